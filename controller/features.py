"""Causal feature extraction: line length, band powers, feature pipelines.

Functional core: no I/O, no clock reads. Arrays are sample-major ``(n_samples,
n_channels)`` float32 µV (docs/architecture.md, "Conventions").

A *feature pipeline* is named and versioned (``sz_v1``); an ONNX model's
contract names the pipeline it was trained on (``controller.inference``), and
``PIPELINES`` maps that name to the class, so training and the controller run
the exact same code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Callable

import numpy as np
from scipy import signal

from controller.filters import SosFilterState
from controller.numeric import median_in_place

__all__ = [
    "line_length",
    "band_powers",
    "FeaturePipeline",
    "SzV1Pipeline",
    "SzV2Pipeline",
    "PIPELINES",
    "make_pipeline",
    "SZ_V1_BANDS_HZ",
]


def _as_window(window: np.ndarray, what: str = "window") -> np.ndarray:
    x = np.asarray(window)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{what} must be (n_samples, n_channels), got shape {np.shape(window)}")
    return x


def line_length(window: np.ndarray) -> np.ndarray:
    """Line length per channel: sum |x[n] - x[n-1]| (Esteller et al. 2001; REFERENCE.md §3).

    ``window`` is (n, ch) or (n,); returns (ch,) float64.
    """
    x = _as_window(window)
    if x.shape[0] < 2:
        raise ValueError(f"line_length needs at least 2 samples, got {x.shape[0]}")
    return np.abs(np.diff(x, axis=0)).sum(axis=0, dtype=np.float64)


def _band_matrix(freqs_hz: np.ndarray, bands_hz) -> np.ndarray:
    m = np.zeros((freqs_hz.size, len(bands_hz)), dtype=np.float64)
    for j, (lo, hi) in enumerate(bands_hz):
        if not (0 <= lo < hi):
            raise ValueError(f"band {j} must satisfy 0 <= lo < hi, got ({lo}, {hi})")
        m[:, j] = (freqs_hz >= lo) & (freqs_hz < hi)
    return m


def band_powers(window: np.ndarray, fs_hz: float, bands) -> np.ndarray:
    """Mean power spectral density (µV²/Hz) in each band, per channel.

    One Hann-windowed periodogram of the whole window (vectorized over
    channels; a window of 1–2 s is too short for useful Welch averaging).
    ``bands`` is a sequence of ``(lo_hz, hi_hz)``, half-open ``[lo, hi)``.
    Returns ``(n_bands, n_channels)`` float64; the mean removed first.
    """
    x = _as_window(window)
    if fs_hz <= 0:
        raise ValueError(f"fs_hz must be > 0, got {fs_hz}")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"band_powers needs at least 4 samples, got {n}")
    for lo, hi in bands:
        if hi > fs_hz / 2 + 1e-9:
            raise ValueError(f"band ({lo}, {hi}) Hz exceeds Nyquist {fs_hz / 2} Hz")
    freqs, psd = signal.periodogram(x, fs=fs_hz, window="hann", detrend="constant", axis=0)
    m = _band_matrix(freqs, bands)
    counts = m.sum(axis=0)
    if np.any(counts == 0):
        empty = [tuple(b) for b, c in zip(bands, counts) if c == 0]
        raise ValueError(f"bands {empty} contain no frequency bin at fs_hz={fs_hz}, n={n} (resolution {fs_hz / n:.3g} Hz)")
    return (m.T @ psd) / counts[:, None]


# Classic EEG bands; gamma capped at 80 Hz so it fits any model rate >= 160 Hz.
SZ_V1_BANDS_HZ: tuple[tuple[float, float], ...] = (
    (1.0, 4.0),    # delta
    (4.0, 8.0),    # theta
    (8.0, 13.0),   # alpha
    (13.0, 30.0),  # beta
    (30.0, 80.0),  # gamma / low-voltage fast activity
)
_BAND_NAMES = ("delta", "theta", "alpha", "beta", "gamma")


class FeaturePipeline(ABC):
    """Base class of named, versioned feature pipelines.

    ``step(window)`` maps one ``(n_samples, n_channels)`` window to a
    ``(n_features,)`` float32 vector written into a preallocated array (the same
    array is returned every call: copy it to keep it). ``make_prefilter()``
    returns the causal stream filter the windows must be cut from.
    """

    name: str = ""
    version: int = 0
    #: the last ``step``'s window was flat on every channel (no signal at all), for pipelines that
    #: tell; the loop does not act on such windows (controller.closed_loop.FLAT_REASON)
    all_flat: bool = False

    def __init__(self, fs_hz: float, n_channels: int, hop_s: float = 0.25):
        if not (fs_hz > 0):
            raise ValueError(f"fs_hz must be > 0, got {fs_hz}")
        if int(n_channels) < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        if not (hop_s > 0):
            raise ValueError(f"hop_s must be > 0, got {hop_s}")
        self.fs_hz = float(fs_hz)
        self.n_channels = int(n_channels)
        self.hop_s = float(hop_s)

    feature_names: tuple[str, ...] = ()

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def make_prefilter(self) -> SosFilterState | None:
        return None

    def reset(self) -> None:
        """Forget the running state (baselines)."""

    @abstractmethod
    def step(self, window: np.ndarray) -> np.ndarray:
        """Features of one window ``(n, ch)`` -> ``(n_features,)`` float32 (preallocated, overwritten)."""


class SzV1Pipeline(FeaturePipeline):
    """``sz_v1``: seizure features that are channel-count agnostic and patient-normalized.

    Per channel and window it computes
      * ``ll``: log line length per sample (Esteller 2001, REFERENCE.md §3),
      * ``pow``: log variance,
      * ``bp_<band>``: log mean PSD in delta/theta/alpha/beta/gamma,
    then subtracts a slow causal running baseline of each of these log
    features, kept per channel in the pipeline state. In log units the
    difference is a ratio to the patient's own recent background, so a
    patient with 3× larger amplitude gives the same features (robust across
    patients). The baseline is an exponential moving average with time
    constant ``baseline_tau_s`` (120 s) updated once per hop; upward moves are
    rate-limited to ``baseline_max_rise_per_s`` so that a seizure lasting tens
    of seconds barely moves it (a seizure must not become the new normal),
    downward moves are not. The first window initializes it and for the first
    ``warmup_s`` (30 s) it follows a fast 5 s EMA without the rise limit, so
    detections in the first ~30 s after start-up are less reliable (and a
    seizure already running at start-up is learned as background).

    Also per channel: relative band powers (fraction of 1–80 Hz power per
    band, amplitude invariant, no baseline) and the spectral edge frequency
    at 80 % of power (divided by 80 Hz).

    Channel aggregation: median and max over channels of each per-channel
    feature, so a 1-channel and a 16-channel stream give the same-length
    vector and a focal seizure on a few channels still shows in ``max``.

    Temporal context: each aggregated feature is repeated as its mean over
    the last ``context_s`` (2 s) of hops (``*_avg2s``), kept in a ring in the
    pipeline state.
    """

    name = "sz_v1"
    version = 1
    baseline_tau_s = 120.0
    baseline_max_rise_per_s = 0.005  # log units/s: a 60 s seizure lifts it by <= 0.3 (×1.35)
    #: µV²: below this a window is flat (no amplifier's noise floor is that low: 0.1 µV rms is
    #: 0.01 µV²) and leaves the running baseline alone
    flat_var_uv2 = 1e-4
    warmup_s = 30.0
    warmup_tau_s = 5.0
    _per_channel = (
        ("ll_z", "pow_z") + tuple(f"bp_{b}_z" for b in _BAND_NAMES)
        + tuple(f"rel_{b}" for b in _BAND_NAMES) + ("sef80",)
    )
    context_s = 2.0
    _age_feature = False
    _instant = tuple(f"{agg}_{f}" for f in _per_channel for agg in ("med", "max"))
    feature_names = _instant + tuple(f"{n}_avg2s" for n in _instant)

    def __init__(self, fs_hz: float, n_channels: int, hop_s: float = 0.25):
        super().__init__(fs_hz, n_channels, hop_s)
        if fs_hz < 2 * SZ_V1_BANDS_HZ[-1][1]:
            raise ValueError(f"sz_v1 needs fs_hz >= {2 * SZ_V1_BANDS_HZ[-1][1]} Hz (gamma band to 80 Hz), got {fs_hz}")
        ch = self.n_channels
        self._n_log = 2 + len(SZ_V1_BANDS_HZ)
        self._n_pc = len(self._per_channel)
        self._pc = np.zeros((self._n_pc, ch), dtype=np.float64)
        self._n_abs = (len(self._instant) - 2 * self._n_pc) // 2
        self._abs = np.zeros((self._n_abs, ch), dtype=np.float64)
        self._baseline = np.zeros((self._n_log, ch), dtype=np.float64)
        self._have_baseline = np.zeros(ch, dtype=bool)
        self._flat_log_var = float(np.log(self.flat_var_uv2 + 1e-6))
        self._alpha = min(1.0, self.hop_s / self.baseline_tau_s)
        self._alpha_warm = min(1.0, self.hop_s / self.warmup_tau_s)
        self._max_rise = self.baseline_max_rise_per_s * self.hop_s
        self._n_steps = 0
        self._out = np.zeros(len(self.feature_names), dtype=np.float32)
        n_inst = len(self._instant)
        self._ctx = np.zeros((max(1, int(round(self.context_s / self.hop_s))), n_inst), dtype=np.float64)
        self._ctx_i = 0
        self._ctx_n = 0
        self._n_window: int | None = None  # spectral tables built for this window length

    def _build_tables(self, n: int) -> None:
        freqs = np.fft.rfftfreq(n, d=1.0 / self.fs_hz)
        bm = _band_matrix(freqs, SZ_V1_BANDS_HZ)
        counts = bm.sum(axis=0)
        if np.any(counts == 0):
            raise ValueError(f"sz_v1 window of {n} samples at {self.fs_hz} Hz is too short to resolve the delta band")
        # One product gives both: mean PSD per band (log band powers) and total power per band
        # (relative powers), bins as columns of the channel-major spectrum.
        self._band_tables = np.hstack([bm / counts, bm])                      # (n_freq, 2 n_bands)
        in_range = np.flatnonzero((freqs >= SZ_V1_BANDS_HZ[0][0]) & (freqs < SZ_V1_BANDS_HZ[-1][1]))
        self._sef_lo, self._sef_hi = int(in_range[0]), int(in_range[-1]) + 1  # the 1-80 Hz bins
        self._sef_of_bin = freqs / SZ_V1_BANDS_HZ[-1][1]
        self._hann = np.hanning(n)
        self._psd_scale = 1.0 / (self.fs_hz * np.sum(self._hann ** 2))
        # Channel-major float64 scratch: every reduction below runs along contiguous rows.
        self._xt = np.empty((self.n_channels, n))
        self._dx = np.empty((self.n_channels, n - 1))
        self._n_window = n

    def reset(self) -> None:
        self._baseline[:] = 0.0
        self._have_baseline[:] = False
        self._n_steps = 0
        self._ctx[:] = 0.0
        self._ctx_i = self._ctx_n = 0

    def make_prefilter(self) -> SosFilterState:
        """0.5 Hz high-pass (order 2): removes electrode drift/DC before windowing."""
        return SosFilterState.butter(2, 0.5, "highpass", self.fs_hz, self.n_channels)

    def _channel_features(self, x: np.ndarray, pc: np.ndarray) -> None:
        """Each channel's features of the window ``x`` (n, ch) into the rows of ``pc``, in
        ``_per_channel`` order: log line length and log variance, log band powers, relative band
        powers, spectral edge. Logs are of µV² (+ a floor), before the baseline is subtracted.

        Channel-major float64 with preallocated scratch, and one product for all band sums: the
        seizure loop's largest stage (docs/performance_log.md, "Late evening round")."""
        n = x.shape[0]
        eps = 1e-6  # µV²: floor for flat (disconnected) channels so log stays finite
        nb = len(SZ_V1_BANDS_HZ)
        xt = self._xt
        np.copyto(xt, x.T)
        xt -= xt.mean(axis=1, keepdims=True)
        dx = np.subtract(xt[:, 1:], xt[:, :-1], out=self._dx)
        pc[0] = np.log(np.abs(dx, out=dx).sum(axis=1) / (n - 1) + eps)
        pc[1] = np.log(np.einsum("cn,cn->c", xt, xt) / n + eps)
        spec = np.fft.rfft(xt * self._hann, axis=1)
        psd = spec.real ** 2 + spec.imag ** 2
        psd *= self._psd_scale                                      # (ch, n_freq), µV²/Hz
        bands = (psd @ self._band_tables).T                         # (2 n_bands, ch)
        pc[2:2 + nb] = np.log(bands[:nb] + eps)
        band_tot = bands[nb:]
        pc[2 + nb:2 + 2 * nb] = band_tot / (band_tot.sum(axis=0) + eps)
        # Spectral edge: the first 1-80 Hz bin where the cumulative power reaches 80 % (bin 0 for a
        # channel with no power there: a flat one).
        cum = np.cumsum(psd[:, self._sef_lo:self._sef_hi], axis=1)
        total = cum[:, -1:]
        edge = np.where(total[:, 0] > 0, self._sef_lo + (cum < 0.8 * total).sum(axis=1), 0)
        pc[2 + 2 * nb] = self._sef_of_bin[np.minimum(edge, self._sef_of_bin.size - 1)]

    def step(self, window: np.ndarray) -> np.ndarray:
        """Features of one window (n, ch); returns the preallocated ``(n_features,)`` float32 vector."""
        x = _as_window(window)
        n, ch = x.shape
        if ch != self.n_channels:
            raise ValueError(f"window has {ch} channels, pipeline sz_v1 was built for {self.n_channels}")
        if n != self._n_window:
            self._build_tables(n)
        pc = self._pc
        self._channel_features(x, pc)
        logs = pc[:self._n_log]
        if self._n_abs:
            # Absolute log line length / variance, before baseline subtraction (sz_v2):
            # they carry amplitude when there is no baseline yet (short recordings).
            self._abs[:] = logs[:2]
        # A flat window (a detached electrode, a zero-filled gap) says nothing about the patient's
        # normal: its log variance sits at log(eps) ≈ -14, and since the baseline falls freely it
        # would drop there and then take minutes to climb back (rise-limited), every later window
        # looking like a seizure meanwhile. Such channels neither start nor move the baseline.
        flat = pc[1] < self._flat_log_var
        self.all_flat = bool(flat.all())
        start = ~self._have_baseline & ~flat
        if start.any():
            self._baseline[:, start] = logs[:, start]
            self._have_baseline |= start
        dev = logs - self._baseline
        # Asymmetric, rate-limited EMA: rises at most baseline_max_rise_per_s (a
        # seizure must not become the new normal), falls freely. During warm-up
        # a fast time constant lets the baseline settle on the patient.
        self._n_steps += 1
        warm = self._n_steps * self.hop_s < self.warmup_s
        step = (self._alpha_warm if warm else self._alpha) * dev
        if not warm:
            np.minimum(step, self._max_rise, out=step)
        step[:, flat] = 0.0
        self._baseline += step
        pc[:self._n_log] = dev
        out = self._out
        n_inst = len(self._instant)
        n_base = 2 * self._n_pc
        # Medians reorder their table's rows in place: both are rewritten whole by the next step.
        out[1:n_base:2] = pc.max(axis=1)
        out[0:n_base:2] = median_in_place(pc, axis=1)
        if self._n_abs:
            out[n_base + 1:n_inst:2] = self._abs.max(axis=1)
            out[n_base:n_inst:2] = median_in_place(self._abs, axis=1)
        # Context: mean of the instantaneous vector over the last context_s (ring
        # of hops). It holds onset evidence through the low-voltage phase and
        # averages out single-window noise such as an interictal spike.
        self._ctx[self._ctx_i] = out[:n_inst]
        self._ctx_i = (self._ctx_i + 1) % self._ctx.shape[0]
        self._ctx_n = min(self._ctx_n + 1, self._ctx.shape[0])
        out[n_inst:2 * n_inst] = self._ctx.sum(axis=0) / self._ctx_n
        if self._age_feature:
            # How settled the baseline is (0 at start, 1 after warm-up): lets a model
            # use different evidence before a patient baseline exists.
            out[2 * n_inst] = min(1.0, self._n_steps * self.hop_s / self.warmup_s) if self.warmup_s > 0 else 1.0
        return out


