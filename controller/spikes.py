"""Fast-path spike detection (functional core: no I/O, no clock reads).

``SpikeDetector.step(chunk, timestamps)`` finds spikes in one chunk of a
multichannel recording, vectorized per chunk, with state carried across chunks:

* **threshold** (default): a negative-going crossing of −k·σ per channel, with
  σ = median(|x|)/0.6745 (Quiroga et al. 2004; k = 4..5, REFERENCE.md §2).
  σ is a causal running estimate: the median |x| of each ``block_ms`` block of
  unblanked samples is kept for the last ``noise_window_s``, and σ is the
  median of those block medians / 0.6745 — robust to spikes and artifacts and
  cheap enough for the hot path (one small median per block, none per sample);
* **window**: a threshold crossing that must also pass every inclusion box and
  no exclusion box (time range after the crossing × amplitude range; Intan RHS
  style window discriminator, REFERENCE.md §2);
* **template**: a threshold crossing whose snippet correlates with
  ``template`` (Pearson r ≥ ``min_corr``).

Everything above runs on the detection channels after a causal band-pass
(``band_hz``, default 300–3000 Hz): Quiroga's σ = median(|x|)/0.6745 assumes a
spike-band signal, and on a raw amplifier stream a DC offset or an LFP makes
median(|x|) measure the offset or the LFP instead of the noise (+40 µV DC or a
100 µV 8 Hz LFP on the simulator took σ from 10 to 59–102 µV and the
detections from 84 to 0). The filter state is carried across chunks, so
chunking does not change the output; ``band_hz=None`` turns it off for a
stream the amplifier already band-passed. The filter delays the waveform by a
fraction of a millisecond (docs/ads.md, "Detector").

Window and template modes need samples after the crossing, so a crossing near
the end of a chunk is decided when the next chunk arrives (its reported time is
still the crossing's). A per-channel refractory period is honoured across chunk
boundaries. ``blank(t0, t1)`` / ``blank_until(t1)`` make samples with
timestamps in ``[t0, t1)`` invisible: they can neither cross nor feed the noise
estimate (stimulation artifacts; Guggenmos 2013 blanks 28 ms, REFERENCE.md §2).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import signal

from controller.filters import SosFilterState
from controller.numeric import median_in_place

__all__ = ["SpikeDetector", "Spikes", "WindowBox", "MAD_TO_SIGMA", "DEFAULT_BAND_HZ", "band_pass_waveform"]

MAD_TO_SIGMA = 0.6745   # σ = median(|x|)/0.6745 (Quiroga et al. 2004, REFERENCE.md §2)
# Detection band. REFERENCE.md §2 gives only the threshold rule, not a band; 300–3000 Hz is the
# band Quiroga et al. 2004 detect in. Measured on SpikingUnits (docs/ads.md, "Detector"): it
# keeps 595 of 600 spikes at k = 5 where 300–6000 Hz keeps 555 (the spikes' energy lies below
# 3 kHz, the noise's up to 6 kHz), and at order 2 it takes an 8 Hz LFP down by 64 dB, 60 Hz mains
# by 29 dB.
DEFAULT_BAND_HZ = (300.0, 3000.0)


class Spikes(NamedTuple):
    """Detections of one ``step``: time (s, the crossing sample's timestamp), channel index, trough µV."""

    t: np.ndarray
    channel: np.ndarray
    amplitude_uv: np.ndarray


@dataclass(frozen=True, slots=True)
class WindowBox:
    """One window-discriminator box: between ``t0_ms`` and ``t1_ms`` after the crossing,
    the waveform must enter ``[lo_uv, hi_uv]`` (inclusion) or must not (``exclude=True``)."""

    t0_ms: float
    t1_ms: float
    lo_uv: float
    hi_uv: float
    exclude: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t0_ms) and math.isfinite(self.t1_ms) and -2.0 <= self.t0_ms <= self.t1_ms <= 5.0):
            raise ValueError(f"WindowBox t0_ms={self.t0_ms!r}, t1_ms={self.t1_ms!r} invalid, "
                             "expected -2 <= t0_ms <= t1_ms <= 5 ms")
        if not (math.isfinite(self.lo_uv) and math.isfinite(self.hi_uv) and self.lo_uv <= self.hi_uv):
            raise ValueError(f"WindowBox lo_uv={self.lo_uv!r}, hi_uv={self.hi_uv!r} invalid, expected lo_uv <= hi_uv")


