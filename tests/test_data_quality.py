"""Bad input in the stream: NaN, saturation, clock jumps, gaps — detected, reported, never acted on."""
import numpy as np

from controller.data_quality import DataQuality

FS = 512.0


def _run(chunks):
    q, events, kept = DataQuality(FS, 4, window_s=1.0), [], []
    for x, t in chunks:
        x2, t2 = q.check(x, t, events)
        kept.append(t2)
    return q, events, np.concatenate(kept)


def _stream(n, start=0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 20, (n, 4)).astype(np.float32)
    t = (start + np.arange(n)) / FS
    return x, t


def _chunks(x, t, size=8):
    return [(x[i:i + size], t[i:i + size]) for i in range(0, len(t), size)]


def test_clean_stream_raises_nothing():
    x, t = _stream(4096)
    q, events, kept = _run(_chunks(x, t))
    assert events == [] and not q.in_bad_run and len(kept) == 4096


def test_nan_burst_faults_drops_rows_then_clears_after_a_window():
    x, t = _stream(4096)
    x[1000:1100, 2] = np.nan
    q, events, kept = _run(_chunks(x, t))
    kinds = [(e.kind.value, e.data.get("what")) for e in events]
    assert kinds == [("fault", "bad_data"), ("status", "data_clean")]
    assert events[0].t == t[1000] and "non-finite" in events[0].data["reason"]
    assert events[1].t >= t[1099] + 1.0  # clean for a whole window before release
    assert len(kept) == 4096 - 100 and np.isfinite(kept).all()
    assert q.invalid_until_t >= t[1099] + 1.0


def test_saturation_detected_across_chunk_boundaries():
    x, t = _stream(4096)
    x[2000:2100, 1] = 3200.0  # rail
    q, events, _ = _run(_chunks(x, t, size=5))  # runs straddle chunks
    assert [e.data.get("what") for e in events] == ["bad_data", "data_clean"]
    assert "saturation" in events[0].data["reason"]
    assert t[2000] < events[0].t <= t[2016]


def test_backward_clock_jump_is_a_fault_and_gap_invalidates_windows():
    x, t = _stream(2048)
    t2 = t.copy()
    t2[1024:] -= 0.5  # clock jumps back
    q, events, _ = _run(_chunks(x, t2))
    assert events and "backwards" in events[0].data["reason"]
    x, t = _stream(2048)
    t3 = t.copy()
    t3[1024:] += 0.2  # 100 samples lost
    q, events, _ = _run(_chunks(x, t3))
    assert events == [] and q.invalid_until_t >= t3[1024] - 1 / FS + 1.0
