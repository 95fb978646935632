"""Personalized-frequency tACS: estimate the individual peak frequency (IPF), then stimulate at it.

``PersonalizedFrequencyPolicy.step(chunk, t)``:

1. **Baseline.** The first ``baseline_s`` of signal (counted in samples, so
   the estimate does not depend on chunk timing) is copied into a
   preallocated buffer; channels are averaged after the estimate (spectra
   are averaged, not signals, so channels with opposite phase do not cancel).
2. **Clean segments** (once, when the baseline is complete): the baseline is
   cut into Welch segments (Hann, ``segment_s``, 50 % overlap). A segment is
   rejected when its power over ``fit_band_hz`` (mean over channels) is not
   finite or lies more than ``max_segment_excess_db`` (10 dB: ten times the
   power, about three times the amplitude) above the quietest tenth of the
   segments: a seizure, an interictal spike or a movement artifact is not the
   resting rhythm whose peak is wanted, and one such segment can outweigh all
   the others (a seizure in a 20 s baseline moved the simulated patient's
   10.5 Hz estimate to 8.8 Hz). Normal variation stays well inside: ≤ 7.4 dB
   over every 5.12 s Delhi interictal segment, ≤ 4 dB over 2 min of the
   simulated background. If fewer than ``min_clean_fraction`` (half) of the
   segments are left, the baseline is refused: a baseline mostly made of
   something else cannot say what the resting peak is. (Were more than nine
   tenths of it a seizure, the seizure would be the reference; the rule
   cannot see that.)
3. **Estimate**: Welch PSD per channel over the clean segments, mean over channels. The
   aperiodic 1/f background is a straight line in log10(PSD) vs log10(f),
   fitted by least squares over ``fit_band_hz`` *excluding* the search band.
   The peak is the largest residual (dB above the fit) among bins inside
   ``search_band_hz``; its frequency is refined by parabolic interpolation of
   the residual (dB) over the peak bin and its two neighbours.
4. **Clear-peak rule** (otherwise no stimulation, ever, for this session):
   the peak must (a) be strictly inside the search band (not on its edge
   bins), (b) rise above the aperiodic fit by at least
   ``max(min_peak_db, min_z * noise_db)`` — 3 dB (2× in power) and 3 standard
   errors of a Welch dB estimate, ``noise_db = 10 log10(e) / sqrt(K)`` for K
   segments, so a short baseline needs a taller peak — and (c) have a
   prominence of at least ``min_prominence_db`` (1 dB) within the band.
   Reported confidence: ``peak_db`` (dB above the fit, also ``confidence_db``)
   and ``confidence_z = peak_db / noise_db``.
5. **Stimulation.** If accepted, tACS bursts: the ``stim`` template (must be
   ``Waveform.SINE``) with ``frequency_hz = IPF``, due every ``period_s`` from
   the end of the baseline (+ ``delay_s``), ``n_bursts`` at most (``None``:
   unlimited). Catch-up rule of ``open_loop.BurstSchedule``.

Events: ``DECISION`` ``what="ipf_estimate"`` with ``ipf_hz``, ``peak_db``
(= confidence), ``peak_psd_uv2_hz``, ``accepted``, ``reason``, ``n_segments``
(clean), ``n_segments_rejected`` and ``rejected_segments_s`` (their start, s
from the start of the baseline, counted in samples) and ``baseline_start_t`` (its first
sample's time); each request
gives ``what="stim_request"``. tES limits (amplitude, ramps, duration, session
dose; REFERENCE.md §4) are enforced by the governor's ``tes`` profile, not here.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
from scipy import signal

from controller.events import Event, EventKind
from controller.policies.base import PolicyOutput, Reconfigurable, check_burst_spacing, check_time, min_burst_spacing_s
from controller.policies.open_loop import BurstSchedule, check_number, check_stim
from controller.safety.governor import StimRequest
from drivers.params import StimParams, Waveform

__all__ = ["PersonalizedFrequencyPolicy", "estimate_ipf", "IpfEstimate", "ALPHA_BAND_HZ"]

ALPHA_BAND_HZ = (7.0, 14.0)


class IpfEstimate(dict):
    """Result of ``estimate_ipf``: a dict with ``ipf_hz``, ``peak_db``, ``peak_psd_uv2_hz``, ``accepted``, ``reason``."""


def estimate_ipf(x: np.ndarray, fs_hz: float, search_band_hz=ALPHA_BAND_HZ, fit_band_hz=(2.0, 40.0),
                 segment_s: float = 2.0, min_peak_db: float = 3.0, min_z: float = 3.0,
                 min_prominence_db: float = 1.0, max_segment_excess_db: float = 10.0,
                 min_clean_fraction: float = 0.5) -> IpfEstimate:
    """Individual peak frequency of ``x`` ``(n, ch)`` µV (rule in the module docstring); pure function."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    fs = check_number("fs_hz", fs_hz, 0.0, lo_open=True)
    slo, shi = search_band_hz
    flo, fhi = fit_band_hz
    if not (0 < flo < fhi <= fs / 2 and flo <= slo < shi <= fhi):
        raise ValueError(f"search_band_hz={search_band_hz!r} / fit_band_hz={fit_band_hz!r} invalid at fs_hz={fs}: "
                         f"expected 0 < fit_lo <= search_lo < search_hi <= fit_hi <= Nyquist {fs / 2} Hz")
    nper = int(round(segment_s * fs))
    if x.shape[0] < nper:
        raise ValueError(f"signal of {x.shape[0]} samples invalid, expected >= one segment "
                         f"segment_s*fs_hz = {nper} samples")
    max_excess = check_number("max_segment_excess_db", max_segment_excess_db, 0.0, lo_open=True)
    min_clean = check_number("min_clean_fraction", min_clean_fraction, 0.0, 1.0, lo_open=True)
    # The segments of a Welch estimate, kept apart so the unclean ones can be left out of the mean
    # (their mean over all segments is scipy.signal.welch's result).
    freqs, seg_mid_s, seg_psd = signal.spectrogram(x, fs=fs, window="hann", nperseg=nper, noverlap=nper // 2,
                                                   detrend="constant", axis=0, mode="psd")  # (f, ch, K)
    in_fit = (freqs >= flo) & (freqs <= fhi)
    in_search = (freqs >= slo) & (freqs <= shi)
    bg = in_fit & ~in_search
    out = IpfEstimate(ipf_hz=None, peak_db=None, peak_psd_uv2_hz=None, accepted=False, reason="",
                      resolution_hz=float(freqs[1] - freqs[0]))
    if np.count_nonzero(in_search) < 3 or np.count_nonzero(bg) < 3:
        out["reason"] = "too_few_bins: lengthen segment_s or widen the bands"
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        seg_db = 10 * np.log10(seg_psd[in_fit].sum(axis=0).mean(axis=0))
    finite = np.isfinite(seg_db)
    clean = finite.copy()
    if finite.any():
        clean &= seg_db <= np.percentile(seg_db[finite], 10) + max_excess
    n_all, n_clean = seg_db.size, int(np.count_nonzero(clean))
    out["n_segments"] = n_clean
    out["n_segments_rejected"] = n_all - n_clean
    out["rejected_segments_s"] = [round(float(m - nper / (2 * fs)), 3) for m in seg_mid_s[~clean]]
    if not finite.any():
        out["reason"] = "non_finite_or_zero_spectrum"
        return out
    if n_clean < min_clean * n_all:
        out["reason"] = (f"baseline_not_clean: {n_all - n_clean} of {n_all} segments rejected (NaN, or > "
                         f"{max_excess:g} dB above the quietest tenth: seizure, spikes, artifacts), "
                         f"< {min_clean:.0%} clean")
        return out
    psd = seg_psd[:, :, clean].mean(axis=2).mean(axis=1)
    if not np.all(np.isfinite(psd[in_fit])) or np.any(psd[in_fit] <= 0):
        out["reason"] = "non_finite_or_zero_spectrum"
        return out
    lf = np.log10(freqs[in_fit])
    lp = 10 * np.log10(psd[in_fit])
    bg_fit = bg[in_fit]
    slope, icpt = np.polyfit(lf[bg_fit], lp[bg_fit], 1)
    resid = lp - (slope * lf + icpt)  # dB above the aperiodic fit, on the fit-band bins
    f_fit = freqs[in_fit]
    idx = np.flatnonzero(in_search[in_fit])
    k = int(idx[np.argmax(resid[idx])])
    # A Welch average of K segments has a dB standard error of about 10*log10(e)/sqrt(K)
    # (chi-square with 2K degrees of freedom): short baselines need a taller peak.
    noise_db = 10 * math.log10(math.e) / math.sqrt(n_clean)
    out["noise_db"] = noise_db
    out["peak_db"] = float(resid[k])
    out["peak_psd_uv2_hz"] = float(psd[in_fit][k])
    out["aperiodic_slope"] = float(slope / 10)  # log10 PSD per decade of frequency
    out["ipf_hz"] = float(f_fit[k])
    if k in (idx[0], idx[-1]):
        out["reason"] = "peak_on_search_band_edge"
        return out
    a, b, c = resid[k - 1], resid[k], resid[k + 1]
    denom = a - 2 * b + c
    delta = 0.5 * (a - c) / denom if denom < 0 else 0.0
    out["ipf_hz"] = float(f_fit[k] + delta * (freqs[1] - freqs[0]))
    out["peak_db"] = float(b - 0.25 * (a - c) * delta)
    # Prominence (as scipy's): rise above the higher of the two minima on either side of it within the band,
    # so a monotonic tilt left over by an imperfect 1/f fit is not taken for a peak.
    left, right = resid[idx[0]:k + 1].min(), resid[k:idx[-1] + 1].min()
    out["prominence_db"] = float(out["peak_db"] - max(left, right))
    out["confidence_z"] = float(out["peak_db"] / noise_db)
    need = max(min_peak_db, min_z * noise_db)
    if out["peak_db"] < need:
        out["reason"] = f"peak {out['peak_db']:.3g} dB above the 1/f fit < required {need:.3g} dB"
        return out
    if out["prominence_db"] < min_prominence_db:
        out["reason"] = f"peak prominence {out['prominence_db']:.3g} dB < required {min_prominence_db} dB"
        return out
    out["accepted"] = True
    out["reason"] = "clear_peak"
    return out


