"""RNS-like responsive stimulation: detect with hysteresis, stimulate with bursts, then rest.

NeuroPace RNS delivers up to two bursts per therapy in response to a
detection (REFERENCE.md §3) and requires detections to persist for a minimum
duration (e.g. 0.64 s for its bandpass detector, §3). This policy mirrors that:

- a detection starts once ``p >= threshold_on`` has held for ``min_duration_s``
  and ends when ``p < threshold_off`` (hysteresis, ``threshold_off <= threshold_on``);
- at detection start it requests one burst; with ``bursts_per_detection=2`` a
  second burst follows ``burst_interval_s`` later *if the detection is still
  present* (as RNS re-checks the detection before the next burst);
- no new therapy starts within ``refractory_s`` of the last burst; a detection
  that starts inside the refractory period is treated once that period ends,
  if it is still present;
- a non-finite ``p`` (NaN: the detector could not evaluate) never stimulates:
  it cancels pending bursts and the onset timer and emits a ``FAULT`` event
  (warning severity; the runner decides whether to stop);
- a window the loop could not evaluate (bad samples, a timestamp gap, blanking
  after a burst, model warm-up, a missed deadline) is reported with
  ``invalid(t, reason)``: it restarts an onset timer that has not yet reached
  ``min_duration_s`` (the above-threshold time must be seen without a hole, as
  the offline scorer counts it), and leaves an ongoing detection and its
  pending burst as they are (a pending burst waits for the next valid window
  that still shows the detection). Our own bursts blank the windows after them,
  so ending or re-arming a detection there would change the burst cadence.
"""
from __future__ import annotations

import math
import numbers

from controller.events import Event, EventKind
from controller.policies.base import PolicyOutput, Reconfigurable, check_burst_spacing, check_time
from controller.safety.governor import StimRequest
from drivers.params import StimParams


def _finite(name: str, value: float, lo: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < lo:
        raise ValueError(f"{name}={value!r} invalid, expected a finite number >= {lo}")
    return float(value)


class ResponsivePolicy(Reconfigurable):
    """Responsive (detection-triggered) stimulation policy; ``step(p, t) -> (requests, events)``.

    ``p`` is the detector output for the window ending at ``t`` (seconds,
    session clock); ``t`` is copied to ``meta["window_end_t"]`` of each request
    so the actuator can report detection-to-command latency.
    """

    def __init__(self, threshold_on: float, threshold_off: float, min_duration_s: float, refractory_s: float,
                 stim: StimParams, bursts_per_detection: int = 2, burst_interval_s: float = 1.0,
                 source: str = "policy.responsive") -> None:
        self.threshold_on = _finite("threshold_on", threshold_on)
        self.threshold_off = _finite("threshold_off", threshold_off)
        if self.threshold_off > self.threshold_on:
            raise ValueError(f"threshold_off={threshold_off} invalid, expected <= threshold_on={threshold_on} (hysteresis)")
        self.min_duration_s = _finite("min_duration_s", min_duration_s, 0.0)
        self.refractory_s = _finite("refractory_s", refractory_s, 0.0)
        if not isinstance(stim, StimParams):
            raise TypeError(f"stim must be a StimParams, got {type(stim).__name__}")
        if isinstance(bursts_per_detection, bool) or bursts_per_detection not in (1, 2):
            raise ValueError(f"bursts_per_detection={bursts_per_detection!r} invalid, expected 1 or 2 "
                             "(RNS: up to two bursts per therapy, REFERENCE.md §3)")
        self.burst_interval_s = _finite("burst_interval_s", burst_interval_s, 0.0)
        if bursts_per_detection == 2:
            check_burst_spacing("burst_interval_s", self.burst_interval_s, stim, "ResponsivePolicy")
        self.stim = stim
        self.bursts_per_detection = int(bursts_per_detection)
        self.source = source
        self.reset()

    def params(self) -> dict:
        return {"threshold_on": self.threshold_on, "threshold_off": self.threshold_off,
                "min_duration_s": self.min_duration_s, "refractory_s": self.refractory_s, "stim": self.stim,
                "bursts_per_detection": self.bursts_per_detection, "burst_interval_s": self.burst_interval_s,
                "source": self.source}

    def reset(self) -> None:
        """Forget all state (new session)."""
        self._last_t = -math.inf
        self._above_since: float | None = None
        self._detecting = False
        self._detection_id = 0
        self._detection_start_t = math.nan
        self._bursts_done = 0          # bursts delivered for the current detection
        self._next_burst_t = math.inf  # due time of the next burst of the current therapy
        self._last_burst_t = -math.inf

    @property
    def detecting(self) -> bool:
        return self._detecting

    def invalid(self, t: float, reason: str) -> PolicyOutput:
        """The window ending at ``t`` could not be evaluated (``reason``); no request ever comes of it.

        Restarts a pending (not yet confirmed) onset timer, with one ``STATUS``
        ``what="onset_restarted"`` event per restart (not per window: blanking
        and faults span many windows). An ongoing detection is left as it is.
        """
        t = self._last_t = check_time(t, self._last_t)
        if self._detecting or self._above_since is None:
            return [], []
        onset_t, self._above_since = self._above_since, None
        return [], [Event(t, EventKind.STATUS, self.source, {
            "what": "onset_restarted", "onset_t": onset_t, "reason": reason})]

    def step(self, p: float, t: float) -> PolicyOutput:
        """Advance to time ``t`` with detector output ``p``; return ``(requests, events)``."""
        t = self._last_t = check_time(t, self._last_t)
        requests: list[StimRequest] = []
        events: list[Event] = []
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p):
            self._above_since = None
            self._next_burst_t = math.inf
            events.append(Event(t, EventKind.FAULT, self.source, {
                "what": "invalid_detector_output", "severity": "warning", "p": p,
                "reason": f"detector output p={p!r} is not finite: no stimulation, onset timer and pending bursts cancelled"}))
            return requests, events
        p = float(p)

        if not self._detecting:
            if p >= self.threshold_on:
                if self._above_since is None:
                    self._above_since = t
                if t - self._above_since >= self.min_duration_s:
                    self._detecting = True
                    self._detection_id += 1
                    self._detection_start_t = t
                    self._bursts_done = 0
                    self._next_burst_t = t
                    in_refractory = t - self._last_burst_t < self.refractory_s
                    events.append(Event(t, EventKind.DECISION, self.source, {
                        "what": "detection_start", "detection_id": self._detection_id, "p": p,
                        "onset_t": self._above_since, "suppressed": "refractory" if in_refractory else None}))
            else:
                self._above_since = None
        elif p < self.threshold_off:
            self._detecting = False
            self._above_since = None
            self._next_burst_t = math.inf
            events.append(Event(t, EventKind.DECISION, self.source, {
                "what": "detection_end", "detection_id": self._detection_id, "p": p,
                "duration_s": t - self._detection_start_t, "bursts": self._bursts_done}))
            return requests, events

        if self._detecting and self._bursts_done < self.bursts_per_detection and t >= self._next_burst_t:
            first = self._bursts_done == 0
            if not first or t - self._last_burst_t >= self.refractory_s:
                self._bursts_done += 1
                self._last_burst_t = t
                self._next_burst_t = t + self.burst_interval_s
                meta = {"detection_id": self._detection_id, "burst_index": self._bursts_done,
                        "window_end_t": t, "p": p}
                requests.append(StimRequest(t=t, source=self.source, params=self.stim, at=None, meta=meta))
                events.append(Event(t, EventKind.DECISION, self.source, {"what": "stim_request", **meta}))
        return requests, events
