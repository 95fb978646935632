"""count_gaps: lost samples from timestamp steps (the no-gap fast path agrees with the plain definition)."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.sources.base import count_gaps


def reference(ts, previous_t, fs_hz, gap_factor=1.5):
    """The definition, written out step by step."""
    if fs_hz <= 0 or len(ts) == 0:
        return 0, 0, math.nan
    prev = ts[0] if previous_t is None else previous_t
    n_gaps = n_lost = 0
    t_first = math.nan
    for t in ts:
        step = t - prev
        if step > gap_factor / fs_hz:
            n_gaps += 1
            n_lost += int(np.rint(step * fs_hz)) - 1
            if math.isnan(t_first):
                t_first = float(t)
        prev = t
    return n_gaps, n_lost, t_first


def same(a, b):
    return a[:2] == b[:2] and (a[2] == b[2] or (math.isnan(a[2]) and math.isnan(b[2])))


def test_regular_chunks_have_no_gap_and_a_hole_is_counted():
    fs = 1000.0
    ts = 10.0 + np.arange(8) / fs
    assert same(count_gaps(ts, 10.0 - 1 / fs, fs), (0, 0, math.nan))
    assert same(count_gaps(ts[:1], 10.0 - 1 / fs, fs), (0, 0, math.nan))
    holed = np.delete(ts, [3, 4])                     # two samples lost before ts[5]
    assert same(count_gaps(holed, None, fs), (1, 2, float(ts[5])))
    assert same(count_gaps(ts[:1], 10.0 - 4 / fs, fs), (1, 3, float(ts[0])))   # across the chunk boundary


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.one_of(st.floats(0.0, 0.01), st.floats(0.0, 0.2), st.just(math.nan)), min_size=0, max_size=20),
       start=st.floats(0.0, 1e5), prev_gap=st.one_of(st.none(), st.floats(0.0, 0.1), st.just(math.nan)),
       fs=st.sampled_from([0.0, 256.0, 1000.0, 30000.0]))
def test_agrees_with_the_definition(steps, start, prev_gap, fs):
    ts = start + np.cumsum(np.asarray(steps, float)) if steps else np.empty(0)
    prev = None if prev_gap is None else (start - prev_gap)
    assert same(count_gaps(ts, prev, fs), reference(list(ts), prev, fs))
