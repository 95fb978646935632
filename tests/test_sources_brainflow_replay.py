"""BrainFlow synthetic board and array/file replay into the ring."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat

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


def test_brainflow_bad_arguments():
    with pytest.raises(ValueError, match="not BrainFlowInputParams fields"):
        BrainFlowSource(-1, {"serial_prt": "/dev/x"})
    with pytest.raises(ValueError, match="busy_poll=1"):
        BrainFlowSource(-1, busy_poll=1)
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