class SzV2Pipeline(SzV1Pipeline):
    """``sz_v2``: ``sz_v1`` with a short start-up and absolute amplitude features.

    The ``sz_v1`` features plus the median/max over channels of the absolute
    log line length and log variance (``*_ll_abs``, ``*_pow_abs``, and their
    2 s means): before a patient baseline exists (a short recording, the
    first seconds of a session) amplitude is the main seizure evidence; and
    ``warmup_frac`` (time since start / ``warmup_s``, capped at 1), which tells
    a model whether the baseline-relative features mean anything yet.
    The running baseline's warm-up differs: it follows a 2 s EMA (no rise limit) for the first 8 s, then the
    slow rise-limited 120 s EMA. ``sz_v1`` waited 30 s, longer than the time to
    the first seizure of the default demo (10 s), during which a seizure
    would have been learned as background. The cost: the first 8 s of a
    session are not usable, and a seizure already running at start-up is
    still taken as background (documented in models/seizure/MODEL_CARD.md).
    """

    name = "sz_v2"
    version = 2
    warmup_s = 8.0
    warmup_tau_s = 2.0
    _instant = SzV1Pipeline._instant + ("med_ll_abs", "max_ll_abs", "med_pow_abs", "max_pow_abs")
    _age_feature = True
    feature_names = _instant + tuple(f"{n}_avg2s" for n in _instant) + ("warmup_frac",)


PIPELINES: dict[str, Callable[..., FeaturePipeline]] = {
    SzV1Pipeline.name: SzV1Pipeline,
    SzV2Pipeline.name: SzV2Pipeline,
}


def make_pipeline(name: str, fs_hz: float, n_channels: int, hop_s: float = 0.25) -> FeaturePipeline:
    """Instantiate the pipeline registered under ``name`` (see ``PIPELINES``)."""
    try:
        cls = PIPELINES[name]
    except KeyError:
        raise KeyError(f"unknown feature pipeline {name!r}; known: {sorted(PIPELINES)}") from None
    return cls(fs_hz=fs_hz, n_channels=n_channels, hop_s=hop_s)
