"""Plasticity-aware stimulation: choose the protocol with the best predicted Δw, then deliver it.

``PlasticityAwarePolicy`` enumerates every combination of the allowed
frequencies and pulse widths (the experimenter's / device's allowed values),
asks the plasticity surrogate (``models.plasticity.PlasticityPredictor``,
ONNX) for the expected weight change Δw of each, and picks the largest Δw
(``target="potentiate"``) or the most negative (``target="depress"``) with
``best_protocol``. The other protocol fields (pairing ``timing_ms``,
``baseline_w``, reward) come from ``protocol``; amplitude, number of pulses and
waveform come from the ``stim`` template, so the predicted protocol and the
delivered burst are the same thing. Background of the model (STDP, triplet
rule, frequency dependence, reward): REFERENCE.md §7; it is a toy model
(models/plasticity/MODEL_CARD.md), not a prediction of tissue responses.

The choice is made at construction (recorded at the first step) and again
whenever ``rechoose`` is called (e.g. with a new ``baseline_w``); each choice is a ``DECISION`` event
``what="plasticity_choice"`` with the chosen frequency, pulse width, predicted
Δw, the runner-up and the number of candidates. With ``period_s`` set, a new
choice whose burst does not fit the period (``check_burst_spacing``: a slower
frequency makes the same pulses last longer) is not taken: the previous choice
and protocol stay, and the event is ``what="plasticity_choice_kept"`` with the
reason and the rejected protocol (taking it would make the governor refuse
bursts as ``device_busy``).

Delivery: ``step(t, trigger=False)``. With ``period_s`` set, one burst every
``period_s`` from the first step (catch-up rule of ``open_loop.BurstSchedule``);
with ``period_s=None``, one burst per ``trigger=True`` step (e.g. a detected
event), ignored (counted in ``n_ignored``) while the previous burst is still
running. Without the ONNX file the constructor raises ``FileNotFoundError``
naming the file: there is no fallback that would stimulate unguided.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from controller.events import Event, EventKind
from controller.policies.base import PolicyOutput, check_burst_spacing, check_time, min_burst_spacing_s
from controller.policies.open_loop import BurstSchedule, check_number, check_stim
from controller.safety.governor import StimRequest
from drivers.params import StimParams, Waveform

__all__ = ["PlasticityAwarePolicy"]

_WAVEFORM_NAME = {Waveform.BIPHASIC: "pulsed", Waveform.SINE: "sine"}
_PROTOCOL_FIELDS = ("timing_ms", "reward_delay_s", "reward", "baseline_w")


def _surrogate_range(name: str) -> tuple[float, float]:
    from models.plasticity.surrogate import RAW_INPUTS

    for n, _, lo, hi in RAW_INPUTS:
        if n == name:
            return lo, hi
    raise KeyError(name)


class PlasticityAwarePolicy:
    """Stimulate with the allowed (frequency, pulse width) whose predicted Δw is best for ``target``.

    ``allowed_frequencies_hz`` / ``allowed_pulse_widths_us``: the values the
    policy may choose from (each within the surrogate's trained range).
    ``protocol``: extra ``Protocol`` fields among ``timing_ms``,
    ``reward_delay_s``, ``reward``, ``baseline_w``. ``stim``: template
    (``BIPHASIC`` pulses or ``SINE``); its ``amplitude_ua`` and ``n_pulses``
    (pulsed) or ``duration_s`` (sine: events = duration × frequency) enter
    the prediction. ``predictor``: a ``PlasticityPredictor``, or ``None`` to
    load ``model_path`` (default: the shipped ``plasticity_v1.onnx``).
    ``max_burst_duration_s`` (set it to the safety profile's): pulsed
    candidates whose burst ``n_pulses / frequency_hz`` is longer are left out,
    since the governor would shorten them into a protocol nobody predicted.
    """

    def __init__(self, allowed_frequencies_hz, allowed_pulse_widths_us, stim: StimParams,
                 target: str = "potentiate", protocol: dict | None = None, period_s: float | None = None,
                 predictor=None, model_path: str | Path | None = None, lookahead_s: float = 0.0,
                 max_burst_duration_s: float | None = None, source: str = "policy.plasticity") -> None:
        if target not in ("potentiate", "depress"):
            raise ValueError(f"target={target!r} invalid, expected 'potentiate' or 'depress'")
        self.target = target
        self.stim = check_stim(stim, "PlasticityAwarePolicy")
        if stim.waveform not in _WAVEFORM_NAME:
            raise ValueError(f"PlasticityAwarePolicy stim waveform={stim.waveform} invalid, expected one of "
                             f"{[str(w) for w in _WAVEFORM_NAME]} (the surrogate models pulsed and sine)")
        self.allowed_frequencies_hz = self._allowed("allowed_frequencies_hz", allowed_frequencies_hz, "frequency_hz")
        self.allowed_pulse_widths_us = self._allowed("allowed_pulse_widths_us", allowed_pulse_widths_us,
                                                     "pulse_width_us")
        lo, hi = _surrogate_range("amplitude_ua")
        check_number("stim.amplitude_ua", stim.amplitude_ua, lo, hi)
        protocol = dict(protocol or {})
        unknown = set(protocol) - set(_PROTOCOL_FIELDS)
        if unknown:
            raise ValueError(f"protocol fields {sorted(unknown)} invalid, expected a subset of {list(_PROTOCOL_FIELDS)} "
                             "(frequency, pulse width, amplitude, pulses and waveform come from the allowed values and stim)")
        self.protocol = protocol
        self.period_s = None if period_s is None else check_number("period_s", period_s, 0.0, lo_open=True)
        self.lookahead_s = check_number("lookahead_s", lookahead_s, 0.0)
        self.max_burst_duration_s = (None if max_burst_duration_s is None else
                                     check_number("max_burst_duration_s", max_burst_duration_s, 0.0, lo_open=True))
        self.source = source
        if predictor is None:
            from models.plasticity.surrogate import DEFAULT_MODEL_PATH, PlasticityPredictor

            path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
            if not path.is_file():
                raise FileNotFoundError(f"PlasticityAwarePolicy: plasticity surrogate {path} not found; it is required "
                                        "to choose the protocol (train it with `stimloop train plasticity`)")
            predictor = PlasticityPredictor(path)
        self.predictor = predictor
        self.choice: dict = {}
        self._choice_event = self._choose()  # fails here, not mid-session, if a candidate cannot be predicted
        if self.period_s is not None:      # against the chosen burst (its frequency sets its duration)
            check_burst_spacing("period_s", self.period_s, self.params, "PlasticityAwarePolicy")
        self.reset()

    @staticmethod
    def _allowed(name: str, values, field: str) -> tuple[float, ...]:
        vals = np.atleast_1d(np.asarray(values, dtype=np.float64)).tolist() if values is not None else []
        if not vals:
            raise ValueError(f"{name}={values!r} invalid, expected at least one value")
        lo, hi = _surrogate_range(field)
        try:
            return tuple(sorted({check_number(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(vals)}))
        except ValueError as exc:
            raise ValueError(f"{exc} (the plasticity surrogate's trained range for {field})") from None

    def candidates(self) -> list[dict]:
        """All candidate ``Protocol`` dicts (allowed frequency × pulse width, other fields fixed)."""
        out = []
        for f, pw in itertools.product(self.allowed_frequencies_hz, self.allowed_pulse_widths_us):
            # A burst the governor would shorten (max_burst_duration clamp) is not the protocol that was
            # predicted: such candidates are left out rather than delivered altered.
            if (self.stim.is_pulsed and self.max_burst_duration_s is not None
                    and self.stim.n_pulses / f > self.max_burst_duration_s):
                continue
            if self.stim.is_pulsed:
                n = int(self.stim.n_pulses)
            else:
                n = max(1, int(round(self.stim.duration_s * f)))  # one event per sine peak
            out.append({"frequency_hz": f, "waveform": _WAVEFORM_NAME[self.stim.waveform], "pulse_width_us": pw,
                        "n_pulses": n, "amplitude_ua": float(self.stim.amplitude_ua), **self.protocol})
        return out

    def _choose(self) -> dict:
        cands = self.candidates()
        if not cands:
            raise ValueError(f"no allowed frequency gives a burst of {self.stim.n_pulses} pulses within "
                             f"max_burst_duration_s={self.max_burst_duration_s}: expected frequencies >= "
                             f"{self.stim.n_pulses / self.max_burst_duration_s:.6g} Hz, got {list(self.allowed_frequencies_hz)}")
        best, dw = self.predictor.best_protocol(cands, maximize=self.target == "potentiate")
        self.choice = {**best, "delta_w": dw}
        self.params = self._params_for(best)
        return self._choice_data(best, dw, len(cands))

    def _params_for(self, proto: dict) -> StimParams:
        return self.stim.with_(frequency_hz=float(proto["frequency_hz"]), pulse_width_us=float(proto["pulse_width_us"]))

    def _choice_data(self, best: dict, dw: float, n_cands: int) -> dict:
        return {"what": "plasticity_choice", "target": self.target, "frequency_hz": best["frequency_hz"],
                "pulse_width_us": best["pulse_width_us"], "predicted_delta_w": dw, "n_candidates": n_cands,
                "protocol": best, "allowed_frequencies_hz": list(self.allowed_frequencies_hz),
                "allowed_pulse_widths_us": list(self.allowed_pulse_widths_us)}

    def rechoose(self, t: float, **protocol_updates) -> list[Event]:
        """Choose again (optionally with new ``protocol`` fields, e.g. ``baseline_w``); return the event.

        With ``period_s`` set, a choice whose burst does not fit the period is refused: the previous
        choice and protocol are kept (event ``what="plasticity_choice_kept"``, with the reason).
        """
        unknown = set(protocol_updates) - set(_PROTOCOL_FIELDS)
        if unknown:
            raise ValueError(f"protocol fields {sorted(unknown)} invalid, expected a subset of {list(_PROTOCOL_FIELDS)}")
        old = (dict(self.protocol), self.choice, self.params, self._choice_event)
        self.protocol.update(protocol_updates)
        try:
            new_event = self._choose()
        except Exception:
            self.protocol, self.choice, self.params, self._choice_event = old
            raise
        if self.period_s is not None:
            try:
                # The constructor's check, against the new burst: a slower frequency stretches the
                # same n_pulses, and a burst longer than the period would be refused as device_busy.
                check_burst_spacing("period_s", self.period_s, self.params, "PlasticityAwarePolicy")
            except ValueError as exc:
                rejected = {**new_event, "what": "plasticity_choice_rejected"}
                self.protocol, self.choice, self.params, self._choice_event = old
                return [Event(t, EventKind.DECISION, self.source, {
                    "what": "plasticity_choice_kept", "reason": str(exc),
                    "frequency_hz": self.choice["frequency_hz"], "pulse_width_us": self.choice["pulse_width_us"],
                    "predicted_delta_w": self.choice["delta_w"], "protocol": old[0],
                    "rejected": rejected, "rejected_protocol_updates": dict(protocol_updates)})]
        self._choice_event = new_event
        if self._sched is not None:
            # The schedule skips due times closer than one burst (+ guard) to the previous start:
            # from now on that is the new burst's length.
            self._sched.min_spacing_s = min_burst_spacing_s(self.params)
        return [Event(t, EventKind.DECISION, self.source, self._choice_event)]

    def reset(self) -> None:
        """Forget the schedule (new session); the current choice is recorded again at the first step."""
        self._last_t = -math.inf
        self._sched: BurstSchedule | None = None
        self._busy_until = -math.inf
        self.n_requests = 0
        self.n_ignored = 0
        self._started = False

    def step(self, t: float, trigger: bool = False) -> PolicyOutput:
        """Advance to ``t``; with ``period_s=None`` a burst per ``trigger=True``. Returns ``(requests, events)``."""
        t = self._last_t = check_time(t, self._last_t)
        requests: list[StimRequest] = []
        events: list[Event] = []
        if not self._started:
            # The choice made at construction is recorded with the first session time.
            events.append(Event(t, EventKind.DECISION, self.source, self._choice_event))
            self._started = True
            if self.period_s is not None:
                t0, p = t, self.period_s
                self._sched = BurstSchedule(t0, lambda due: t0 + (round((due - t0) / p) + 1) * p, self.lookahead_s,
                                            min_burst_spacing_s(self.params))
        at = None
        skipped = 0
        if self._sched is not None:
            got = self._sched.take(t)
            if got is None:
                return requests, events
            due, at, skipped = got
        elif trigger:
            if t < self._busy_until:
                self.n_ignored += 1
                return requests, events
            due = t
        else:
            return requests, events
        # Until the device is free again (the governor's device-busy guard included).
        self._busy_until = (at if at is not None else t) + min_burst_spacing_s(self.params)
        self.n_requests += 1
        meta = {"due_t": due, "skipped": skipped, "burst_index": self.n_requests,
                "predicted_delta_w": self.choice["delta_w"], "window_end_t": t}
        requests.append(StimRequest(t=t, source=self.source, params=self.params, at=at, meta=meta))
        events.append(Event(t, EventKind.DECISION, self.source, {"what": "stim_request", **meta}))
        return requests, events
