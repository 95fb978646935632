"""The acquisition process: real spawned processes, raw recording, events file, SIGKILL tolerance."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from controller.acquisition import RawRecorder, load_raw, load_raw_meta, run_acquisition, start_acquisition
from controller.events import Event, EventKind
from controller.ring import SharedRing

pytestmark = pytest.mark.realtime
FS = 500.0


def test_acquisition_process_fills_ring_records_raw_and_events(tmp_path):
    data = np.random.default_rng(0).normal(0, 50, (int(FS * 1.0), 4)).astype(np.float32)
    data[100:103, 2] = np.nan  # NaN samples must be reported, and recorded as they came
    ring = SharedRing.create(None, 4, 4096, FS)
    events_path = tmp_path / "events.jsonl"
    spec = {"kind": "array", "data": data, "fs_hz": FS, "chunk": 16, "name": "noise"}
    proc, stop_event = start_acquisition(spec, ring.name, events_path, tmp_path / "raw")
    try:
        deadline = time.monotonic() + 10
        while ring.counter < data.shape[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ring.counter == data.shape[0]
        s, ts, end = ring.reader().latest(data.shape[0], copy=True, out=np.empty_like(data),
                                          ts_out=np.empty(data.shape[0]))
        assert np.array_equal(s, data, equal_nan=True)
        time.sleep(0.6)  # let the events buffer (flushed every 0.5 s) reach the file
    finally:
        stop_event.set()
        proc.join(10)
        assert proc.exitcode == 0
        ring.close()
        ring.unlink()
    samples, timestamps = load_raw(tmp_path / "raw")
    assert np.array_equal(samples, data, equal_nan=True)
    assert np.allclose(np.diff(timestamps), 1 / FS)
    meta = load_raw_meta(tmp_path / "raw")
    assert meta["n_channels"] == 4 and meta["fs_hz"] == FS and meta["source"]["name"] == "noise"
    events = [Event.from_dict(json.loads(line)) for line in events_path.read_text().splitlines()]
    whats = [e.data.get("what") for e in events]
    assert whats[0] == "acquisition_started" and whats[-1] == "acquisition_stopped"
    nan_ev = [e for e in events if e.data.get("what") == "nan_samples"]
    assert sum(e.data["n_samples"] for e in nan_ev) == 3


def _record_following(ring, tmp_path):
    """``run_acquisition(follow=...)`` recording ``ring`` into ``tmp_path/raw`` from a thread, as the
    fast path's recording process does: ``(stop, wake_path, thread, out)``, ``out["rc"]`` once it returns."""
    import threading

    from controller.sources import SourceInfo
    from controller.wakeup import make_wakeup
    wake_path = make_wakeup(tmp_path / "wake")
    info = SourceInfo("followed", "EEG", "sid", 4, ("a", "b", "c", "d"), ("microvolts",) * 4, FS)
    stop = mp.get_context("spawn").Event()
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("rc", run_acquisition(
        None, ring.name, stop, str(tmp_path / "events.jsonl"), str(tmp_path / "raw"),
        wakeup_path=str(wake_path), follow=info)))
    th.start()
    return stop, wake_path, th, out


