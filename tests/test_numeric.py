"""controller.numeric: the real-time path's cheaper equivalents give numpy's values exactly."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from controller.numeric import median_in_place


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64]),
                  st.tuples(st.integers(1, 401), st.integers(1, 17)),
                  elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)),
       st.sampled_from([0, 1]))
def test_median_in_place_is_numpys_median(x, axis):
    # Used by the spike detector's noise estimate (axis 0: a float32 block, a float64 ring) and the
    # seizure features' channel medians (axis 1): np.median's values exactly, odd and even counts.
    want = np.median(x, axis=axis)
    got = median_in_place(x.copy(), axis=axis)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_median_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        median_in_place(np.zeros((0, 3)))