def band_pass_waveform(waveform: np.ndarray, fs_hz: float, band_hz: tuple[float, float] = DEFAULT_BAND_HZ,
                       order: int = 2) -> np.ndarray:
    """``waveform`` (1-D µV, an isolated spike: starts and ends near 0) as ``SpikeDetector``'s
    band-pass shows it (same filter, from rest), for ``template=`` in template mode."""
    w = np.asarray(waveform, np.float64).ravel()
    sos = signal.butter(order, band_hz, btype="bandpass", fs=fs_hz, output="sos")
    return signal.sosfilt(sos, w).astype(np.float32)


_EMPTY = Spikes(np.empty(0), np.empty(0, np.int64), np.empty(0, np.float32))


class SpikeDetector:
    """Per-channel adaptive-threshold spike detector (see module doc).

    ``channels``: indices (into the chunk's columns) to detect on. ``k``:
    threshold in σ (REFERENCE.md §2: 4–5). ``refractory_ms``: minimum time
    between two detections on one channel. ``noise_window_s``: span of the
    running noise estimate. ``initial_sigma_uv``: σ before the first noise block
    is complete (``None``: detect nothing until then). ``band_hz``: the causal
    band-pass (low, high Hz; order-``band_order`` Butterworth) applied to the
    detection channels before the noise estimate, the threshold and the
    window/template decisions; ``None`` for a stream already band-passed by the
    amplifier. Thresholds, boxes, templates, σ and the reported trough
    amplitudes are all in the band-passed signal's µV: a template recorded raw
    goes through ``band_pass_waveform`` first.
    """

    def __init__(self, fs_hz: float, n_channels: int, channels: list[int] | tuple[int, ...] | None = None,
                 k: float = 4.5, refractory_ms: float = 1.0, noise_window_s: float = 2.0,
                 mode: str = "threshold", template: np.ndarray | None = None, min_corr: float = 0.8,
                 boxes: list[WindowBox] | tuple[WindowBox, ...] = (), block_ms: float = 10.0,
                 initial_sigma_uv: float | None = None, max_chunk: int = 4096,
                 align_ms: float = 0.5, band_hz: tuple[float, float] | None = DEFAULT_BAND_HZ,
                 band_order: int = 2) -> None:
        if not (isinstance(fs_hz, (int, float)) and math.isfinite(fs_hz) and 1_000 <= fs_hz <= 200_000):
            raise ValueError(f"SpikeDetector fs_hz={fs_hz!r} invalid, expected 1000..200000 Hz")
        if not (isinstance(n_channels, (int, np.integer)) and n_channels >= 1):
            raise ValueError(f"SpikeDetector n_channels={n_channels!r} invalid, expected an int >= 1")
        ch = list(range(n_channels)) if channels is None else [int(c) for c in channels]
        if not ch or len(set(ch)) != len(ch) or not all(0 <= c < n_channels for c in ch):
            raise ValueError(f"SpikeDetector channels={channels!r} invalid, expected distinct indices in 0..{n_channels - 1}")
        if not (math.isfinite(k) and 2.0 <= k <= 20.0):
            raise ValueError(f"SpikeDetector k={k!r} invalid, expected 2..20 (σ units; 4-5 is usual)")
        if not (math.isfinite(refractory_ms) and 0 <= refractory_ms <= 100):
            raise ValueError(f"SpikeDetector refractory_ms={refractory_ms!r} invalid, expected 0..100 ms")
        if not (math.isfinite(block_ms) and 1 <= block_ms <= 1000):
            raise ValueError(f"SpikeDetector block_ms={block_ms!r} invalid, expected 1..1000 ms")
        if not (math.isfinite(noise_window_s) and block_ms / 1000 <= noise_window_s <= 600):
            raise ValueError(f"SpikeDetector noise_window_s={noise_window_s!r} invalid, expected {block_ms / 1000}..600 s")
        if mode not in ("threshold", "window", "template"):
            raise ValueError(f"SpikeDetector mode={mode!r} invalid, expected 'threshold', 'window' or 'template'")
        if mode == "window" and not boxes:
            raise ValueError("SpikeDetector mode='window' needs at least one WindowBox in boxes")
        if initial_sigma_uv is not None and not (math.isfinite(initial_sigma_uv) and initial_sigma_uv > 0):
            raise ValueError(f"SpikeDetector initial_sigma_uv={initial_sigma_uv!r} invalid, expected > 0 µV or None")
        if band_hz is not None:
            try:
                lo, hi = (float(v) for v in band_hz)
            except (TypeError, ValueError):
                lo = hi = math.nan
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi < fs_hz / 2):
                raise ValueError(f"SpikeDetector band_hz={band_hz!r} invalid, expected (low, high) with "
                                 f"0 < low < high < fs_hz/2 = {fs_hz / 2:g} Hz, or None for a stream "
                                 "already band-passed")
        if not (isinstance(band_order, (int, np.integer)) and 1 <= band_order <= 4):
            raise ValueError(f"SpikeDetector band_order={band_order!r} invalid, expected an int 1..4")
        self.fs_hz = float(fs_hz)
        self.n_channels = int(n_channels)
        self.band_hz = None if band_hz is None else (lo, hi)
        self.channels = np.asarray(ch, np.int64)
        self.k = float(k)
        self.mode = mode
        self.boxes = tuple(boxes)
        self.min_corr = float(min_corr)
        nc = len(ch)
        self._refr_s = refractory_ms * 1e-3
        # Snippet geometry: samples needed before and after a crossing to decide it.
        self._pre = 0
        self._post = 0
        self._align_n = 0
        self._template: np.ndarray | None = None
        if mode == "template":
            if template is None:
                raise ValueError("SpikeDetector mode='template' needs a template (1-D µV waveform)")
            tpl = np.asarray(template, np.float64).ravel()
            if tpl.size < 4 or not np.all(np.isfinite(tpl)) or tpl.std() == 0:
                raise ValueError(f"SpikeDetector template of {tpl.size} samples invalid, "
                                 "expected >= 4 finite, non-constant samples")
            # Snippets are aligned on their trough (searched up to align_ms after the
            # crossing), as is the template: a few samples of misalignment ruin r.
            self._tpl_pre = int(np.argmin(tpl))
            self._tpl_post = tpl.size - self._tpl_pre - 1
            self._align_n = max(1, int(round(align_ms * 1e-3 * fs_hz)))
            self._template = (tpl - tpl.mean()) / (tpl.std() * tpl.size)
            self._pre = self._tpl_pre
            self._post = self._align_n + self._tpl_post
        elif mode == "window":
            self._box_idx = [(int(math.floor(b.t0_ms * 1e-3 * fs_hz)), int(math.ceil(b.t1_ms * 1e-3 * fs_hz)))
                             for b in self.boxes]
            self._pre = max(0, -min(i0 for i0, _ in self._box_idx))
            self._post = max(0, max(i1 for _, i1 in self._box_idx))
        # History carried into the next chunk: enough for a deferred snippet and the crossing test.
        self._hist_n = self._pre + self._post + 1
        self._hist_x = np.zeros((self._hist_n, nc), np.float32)
        self._hist_t = np.full(self._hist_n, -np.inf)
        self._hist_blank = np.ones(self._hist_n, bool)   # nothing before the first sample (rows)
        self._hist_fill = 0
        self._pending: list[tuple[float, int]] = []            # (crossing t, channel col) awaiting samples
        self._last_spike_t = np.full(nc, -np.inf)
        # Noise estimate.
        self._block_n = max(8, int(round(block_ms * 1e-3 * fs_hz)))
        self._acc = np.empty((self._block_n, nc), np.float32)
        self._acc_fill = 0
        self._med_ring = np.zeros((max(1, int(round(noise_window_s * 1e3 / block_ms))), nc))
        self._med_scratch = np.empty_like(self._med_ring)   # the ring's median reorders a copy
        self._med_pos = 0
        self._sigma = np.full(nc, np.nan if initial_sigma_uv is None else float(initial_sigma_uv))
        self._thr = -self.k * self._sigma
        self._blanks: deque[tuple[float, float]] = deque()
        self.max_chunk = int(max_chunk)
        self._buf = np.empty((self._hist_n + self.max_chunk, nc), np.float32)
        self._buf_t = np.empty(self._hist_n + self.max_chunk)
        self._buf_blank = np.empty(self._hist_n + self.max_chunk, bool)
        self.n_blanked = 0
        # Only the detection channels are filtered: the spike path is latency-critical
        # (~2 µs per 30-sample × 2-channel chunk, docs/ads.md). The default order 2 (4 poles,
        # 12 dB/octave each side, like the simulator's noise) keeps the group delay and the
        # ringing after a stimulation artifact short: both grow with the order.
        self._bandpass = (None if band_hz is None
                          else SosFilterState.butter(int(band_order), self.band_hz, "bandpass", self.fs_hz, nc))

    # ------------------------------------------------------------------ state views
    @property
    def sigma_uv(self) -> np.ndarray:
        """Current σ per detection channel (µV; NaN until the first noise block)."""
        return self._sigma.copy()

    @property
    def threshold_uv(self) -> np.ndarray:
        """Current (negative) threshold per detection channel, µV."""
        return -self.k * self._sigma

    # ------------------------------------------------------------------ blanking
    def blank(self, t0: float, t1: float) -> None:
        """Ignore samples with timestamps in ``[t0, t1)`` (s, session clock) on every detection channel."""
        if not (math.isfinite(t0) and math.isfinite(t1) and t1 >= t0):
            raise ValueError(f"SpikeDetector.blank t0={t0!r}, t1={t1!r} invalid, expected finite t0 <= t1")
        if t1 > t0:
            self._blanks.append((float(t0), float(t1)))

    def blank_until(self, t1: float, t0: float = -math.inf) -> None:
        """Ignore samples from ``t0`` (default: everything not yet seen) until ``t1``."""
        if not math.isfinite(t1):
            raise ValueError(f"SpikeDetector.blank_until t1={t1!r} invalid, expected a finite time")
        self._blanks.append((float(t0), float(t1)))

    # ------------------------------------------------------------------ the step
    def step(self, chunk: np.ndarray, timestamps: np.ndarray) -> Spikes:
        """Detect spikes in ``chunk`` (``(n, n_channels)`` µV) with sample ``timestamps`` (``(n,)`` s)."""
        n = chunk.shape[0] if chunk.ndim == 2 else -1
        if chunk.ndim != 2 or chunk.shape[1] != self.n_channels:
            raise ValueError(f"SpikeDetector.step chunk shape {chunk.shape} invalid, expected (n, {self.n_channels})")
        if timestamps.shape != (n,):
            raise ValueError(f"SpikeDetector.step timestamps shape {timestamps.shape} invalid, expected ({n},)")
        if n == 0:
            return _EMPTY
        if n > self.max_chunk:
            # Rare (a stall): split instead of allocating on the hot path.
            parts = [self.step(chunk[i:i + self.max_chunk], timestamps[i:i + self.max_chunk])
                     for i in range(0, n, self.max_chunk)]
            return Spikes(*(np.concatenate(p) for p in zip(*parts)))
        h = self._hist_n
        x = self._buf[:h + n]
        ts = self._buf_t[:h + n]
        bl = self._buf_blank[:h + n]
        xn = x[h:]
        np.take(chunk, self.channels, axis=1, out=xn)
        if self._bandpass is not None:
            # Blanked samples go through the filter too: holding the input instead would leave a
            # step (LFP drift, artifact tail) at the end of the window, which a high-pass turns
            # into a spike-like transient. The artifact's own ringing is over long before 28 ms.
            self._bandpass.process_in_place(xn)
        t_first, t_last = float(timestamps[0]), float(timestamps[-1])
        while self._blanks and self._blanks[0][1] <= t_first:
            self._blanks.popleft()   # windows arrive in time order: the head expires first
        new_bl = None
        for b0, b1 in self._blanks:
            if b0 > t_last or b1 <= t_first:
                continue
            if new_bl is None:
                new_bl = bl[h:]
                new_bl[:] = False
            i0 = int(np.searchsorted(timestamps, b0, "left"))
            i1 = int(np.searchsorted(timestamps, b1, "left"))
            new_bl[i0:i1] = True
        if new_bl is not None:
            self.n_blanked += int(new_bl.sum())

        self._update_noise(xn, new_bl)
        thr = self._thr                  # -k·σ; NaN before the first estimate: no crossings
        if new_bl is None and self.mode == "threshold":
            # Nothing blanked (the usual chunk): the few samples below threshold are walked in
            # Python instead of a dozen whole-chunk numpy calls. Each numpy call costs several µs
            # when its code is cold, which it is on the fast path (bench_ads breakdown).
            below_rc = np.nonzero(xn < thr)
            out = self._sparse_crossings(below_rc, xn, timestamps, thr) if below_rc[0].size else _EMPTY
            self._hist_x[:] = xn[-h:]
            self._hist_t[:] = timestamps[-h:]
            self._hist_blank[:] = False
            return out
        if new_bl is None:
            new_bl = bl[h:]
            new_bl[:] = False
        x[:h] = self._hist_x
        ts[:h] = self._hist_t
        bl[:h] = self._hist_blank
        ts[h:] = timestamps
        below = x < thr                  # NaN compares False
        below |= bl[:, None]             # a blanked sample counts as "below": no crossing into or out of it
        cross = below[h:] & ~below[h - 1:-1]
        cross &= ~bl[h:, None]
        rows, cols = np.nonzero(cross)
        cand_t = ts[h + rows] if rows.size else None

        out_t: list[float] = []
        out_c: list[int] = []
        out_a: list[float] = []
        # Deferred crossings from the previous chunk come first (time order per channel).
        if self._pending:
            pend, self._pending = self._pending, []
            for t_c, col in pend:
                pos = int(np.searchsorted(ts, t_c, "left"))
                self._decide(x, ts, pos, col, h + n, out_t, out_c, out_a)
        if rows.size:
            order = np.lexsort((rows, cols)) if self.mode != "threshold" else None
            if self.mode == "threshold":
                # Vectorized refractory against the previous chunk; within-chunk conflicts are rare.
                ok = cand_t - self._last_spike_t[cols] >= self._refr_s
                rows, cols, cand_t = rows[ok], cols[ok], cand_t[ok]
                if rows.size:
                    dup = _within_refractory(cand_t, cols, self._refr_s)
                    if dup is not None:
                        rows, cols, cand_t = rows[~dup], cols[~dup], cand_t[~dup]
                    np.maximum.at(self._last_spike_t, cols, cand_t)
                    amp = x[h + rows, cols]
                    if not out_t:
                        return Spikes(cand_t.copy(), self.channels[cols], amp.astype(np.float32))
                    out_t.extend(cand_t.tolist()); out_c.extend(cols.tolist()); out_a.extend(amp.tolist())
            else:
                for r, c in zip(rows[order].tolist(), cols[order].tolist()):   # per crossing, not per sample
                    self._decide(x, ts, h + r, c, h + n, out_t, out_c, out_a)

        # Carry the tail into the next chunk.
        self._hist_x[:] = x[-h:]
        self._hist_t[:] = ts[-h:]
        self._hist_blank[:] = bl[-h:]
        if not out_t:
            return _EMPTY
        t_arr = np.asarray(out_t)
        o = np.argsort(t_arr, kind="stable")
        return Spikes(t_arr[o], self.channels[np.asarray(out_c, np.int64)[o]], np.asarray(out_a, np.float32)[o])

    # ------------------------------------------------------------------ internals
    def _sparse_crossings(self, below_rc, xn, timestamps, thr) -> Spikes:
        """Threshold crossings among the below-threshold samples ``below_rc`` (row-major, as
        ``np.nonzero`` gives them) of an unblanked chunk; refractory greedy in time per channel."""
        prev_x, prev_blank = self._hist_x[-1].tolist(), bool(self._hist_blank[-1])
        thr_l = thr.tolist()
        last_spike = self._last_spike_t
        seen: dict[int, int] = {}   # channel -> last row below threshold
        out_t: list[float] = []
        out_c: list[int] = []
        out_a: list[float] = []
        for r, c in zip(below_rc[0].tolist(), below_rc[1].tolist()):
            before = seen.get(c)
            seen[c] = r
            was_below = (before == r - 1) if r else (prev_blank or prev_x[c] < thr_l[c])
            if was_below:
                continue
            t = float(timestamps[r])
            if t - last_spike[c] < self._refr_s:
                continue
            last_spike[c] = t
            out_t.append(t)
            out_c.append(c)
            out_a.append(float(xn[r, c]))
        if not out_t:
            return _EMPTY
        return Spikes(np.asarray(out_t), self.channels[out_c], np.asarray(out_a, np.float32))

    def _decide(self, x, ts, pos: int, col: int, end: int, out_t, out_c, out_a) -> None:
        """Accept or reject the crossing at buffer row ``pos`` of column ``col`` (window/template modes)."""
        t_c = float(ts[pos])
        if t_c - self._last_spike_t[col] < self._refr_s:
            return
        if pos + self._post >= end:
            self._pending.append((t_c, col))
            return
        lo = pos - self._pre
        if lo < 0:
            return  # history shorter than the snippet (first samples of the stream)
        snip = x[lo:pos + self._post + 1, col]
        if self.mode == "template":
            trough = pos + int(np.argmin(x[pos:pos + self._align_n + 1, col]))
            s = x[trough - self._tpl_pre:trough + self._tpl_post + 1, col].astype(np.float64)
            sd = s.std()
            if sd == 0 or float(np.dot(self._template, s - s.mean()) / sd) < self.min_corr:
                return
        else:
            for (i0, i1), b in zip(self._box_idx, self.boxes):
                seg = x[pos + i0:pos + i1 + 1, col]
                hit = bool(np.any((seg >= b.lo_uv) & (seg <= b.hi_uv)))
                if hit == b.exclude:
                    return
        self._last_spike_t[col] = t_c
        out_t.append(t_c)
        out_c.append(col)
        out_a.append(float(snip.min()))

    def _update_noise(self, xn: np.ndarray, blanked_rows: np.ndarray | None) -> None:
        """Feed unblanked samples to the per-channel block-median noise estimate (blanking is per row)."""
        v = xn if blanked_rows is None or not blanked_rows.any() else xn[~blanked_rows]
        fill, i, m = self._acc_fill, 0, v.shape[0]
        while i < m:   # at most a few iterations per chunk (one per completed block)
            take = min(self._block_n - fill, m - i)
            np.abs(v[i:i + take], out=self._acc[fill:fill + take])
            fill += take
            i += take
            if fill == self._block_n:
                # The block is rewritten from its start next: its median may reorder it in place.
                self._med_ring[self._med_pos % self._med_ring.shape[0]] = median_in_place(self._acc)
                self._med_pos += 1
                n_filled = min(self._med_pos, self._med_ring.shape[0])
                scratch = self._med_scratch[:n_filled]
                np.copyto(scratch, self._med_ring[:n_filled])
                self._sigma[:] = median_in_place(scratch) / MAD_TO_SIGMA
                np.multiply(self._sigma, -self.k, out=self._thr)
                fill = 0
        self._acc_fill = fill


def _within_refractory(t: np.ndarray, cols: np.ndarray, refr_s: float) -> np.ndarray | None:
    """Mask of crossings that follow an accepted one on the same channel by less than ``refr_s``.

    Greedy in time order per channel; returns ``None`` when nothing conflicts (the usual case).
    """
    if t.size < 2:
        return None
    o = np.lexsort((t, cols))
    ts, cs = t[o], cols[o]
    close = (np.diff(ts) < refr_s) & (cs[1:] == cs[:-1])
    if not close.any():
        return None
    drop = np.zeros(t.size, bool)
    last_t, last_c = -np.inf, -1
    for i in range(ts.size):   # only reached with close crossings: a handful of values
        if cs[i] == last_c and ts[i] - last_t < refr_s:
            drop[o[i]] = True
        else:
            last_t, last_c = ts[i], cs[i]
    return drop