def test_following_a_ring_another_process_writes_records_all_of_it(tmp_path):
    # The spike fast path: the loop writes the ring, the acquisition process only records it, from
    # the ring's first sample (written before it started) to the last (written just before its stop).
    from controller.wakeup import WakeupWriter
    data = np.random.default_rng(3).normal(0, 50, (3000, 4)).astype(np.float32)
    data[1500:1504, 1] = np.nan
    ts = 100.0 + np.arange(3000) / FS
    ring = SharedRing.create(None, 4, 4096, FS)
    ring.write(data[:500], ts[:500])                  # before the recorder exists
    stop, wake_path, th, out = _record_following(ring, tmp_path)
    try:
        writer = WakeupWriter(wake_path)
        for i in range(500, 2990, 10):
            ring.write(data[i:i + 10], ts[i:i + 10])
            writer.notify()
            time.sleep(0.002)
        ring.write(data[2990:], ts[2990:])            # no notify: the stop's last pass must get it
        stop.set()
        th.join(10)
        writer.close()
    finally:
        ring.close()
        ring.unlink()
    assert out["rc"] == 0
    samples, got_ts = load_raw(tmp_path / "raw")
    assert np.array_equal(samples, data, equal_nan=True) and np.array_equal(got_ts, ts)
    assert load_raw_meta(tmp_path / "raw")["source"]["channel_names"] == ["a", "b", "c", "d"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["what"] == "acquisition_started" and events[0]["role"] == "recorder"
    assert sum(e["n_samples"] for e in events if e.get("what") == "nan_samples") == 4
    assert events[-1]["what"] == "acquisition_stopped" and events[-1]["n_recorded"] == 3000


def test_following_without_wakeups_still_records_the_whole_ring(tmp_path):
    # The fast path wakes the recording at most every RECORDING_WAKE_S, and a writer may stop
    # waking it at all: the recording then reads on its own every FOLLOW_WAIT_S. Here the ring
    # wraps three times with no wake-up; a recording that only read when woken (or at the stop)
    # would lose all but the last ring's worth.
    from controller.acquisition import FOLLOW_WAIT_S
    from controller.wakeup import WakeupWriter
    cap, step = 2048, 256
    data = np.random.default_rng(4).normal(0, 50, (3 * cap, 4)).astype(np.float32)
    ts = 10.0 + np.arange(data.shape[0]) / FS
    ring = SharedRing.create(None, 4, cap, FS)
    stop, wake_path, th, out = _record_following(ring, tmp_path)
    writer = WakeupWriter(wake_path)   # opened, never poked
    try:
        for i in range(0, data.shape[0], step):
            ring.write(data[i:i + step], ts[i:i + step])
            time.sleep(FOLLOW_WAIT_S)   # a ring's worth takes 8 of these: the recording reads in between
        stop.set()
        th.join(10)
    finally:
        writer.close()
        ring.close()
        ring.unlink()
    assert out["rc"] == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("kind") == "dropped"], "the recording fell a ring behind"
    samples, got_ts = load_raw(tmp_path / "raw")
    assert np.array_equal(samples, data) and np.array_equal(got_ts, ts)


def test_following_needs_a_wakeup(tmp_path):
    from controller.sources import SourceInfo
    ring = SharedRing.create(None, 4, 4096, FS)
    info = SourceInfo("followed", "EEG", "sid", 4, ("a", "b", "c", "d"), ("microvolts",) * 4, FS)
    try:
        with pytest.raises(ValueError, match="needs wakeup_path"):
            run_acquisition(None, ring.name, mp.get_context("spawn").Event(), str(tmp_path / "events.jsonl"),
                            follow=info)
    finally:
        ring.close()
        ring.unlink()


def test_sigkill_loses_at_most_about_one_second(tmp_path):
    n_total = int(FS * 30)
    k = np.arange(n_total, dtype=np.float32)
    data = np.stack([k, -k], axis=1)  # each row encodes its index
    ring = SharedRing.create(None, 2, 8192, FS)
    proc, stop_event = start_acquisition({"kind": "array", "data": data, "fs_hz": FS, "chunk": 25},
                                         ring.name, tmp_path / "events.jsonl", tmp_path / "raw")
    try:
        time.sleep(2.7)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        n_in_ring = ring.counter
    finally:
        ring.close()
        ring.unlink()
    assert proc.exitcode == -signal.SIGKILL
    samples, timestamps = load_raw(tmp_path / "raw")
    n = samples.shape[0]
    assert n_in_ring > FS * 2
    assert n_in_ring - FS * 1.2 <= n <= n_in_ring  # raw flush every 1 s (+ one loop of slack)
    assert np.array_equal(samples, data[:n])
    assert timestamps.shape == (n,)
    # a torn last record (killed mid-write) is ignored, and a reopened recorder trims it and appends
    with open(tmp_path / "raw" / "samples.f32", "ab") as f:
        f.write(b"\x00\x00\x80")
    s2, _ = load_raw(tmp_path / "raw")
    assert s2.shape[0] == n
    rec = RawRecorder(tmp_path / "raw", 2, FS)
    rec.append(data[n:n + 10], np.arange(n, n + 10) / FS)
    rec.close()
    s3, t3 = load_raw(tmp_path / "raw")
    assert np.array_equal(s3, data[:n + 10]) and t3.shape == (n + 10,)


