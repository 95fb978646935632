"""Causal streaming polyphase resampler with carried state.

The controller feeds any source rate (100, 173.61, 200, 256, 512 Hz, ...) to a
model's declared rate. The design follows ``scipy.signal.resample_poly``
(Kaiser-windowed FIR anti-alias filter on the up-sampled grid, ``up/down``
rational factors), but runs causally on chunks: the input history the filter
needs is kept between calls, so chunked output equals one-shot output sample
for sample. Non-integer rates are approximated by the closest ratio with
both factors <= ``max_factor`` (173.61 -> 256 Hz gives 59/40, 0.03 % rate
error); ``fs_out_actual_hz`` and ``rate_error`` say what was chosen.

Functional core: no I/O, no clock. Per chunk the work is one gather and one
``einsum`` (no per-sample Python loop).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy import signal

__all__ = ["StreamResampler", "rational_ratio"]


#: Largest factor of an exact ratio: amplifiers' usual rates reach the models' 256 Hz only through
#: large exact ones (2000 -> 256 is 16/125, 30000 -> 256 is 32/3750); the FIR grows with the
#: factor (20 taps per unit), which stays affordable at 256 Hz out.
MAX_EXACT_FACTOR = 4096


def rational_ratio(fs_in_hz: float, fs_out_hz: float, max_factor: int = 64) -> tuple[int, int]:
    """Best ``(up, down)`` with fs_in*up/down ≈ fs_out.

    An exact ratio with both factors <= ``max(max_factor, MAX_EXACT_FACTOR)`` is
    taken first (200 -> 256 gives 32/25, 2000 -> 256 gives 16/125); otherwise the
    ratio with both factors <= ``max_factor`` and the smallest relative error wins
    (ties: smallest factors).
    """
    if not (fs_in_hz > 0 and fs_out_hz > 0):
        raise ValueError(f"sample rates must be > 0, got fs_in_hz={fs_in_hz}, fs_out_hz={fs_out_hz}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    exact = Fraction(str(fs_out_hz)) / Fraction(str(fs_in_hz))
    if max(exact.numerator, exact.denominator) <= max(max_factor, MAX_EXACT_FACTOR):
        return exact.numerator, exact.denominator
    ratio = fs_out_hz / fs_in_hz
    best = (np.inf, 1, 1)
    for down in range(1, max_factor + 1):
        up = int(round(down * ratio))
        if 1 <= up <= max_factor:
            err = abs(up / down - ratio) / ratio
            if err < best[0] - 1e-15:
                best = (err, up, down)
    if not np.isfinite(best[0]):
        raise ValueError(f"no ratio with factors <= {max_factor} for {fs_in_hz} -> {fs_out_hz} Hz")
    return best[1], best[2]


class StreamResampler:
    """Resample ``(n, ch)`` chunks from ``fs_in`` to ~``fs_out`` causally, keeping state.

    ``process(chunk)`` returns ``(y, src_idx)``: the output block ``(m, ch)``
    float64 and, for each output sample, the absolute index (counted from the
    first input sample ever seen) of the newest input sample it depends on.
    The caller maps ``src_idx`` to input timestamps, so output timestamps never
    drift even when the rate is approximated. The FIR adds a group delay of
    ``delay_s`` (the signal content is late by that much; timestamps are the
    time the data was available).
    """

    def __init__(self, fs_in: float, fs_out: float, n_channels: int, max_factor: int = 64,
                 half_len: int = 10, kaiser_beta: float = 5.0):
        if int(n_channels) < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        self.fs_in_hz = float(fs_in)
        self.fs_out_hz = float(fs_out)
        self.n_channels = int(n_channels)
        self.up, self.down = rational_ratio(fs_in, fs_out, max_factor)
        self.fs_out_actual_hz = self.fs_in_hz * self.up / self.down
        self.rate_error = self.fs_out_actual_hz / self.fs_out_hz - 1.0
        up, down = self.up, self.down
        if up == down == 1:
            h = np.ones(1)
        else:
            # Same filter as scipy.signal.resample_poly (window=('kaiser', 5.0)).
            max_rate = max(up, down)
            h = signal.firwin(2 * half_len * max_rate + 1, 1.0 / max_rate, window=("kaiser", kaiser_beta)) * up
        # Polyphase split: phase p uses taps h[p], h[p+up], ...; tap j multiplies x[i0 - j].
        self._taps = int(np.ceil(h.size / up))
        hp = np.zeros(self._taps * up)
        hp[:h.size] = h
        self._poly = hp.reshape(self._taps, up).T.copy()  # (up, taps)
        self.delay_s = (h.size - 1) / 2 / (up * self.fs_in_hz)
        self._hist = np.zeros((self._taps - 1, self.n_channels))  # previous inputs, oldest first
        self._n_in = 0   # input samples consumed so far
        self._n_out = 0  # output samples produced so far

    def reset(self) -> None:
        self._hist[:] = 0.0
        self._n_in = 0
        self._n_out = 0

    def process(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed ``chunk`` (n, ch); return ``(y (m, ch) float64, src_idx (m,) int64)``."""
        x = np.asarray(chunk, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.n_channels:
            raise ValueError(f"chunk must be (n, {self.n_channels}), got shape {np.shape(chunk)}")
        n = x.shape[0]
        n_in_end = self._n_in + n
        # Output m needs input index i0 = floor(m*down/up) to exist: m*down < n_in_end*up.
        m_end = (n_in_end * self.up + self.down - 1) // self.down
        m = np.arange(self._n_out, m_end, dtype=np.int64)
        ext = np.concatenate([self._hist, x], axis=0)  # ext[k] is absolute input self._n_in - (taps-1) + k
        if m.size:
            pos = m * self.down
            i0 = pos // self.up
            phase = pos - i0 * self.up
            rel = i0 - (self._n_in - (self._taps - 1))
            idx = rel[:, None] - np.arange(self._taps)[None, :]  # (m, taps), >= 0 by construction
            y = np.einsum("mt,mtc->mc", self._poly[phase], ext[idx])
        else:
            i0 = m
            y = np.zeros((0, self.n_channels))
        keep = self._taps - 1
        if keep:
            self._hist = ext[-keep:].copy() if ext.shape[0] >= keep else ext
        self._n_in = n_in_end
        self._n_out = int(m_end)
        return y, i0
