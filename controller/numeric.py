"""Small numeric helpers for the real-time path (functional core: no I/O, no clock).

Here is what numpy does correctly but too slowly for a loop that has a millisecond:
the same values, fewer calls.
"""
from __future__ import annotations

import numpy as np

__all__ = ["median_in_place"]


def median_in_place(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.median(x, axis=axis)`` of finite ``x``, the same values, reordering ``x`` in place.

    ``np.median`` costs 13–15 µs on a small array with warm caches (a (300, 2) noise block, a
    (13, 16) feature table) and three times that cold; one ``partition`` in place takes ~5
    (2-core CI VM). The median of an even count is the mean of the two middle values, as
    ``np.median`` computes it. NaN is not handled: the real-time path leaves non-finite
    samples out before they reach a statistic (controller.data_quality).
    """
    n = x.shape[axis]
    if n < 1:
        raise ValueError(f"median of an empty axis {axis} (shape {x.shape})")
    h = n // 2
    if n % 2:
        x.partition(h, axis=axis)
        return np.take(x, h, axis=axis)
    x.partition((h - 1, h), axis=axis)
    return (np.take(x, h - 1, axis=axis) + np.take(x, h, axis=axis)) / 2
