"""Adaptive (aDBS-like) stimulation: a biomarker sets the amplitude of repeated bursts.

Model: Medtronic Percept / ADAPT-PD and the Summit RC+S example (REFERENCE.md §3):
the control signal is LFP band power in 8–30 Hz, compared with one threshold
(single mode) or two (dual mode); the amplitude moves between a lower and an
upper bound at limited ramp rates; the biomarker is blanked for a while after
each state change. RC+S example numbers (REFERENCE.md §3, Gilron 2021): FFT
every 500 ms, decision every 30 s, ramp up 0.03 mA/s (30 µA/s), ramp down
0.12 mA/s (120 µA/s), 15 s blanking — these are the defaults below.

Exact semantics of ``AdaptivePolicy.step(biomarker, t)``:

1. **Decisions** are made on a fixed grid ``t0 + k * decision_period_s``
   (``t0`` = time of the first step). A decision uses the mean of the finite,
   non-blanked biomarker values received in ``(previous decision, this
   decision]``; with no such value the state is kept (event ``reason``
   ``no_valid_biomarker``).
2. **States.** single: ``high`` if mean > ``threshold`` else ``low``.
   dual (Percept-like): ``high`` if mean > ``threshold_high``, ``low`` if mean
   < ``threshold_low``, else ``hold`` (amplitude frozen where it is).
   ``high`` targets ``max_amplitude_ua``, ``low`` targets ``min_amplitude_ua``.
   The policy starts in ``low`` at ``min_amplitude_ua``.
3. **Ramps.** The amplitude moves linearly from its value at the decision
   time toward the target at ``ramp_up_ua_per_s`` / ``ramp_down_ua_per_s``
   and stops at the target: ``amplitude_at(t)`` is exact (piecewise linear),
   whatever the step cadence.
4. **Blanking.** After each state change at time ``c``, biomarker values with
   time in ``[c, c + blanking_s)`` are ignored (stimulation transients would
   otherwise feed back into the biomarker).
5. **Stimulation output.** Stimulation is a train of bursts of the ``stim``
   template (e.g. 130 Hz biphasic, or a sine segment), one every
   ``stim_period_s`` on the grid ``t0 + k * stim_period_s`` (catch-up rule of
   ``open_loop.BurstSchedule``: at most one per step, missed ones skipped and
   counted). Each request is the template with ``amplitude_ua`` =
   ``amplitude_at`` the request time. Continuous use: set ``stim_period_s`` to
   the burst duration (back-to-back segments, each an amplitude update). A
   burst whose amplitude is 0 (``min_amplitude_ua = 0`` and fully ramped down)
   is not requested (counted in ``n_zero``).
6. Events: one ``DECISION`` event ``what="adaptive_state"`` per decision that
   changes the state, with the biomarker mean, the new and old state, the
   amplitude at the decision and the target; ``what="adaptive_decision"``
   (``STATUS``) for decisions without a change. A non-finite biomarker gives a
   ``FAULT`` warning event and is not used.

``BandPowerBiomarker`` turns signal chunks into the biomarker (mean PSD in
the band, via ``controller.features.band_powers``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from controller.events import Event, EventKind
from controller.features import band_powers
from controller.policies.base import PolicyOutput, Reconfigurable, check_burst_spacing, check_time, min_burst_spacing_s
from controller.policies.open_loop import BurstSchedule, check_number, check_stim
from controller.safety.governor import StimRequest
from drivers.params import StimParams

__all__ = ["AdaptivePolicy", "BandPowerBiomarker", "RCS_DECISION_PERIOD_S", "RCS_RAMP_UP_UA_PER_S",
           "RCS_RAMP_DOWN_UA_PER_S", "RCS_BLANKING_S", "AADBS_BAND_HZ"]

AADBS_BAND_HZ = (8.0, 30.0)       # REFERENCE.md §3: Percept / ADAPT-PD control band
RCS_FFT_HOP_S = 0.5               # REFERENCE.md §3: RC+S FFT every 500 ms
RCS_DECISION_PERIOD_S = 30.0      # REFERENCE.md §3: decision every 30 s
RCS_RAMP_UP_UA_PER_S = 30.0       # REFERENCE.md §3: 0.03 mA/s
RCS_RAMP_DOWN_UA_PER_S = 120.0    # REFERENCE.md §3: 0.12 mA/s
RCS_BLANKING_S = 15.0             # REFERENCE.md §3: 15 s blanking after each state change

_STATES = ("low", "hold", "high")


class AdaptivePolicy(Reconfigurable):
    """Biomarker-driven amplitude adaptation with single or dual thresholds; ``step(biomarker, t)``.

    Semantics (decision grid, states, ramps, blanking, bursts) are in the
    module docstring. ``thresholds`` is ``(threshold,)`` for ``mode='single'``
    and ``(threshold_low, threshold_high)`` for ``mode='dual'``, in the
    biomarker's units (µV²/Hz for ``BandPowerBiomarker``).
    """

    def __init__(self, thresholds, stim: StimParams, min_amplitude_ua: float, max_amplitude_ua: float,
                 mode: str = "single", ramp_up_ua_per_s: float = RCS_RAMP_UP_UA_PER_S,
                 ramp_down_ua_per_s: float = RCS_RAMP_DOWN_UA_PER_S,
                 decision_period_s: float = RCS_DECISION_PERIOD_S, blanking_s: float = RCS_BLANKING_S,
                 stim_period_s: float = 1.0, source: str = "policy.adaptive") -> None:
        if mode not in ("single", "dual"):
            raise ValueError(f"mode={mode!r} invalid, expected 'single' or 'dual'")
        th = [thresholds] if isinstance(thresholds, numbers.Real) else list(thresholds)
        need = 1 if mode == "single" else 2
        if len(th) != need:
            raise ValueError(f"thresholds={thresholds!r} invalid for mode={mode!r}, expected {need} value(s)")
        th = [check_number(f"thresholds[{i}]", v) for i, v in enumerate(th)]
        if mode == "dual" and not th[0] < th[1]:
            raise ValueError(f"thresholds={thresholds!r} invalid, expected threshold_low < threshold_high")
        self.mode = mode
        self.thresholds = tuple(th)
        self.stim = check_stim(stim, "AdaptivePolicy")
        self.min_amplitude_ua = check_number("min_amplitude_ua", min_amplitude_ua, 0.0)
        self.max_amplitude_ua = check_number("max_amplitude_ua", max_amplitude_ua, self.min_amplitude_ua, lo_open=True)
        self.ramp_up_ua_per_s = check_number("ramp_up_ua_per_s", ramp_up_ua_per_s, 0.0, lo_open=True)
        self.ramp_down_ua_per_s = check_number("ramp_down_ua_per_s", ramp_down_ua_per_s, 0.0, lo_open=True)
        self.decision_period_s = check_number("decision_period_s", decision_period_s, 0.0, lo_open=True)
        self.blanking_s = check_number("blanking_s", blanking_s, 0.0)
        self.stim_period_s = check_number("stim_period_s", stim_period_s, 0.0, lo_open=True)
        check_burst_spacing("stim_period_s", self.stim_period_s, stim, "AdaptivePolicy")
        self.source = source
        self.reset()

    STIM_FIELDS_IT_SETS = ("amplitude_ua",)   # amplitude_at(t): set min/max_amplitude_ua instead

    def params(self) -> dict:
        return {"thresholds": self.thresholds, "stim": self.stim, "min_amplitude_ua": self.min_amplitude_ua,
                "max_amplitude_ua": self.max_amplitude_ua, "mode": self.mode,
                "ramp_up_ua_per_s": self.ramp_up_ua_per_s, "ramp_down_ua_per_s": self.ramp_down_ua_per_s,
                "decision_period_s": self.decision_period_s, "blanking_s": self.blanking_s,
                "stim_period_s": self.stim_period_s, "source": self.source}

    def _updated(self, names: set[str]) -> None:
        if "stim" in names and self._sched is not None:   # a longer burst needs a longer gap before the next
            self._sched.min_spacing_s = min_burst_spacing_s(self.stim)

    def reset(self) -> None:
        """Forget all state (new session): state ``low`` at ``min_amplitude_ua``."""
        self._t0: float | None = None
        self._last_t = -math.inf
        self.state = "low"
        self._ramp_t = -math.inf              # start of the current ramp segment
        self._ramp_from_ua = self.min_amplitude_ua
        self._target_ua = self.min_amplitude_ua
        self._blank_until = -math.inf
        self._next_decision_t = math.inf
        self._sum = 0.0
        self._n = 0
        self._sched: BurstSchedule | None = None
        self.n_requests = 0
        self.n_zero = 0
        self.n_blanked = 0
        self.n_decisions = 0

    # -- amplitude trajectory (pure function of the last decision) --------------
    def amplitude_at(self, t: float) -> float:
        """Amplitude (µA) at time ``t`` >= the last decision: linear ramp from the decision value to the target."""
        a0, target = self._ramp_from_ua, self._target_ua
        dt = max(0.0, t - self._ramp_t)
        if target > a0:
            return min(target, a0 + self.ramp_up_ua_per_s * dt)
        if target < a0:
            return max(target, a0 - self.ramp_down_ua_per_s * dt)
        return a0

    @property
    def target_ua(self) -> float:
        """Amplitude the current ramp is heading to (µA)."""
        return self._target_ua

    def _classify(self, mean: float) -> str:
        if self.mode == "single":
            return "high" if mean > self.thresholds[0] else "low"
        if mean > self.thresholds[1]:
            return "high"
        if mean < self.thresholds[0]:
            return "low"
        return "hold"

    def _decide(self, d: float, events: list[Event]) -> None:
        self.n_decisions += 1
        if self._n == 0:
            events.append(Event(d, EventKind.STATUS, self.source, {
                "what": "adaptive_decision", "state": self.state, "reason": "no_valid_biomarker",
                "amplitude_ua": self.amplitude_at(d)}))
            return
        mean = self._sum / self._n
        n = self._n
        self._sum, self._n = 0.0, 0
        new = self._classify(mean)
        amp = self.amplitude_at(d)
        if new == self.state:
            events.append(Event(d, EventKind.STATUS, self.source, {
                "what": "adaptive_decision", "state": self.state, "biomarker": mean, "n_values": n,
                "amplitude_ua": amp}))
            return
        old = self.state
        self.state = new
        self._ramp_t = d
        self._ramp_from_ua = amp
        self._target_ua = {"high": self.max_amplitude_ua, "low": self.min_amplitude_ua, "hold": amp}[new]
        self._blank_until = d + self.blanking_s
        events.append(Event(d, EventKind.DECISION, self.source, {
            "what": "adaptive_state", "state": new, "previous_state": old, "biomarker": mean, "n_values": n,
            "thresholds": list(self.thresholds), "amplitude_ua": amp, "target_ua": self._target_ua,
            "ramp_ua_per_s": self.ramp_up_ua_per_s if self._target_ua > amp else self.ramp_down_ua_per_s,
            "blanked_until_t": self._blank_until}))

    def step(self, biomarker: float, t: float) -> PolicyOutput:
        """Advance to ``t`` with the biomarker value computed for the window ending at ``t``."""
        t = self._last_t = check_time(t, self._last_t)
        requests: list[StimRequest] = []
        events: list[Event] = []
        if self._t0 is None:
            self._t0 = t
            self._ramp_t = t
            self._next_decision_t = t + self.decision_period_s
            t0 = t
            self._sched = BurstSchedule(t0, lambda due: t0 + (round((due - t0) / self.stim_period_s) + 1)
                                        * self.stim_period_s, min_spacing_s=min_burst_spacing_s(self.stim))
        # Decisions strictly before t use only values received before them.
        while self._next_decision_t < t:
            self._decide(self._next_decision_t, events)
            self._next_decision_t += self.decision_period_s
        finite = not isinstance(biomarker, bool) and isinstance(biomarker, numbers.Real) and math.isfinite(biomarker)
        if not finite:
            events.append(Event(t, EventKind.FAULT, self.source, {
                "what": "invalid_biomarker", "severity": "warning", "biomarker": biomarker,
                "reason": f"biomarker={biomarker!r} is not finite: value ignored, amplitude keeps its course"}))
        elif t < self._blank_until:
            self.n_blanked += 1
        else:
            self._sum += float(biomarker)
            self._n += 1
        if self._next_decision_t <= t:
            self._decide(self._next_decision_t, events)
            self._next_decision_t += self.decision_period_s

        got = self._sched.take(t)
        if got is not None:
            due, _, skipped = got
            amp = self.amplitude_at(t)
            if amp <= 0.0:
                self.n_zero += 1
            else:
                self.n_requests += 1
                meta = {"due_t": due, "skipped": skipped, "state": self.state, "amplitude_ua": amp,
                        "window_end_t": t}
                requests.append(StimRequest(t=t, source=self.source, params=self.stim.with_(amplitude_ua=amp),
                                            at=None, meta=meta))
                events.append(Event(t, EventKind.DECISION, self.source, {"what": "stim_request", **meta}))
        return requests, events


class BandPowerBiomarker:
    """Band power biomarker from signal chunks: mean PSD (µV²/Hz) in ``band`` over channels.

    Every ``hop_s`` it evaluates the last ``window_s`` of signal with
    ``controller.features.band_powers`` (one Hann periodogram per window) and
    averages over channels. ``step(chunk, timestamps) -> (t, values)`` returns
    the window-end timestamps and values of all windows completed by this
    chunk (empty arrays if none); the first window completes once
    ``window_s`` of signal has arrived. Defaults follow the RC+S example: FFT
    every 0.5 s, band 8–30 Hz (REFERENCE.md §3).
    """

    def __init__(self, fs_hz: float, band: tuple[float, float] = AADBS_BAND_HZ, window_s: float = 1.0,
                 hop_s: float = RCS_FFT_HOP_S, n_channels: int = 1) -> None:
        self.fs_hz = check_number("fs_hz", fs_hz, 0.0, lo_open=True)
        lo, hi = (check_number("band[0]", band[0], 0.0), check_number("band[1]", band[1], 0.0))
        if not lo < hi <= self.fs_hz / 2:
            raise ValueError(f"band={band!r} invalid, expected 0 <= lo < hi <= Nyquist {self.fs_hz / 2} Hz")
        self.band = (lo, hi)
        self.window_n = int(round(check_number("window_s", window_s, 0.0, lo_open=True) * self.fs_hz))
        self.hop_n = int(round(check_number("hop_s", hop_s, 0.0, lo_open=True) * self.fs_hz))
        if self.window_n < 4 or self.hop_n < 1:
            raise ValueError(f"window_s={window_s}, hop_s={hop_s} invalid at fs_hz={fs_hz}: expected a window "
                             ">= 4 samples and a hop >= 1 sample")
        if isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral) or n_channels < 1:
            raise ValueError(f"n_channels={n_channels!r} invalid, expected an integer >= 1")
        self.n_channels = int(n_channels)
        self.window_s = self.window_n / self.fs_hz
        self.hop_s = self.hop_n / self.fs_hz
        self._buf = np.zeros((self.window_n + 1024, self.n_channels), dtype=np.float64)
        self.reset()

    def reset(self) -> None:
        """Forget the signal history."""
        self._n_hist = 0        # valid samples at the start of _buf (<= window_n - 1)
        self._n_seen = 0        # samples seen since reset
        self._next_end = self.window_n  # global sample count at which the next window ends

    def step(self, chunk: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed one chunk ``(n, n_channels)`` µV with its ``(n,)`` timestamps; return ``(t, values)``."""
        x = np.asarray(chunk)
        if x.ndim == 1:
            x = x[:, None]
        ts = np.asarray(timestamps, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_channels or ts.shape != (x.shape[0],):
            raise ValueError(f"chunk shape {np.shape(chunk)} / timestamps shape {ts.shape} invalid, expected "
                             f"(n, {self.n_channels}) and (n,)")
        m = x.shape[0]
        total = self._n_hist + m
        if total > self._buf.shape[0]:
            grown = np.zeros((max(total, 2 * self._buf.shape[0]), self.n_channels), dtype=np.float64)
            grown[:self._n_hist] = self._buf[:self._n_hist]
            self._buf = grown
        self._buf[self._n_hist:total] = x
        # Window ends as global sample counts; the first one once window_n samples have arrived.
        ends = np.arange(self._next_end, self._n_seen + m + 1, self.hop_n, dtype=np.int64) - self._n_seen
        if ends.size:
            self._next_end += ends.size * self.hop_n
            offs = ends + self._n_hist  # exclusive end positions in _buf
            idx = offs[:, None] - self.window_n + np.arange(self.window_n)[None, :]
            # (k, window, ch) -> (window, k*ch): one vectorized band_powers call for all windows.
            wins = self._buf[idx].transpose(1, 0, 2).reshape(self.window_n, -1)
            bp = band_powers(wins, self.fs_hz, [self.band])[0].reshape(ends.size, self.n_channels)
            values = bp.mean(axis=1)
            times = ts[ends - 1]
        else:
            values = np.empty(0)
            times = np.empty(0)
        self._n_seen += m
        keep = min(self.window_n - 1, total)
        self._buf[:keep] = self._buf[total - keep:total]
        self._n_hist = keep
        return times, values