def test_source_that_cannot_open_is_reported(tmp_path):
    ring = SharedRing.create(None, 2, 64, 100.0)
    try:
        with pytest.raises(RuntimeError, match="not ready"):
            start_acquisition({"kind": "lsl", "name": "stimloop-absent", "resolve_timeout_s": 0.3},
                              ring.name, tmp_path / "events.jsonl", None, ready_timeout_s=20)
    finally:
        ring.close()
        ring.unlink()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["kind"] == str(EventKind.FAULT) and events[0]["what"] == "source_open_failed"
    assert "stimloop-absent" in events[0]["error"]


def test_raw_recorder_flushes_on_the_callers_clock(tmp_path):
    """The simulated runner passes virtual time (from 0 s): timed writes follow that clock, not the
    recorder's own (a monotonic baseline of hours kept virtual-time sessions from flushing until the
    stage filled)."""
    rec = RawRecorder(tmp_path / "raw", 2, FS, flush_s=1.0)
    on_disk = lambda: os.path.getsize(tmp_path / "raw" / "timestamps.f64") // 8  # noqa: E731
    block = np.zeros((50, 2), np.float32)
    rec.append(block, np.arange(50) / FS)
    rec.maybe_flush(0.0)
    assert on_disk() == 50            # the first timed flush writes
    rec.append(block, (50 + np.arange(50)) / FS)
    rec.maybe_flush(0.9)
    assert on_disk() == 50            # not yet: 0.9 s < flush_s
    rec.maybe_flush(1.0)
    assert on_disk() == 100
    rec.close()


def test_raw_recorder_writes_in_small_pieces_between_timed_flushes(tmp_path):
    """About flush_bytes staged go out at once, not a whole flush_s of data in one long write
    that would hold up the acquisition's next pull."""
    rec = RawRecorder(tmp_path / "raw", 2, FS, flush_s=1.0, flush_bytes=16 * 100)   # 100 rows of 4*2 + 8 bytes
    on_disk = lambda: os.path.getsize(tmp_path / "raw" / "timestamps.f64") // 8  # noqa: E731
    rec.maybe_flush(0.0)                 # the first timed flush, nothing staged yet
    block = np.zeros((60, 2), np.float32)
    rec.append(block, np.arange(60) / FS)
    rec.maybe_flush(0.1)
    assert on_disk() == 0                # 60 rows < 100, and 0.1 s < flush_s
    rec.append(block, (60 + np.arange(60)) / FS)
    rec.maybe_flush(0.2)
    assert on_disk() == 120              # 120 rows staged >= 100: written whole, in order
    assert load_raw(tmp_path / "raw")[1].tolist() == (np.arange(120) / FS).tolist()
    rec.close()


@pytest.mark.parametrize("busy_poll, expected", [(False, "nice 5"), (True, "unchanged")])
def test_acquisition_runs_at_the_given_nice_unless_its_source_busy_polls(tmp_path, busy_poll, expected):
    """The process that polls decides (controller.low_latency.nice_for): a raised busy-poller would crowd out
    its core. nice 5 (lowering a priority) is permitted to anyone, so the outcome is known."""
    ring = SharedRing.create(None, 16, 4096, 250.0)
    events_path = tmp_path / "events.jsonl"
    spec = {"kind": "brainflow", "board_id": -1, "params": {}, "busy_poll": busy_poll}   # BrainFlow's synthetic board
    proc, stop_event = start_acquisition(spec, ring.name, events_path, None, nice=5)
    try:
        time.sleep(0.6)   # the start event is flushed at once; let a data flush pass too
    finally:
        stop_event.set()
        proc.join(10)
        ring.close()
        ring.unlink()
    assert proc.exitcode == 0
    started = [json.loads(line) for line in events_path.read_text().splitlines()
               if json.loads(line).get("what") == "acquisition_started"]
    assert [e["nice"] for e in started] == [expected]


