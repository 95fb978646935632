"""BrainFlow synthetic board and array/file replay into the ring."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.io import loadmat

from controller.events import EventKind
from controller.ring import SharedRing
from controller.sources import SourceError, build_source
from controller.sources.brainflow_source import BrainFlowSource
from controller.sources.replay import ArraySource

from shared_data import DELHI  # noqa: E402


@pytest.mark.realtime
@pytest.mark.parametrize("busy_poll", [False, True])
def test_brainflow_synthetic_board_reads_into_ring(busy_poll):
    import pylsl
    src = build_source({"kind": "brainflow", "board_id": -1, "params": {}, "busy_poll": busy_poll})
    info = src.open()
    ring = SharedRing.create(None, info.n_channels, 2048, info.fs_hz)
    try:
        # REFERENCE.md §8: synthetic board = 250 Hz, 16 EXG channels
        assert (info.n_channels, info.fs_hz) == (16, 250.0)
        assert info.channel_names[0] == "Fz"
        assert info.units == ("uV",) * 16 and info.describe_units() == "in µV"   # EXG rows: BrainFlow's µV
        # host-stamped: the jitter tolerance the loop and the export take over (meta.json "source")
        assert info.gap_factor == 2.5 and info.to_dict()["gap_factor"] == 2.5
        reader = ring.reader("oldest")
        t_end = time.monotonic() + 1.2
        while time.monotonic() < t_end:
            src.read_into(ring)
        res = reader.read_new(copy=True)
        assert 200 <= res.samples.shape[0] <= 400
        assert np.isfinite(res.samples).all() and res.samples.std() > 0
        steps = np.diff(res.timestamps)
        assert (steps > 0).all() and abs(np.median(steps) - 1 / 250) < 5e-4
        # timestamps are on the session clock (board wall-clock stamps mapped to local_clock)
        assert abs(res.timestamps[-1] - pylsl.local_clock()) < 0.5
    finally:
        src.close()
        ring.close()
        ring.unlink()


@pytest.mark.realtime
def test_a_closed_board_object_dying_late_does_not_end_a_newer_session():
    """BoardShim.__del__ releases whatever session has its board id and params; a closed source's
    board object collected during a newer source's session (same board) must not release it."""
    import gc
    old = build_source({"kind": "brainflow", "board_id": -1, "params": {}})
    old.open()
    stale = old._board   # held, as BrainFlow's kept frames hold it, until after the next open
    old.close()
    new = build_source({"kind": "brainflow", "board_id": -1, "params": {}, "busy_poll": True})
    info = new.open()
    ring = SharedRing.create(None, info.n_channels, 2048, info.fs_hz)
    try:
        del stale
        gc.collect()
        t_end = time.monotonic() + 0.3
        n = 0
        while time.monotonic() < t_end:
            n += new.read_into(ring)
        assert n > 0 and new._board.is_prepared()
    finally:
        new.close()
        ring.close()
        ring.unlink()


def _pump(src, ring, seconds, until=None):
    events, n = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n += src.read_into(ring)
        events += src.drain_events()
        if until is not None and until(events):
            break
    return n, events


@pytest.mark.realtime
def test_a_board_that_stops_delivering_is_reported_lost_once_then_recovered():
    """BrainFlow raises nothing when a board goes quiet (unplugged, firmware hang): the source says so
    after stall_timeout_s, once per stall, and says when data is back (as LslSource does)."""
    src = build_source({"kind": "brainflow", "board_id": -1, "params": {}, "stall_timeout_s": 0.3})
    info = src.open()
    ring = SharedRing.create(None, info.n_channels, 4096, info.fs_hz)
    try:
        n, events = _pump(src, ring, 0.4)
        assert n > 0 and not events
        src._board.stop_stream()   # the real board stops delivering underneath the source
        n, events = _pump(src, ring, 1.2)   # four stall timeouts: still one report
        assert n == 0
        assert [(e.kind, e.data["what"], e.data["reason"]) for e in events] == [
            (EventKind.FAULT, "stream_lost", "stall")]
        src._board.start_stream(45_000)
        n, events = _pump(src, ring, 3.0, until=lambda ev: any(e.data.get("what") == "stream_recovered" for e in ev))
        assert n > 0
        back = [e for e in events if e.data.get("what") == "stream_recovered"]
        assert len(back) == 1 and back[0].kind is EventKind.STATUS and back[0].data["outage_s"] > 0.3
        assert not [e for e in events if e.kind is EventKind.FAULT]
    finally:
        src.close()
        ring.close()
        ring.unlink()


@pytest.mark.realtime
def test_a_board_that_fails_to_start_streaming_is_released_and_opens_again():
    """start_stream failing after prepare_session (here: a buffer over BrainFlow's 21.6 M-sample limit)
    must not keep the board prepared: the next open of the same board would fail."""
    with pytest.raises(SourceError, match="INVALID_BUFFER_SIZE") as first:
        BrainFlowSource(-1, ring_buffer_samples=21_600_001).open()
    # first's traceback still holds open()'s frame and its BoardShim, as a caller keeping the error does
    src = BrainFlowSource(-1)
    info = src.open()
    ring = SharedRing.create(None, info.n_channels, 4096, info.fs_hz)
    try:
        n, _ = _pump(src, ring, 0.3)
        assert n > 0 and first.value is not None
    finally:
        src.close()
        ring.close()
        ring.unlink()


