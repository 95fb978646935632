"""Causal IIR filtering with state carried across chunks (functional core: no I/O, no clock).

One filter serves the whole controller: the seizure features' 0.5 Hz high-pass
(``controller.features``) and the spike detector's 300–3000 Hz band-pass
(``controller.spikes``). Filtering a signal chunk by chunk gives the same output
as filtering it in one call, which is what makes the streaming controller and
offline training see identical data.
"""
from __future__ import annotations

import numpy as np
from scipy import signal

try:
    # scipy's in-place SOS kernel: ~1.6 µs for a 30-sample × 2-channel chunk, against ~27 µs for
    # the public signal.sosfilt (argument checks, axis moves, copies) — a cost every 1 ms spike
    # chunk and every 1/64 s iEEG chunk paid. Private, so a scipy without it falls back to the
    # public call (tests/test_filters.py checks both give the same output).
    from scipy.signal._sosfilt import _sosfilt as _sosfilt_inplace
except ImportError:  # pragma: no cover - depends on the scipy build
    _sosfilt_inplace = None

__all__ = ["SosFilterState"]


class SosFilterState:
    """Causal IIR filter (second-order sections) per channel, its state carried across chunks.

    ``process(chunk)`` returns the filtered ``(n, ch)`` block as float64;
    ``process_in_place(x)`` overwrites a float ``(n, ch)`` array with it (the
    spike path's chunk, no allocation). The first chunk starts from the steady
    state for its first sample, so a DC offset gives no start-up transient (which a
    spike detector would take for spikes).
    """

    def __init__(self, sos: np.ndarray, n_channels: int):
        sos = np.asarray(sos, dtype=np.float64)
        if sos.ndim != 2 or sos.shape[1] != 6:
            raise ValueError(f"sos must have shape (n_sections, 6), got {sos.shape}")
        if n_channels < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        self.sos = np.ascontiguousarray(sos)
        self.n_channels = int(n_channels)
        # The in-place kernel's layout: (n_channels, n_sections, 2), filtering (n_channels, n) rows.
        self._zi = np.zeros((self.n_channels, sos.shape[0], 2), dtype=np.float64)
        self._zi_step = signal.sosfilt_zi(sos)   # (n_sections, 2): the state after a unit step
        self._scratch = np.empty(0, dtype=np.float64)
        self._primed = False

    @classmethod
    def butter(cls, order: int, cutoff_hz, btype: str, fs_hz: float, n_channels: int) -> "SosFilterState":
        """Butterworth design helper (``scipy.signal.butter(..., output='sos')``)."""
        if fs_hz <= 0:
            raise ValueError(f"fs_hz must be > 0, got {fs_hz}")
        sos = signal.butter(order, cutoff_hz, btype=btype, fs=fs_hz, output="sos")
        return cls(sos, n_channels)

    def reset(self) -> None:
        """Forget the history; the next chunk primes the state again."""
        self._zi[:] = 0.0
        self._primed = False

    def _rows(self, x: np.ndarray) -> np.ndarray:
        """Filter ``x`` (n, ch) into a (ch, n) float64 scratch view and return that view."""
        if x.ndim != 2:
            raise ValueError(f"chunk must be (n_samples, n_channels), got shape {x.shape}")
        n, ch = x.shape
        if ch != self.n_channels:
            raise ValueError(f"chunk has {ch} channels, filter was built for {self.n_channels}")
        if n and not self._primed:
            self._zi[:] = self._zi_step[None] * np.asarray(x[0], dtype=np.float64)[:, None, None]
            self._primed = True
        if self._scratch.size < n * ch:
            self._scratch = np.empty(max(n * ch, 2 * self._scratch.size), dtype=np.float64)
        rows = self._scratch[:n * ch].reshape(ch, n)
        if not n:
            return rows
        rows[:] = x.T
        if _sosfilt_inplace is not None:
            _sosfilt_inplace(self.sos, rows, self._zi)
        else:  # public API: zi is (n_sections, ch, 2) for axis=-1 filtering of (ch, n)
            y, zi = signal.sosfilt(self.sos, rows, axis=-1, zi=self._zi.transpose(1, 0, 2))
            self._zi[:] = zi.transpose(1, 0, 2)
            rows[:] = y
        return rows

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Filter ``chunk`` (n, ch) and return the filtered block (a new (n, ch) float64 array)."""
        x = np.asarray(chunk)
        if x.ndim == 1:
            x = x[:, None]
        return self._rows(x).T.copy()

    def process_in_place(self, x: np.ndarray) -> None:
        """Filter the float array ``x`` (n, ch) in place."""
        x[:] = self._rows(x).T
