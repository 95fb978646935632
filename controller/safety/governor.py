"""The safety governor: every stimulation request passes here before any driver sees it.

Functional core: no I/O, no clock reads, no threads. The caller passes ``now``
(seconds on the session clock). Each ``step`` returns a ``Decision`` whose
``params`` is the checked (possibly clamped) ``StimParams`` or ``None`` when
refused, plus the events that explain it. Rules and their sources: docs/safety.md.

Design choices that keep it on the safe side:
- clamps only ever reduce the stimulus; anything else that is out of range is refused;
- dose (charge, stimulation time, bursts) is counted when a burst is *allowed*,
  with a charge estimate that never undercounts, whether or not it is then delivered;
- faults latch: nothing passes until ``reset``; a failed internal post-check refuses;
- non-finite numbers anywhere in a request, or a clock going backwards, are refused.
"""
from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from controller.events import Event, EventKind
from controller.safety.profiles import CHARGE_BALANCED_WAVEFORMS, TI_MIN_CARRIER_HZ, SafetyProfile
from drivers.params import DeviceCapabilities, StimParams, Waveform

RATE_WINDOW_S = 60.0  # max_bursts_per_min is counted over any 60 s window
#: A device holds one burst at a time, running or scheduled (drivers/PROTOCOL.md: a TRIGGER then gets
#: BUSY, which the actuator must treat as a fault). A request sent sooner than this after the end of
#: the last allowed burst is refused here instead. The end is the device's own once the actuator has
#: reported when the TRIGGER arrived (``confirm_start``: after retries of the CONFIGURE or TRIGGER that
#: can be 50–150 ms after the decision), so what is left to cover is the *next* command's transport
#: delay before the device judges it (≤ 1 ms on this machine's pty; 5 ms covers a loaded USB-serial link).
DEVICE_BUSY_GUARD_S = 0.005
# Charge-limit clamps land this fraction below the limit so float rounding and
# Shannon's strict "<" can never put the clamped value on the wrong side.
_CLAMP_MARGIN = 1e-9
# Below these no stimulator delivers anything, and floating point could not promise that the dose
# books at least the charge (subnormal products lose their relative precision): refused, not booked.
MIN_AMPLITUDE_UA = 1e-6      # 1 pA (0 stays allowed: no current)
MIN_DURATION_S = 1e-6
#: What approved sine/DC/TI params carry in ``n_pulses``. The field means nothing for continuous waveforms,
#: but every device receives it: the serial wire format is a uint32 (drivers/PROTOCOL.md §5.2), so a
#: value passed through unchanged (2**32, say) was refused by that encoder as a fault while the
#: simulated device took it. One fixed value makes every device get, and record, the same params.
CONTINUOUS_N_PULSES = 1
_NUMERIC_FIELDS = ("amplitude_ua", "pulse_width_us", "interphase_gap_us", "frequency_hz",
                   "duration_s", "ramp_s", "carrier_hz")


def _finite_real(x: Any) -> bool:
    """True for a real number (not a bool) that is finite *as a float*.

    ``math.isfinite`` raises ``OverflowError`` on an int beyond float range (10**400), and every
    later product or quotient would too: such a value is garbage to refuse, not a crash.
    """
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return False
    try:
        return math.isfinite(x)
    except (OverflowError, TypeError, ValueError):
        return False


def _show(x: Any) -> str:
    """A short repr for refusal reasons: a 5000-digit int has no repr (ValueError) and floods logs."""
    if isinstance(x, numbers.Integral) and not isinstance(x, bool) and not _finite_real(x):
        return f"<int of {int(x).bit_length()} bits>"
    try:
        r = repr(x)
    except Exception:
        return f"<{type(x).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


def _json_value(x: Any) -> Any:
    """``x`` itself when an event can serialise it (NaN/inf become null there), else ``_show(x)``."""
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, numbers.Real) and (_finite_real(x) or isinstance(x, float)):
        return x
    return _show(x)


def _pulse_count(n: Any) -> bool:
    """True for an int >= 1 that float arithmetic (n / frequency_hz, charge) can hold."""
    return (not isinstance(n, bool) and isinstance(n, numbers.Integral) and n >= 1 and _finite_real(n))


