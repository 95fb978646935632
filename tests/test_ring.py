"""SharedRing: wrap-around, overrun, attach across processes, no torn reads under a concurrent writer."""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from controller.ring import Overrun, RingError, SharedRing

SPLIT = 1 << 20  # float32 holds integers exactly up to 2**24: encode the counter in two channels


def pattern(start: int, n: int, n_ch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Rows that encode their own counter: (lo, hi, lo+0.5, -lo) so any torn or shifted row is visible."""
    k = np.arange(start, start + n, dtype=np.int64)
    x = np.empty((n, n_ch), np.float32)
    x[:, 0] = k % SPLIT
    x[:, 1] = k // SPLIT
    x[:, 2] = (k % SPLIT) + 0.5
    x[:, 3] = -(k % SPLIT)
    return x, k.astype(np.float64)


def check_rows(samples: np.ndarray, ts: np.ndarray, start: int) -> bool:
    expect, expect_ts = pattern(start, samples.shape[0], samples.shape[1])
    return bool(np.array_equal(samples, expect) and np.array_equal(ts, expect_ts))


@pytest.fixture
def ring():
    r = SharedRing.create(None, 4, 64, 250.0)
    yield r
    r.close()
    r.unlink()


def test_write_read_wraparound_in_order(ring):
    reader = ring.reader("oldest")
    k = 0
    seen = 0
    for n in [5, 30, 17, 60, 1, 64, 13, 40] * 3:  # chunk sizes that straddle the end of the ring
        x, t = pattern(k, n)
        ring.write(x, t)
        k += n
        res = reader.read_new()
        assert res.start == seen and check_rows(res.samples, res.timestamps, res.start)
        seen = res.end
    assert ring.counter == k == seen
    assert reader.available() == 0


def test_latest_view_when_contiguous_copy_when_wrapped(ring):
    reader = ring.reader("now", max_read=64)
    x, t = pattern(0, 50)
    ring.write(x, t)
    s, ts, end = reader.latest(20)
    assert end == 50 and check_rows(s, ts, 30)
    assert np.shares_memory(s, ring.samples)  # zero-copy
    assert reader.valid(end - 20)
    x, t = pattern(50, 30)  # now the last 20 rows wrap around slot 63 -> 0
    ring.write(x, t)
    s, ts, end = reader.latest(20)
    assert end == 80 and check_rows(s, ts, 60)
    assert not np.shares_memory(s, ring.samples)
    out, ts_out = np.empty((20, 4), np.float32), np.empty(20)
    s2, ts2, _ = reader.latest(20, out=out, ts_out=ts_out)
    assert s2.base is out or s2 is out
    assert check_rows(s2, ts2, 60)
    # fewer samples than asked for exist only at the start
    r2 = SharedRing.create(None, 4, 16, 0.0)
    try:
        r2.write(*pattern(0, 3))
        s, ts, end = r2.reader().latest(10)
        assert s.shape == (3, 4) and end == 3
    finally:
        r2.close()
        r2.unlink()


def test_overrun_reports_lost_samples_and_resumes(ring):
    reader = ring.reader("oldest")
    ring.write(*pattern(0, 10))
    assert reader.read_new(4).end == 4
    for k in range(10, 110, 20):  # 100 more: the reader at 4 is lapped (capacity 64)
        ring.write(*pattern(k, 20))
    with pytest.raises(Overrun) as exc:
        reader.read_new()
    assert exc.value.lost == (110 - 64) - 4
    assert exc.value.resume_counter == 110 - 64
    res = reader.read_new()
    assert res.start == 46 and res.end == 110 and check_rows(res.samples, res.timestamps, 46)
    # a zero-copy view becomes invalid once the writer laps it
    s, ts, end = reader.latest(10)
    assert reader.valid(end - 10)
    ring.write(*pattern(110, 60))
    assert not reader.valid(end - 10)


def test_bad_input_is_refused_with_clear_message(ring):
    with pytest.raises(ValueError, match=r"samples shape \(5, 3\): expected \(n, 4\)"):
        ring.write(np.zeros((5, 3), np.float32), np.zeros(5))
    with pytest.raises(ValueError, match="timestamps shape"):
        ring.write(np.zeros((5, 4), np.float32), np.zeros(4))
    with pytest.raises(ValueError, match="exceeds ring capacity 64"):
        ring.write(np.zeros((65, 4), np.float32), np.zeros(65))
    with pytest.raises(ValueError, match="n_channels=0"):
        SharedRing.create(None, 0, 10, 100.0)
    with pytest.raises(ValueError, match="capacity=1"):
        SharedRing.create(None, 2, 1, 100.0)
    with pytest.raises(RingError, match="no shared-memory ring named 'stimloop-does-not-exist'"):
        SharedRing.attach("stimloop-does-not-exist")
    with pytest.raises(ValueError, match="n=0"):
        ring.reader().latest(0)


# ----------------------------------------------------------------- across processes
def _child_attach_and_read(name: str, q) -> None:
    ring = SharedRing.attach(name)
    s, ts, end = ring.reader().latest(10, copy=True)
    q.put((end, s.copy(), ts.copy(), ring.n_channels, ring.capacity, ring.fs_hz))
    ring.close()


def test_attach_from_another_process_and_segment_survives_its_exit(ring):
    ring.write(*pattern(0, 40))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_attach_and_read, args=(ring.name, q))
    p.start()
    end, s, ts, n_ch, cap, fs = q.get(timeout=30)
    p.join(30)
    assert p.exitcode == 0
    assert (end, n_ch, cap, fs) == (40, 4, 64, 250.0)
    assert check_rows(s, ts, 30)
    # cpython#82300: an attaching process must not unlink the segment when it exits
    again = SharedRing.attach(ring.name)
    assert again.counter == 40
    again.close()


def _writer_process(name: str, total: int, max_chunk: int, go) -> None:
    ring = SharedRing.attach(name)
    rng = np.random.default_rng(1)
    go.wait(30)
    k = 0
    while k < total:
        n = int(rng.integers(1, max_chunk + 1))
        ring.write(*pattern(k, n))
        k += n
    ring.close()


@pytest.mark.realtime
def test_concurrent_writer_never_yields_torn_rows():
    """A writer process laps a small ring as fast as it can; every row a reader accepts must be intact."""
    ring = SharedRing.create(None, 4, 512, 1000.0)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    total = 3_000_000
    p = ctx.Process(target=_writer_process, args=(ring.name, total, 48, go))
    p.start()
    try:
        seq = ring.reader("oldest", max_read=128)
        win = ring.reader("now", max_read=256)
        n_ok_rows = n_overruns = n_lost = n_latest_ok = n_latest_invalid = 0
        go.set()
        deadline = time.monotonic() + 20
        k = 0
        while p.is_alive() and time.monotonic() < deadline:
            k += 1
            if k % 256 == 0:
                # Fall behind now and then, so the writer surely laps the reader (a fast reader on an
                # idle machine otherwise keeps up and the overrun path goes untested).
                time.sleep(0.002)
            try:
                res = seq.read_new(128, copy=True)  # copies are validated by read_new itself
                assert check_rows(res.samples, res.timestamps, res.start), f"torn copy at {res.start}"
                n_ok_rows += res.samples.shape[0]
            except Overrun as exc:
                n_overruns += 1
                n_lost += exc.lost
            try:
                s, ts, end = win.latest(200)  # zero-copy when contiguous: validate after use
                intact = check_rows(s, ts, end - s.shape[0])
                if win.valid(end - s.shape[0]):
                    assert intact, f"view reported valid but torn at {end}"
                    n_latest_ok += 1
                else:
                    n_latest_invalid += 1
            except Overrun:
                n_latest_invalid += 1
        p.join(30)
        assert p.exitcode == 0
        print(dict(rows=n_ok_rows, overruns=n_overruns, lost=n_lost, latest_ok=n_latest_ok, latest_invalid=n_latest_invalid))
        assert n_ok_rows > 1000 and n_latest_ok > 10
        assert n_overruns > 0 and n_lost > 0  # the writer really did lap the reader
        assert seq.cursor <= ring.counter and ring.counter >= total
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        ring.close()
        ring.unlink()