def test_nan_samples_read_just_before_the_stop_are_reported(tmp_path):
    """NaN counts go out with the events flush (here: not before a minute); the ones counted since
    the last flush are reported when the acquisition stops, not dropped."""
    data = np.random.default_rng(1).normal(0, 50, (400, 2)).astype(np.float32)
    data[300:303, 1] = np.nan
    ring = SharedRing.create(None, 2, 1024, FS)
    events_path = tmp_path / "events.jsonl"
    spec = {"kind": "array", "data": data, "fs_hz": FS, "chunk": 16, "pace": "none"}
    proc, stop_event = start_acquisition(spec, ring.name, events_path, tmp_path / "raw", events_flush_s=60.0)
    try:
        deadline = time.monotonic() + 10
        while ring.counter < data.shape[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ring.counter == data.shape[0]
    finally:
        stop_event.set()
        proc.join(10)
        ring.close()
        ring.unlink()
    assert proc.exitcode == 0
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    nan_ev = [e for e in events if e.get("what") == "nan_samples"]
    assert sum(e["n_samples"] for e in nan_ev) == 3
    assert [e.get("what") for e in events][-1] == "acquisition_stopped"


FSIZE_LIMIT_BYTES = 16_000


def _limit_file_size(limit_bytes: int) -> None:
    """Files of this process cannot grow past ``limit_bytes``: a full disk, for this process only."""
    import resource
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _torn_flush_then_space_back(raw_dir: str, n_channels: int, limit_bytes: int) -> None:
    import resource
    rec = RawRecorder(raw_dir, n_channels, 100.0, stage_samples=100)
    k = np.arange(100 * n_channels, dtype=np.float32).reshape(100, n_channels)   # every value says where it belongs
    rec.append(k, np.arange(100) / 100.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    _limit_file_size(limit_bytes)
    try:
        rec.flush()
    except OSError:
        pass
    else:
        raise AssertionError("the flush did not fail")
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))   # space is back: the stage is written again
    rec.close()


@pytest.mark.parametrize("n_channels, limit_bytes", [(4, 1000),   # torn inside samples.f32 (1600 bytes)
                                                     (1, 600)])   # samples whole (400), timestamps.f64 torn (800)
def test_a_write_that_fails_partway_leaves_no_torn_or_repeated_row(tmp_path, n_channels, limit_bytes):
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_torn_flush_then_space_back, args=(str(tmp_path), n_channels, limit_bytes))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    samples, timestamps = load_raw(tmp_path)
    expect = np.arange(100 * n_channels, dtype=np.float32).reshape(100, n_channels)
    assert np.array_equal(samples, expect) and np.array_equal(timestamps, np.arange(100) / 100.0)


def _acquire_until_the_disk_fills(spec: dict, ring_name: str, events_path: str, raw_dir: str, stop_event) -> None:
    _limit_file_size(FSIZE_LIMIT_BYTES)
    try:
        run_acquisition(spec, ring_name, stop_event, events_path, raw_dir, events_flush_s=60.0)
    except OSError:
        return
    raise AssertionError("the acquisition did not fail")


def test_a_recording_that_fails_mid_session_reports_its_nan_samples_and_keeps_whole_rows(tmp_path):
    """Disk full mid-session: the acquisition fails (reported), the NaN samples it read are still
    reported, and what is on disk is whole rows, each the row that was read."""
    data = np.random.default_rng(2).normal(0, 50, (2000, 4)).astype(np.float32)   # 32 000 bytes of samples
    data[900:905, 1] = np.nan   # read before the write that crosses the limit (row 1000 on)
    ring = SharedRing.create(None, 4, 4096, FS)
    events_path = tmp_path / "events.jsonl"
    spec = {"kind": "array", "data": data, "fs_hz": FS, "chunk": 16, "pace": "none"}
    ctx = mp.get_context("spawn")
    stop_event = ctx.Event()
    p = ctx.Process(target=_acquire_until_the_disk_fills,
                    args=(spec, ring.name, str(events_path), str(tmp_path / "raw"), stop_event))
    p.start()
    try:
        p.join(30)
    finally:
        stop_event.set()
        p.join(10)
        ring.close()
        ring.unlink()
    assert p.exitcode == 0
    events = [json.loads(line) for line in events_path.read_text().splitlines()]
    whats = [e.get("what") for e in events]
    assert "acquisition_crashed" in whats
    assert sum(e["n_samples"] for e in events if e.get("what") == "nan_samples") == 5
    samples, timestamps = load_raw(tmp_path / "raw")
    n = samples.shape[0]
    assert 0 < n < 1000 and timestamps.shape == (n,)
    assert np.array_equal(samples, data[:n])
    assert os.path.getsize(tmp_path / "raw" / "samples.f32") == n * 4 * 4   # nothing torn left behind
