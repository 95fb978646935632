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
    assert "saturation" in events[0].data["reason"] and "channel(s) 1 " in events[0].data["reason"]
    assert t[2000] < events[0].t <= t[2016]


def test_flat_zero_channel_is_a_fault_and_its_samples_are_left_out():
    # A detached electrode reads a flat zero on many amplifiers: fed to the filters, those
    # windows would drag the seizure model's running baseline down for minutes.
    x, t = _stream(4096)
    x[1000:3000, 3] = 0.0
    q, events, kept = _run(_chunks(x, t))
    assert [e.data.get("what") for e in events] == ["bad_data", "data_clean"]
    assert "channel(s) 3 " in events[0].data["reason"] and "electrode off" in events[0].data["reason"]
    assert t[1000] < events[0].t <= t[1016]
    assert events[1].t >= t[2999] + 1.0
    assert len(kept) == 4096 - (2000 - 15)   # the first 15 zeros are not yet a run


def test_a_nan_burst_is_not_also_reported_as_a_stuck_channel():
    x, t = _stream(4096)
    x[1000:1100, 2] = np.nan
    _, events, _ = _run(_chunks(x, t))
    assert events[0].data["reason"] == "bad samples: non-finite samples"


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


def test_a_host_stamped_sources_jitter_is_no_gap_under_its_own_gap_factor():
    """BrainFlow stamps samples as its reader thread gets them: steps of 2.2 periods with nothing lost
    (the late sample's successor comes early). Under the default 1.5 these invalidated windows a
    BrainFlow session should have acted on; under the source's 2.5 they do not, and a real loss of
    two samples (3 periods) still does."""
    from controller.sources.base import GAP_FACTOR, HOST_STAMPED_GAP_FACTOR, gap_factor_for

    x, t = _stream(2048)
    jitter = t.copy()
    jitter[999] -= 0.6 / FS             # one sample stamped early, the next late: steps of 0.4, 2.2, 0.4
    jitter[1000] += 0.6 / FS
    for factor, invalid in ((GAP_FACTOR, True), (HOST_STAMPED_GAP_FACTOR, False)):
        q, events = DataQuality(FS, 4, window_s=1.0, gap_factor=factor), []
        for xc, tc in _chunks(x, jitter):
            q.check(xc, tc, events)
        assert (q.invalid_until_t > 0) is invalid, factor
    lost = np.r_[t[:1000], t[1002:]]     # two samples really missing: a 3-period step
    q, events = DataQuality(FS, 4, window_s=1.0, gap_factor=HOST_STAMPED_GAP_FACTOR), []
    for xc, tc in _chunks(x[:lost.size], lost):
        q.check(xc, tc, events)
    assert q.invalid_until_t >= lost[1000] + 1.0 - 1 / FS
    assert (gap_factor_for("brainflow"), gap_factor_for("lsl"), gap_factor_for("hil")) == (2.5, 1.5, 1.5)


def test_the_loop_checks_with_its_sources_gap_factor():
    from controller.closed_loop import SeizureLoop
    from controller.config import parse_config

    for kind, factor in (("brainflow", 2.5), ("lsl", 1.5), ("hil", 1.5)):
        loop = SeizureLoop.from_config(parse_config({"source": {"kind": kind}}), 250.0, 4)
        loop.windows(np.zeros((8, 4), np.float32) + np.arange(8)[:, None], np.arange(8) / 250.0, [])
        assert loop.gap_factor == factor and loop.quality.gap_s == factor / 250.0


# --- the shortcut for plainly clean chunks decides exactly as the full check --------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TROUBLE = st.sampled_from(["none", "none", "none", "nan", "inf", "stuck", "zeros", "repeat_boundary",
                            "backwards", "gap", "duplicate_t", "blank", "huge"])


@st.composite
def _chunk_plans(draw):
    return draw(st.lists(st.tuples(st.integers(1, 12), _TROUBLE), min_size=1, max_size=40)), draw(st.integers(0, 99))


def _apply(plan, seed):
    """Chunks (x, t, blank-or-None) from a plan of (size, trouble) steps on a 512 Hz, 3-channel stream."""
    rng = np.random.default_rng(seed)
    out, k, prev_last = [], 0, None
    for size, trouble in plan:
        x = rng.normal(0, 20, (size, 3)).astype(np.float32)
        t = (k + np.arange(size)) / FS
        k += size
        blank = None
        i = int(rng.integers(size))
        if trouble == "nan":
            x[i, int(rng.integers(3))] = np.nan
        elif trouble == "inf":
            x[i, 0] = -np.inf
        elif trouble == "stuck":
            x[:, 1] = 123.0                       # a run that may carry on into the next chunks
        elif trouble == "zeros":
            x[:, 2] = 0.0                         # a flat zero (electrode off) is stuck too
        elif trouble == "repeat_boundary" and prev_last is not None:
            x[0, 0] = prev_last[0]
        elif trouble == "backwards":
            t[i:] -= 5 / FS
        elif trouble == "gap":
            t[i:] += 3 / FS
            k += 3
        elif trouble == "duplicate_t" and size > 1:
            t[i] = t[i - 1] if i else t[i]
        elif trouble == "blank":
            blank = (float(t[0]) + 0.3 / FS, float(t[-1]) + 40 / FS)
        elif trouble == "huge":
            x[i, 0] = 3e38                        # finite extremes are data, not a fault
            x[i, 1] = 3e38
        prev_last = x[-1].copy()
        out.append((x, t, blank))
    return out


def _trace(q, chunks):
    trace = []
    for x, t, blank in chunks:
        if blank is not None:
            q.blank(*blank)
        events = []
        x2, t2 = q.check(x, t, events)
        trace.append((x2.tobytes(), t2.tobytes(), [(e.t, e.kind, e.source, e.data) for e in events],
                      q.invalid_until_t, q.in_bad_run, q._fault_clear_t, q._run.tolist(),
                      q._last_row.tobytes(), q._last_t))
    return trace


@settings(max_examples=300, deadline=None)
@given(_chunk_plans())
def test_clean_chunk_shortcut_matches_the_full_check(plan_seed):
    plan, seed = plan_seed
    chunks = _apply(plan, seed)
    fast = DataQuality(FS, 3, window_s=0.05, saturation_run=4)
    full = DataQuality(FS, 3, window_s=0.05, saturation_run=4)
    full._plainly_clean = lambda chunk, ts: False   # the definition: every chunk through the full check
    assert _trace(fast, chunks) == _trace(full, chunks)


def test_shortcut_is_taken_for_a_clean_stream_and_not_for_trouble():
    q = DataQuality(FS, 4, window_s=1.0)
    x, t = _stream(64)
    assert q._plainly_clean(x[:8], t[:8])
    q.check(x[:8], t[:8], [])
    assert q._plainly_clean(x[8:16], t[8:16])
    bad = x[8:16].copy()
    bad[3, 1] = np.nan
    assert not q._plainly_clean(bad, t[8:16])
    assert not q._plainly_clean(x[8:16], t[8:16] + 2 / FS)        # gap from the previous chunk
    q.blank(float(t[10]), float(t[12]))
    assert not q._plainly_clean(x[8:16], t[8:16])