@pytest.mark.realtime
def test_an_open_that_finds_the_board_taken_leaves_the_holder_streaming():
    """A second source on a board another one holds is refused, and its board object, collected
    later, must not release the holder's session (BoardShim.__del__ releases by board id and params)."""
    import gc
    holder = BrainFlowSource(-1)
    info = holder.open()
    ring = SharedRing.create(None, info.n_channels, 4096, info.fs_hz)
    try:
        with pytest.raises(SourceError, match="ANOTHER_BOARD_IS_CREATED"):
            BrainFlowSource(-1).open()
        gc.collect()
        time.sleep(0.05)
        n, _ = _pump(holder, ring, 0.3)
        assert n > 0 and holder._board.is_prepared()
    finally:
        holder.close()
        ring.close()
        ring.unlink()


def test_brainflow_bad_arguments():
    with pytest.raises(ValueError, match="not BrainFlowInputParams fields"):
        BrainFlowSource(-1, {"serial_prt": "/dev/x"})
    with pytest.raises(ValueError, match="busy_poll=1"):
        BrainFlowSource(-1, busy_poll=1)
    with pytest.raises(ValueError, match="ring_buffer_samples=0: expected an integer >= 1"):
        BrainFlowSource(-1, ring_buffer_samples=0)
    with pytest.raises(ValueError, match="stall_timeout_s=0"):
        BrainFlowSource(-1, stall_timeout_s=0)
    with pytest.raises(ValueError, match="channels='abc'"):
        BrainFlowSource(-1, channels="abc").open()
    with pytest.raises(SourceError, match="board 424242"):
        BrainFlowSource(424242).open()


def test_ring_channel_mismatch_is_a_clear_error():
    src = ArraySource(np.zeros((100, 2)), 100.0, pace="none", t0=0.0)
    src.open()
    ring = SharedRing.create(None, 3, 64, 100.0)
    try:
        with pytest.raises(SourceError, match="n_channels=3.*delivers 2"):
            src.read_into(ring)
    finally:
        ring.close()
        ring.unlink()


def test_replay_real_delhi_eeg_file_exactly():
    path = DELHI / "ictal" / sorted(p.name for p in (DELHI / "ictal").glob("*.mat"))[0]
    expect = loadmat(path)["ictal"].astype(np.float32).reshape(-1, 1)
    src = ArraySource.from_file(path, fs_hz=200.0, pace="none", chunk=100, t0=10.0)
    info = src.open()
    ring = SharedRing.create(None, info.n_channels, 4096, info.fs_hz)
    try:
        reader = ring.reader("oldest")
        while not src.exhausted:
            src.read_into(ring)
        res = reader.read_new(copy=True)
        assert np.array_equal(res.samples, expect)  # 1024 samples, bit-exact
        assert np.allclose(res.timestamps, 10.0 + np.arange(1024) / 200.0)
    finally:
        ring.close()
        ring.unlink()


def test_looped_replay_with_a_chunk_longer_than_the_data_writes_whole_chunks():
    """A looped chunk may wrap more than once: it is written whole, in one write, and the timeline goes on."""
    src = ArraySource(np.arange(10, dtype=np.float32), 100.0, pace="none", chunk=32, loop=True, t0=0.0)
    src.open()
    ring = SharedRing.create(None, 1, 256, 100.0)
    try:
        assert [src.read_into(ring) for _ in range(3)] == [32, 32, 32]
        s, ts, end = ring.reader().latest(96, copy=True)
        assert end == 96
        assert np.array_equal(s[:, 0], np.arange(96) % 10)
        assert np.allclose(ts, np.arange(96) / 100.0)
    finally:
        ring.close()
        ring.unlink()


def test_replay_loop_continues_the_timeline():
    data = np.arange(10, dtype=np.float32)
    src = ArraySource(data, 100.0, pace="none", chunk=7, loop=True, t0=0.0)
    src.open()
    ring = SharedRing.create(None, 1, 64, 100.0)
    try:
        for _ in range(4):
            src.read_into(ring)
        s, ts, end = ring.reader().latest(28, copy=True)
        assert end == 28
        assert np.array_equal(s[:, 0], np.arange(28) % 10)
        assert np.allclose(ts, np.arange(28) / 100.0)
    finally:
        ring.close()
        ring.unlink()


def test_a_sessions_stall_timeout_reaches_the_brainflow_source_it_builds():
    from controller.config import parse_config
    from controller.runners.realtime import source_spec
    from controller.sources import build_source
    cfg = parse_config({"source": {"kind": "brainflow", "board_id": -1, "stall_timeout_s": 3.5}})
    assert build_source(source_spec(cfg)).stall_timeout_s == 3.5   # built, not opened


@pytest.mark.realtime
def test_a_brainflow_row_outside_the_exg_channels_is_not_called_microvolts():
    """The synthetic board's row 17 is an accelerometer (g): left undeclared, and said so at start-up."""
    from controller.sources.brainflow_source import BrainFlowSource
    src = BrainFlowSource(-1, channels=[1, 17])
    try:
        info = src.open()
        assert info.units == ("uV", "")
        assert info.describe_units().startswith("1 of 2 channel(s) declare no unit: taken as µV")
    finally:
        src.close()