@dataclass(frozen=True, slots=True)
class StimRequest:
    """A policy's request for one burst on one channel.

    ``t`` is when the request was made (session clock), ``at`` when the burst
    should start (``None``: now). ``meta`` is carried into events; the actuator
    copies ``meta["window_end_t"]`` (end of the signal window that caused the
    request) into its ``COMMAND`` event for latency accounting.
    """

    t: float
    source: str
    params: StimParams
    at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of ``SafetyGovernor.step``: ``params`` is ``None`` when the request was refused."""

    request: StimRequest
    params: StimParams | None
    events: list[Event]
    reason: str

    @property
    def allowed(self) -> bool:
        return self.params is not None


@dataclass(frozen=True, slots=True)
class Dose:
    """Cumulative session dose of allowed bursts (counted when allowed, never undercounted)."""

    charge_uc: float
    stim_s: float
    bursts: int


def conservative_charge_uc(params: StimParams) -> float:
    """Charge in µC the governor books for one burst; never below the charge actually moved.

    Pulsed: both phases of every pulse (``StimParams.burst_charge_uc``).
    Continuous: peak amplitude for the whole duration, ramps included (a sine's
    mean |I| is only 2/π of that), doubled for TI which drives two electrode pairs.
    """
    if params.is_pulsed:
        return params.burst_charge_uc
    pairs = 2 if params.waveform is Waveform.TI else 1
    return pairs * abs(params.amplitude_ua) * params.duration_s


def _max_charge_per_phase_uc(profile: SafetyProfile) -> tuple[float, str]:
    """Tightest charge-per-phase limit in µC and the rule that sets it."""
    limits: list[tuple[float, str]] = [(math.inf, "none")]
    if profile.max_charge_per_phase_uc is not None:
        limits.append((profile.max_charge_per_phase_uc, "charge_per_phase"))
    if profile.max_charge_density_uc_cm2 is not None:
        limits.append((profile.max_charge_density_uc_cm2 * profile.electrode_area_cm2, "charge_density"))
    if profile.shannon_k_max is not None:
        # log10(Q/A) + log10(Q) < k  <=>  Q < sqrt(10**k * A)   (REFERENCE.md §4, Shannon 1992)
        limits.append((math.sqrt(10.0 ** profile.shannon_k_max * profile.electrode_area_cm2), "shannon"))
    return min(limits)


def check_params(profile: SafetyProfile, caps: DeviceCapabilities, params: StimParams) -> list[str]:
    """Every rule a single burst's params break (empty list: inside profile and device).

    Stateless (no rate or dose rules). The governor runs it on everything it
    lets through, as a post-condition independent of the clamping arithmetic.
    """
    v: list[str] = []
    if not isinstance(params, StimParams) or not isinstance(params.waveform, Waveform):
        return ["params must be a StimParams with a Waveform"]
    for f in _NUMERIC_FIELDS:
        x = getattr(params, f)
        if not _finite_real(x):
            v.append(f"{f}={_show(x)} is not a finite number")
    if not _pulse_count(params.n_pulses):
        v.append(f"n_pulses={_show(params.n_pulses)} must be an int >= 1")
    if v:
        return v
    try:
        _check_values(profile, caps, params, v)
    except OverflowError:
        # An int below the float maximum whose double or product is not (2 * 9e307): refused, not raised.
        v.append("the params' products overflow a float (values near the float range)")
    return v


def ti_carrier_ok(params: StimParams) -> bool:
    """A TI carrier neurons do not follow (>= ``TI_MIN_CARRIER_HZ``, REFERENCE.md §7) and above the beat."""
    return params.carrier_hz >= TI_MIN_CARRIER_HZ and params.carrier_hz > params.frequency_hz


def _check_values(profile: SafetyProfile, caps: DeviceCapabilities, params: StimParams, v: list[str]) -> None:
    """The rules of :func:`check_params` on params already known to be finite numbers; appends to ``v``."""
    ch = params.channel
    if isinstance(ch, bool) or not isinstance(ch, numbers.Integral) or not 0 <= ch < caps.n_channels:
        v.append(f"channel={_show(ch)} outside 0..{caps.n_channels - 1}")
    w = params.waveform
    if w not in profile.allowed_waveforms or w not in caps.waveforms:
        v.append(f"waveform={w} not allowed")
    if profile.require_charge_balanced and w not in CHARGE_BALANCED_WAVEFORMS:
        v.append(f"waveform={w} not charge-balanced")
    amp = params.amplitude_ua
    if not 0 <= amp <= min(profile.max_amplitude_ua, profile.hard_max_amplitude_ua, caps.max_amplitude_ua):
        v.append(f"amplitude_ua={amp} outside 0..{min(profile.max_amplitude_ua, caps.max_amplitude_ua)}")
    if w is not Waveform.DC:
        f_max = min(profile.max_frequency_hz, caps.max_frequency_hz)
        if not profile.min_frequency_hz <= params.frequency_hz <= f_max:
            v.append(f"frequency_hz={params.frequency_hz} outside {profile.min_frequency_hz}..{f_max}")
    if params.is_pulsed:
        pw = params.pulse_width_us
        lo, hi = max(profile.min_pulse_width_us, caps.min_pulse_width_us), min(profile.max_pulse_width_us, caps.max_pulse_width_us)
        if not lo <= pw <= hi:
            v.append(f"pulse_width_us={pw} outside {lo}..{hi}")
        if params.interphase_gap_us < 0:
            v.append(f"interphase_gap_us={params.interphase_gap_us} < 0")
        if params.frequency_hz > 0 and 2 * pw + params.interphase_gap_us > 1e6 / params.frequency_hz:
            v.append("pulses overlap: 2*pulse_width_us + interphase_gap_us > period")
        q = params.charge_per_phase_uc
        if profile.max_charge_per_phase_uc is not None and q > profile.max_charge_per_phase_uc:
            v.append(f"charge per phase {q:.4g} µC > {profile.max_charge_per_phase_uc}")
        d = q / profile.electrode_area_cm2
        if profile.max_charge_density_uc_cm2 is not None and d > profile.max_charge_density_uc_cm2:
            v.append(f"charge density {d:.4g} µC/cm² > {profile.max_charge_density_uc_cm2}")
        if profile.shannon_k_max is not None and q > 0 and not math.log10(d) + math.log10(q) < profile.shannon_k_max:
            v.append(f"Shannon k={math.log10(d) + math.log10(q):.3f} >= {profile.shannon_k_max}")
    else:
        if not params.duration_s > 0:
            v.append(f"duration_s={params.duration_s} must be > 0")
        if params.ramp_s < 0 or 2 * params.ramp_s > params.duration_s:
            v.append(f"ramp_s={params.ramp_s} outside 0..duration_s/2")
        if params.ramp_s < profile.min_ramp_s:
            v.append(f"ramp_s={params.ramp_s} < {profile.min_ramp_s}")
        if profile.max_ramp_rate_ua_per_s is not None and amp > 0 and (
                params.ramp_s <= 0 or amp / params.ramp_s > profile.max_ramp_rate_ua_per_s):
            v.append(f"ramp rate above {profile.max_ramp_rate_ua_per_s} µA/s")
        if w is Waveform.TI and not ti_carrier_ok(params):
            v.append(f"carrier_hz={params.carrier_hz} must be >= {TI_MIN_CARRIER_HZ} Hz and > frequency_hz")
    if params.burst_duration_s > profile.max_burst_duration_s:
        v.append(f"burst duration {params.burst_duration_s:.4g} s > {profile.max_burst_duration_s}")


class _Refused(Exception):
    def __init__(self, rule: str, reason: str):
        self.rule, self.reason = rule, reason


class SafetyGovernor:
    """Clamps or refuses stimulation requests against a ``SafetyProfile`` and the device's capabilities.

    Pure state machine: ``step(request, now)``, ``confirm_start(booked_start_t,
    started_t, now)``, ``set_impedance(ohm, now)``, ``heartbeat_ok(now)``,
    ``fault(reason, now)``, ``emergency_stop(now)``, ``reset(now)``. Faults and emergency stops latch until ``reset``; an
    impedance outside the window or a stale heartbeat refuse everything while
    they last. ``reset`` never clears the session dose or the rate history.
    """

    def __init__(self, profile: SafetyProfile, capabilities: DeviceCapabilities, source: str = "governor"):
        if not isinstance(profile, SafetyProfile):
            raise TypeError(f"profile must be a SafetyProfile, got {type(profile).__name__}")
        if not isinstance(capabilities, DeviceCapabilities):
            raise TypeError(f"capabilities must be a DeviceCapabilities, got {type(capabilities).__name__}")
        # Full re-validation: SafetyProfile.model_construct() would have skipped every check.
        profile = SafetyProfile.model_validate(profile.model_dump())
        if capabilities.n_channels < 1:
            raise ValueError(f"capabilities.n_channels={capabilities.n_channels}, expected >= 1")
        self._profile = profile
        self._caps = capabilities
        self._source = source
        # Every latched reason, oldest first: each cause is released on its own (bad data clean
        # again, stream back, device reconnected) and one cause's release must not clear another's.
        self._latches: dict[str, None] = {}
        self._impedance_ohm: float | None = None
        self._last_heartbeat_t: float | None = None
        self._last_now = -math.inf
        # Allowed bursts sorted by start time (scheduled bursts can arrive out of order), so that the
        # interval and rate checks look at a few neighbours found by bisection, not the whole minute.
        self._hist_t: list[float] = []
        self._hist_d: list[float] = []
        self._hist_max_d = 0.0
        self._history_horizon_s = (RATE_WINDOW_S + profile.max_burst_duration_s + profile.min_interval_s
                                   + profile.max_schedule_ahead_s)
        self._charge_uc = 0.0
        self._stim_s = 0.0
        self._bursts = 0
        # The last params object that passed the per-params checks, with their result. Those checks
        # depend only on (profile, capabilities, params), all immutable, and policies resend the same
        # object: reusing the result by identity keeps ~150 µs of cold Python off the spike → command
        # path (bench_ads breakdown). Identity, not equality: True == 1.0 must still be refused.
        self._checked: tuple[StimParams, StimParams, list[dict[str, Any]], dict[str, Any]] | None = None

    # ---- read-only state -------------------------------------------------------------
    @property
    def profile(self) -> SafetyProfile:
        return self._profile

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._caps

    @property
    def dose(self) -> Dose:
        return Dose(self._charge_uc, self._stim_s, self._bursts)

    @property
    def latched(self) -> str | None:
        """Reason of the oldest latched fault, or ``None`` when not latched."""
        return next(iter(self._latches), None)

    @property
    def latch_reasons(self) -> tuple[str, ...]:
        """Every latched reason, oldest first (empty when not latched)."""
        return tuple(self._latches)

    @property
    def impedance_ohm(self) -> float | None:
        return self._impedance_ohm

    def impedance_ok(self) -> bool:
        """True when the last impedance is inside the window (or no window and no check required).

        A reading that was not a finite positive number is never ok, window or not (docs/safety.md rule 5).
        """
        p = self._profile
        z = self._impedance_ohm
        if z is None:
            return not p.require_impedance_check
        if not (math.isfinite(z) and z > 0):
            # A failed or nonsense reading says the contact is unknown: with or without a window.
            return False
        if p.impedance_min_ohm is None:
            return True
        return p.impedance_min_ohm <= z <= p.impedance_max_ohm

    def heartbeat_fresh(self, now: float) -> bool:
        """True when a heartbeat arrived within ``heartbeat_timeout_s`` before ``now``."""
        timeout = self._profile.heartbeat_timeout_s
        if timeout is None:
            return True
        hb = self._last_heartbeat_t
        return hb is not None and _finite_real(now) and now - hb <= timeout

    # ---- inputs ----------------------------------------------------------------------
    def heartbeat_ok(self, now: float) -> None:
        """Record that the control loop is alive at ``now`` (non-finite ``now`` is ignored: fail safe)."""
        if _finite_real(now):
            self._last_heartbeat_t = now if self._last_heartbeat_t is None else max(self._last_heartbeat_t, now)

    def set_impedance(self, ohm: float, now: float) -> list[Event]:
        """Record an electrode impedance; outside the window, every request is refused until it is back.

        Returns a ``FAULT`` event when the impedance is out of the window (or not
        a finite positive number, which counts as out of window), else ``STATUS``.
        """
        ok_number = _finite_real(ohm) and ohm > 0
        self._impedance_ohm = float(ohm) if ok_number else math.nan
        p = self._profile
        data = {"what": "impedance", "impedance_ohm": _json_value(ohm),
                "window_ohm": [p.impedance_min_ohm, p.impedance_max_ohm]}
        if ok_number and self.impedance_ok():
            return [Event(now, EventKind.STATUS, self._source, {**data, "in_window": True})]
        return [Event(now, EventKind.FAULT, self._source,
                      {**data, "in_window": False, "rule": "impedance",
                       "reason": f"impedance_ohm={ohm!r} outside {p.impedance_min_ohm}..{p.impedance_max_ohm} Ω"})]

    def fault(self, reason: str, now: float) -> list[Event]:
        """Latch the safe state: every request is refused until ``reset``. Returns one ``FAULT`` event."""
        first = not self._latches
        self._latches.setdefault(str(reason))
        return [Event(now, EventKind.FAULT, self._source,
                      {"reason": str(reason), "latched": True, "latched_reason": self.latched, "first": first})]

    def emergency_stop(self, now: float, reason: str = "emergency_stop") -> list[Event]:
        """Same latch as ``fault``, with its own reason (operator or runner stop)."""
        return self.fault(reason if reason.startswith("emergency_stop") else f"emergency_stop: {reason}", now)

    def reset(self, now: float, reason: str | None = None) -> list[Event]:
        """Clear the latch: every reason (``reason=None``: an operator's reset), or only ``reason`` (its
        cause went away); the others stay latched. Dose, rate history, impedance and heartbeat state
        are kept. ``cleared`` in the event is the oldest reason cleared (``None``: nothing was)."""
        if reason is None:
            gone, self._latches = list(self._latches), {}
        elif reason in self._latches:
            del self._latches[reason]
            gone = [reason]
        else:
            gone = []
        return [Event(now, EventKind.STATUS, self._source,
                      {"what": "reset", "cleared": gone[0] if gone else None, "cleared_all": gone,
                       "still_latched": list(self._latches)})]

    def confirm_start(self, booked_start_t: float, started_t: float | None, now: float) -> float:
        """Book when the device really started the burst allowed at ``booked_start_t``; return the start
        now booked (≥ ``booked_start_t``).

        ``step`` books an immediate burst at the decision time, but the device starts it when the
        TRIGGER arrives, which retries of the CONFIGURE or TRIGGER (``timeout_s`` each) can delay by
        50–150 ms: judged against the booked start, the next request could pass ``min_interval`` and
        ``device_busy`` while the device still runs this burst (a BUSY NACK, or two bursts overlapping
        on two channels). The start only ever moves *later* (stricter): a ``started_t`` before the booked
        start (a scheduled burst whose TRIGGER came early, a device clock behind the host's) leaves it,
        and one after ``now``, or one that is not a finite time, counts as ``now`` (nothing acknowledged
        by ``now`` can start later). Dose and burst count stay: it is the same burst, booked once.
        ``ValueError`` when no allowed burst starts at ``booked_start_t`` (the caller's defect).
        """
        ts, ds = self._hist_t, self._hist_d
        i = bisect.bisect_left(ts, booked_start_t) if _finite_real(booked_start_t) else len(ts)
        if i == len(ts) or ts[i] != booked_start_t:
            raise ValueError(f"confirm_start: no allowed burst starts at {_show(booked_start_t)}")
        latest = now if _finite_real(now) else self._last_now
        started = started_t if _finite_real(started_t) else latest
        start_t = max(booked_start_t, min(started, latest))
        if start_t > booked_start_t:
            # Bursts never share a start (the no-overlap rule), so index i is this one.
            duration_s = ds.pop(i)
            ts.pop(i)
            j = bisect.bisect_right(ts, start_t)
            ts.insert(j, start_t)
            ds.insert(j, duration_s)
        return start_t

    # ---- the decision ----------------------------------------------------------------
    def step(self, request: StimRequest, now: float) -> Decision:
        """Check one request at session time ``now``; return the decision and its events.

        Never raises: garbage is refused with its rule, and an error inside the checks
        themselves is refused with rule ``internal`` (a raise would leave the caller
        without a decision, and the actuator's caller without the safe state).
        """
        try:
            return self._step(request, now)
        except Exception as exc:
            try:
                reason = f"error inside the governor: {type(exc).__name__}: {exc}"[:500]
            except Exception:
                reason = f"error inside the governor: {type(exc).__name__}"
            try:
                return self._refusal(request, now, "internal", reason)
            except Exception:
                # Even the refusal's data could not be built from this request: the bare minimum.
                t = now if _finite_real(now) else (self._last_now if math.isfinite(self._last_now) else 0.0)
                ev = Event(t, EventKind.REFUSAL, self._source,
                           {"allowed": False, "rule": "internal", "reason": reason})
                return Decision(request, None, [ev], f"refused (internal): {reason}")

    def _step(self, request: StimRequest, now: float) -> Decision:
        try:
            if not _finite_real(now):
                raise _Refused("invalid_time", f"now={_show(now)} is not a finite time")
            if now < self._last_now:
                raise _Refused("clock", f"now={now} is before the previous step ({self._last_now}): clock went backwards")
            self._last_now = now
            self._prune(now)
            if self._latches:
                raise _Refused("safe_state", f"latched safe state ({'; '.join(self._latches)}); reset required")
            if not self.heartbeat_fresh(now):
                raise _Refused("heartbeat", f"no heartbeat within {self._profile.heartbeat_timeout_s} s "
                                            f"(last at {self._last_heartbeat_t})")
            if not self.impedance_ok():
                p = self._profile
                raise _Refused("impedance", f"impedance_ohm={self._impedance_ohm} not inside "
                                            f"{p.impedance_min_ohm}..{p.impedance_max_ohm} Ω (or not measured)")
            if not isinstance(request, StimRequest):
                raise _Refused("invalid_request", f"request must be a StimRequest, got {type(request).__name__}")
            params, clamps, params_dict = self._checked_params(request.params)
            start_t = self._start_time(request, now)
            duration_s = params.burst_duration_s
            self._check_rate(start_t, duration_s)
            self._check_device_free(now)
            charge_uc = conservative_charge_uc(params)
            self._check_dose(charge_uc, duration_s)
        except _Refused as r:
            return self._refusal(request, now, r.rule, r.reason)

        i = bisect.bisect_right(self._hist_t, start_t)
        self._hist_t.insert(i, start_t)
        self._hist_d.insert(i, duration_s)
        self._hist_max_d = max(self._hist_max_d, duration_s)
        self._charge_uc += charge_uc
        self._stim_s += duration_s
        self._bursts += 1
        base = self._base_data(request)
        events = [Event(now, EventKind.CLAMP, self._source, {**base, **c}) for c in clamps]
        reason = "allowed" if not clamps else "allowed after clamping " + ", ".join(c["field"] for c in clamps)
        events.append(Event(now, EventKind.DECISION, self._source,
                            {**base, "allowed": True, "reason": reason, "start_t": start_t,
                             "params": dict(params_dict), "charge_uc": charge_uc, "dose_charge_uc": self._charge_uc,
                             "dose_stim_s": self._stim_s, "dose_bursts": self._bursts}))
        return Decision(request, params, events, reason)

    # ---- helpers ---------------------------------------------------------------------
    def _base_data(self, request: Any) -> dict[str, Any]:
        if isinstance(request, StimRequest):
            return {"request_source": _json_value(request.source), "request_t": _json_value(request.t)}
        return {"request_source": None, "request_t": None}

    def _refusal(self, request: Any, now: Any, rule: str, reason: str) -> Decision:
        data = {**self._base_data(request), "allowed": False, "rule": rule, "reason": reason}
        params = getattr(request, "params", None)
        if isinstance(params, StimParams) and isinstance(params.waveform, Waveform):
            data["requested"] = {k: _json_value(v) for k, v in params.to_dict().items()}
        if not _finite_real(now):
            # The event still needs a time a log can hold: the last good one; the bad one is in the data.
            data["now"] = _show(now)
            now = self._last_now if math.isfinite(self._last_now) else 0.0
        ev = Event(now, EventKind.REFUSAL, self._source, data)
        return Decision(request, None, [ev], f"refused ({rule}): {reason}")

    def _prune(self, now: float) -> None:
        k = bisect.bisect_left(self._hist_t, now - self._history_horizon_s)
        if k:
            del self._hist_t[:k]
            del self._hist_d[:k]

    def _start_time(self, request: StimRequest, now: float) -> float:
        at = request.at
        if at is None:
            return now
        if not _finite_real(at):
            raise _Refused("invalid_request", f"at={_show(at)} is not a finite time")
        if at > now + self._profile.max_schedule_ahead_s:
            raise _Refused("schedule", f"at={at} is more than max_schedule_ahead_s="
                                       f"{self._profile.max_schedule_ahead_s} after now={now}")
        if at > now and not self._caps.scheduled_trigger:
            raise _Refused("schedule", f"at={at} is in the future but device {self._caps.name!r} "
                                       "cannot schedule triggers")
        return max(at, now)  # a time in the past means "now"

    def _check_device_free(self, now: float) -> None:
        """Refuse a command the device would answer BUSY: an allowed burst is still scheduled or
        running at ``now``, or ended less than ``DEVICE_BUSY_GUARD_S`` ago. Any channel, as the
        no-overlap rule."""
        ts, ds = self._hist_t, self._hist_d
        for i in range(bisect.bisect_left(ts, now - self._hist_max_d - DEVICE_BUSY_GUARD_S), len(ts)):
            end = ts[i] + ds[i]
            if end + DEVICE_BUSY_GUARD_S > now:
                state = "scheduled" if ts[i] > now else "running"
                raise _Refused("device_busy", f"the burst at {ts[i]} is still {state} until {end:.6g} "
                                              f"(+{DEVICE_BUSY_GUARD_S} s guard); the device holds one at a time")

    def _check_rate(self, start_t: float, duration_s: float) -> None:
        p = self._profile
        ts, ds = self._hist_t, self._hist_d
        # Only bursts this close can violate the interval / no-overlap rule.
        lo = bisect.bisect_left(ts, start_t - max(p.min_interval_s, self._hist_max_d))
        hi = bisect.bisect_right(ts, start_t + max(p.min_interval_s, duration_s))
        for i in range(lo, hi):
            t, d = ts[i], ds[i]
            gap = abs(start_t - t)
            earlier_d = d if t <= start_t else duration_s
            need = max(p.min_interval_s, earlier_d)
            if gap < need:
                raise _Refused("min_interval", f"burst at {start_t} is {gap:.6g} s from the burst at {t}; "
                                               f"needs >= {need:.6g} s (min_interval_s or no overlap)")
        # Counting bursts within 60 s on *either* side is stricter than any sliding
        # window, which keeps it correct for out-of-order scheduled bursts.
        near = bisect.bisect_left(ts, start_t + RATE_WINDOW_S) - bisect.bisect_right(ts, start_t - RATE_WINDOW_S)
        if near >= p.max_bursts_per_min:
            raise _Refused("rate_limit", f"{near} bursts within {RATE_WINDOW_S} s of {start_t}; "
                                         f"max_bursts_per_min={p.max_bursts_per_min}")

    def _check_dose(self, charge_uc: float, duration_s: float) -> None:
        p = self._profile
        if self._charge_uc + charge_uc > p.max_session_charge_uc:
            raise _Refused("dose_charge", f"session charge would be {self._charge_uc + charge_uc:.6g} µC; "
                                          f"max_session_charge_uc={p.max_session_charge_uc}")
        if self._stim_s + duration_s > p.max_session_stim_s:
            raise _Refused("dose_time", f"session stimulation time would be {self._stim_s + duration_s:.6g} s; "
                                        f"max_session_stim_s={p.max_session_stim_s}")

    def _checked_params(self, params: Any) -> tuple[StimParams, list[dict[str, Any]], dict[str, Any]]:
        """``_check_and_clamp`` plus the post-check, reused while the same params object comes back."""
        memo = self._checked
        if memo is not None and memo[0] is params:
            return memo[1], memo[2], memo[3]
        out, clamps = self._check_and_clamp(params)
        violations = check_params(self._profile, self._caps, out)
        if violations:  # post-condition; unreachable unless the clamping logic is wrong
            raise _Refused("internal", "post-check failed: " + "; ".join(violations))
        self._checked = (params, out, clamps, out.to_dict())
        return out, clamps, self._checked[3]

    def _check_and_clamp(self, params: Any) -> tuple[StimParams, list[dict[str, Any]]]:
        p, caps = self._profile, self._caps
        act = p.on_violation
        clamps: list[dict[str, Any]] = []

        def clamp(field_name: str, requested: float, clamped: float, rule: str, action: str) -> None:
            if action != "clamp":
                raise _Refused(rule, f"{field_name}={requested} exceeds {clamped} ({rule}); profile says refuse")
            clamps.append({"field": field_name, "requested": requested, "clamped": clamped, "rule": rule})

        if not isinstance(params, StimParams):
            raise _Refused("invalid_request", f"params must be a StimParams, got {type(params).__name__}")
        if not isinstance(params.waveform, Waveform):
            raise _Refused("invalid_request", f"waveform={_show(params.waveform)} is not a Waveform")
        for f in _NUMERIC_FIELDS:
            x = getattr(params, f)
            if not _finite_real(x):
                raise _Refused("invalid_request", f"{f}={_show(x)} is not a finite number")
        ch = params.channel
        if isinstance(ch, bool) or not isinstance(ch, numbers.Integral) or not 0 <= ch < caps.n_channels:
            raise _Refused("channel", f"channel={_show(ch)}, expected an int in 0..{caps.n_channels - 1}")
        w = params.waveform
        if w not in p.allowed_waveforms:
            raise _Refused("waveform", f"waveform={w} not in profile {p.name!r} allowed_waveforms "
                                       f"{[str(x) for x in p.allowed_waveforms]}")
        if w not in caps.waveforms:
            raise _Refused("waveform", f"waveform={w} not supported by device {caps.name!r}")
        if p.require_charge_balanced and w not in CHARGE_BALANCED_WAVEFORMS:
            raise _Refused("charge_balance", f"waveform={w} is not charge-balanced; profile {p.name!r} requires it")

        amp = float(params.amplitude_ua)
        if amp < 0:
            raise _Refused("amplitude", f"amplitude_ua={amp} is negative; expected >= 0 (polarity is the waveform's)")
        if 0 < amp < MIN_AMPLITUDE_UA:
            raise _Refused("invalid_request", f"amplitude_ua={amp} is below {MIN_AMPLITUDE_UA} µA; expected 0 "
                                              "(no current) or a deliverable amplitude")
        if amp > p.hard_max_amplitude_ua:
            raise _Refused("hard_max_amplitude", f"amplitude_ua={amp} > hard_max_amplitude_ua={p.hard_max_amplitude_ua}")
        amp_max = min(p.max_amplitude_ua, caps.max_amplitude_ua)
        if amp > amp_max:
            clamp("amplitude_ua", amp, amp_max, "max_amplitude", act.amplitude)
            amp = amp_max

        if w is not Waveform.DC:
            f_max = min(p.max_frequency_hz, caps.max_frequency_hz)
            if not p.min_frequency_hz <= params.frequency_hz <= f_max:
                raise _Refused("frequency", f"frequency_hz={params.frequency_hz} outside {p.min_frequency_hz}..{f_max} Hz")

        changes: dict[str, Any] = {}
        n = params.n_pulses
        if not _pulse_count(n):
            # Garbage in an unused field is still garbage (a policy that confused its waveforms): one rule
            # for every waveform, so that no device-specific encoder is left to find it.
            unused = "" if params.is_pulsed else f"; {w} ignores it, leave the default 1"
            raise _Refused("invalid_request", f"n_pulses={_show(n)}, expected an int >= 1 (and within float range){unused}")
        if params.is_pulsed:
            if params.interphase_gap_us < 0:
                raise _Refused("invalid_request", f"interphase_gap_us={params.interphase_gap_us}, expected >= 0")
            pw = float(params.pulse_width_us)
            pw_lo = max(p.min_pulse_width_us, caps.min_pulse_width_us)
            pw_hi = min(p.max_pulse_width_us, caps.max_pulse_width_us)
            if pw < pw_lo:  # lengthening a pulse adds charge: never clamp upward
                raise _Refused("pulse_width", f"pulse_width_us={pw} < minimum {pw_lo} µs")
            if pw > pw_hi:
                clamp("pulse_width_us", pw, pw_hi, "max_pulse_width", act.pulse_width)
                pw = pw_hi
            if 2 * pw + params.interphase_gap_us > 1e6 / params.frequency_hz:
                raise _Refused("pulse_overlap", f"2*pulse_width_us+interphase_gap_us={2 * pw + params.interphase_gap_us} µs "
                                                f"exceeds the period {1e6 / params.frequency_hz} µs")
            q_max, rule = _max_charge_per_phase_uc(p)
            if amp * pw * 1e-6 > q_max * (1 - _CLAMP_MARGIN):
                limit = q_max / (pw * 1e-6) * (1 - _CLAMP_MARGIN)
                clamp("amplitude_ua", amp, limit, rule, act.charge)
                amp = limit
            if n / params.frequency_hz > p.max_burst_duration_s:
                n_max = math.floor(p.max_burst_duration_s * params.frequency_hz)
                while n_max >= 1 and n_max / params.frequency_hz > p.max_burst_duration_s:
                    n_max -= 1  # float rounding of floor()
                if n_max < 1:
                    raise _Refused("burst_duration", f"one pulse at {params.frequency_hz} Hz already exceeds "
                                                     f"max_burst_duration_s={p.max_burst_duration_s}")
                clamp("n_pulses", n, n_max, "max_burst_duration", act.burst_duration)
                changes["n_pulses"] = int(n_max)
            changes["pulse_width_us"] = pw
        else:
            dur = float(params.duration_s)
            if not dur >= MIN_DURATION_S:
                raise _Refused("invalid_request", f"duration_s={dur}, expected >= {MIN_DURATION_S} s for {w} stimulation")
            if dur > p.max_burst_duration_s:
                clamp("duration_s", dur, p.max_burst_duration_s, "max_burst_duration", act.burst_duration)
                dur = p.max_burst_duration_s
            ramp = params.ramp_s
            if ramp < 0 or 2 * ramp > dur:
                raise _Refused("ramp", f"ramp_s={ramp} outside 0..duration_s/2={dur / 2} (ramps are inside duration_s)")
            if ramp < p.min_ramp_s:
                raise _Refused("ramp", f"ramp_s={ramp} < min_ramp_s={p.min_ramp_s}")
            if p.max_ramp_rate_ua_per_s is not None and amp > 0 and (
                    ramp <= 0 or amp / ramp > p.max_ramp_rate_ua_per_s):
                raise _Refused("ramp", f"ramp rate {amp}/{ramp} µA/s > max_ramp_rate_ua_per_s={p.max_ramp_rate_ua_per_s}")
            if w is Waveform.TI and not ti_carrier_ok(params):
                raise _Refused("invalid_request", f"carrier_hz={params.carrier_hz}, expected >= {TI_MIN_CARRIER_HZ} Hz "
                                                  f"(REFERENCE.md §7: kHz carriers) and > frequency_hz={params.frequency_hz}")
            changes["duration_s"] = dur
        changes["amplitude_ua"] = amp
        # Plain Python numbers out (numpy scalars in): drivers and JSON see one type.
        out = {f: float(getattr(params, f)) for f in _NUMERIC_FIELDS}
        out.update(channel=int(ch), n_pulses=int(n) if params.is_pulsed else CONTINUOUS_N_PULSES)
        out.update(changes)
        return params.with_(**out), clamps