class PersonalizedFrequencyPolicy(Reconfigurable):
    """tACS at the individual peak frequency estimated from a baseline; ``step(chunk, t)``.

    ``chunk`` is ``(n, n_channels)`` µV (or ``None`` once the baseline is
    done, to only advance the schedule), ``t`` the session time of the end of
    the chunk. Samples after the baseline are not used (the estimate is made
    once per session; ``reset`` starts a new baseline). Rules in the module docstring.
    """

    def __init__(self, fs_hz: float, baseline_s: float, stim: StimParams, period_s: float,
                 n_channels: int = 1, search_band_hz=ALPHA_BAND_HZ, fit_band_hz=(2.0, 40.0),
                 segment_s: float = 2.0, min_peak_db: float = 3.0, min_z: float = 3.0,
                 min_prominence_db: float = 1.0, max_segment_excess_db: float = 10.0,
                 min_clean_fraction: float = 0.5, delay_s: float = 0.0,
                 n_bursts: int | None = None, lookahead_s: float = 0.0,
                 source: str = "policy.personalized") -> None:
        self.fs_hz = check_number("fs_hz", fs_hz, 0.0, lo_open=True)
        self.baseline_s = check_number("baseline_s", baseline_s, 0.0, lo_open=True)
        self.stim = check_stim(stim, "PersonalizedFrequencyPolicy")
        if stim.waveform is not Waveform.SINE:
            raise ValueError(f"PersonalizedFrequencyPolicy stim waveform={stim.waveform} invalid, expected sine (tACS)")
        self.period_s = check_number("period_s", period_s, 0.0, lo_open=True)
        check_burst_spacing("period_s", self.period_s, stim, "PersonalizedFrequencyPolicy")
        if isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral) or n_channels < 1:
            raise ValueError(f"n_channels={n_channels!r} invalid, expected an integer >= 1")
        self.n_channels = int(n_channels)
        self.search_band_hz = tuple(float(v) for v in search_band_hz)
        self.fit_band_hz = tuple(float(v) for v in fit_band_hz)
        self.segment_s = check_number("segment_s", segment_s, 0.0, lo_open=True)
        self.min_peak_db = check_number("min_peak_db", min_peak_db, 0.0)
        self.min_z = check_number("min_z", min_z, 0.0)
        self.min_prominence_db = check_number("min_prominence_db", min_prominence_db, 0.0)
        self.max_segment_excess_db = check_number("max_segment_excess_db", max_segment_excess_db, 0.0, lo_open=True)
        self.min_clean_fraction = check_number("min_clean_fraction", min_clean_fraction, 0.0, 1.0, lo_open=True)
        self.delay_s = check_number("delay_s", delay_s, 0.0)
        if n_bursts is not None and (isinstance(n_bursts, bool) or not isinstance(n_bursts, numbers.Integral)
                                     or n_bursts < 1):
            raise ValueError(f"n_bursts={n_bursts!r} invalid, expected None or an integer >= 1")
        self.n_bursts = n_bursts
        self.lookahead_s = check_number("lookahead_s", lookahead_s, 0.0)
        self.source = source
        self._baseline_n = int(round(self.baseline_s * self.fs_hz))
        if self._baseline_n < int(round(self.segment_s * self.fs_hz)):
            raise ValueError(f"baseline_s={baseline_s} invalid, expected >= segment_s={segment_s} (one Welch segment)")
        # Fail at construction, not at the end of the baseline, on bands that cannot fit.
        estimate_ipf(np.zeros((int(round(self.segment_s * self.fs_hz)), 1)), self.fs_hz, self.search_band_hz,
                     self.fit_band_hz, self.segment_s, self.min_peak_db)
        self._buf = np.zeros((self._baseline_n, self.n_channels), dtype=np.float64)
        self.reset()

    STIM_FIELDS_IT_SETS = ("frequency_hz",)   # the estimated IPF

    def params(self) -> dict:
        return {"fs_hz": self.fs_hz, "baseline_s": self.baseline_s, "stim": self.stim, "period_s": self.period_s,
                "n_channels": self.n_channels, "search_band_hz": self.search_band_hz,
                "fit_band_hz": self.fit_band_hz, "segment_s": self.segment_s, "min_peak_db": self.min_peak_db,
                "min_z": self.min_z, "min_prominence_db": self.min_prominence_db,
                "max_segment_excess_db": self.max_segment_excess_db, "min_clean_fraction": self.min_clean_fraction,
                "delay_s": self.delay_s,
                "n_bursts": self.n_bursts, "lookahead_s": self.lookahead_s, "source": self.source}

    def _updated(self, names: set[str]) -> None:
        if "stim" in names and self._sched is not None:   # a longer burst needs a longer gap before the next
            self._sched.min_spacing_s = min_burst_spacing_s(self.stim)

    def reset(self) -> None:
        """Forget the baseline and the estimate (new session)."""
        self._n = 0
        self._start_t: float | None = None
        self._last_t = -math.inf
        self.estimate: IpfEstimate | None = None
        self._sched: BurstSchedule | None = None
        self.n_requests = 0

    @property
    def ipf_hz(self) -> float | None:
        """Accepted IPF (Hz), or ``None`` before the estimate or when it was refused."""
        return self.estimate["ipf_hz"] if self.estimate is not None and self.estimate["accepted"] else None

    def step(self, chunk: np.ndarray | None, t: float) -> PolicyOutput:
        """Feed the chunk ending at ``t``; return ``(requests, events)``."""
        t = self._last_t = check_time(t, self._last_t)
        requests: list[StimRequest] = []
        events: list[Event] = []
        if self.estimate is None:
            if chunk is None:
                return requests, events
            x = np.asarray(chunk)
            if x.ndim == 1:
                x = x[:, None]
            if x.ndim != 2 or x.shape[1] != self.n_channels:
                raise ValueError(f"chunk shape {np.shape(chunk)} invalid, expected (n, {self.n_channels})")
            if self._n == 0 and x.shape[0]:   # t is the chunk's last sample's time
                self._start_t = t - (x.shape[0] - 1) / self.fs_hz
            take = min(x.shape[0], self._baseline_n - self._n)
            self._buf[self._n:self._n + take] = x[:take]
            self._n += take
            if self._n < self._baseline_n:
                return requests, events
            est = estimate_ipf(self._buf, self.fs_hz, self.search_band_hz, self.fit_band_hz, self.segment_s,
                               self.min_peak_db, self.min_z, self.min_prominence_db, self.max_segment_excess_db,
                               self.min_clean_fraction)
            self.estimate = est
            events.append(Event(t, EventKind.DECISION, self.source, {
                "what": "ipf_estimate", **est, "confidence_db": est["peak_db"], "baseline_s": self.baseline_s,
                "segment_s": self.segment_s, "baseline_start_t": self._start_t,
                "search_band_hz": list(self.search_band_hz), "min_peak_db": self.min_peak_db,
                "stimulation": "scheduled" if est["accepted"] else "refused"}))
            if est["accepted"]:
                t0 = t + self.delay_s
                self._sched = BurstSchedule(
                    t0, lambda due: t0 + (round((due - t0) / self.period_s) + 1) * self.period_s, self.lookahead_s,
                    min_burst_spacing_s(self.stim))
        if self._sched is None or (self.n_bursts is not None and self.n_requests >= self.n_bursts):
            return requests, events
        got = self._sched.take(t)
        if got is not None:
            due, at, skipped = got
            self.n_requests += 1
            params = self.stim.with_(frequency_hz=self.estimate["ipf_hz"])
            meta = {"due_t": due, "skipped": skipped, "burst_index": self.n_requests,
                    "ipf_hz": self.estimate["ipf_hz"], "window_end_t": t}
            requests.append(StimRequest(t=t, source=self.source, params=params, at=at, meta=meta))
            events.append(Event(t, EventKind.DECISION, self.source, {"what": "stim_request", **meta}))
        return requests, events
