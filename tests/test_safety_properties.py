"""Property-based tests of the governor (hypothesis): whatever arrives, nothing unsafe gets out.

The oracle here is written independently of the governor's own post-check
(``check_params``) so a shared mistake cannot hide.
"""
import dataclasses
import math

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from controller.events import EventKind
from controller.safety import MACRO_RNS, MICRO, TES, SafetyGovernor, SafetyProfile, StimRequest, check_params
from controller.safety.profiles import UnsafeProfileError
from controller.safety.governor import DEVICE_BUSY_GUARD_S
from drivers.params import DeviceCapabilities, StimParams, Waveform

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


def sensible(lo, hi):
    # mostly in-range values so requests get through, plus any float at all
    return st.one_of(st.floats(lo, hi), st.floats(lo, hi), ANY_FLOAT)


params_strategy = st.builds(
    StimParams,
    channel=st.integers(-2, 5),
    waveform=st.sampled_from(list(Waveform)),
    amplitude_ua=sensible(0.0, 15_000.0),
    pulse_width_us=sensible(10.0, 1200.0),
    interphase_gap_us=st.one_of(st.just(0.0), ANY_FLOAT),
    frequency_hz=sensible(0.1, 400.0),
    n_pulses=st.integers(-1, 3000),
    duration_s=sensible(0.0, 3000.0),
    ramp_s=sensible(0.0, 40.0),
    carrier_hz=sensible(0.0, 5000.0),
)

def profile_params(p: SafetyProfile, caps: DeviceCapabilities):
    """Requests scaled to the profile, within and across its limits (finite numbers only)."""
    def near(lo, hi):
        return st.floats(lo, hi)
    return st.builds(
        StimParams,
        channel=st.integers(0, caps.n_channels - 1),
        waveform=st.sampled_from(p.allowed_waveforms),
        amplitude_ua=near(0.0, 1.1 * p.hard_max_amplitude_ua),
        pulse_width_us=near(0.5 * p.min_pulse_width_us, 1.2 * p.max_pulse_width_us),
        interphase_gap_us=st.one_of(st.just(0.0), st.just(0.0), near(0.0, 100.0)),
        frequency_hz=near(0.5 * p.min_frequency_hz, 1.2 * p.max_frequency_hz),
        n_pulses=st.one_of(st.integers(1, 50), st.integers(1, 3000)),
        duration_s=near(0.0, 1.2 * p.max_burst_duration_s),
        ramp_s=near(0.0, 3 * p.min_ramp_s + 10.0),
        carrier_hz=near(0.0, 5000.0),
    )


caps_strategy = st.builds(
    DeviceCapabilities,
    n_channels=st.integers(1, 4),
    waveforms=st.lists(st.sampled_from(list(Waveform)), min_size=1, unique=True).map(tuple),
    max_amplitude_ua=st.floats(50.0, 12_000.0),
    min_pulse_width_us=st.floats(10.0, 100.0),
    max_pulse_width_us=st.floats(100.0, 1000.0),
    max_frequency_hz=st.floats(50.0, 400.0),
    scheduled_trigger=st.booleans(),
)

tes_ti = SafetyProfile(**{**TES.model_dump(), "name": "tes_ti",
                          "allowed_waveforms": (Waveform.DC, Waveform.SINE, Waveform.TI)})
small_dose = MACRO_RNS.model_copy(update={"name": "small_dose", "max_session_charge_uc": 500.0,
                                          "max_bursts_per_min": 5, "max_amplitude_ua": 3000.0,
                                          "on_violation": {"charge": "refuse"}})
PROFILES = [MACRO_RNS, MICRO, TES, tes_ti, small_dose]


def oracle_violations(p: SafetyProfile, caps: DeviceCapabilities, s: StimParams) -> list[str]:
    """Independent statement of the per-burst limits."""
    out = []
    nums = [s.amplitude_ua, s.pulse_width_us, s.interphase_gap_us, s.frequency_hz, s.duration_s, s.ramp_s, s.carrier_hz]
    if not all(isinstance(x, float) and math.isfinite(x) for x in nums):
        return ["non-finite or non-float field"]
    if not (type(s.channel) is int and 0 <= s.channel < caps.n_channels):
        out.append("channel")
    if s.waveform not in p.allowed_waveforms or s.waveform not in caps.waveforms:
        out.append("waveform")
    if s.waveform in (Waveform.MONOPHASIC, Waveform.DC) and p.require_charge_balanced:
        out.append("charge balance")
    if s.amplitude_ua < 0 or s.amplitude_ua > p.max_amplitude_ua or s.amplitude_ua > caps.max_amplitude_ua:
        out.append("amplitude")
    pulsed = s.waveform in (Waveform.BIPHASIC, Waveform.MONOPHASIC)
    if s.waveform is not Waveform.DC and not (
            p.min_frequency_hz <= s.frequency_hz <= p.max_frequency_hz and s.frequency_hz <= caps.max_frequency_hz):
        out.append("frequency")
    if pulsed:
        if not (p.min_pulse_width_us <= s.pulse_width_us <= p.max_pulse_width_us
                and caps.min_pulse_width_us <= s.pulse_width_us <= caps.max_pulse_width_us):
            out.append("pulse width")
        if not (type(s.n_pulses) is int and s.n_pulses >= 1):
            out.append("n_pulses")
        q_uc = s.amplitude_ua * s.pulse_width_us / 1e6
        d = q_uc / p.electrode_area_cm2
        if p.max_charge_per_phase_uc is not None and q_uc > p.max_charge_per_phase_uc:
            out.append("charge per phase")
        if p.max_charge_density_uc_cm2 is not None and d > p.max_charge_density_uc_cm2:
            out.append("charge density")
        if p.shannon_k_max is not None and q_uc > 0 and math.log10(d) + math.log10(q_uc) >= p.shannon_k_max:
            out.append("shannon")
        if s.frequency_hz > 0 and s.n_pulses / s.frequency_hz > p.max_burst_duration_s:
            out.append("burst duration")
        if (2 * s.pulse_width_us + s.interphase_gap_us) * s.frequency_hz > 1e6:
            out.append("pulse overlap")
    else:
        if not 0 < s.duration_s <= p.max_burst_duration_s:
            out.append("duration")
        if s.ramp_s < p.min_ramp_s or 2 * s.ramp_s > s.duration_s:
            out.append("ramp")
        if p.max_ramp_rate_ua_per_s is not None and s.amplitude_ua > 0 and (
                s.ramp_s <= 0 or s.amplitude_ua / s.ramp_s > p.max_ramp_rate_ua_per_s):
            out.append("ramp rate")
    return out


def oracle_charge_uc(s: StimParams) -> float:
    if s.waveform is Waveform.BIPHASIC:
        return 2 * s.n_pulses * s.amplitude_ua * s.pulse_width_us * 1e-6
    if s.waveform is Waveform.MONOPHASIC:
        return s.n_pulses * s.amplitude_ua * s.pulse_width_us * 1e-6
    return s.amplitude_ua * s.duration_s * (2 if s.waveform is Waveform.TI else 1)


class GovernorMachine(RuleBasedStateMachine):
    """Random interleavings of requests, faults, resets, impedance readings, heartbeats and time."""

    @initialize(profile=st.sampled_from(PROFILES), caps=caps_strategy, add_profile_waveforms=st.booleans(),
                ohm=st.one_of(st.just(1000.0), st.just(1000.0), st.floats(100.0, 12_000.0), st.none()))
    def setup(self, profile, caps, add_profile_waveforms, ohm):
        if add_profile_waveforms:  # so that many requests can pass at all
            caps = dataclasses.replace(caps, waveforms=tuple(set(caps.waveforms) | set(profile.allowed_waveforms)))
        self.p, self.caps = profile, caps
        self.g = SafetyGovernor(profile, caps)
        if ohm is not None:
            self.g.set_impedance(ohm, 0.0)
        self.now = 0.0
        self.latched = False
        self.allowed_charge_uc = 0.0
        self.allowed_stim_s = 0.0
        self.allowed: list[tuple[float, float]] = []   # (start_t, duration)
        self.n_allowed = 0
        self.steps_since_reset = 0

    @rule(dt=st.one_of(st.floats(0.0, 2.0), st.floats(0.0, 120.0)))
    def advance(self, dt):
        self.now += dt

    @rule()
    def heartbeat(self):
        self.g.heartbeat_ok(self.now)

    @rule(data=st.data())
    def impedance(self, data):
        lo, hi = self.p.impedance_min_ohm or 100.0, self.p.impedance_max_ohm or 12_000.0
        ohm = data.draw(st.one_of(st.floats(lo, hi), st.floats(lo, hi), st.floats(0.5 * lo, 2 * hi), ANY_FLOAT))
        ev = self.g.set_impedance(ohm, self.now)
        assert len(ev) == 1 and ev[0].kind in (EventKind.FAULT, EventKind.STATUS)

    # Faults only after some activity: otherwise most runs sit in the latched state.
    @precondition(lambda self: self.steps_since_reset >= 6)
    @rule(reason=st.text(max_size=10))
    def fault(self, reason):
        ev = self.g.fault(reason, self.now)
        assert ev[0].kind is EventKind.FAULT
        self.latched = True

    @precondition(lambda self: self.steps_since_reset >= 6)
    @rule()
    def estop(self):
        self.g.emergency_stop(self.now)
        self.latched = True

    @rule()
    def reset(self):
        self.g.reset(self.now)
        self.latched = False
        self.steps_since_reset = 0

    @rule(params=params_strategy, at_offset=st.one_of(st.none(), st.floats(-1.0, 2.0), ANY_FLOAT))
    def request_wild(self, params, at_offset):
        self._request(params, at_offset)

    @rule(data=st.data(), at_offset=st.one_of(st.none(), st.none(), st.floats(-1.0, 1.0)),
          ack_delay=st.one_of(st.just(0.0), st.floats(0.0, 0.2)),
          started_offset=st.one_of(st.just(0.0), st.floats(-0.3, 0.1), ANY_FLOAT, st.none()))
    def request_tame(self, data, at_offset, ack_delay=0.0, started_offset=0.0):
        self.g.heartbeat_ok(self.now)   # heartbeats usually keep up with requests
        self._request(data.draw(profile_params(self.p, self.caps)), at_offset, ack_delay, started_offset)

    @rule(data=st.data())
    def request_tame_again(self, data):
        # a second entry point so that requests outnumber faults and resets
        self.request_tame(data, None)

    def _request(self, params, at_offset, ack_delay=0.0, started_offset=0.0):
        at = None if at_offset is None else self.now + at_offset
        d = self.g.step(StimRequest(t=self.now, source="prop", params=params, at=at), self.now)
        assert d.events, "every decision produces an event"
        assert d.events[-1].kind is (EventKind.DECISION if d.allowed else EventKind.REFUSAL)
        for e in d.events:
            e.to_json()  # recorder-safe whatever the input
        if not d.allowed:
            assert d.params is None and d.events[0].data["rule"] and d.reason
            return
        s = d.params
        assert not self.latched, "nothing passes a latched governor"
        assert self.g.heartbeat_fresh(self.now) and self.g.impedance_ok()
        assert oracle_violations(self.p, self.caps, s) == []
        assert check_params(self.p, self.caps, s) == []
        # clamps only ever reduce
        assert s.amplitude_ua <= params.amplitude_ua
        assert s.waveform is params.waveform and s.frequency_hz == params.frequency_hz
        if s.waveform in (Waveform.BIPHASIC, Waveform.MONOPHASIC):
            assert s.pulse_width_us <= params.pulse_width_us and s.n_pulses <= params.n_pulses
        start = self.now if at is None else max(at, self.now)
        dur = s.burst_duration_s
        for t0, d0 in self.allowed:
            first_d = d0 if t0 <= start else dur
            assert abs(start - t0) >= max(self.p.min_interval_s, first_d) - 1e-9
        assert sum(1 for t0, _ in self.allowed if abs(t0 - start) < 60.0) < self.p.max_bursts_per_min
        # the device holds one burst at a time: none allowed earlier is scheduled or running now
        assert all(t0 + d0 + DEVICE_BUSY_GUARD_S <= self.now + 1e-9 for t0, d0 in self.allowed)
        self.allowed_charge_uc += oracle_charge_uc(s)
        self.allowed_stim_s += dur
        self.n_allowed += 1
        if ack_delay or started_offset:
            # The actuator's report once the TRIGGER is acknowledged, ack_delay later: when the device
            # started it (retries delay an immediate one; anything else a device may claim). Never earlier
            # than booked, never after the report's now; an unknown time counts as that now.
            self.now += ack_delay
            started = None if started_offset is None else self.now + started_offset
            known = started is not None and math.isfinite(started)
            expected = max(start, min(started, self.now) if known else self.now)
            assert self.g.confirm_start(start, started, self.now) == expected
            start = expected
        self.allowed.append((start, dur))

    @precondition(lambda self: self.now > 0)
    @rule(back=st.floats(1e-6, 10.0), params=params_strategy)
    def clock_backwards(self, back, params):
        d = self.g.step(StimRequest(t=self.now, source="prop", params=params), self.now - back)
        # the governor may not have stepped yet at all; after one step, going back is refused
        if self.g._last_now > self.now - back:
            assert not d.allowed and d.events[0].data["rule"] == "clock"

    @invariant()
    def dose_never_undercounts(self):
        dose = self.g.dose
        assert dose.bursts == self.n_allowed
        assert math.isclose(dose.charge_uc, self.allowed_charge_uc, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(dose.stim_s, self.allowed_stim_s, rel_tol=1e-9, abs_tol=1e-9)
        assert dose.charge_uc <= self.p.max_session_charge_uc * (1 + 1e-12)
        assert dose.stim_s <= self.p.max_session_stim_s * (1 + 1e-12)

    @invariant()
    def count_steps(self):
        self.steps_since_reset += 1

    @invariant()
    def latch_matches(self):
        assert (self.g.latched is not None) == self.latched


TestGovernorMachine = GovernorMachine.TestCase
TestGovernorMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=400, deadline=None)
@given(profile=st.sampled_from(PROFILES), caps=caps_strategy, data=st.data())
def test_single_request_never_exceeds_limits(profile, caps, data):
    caps = dataclasses.replace(caps, waveforms=tuple(set(caps.waveforms) | set(profile.allowed_waveforms)))
    params = data.draw(st.one_of(profile_params(profile, caps), profile_params(profile, caps), params_strategy))
    g = SafetyGovernor(profile, caps)
    g.heartbeat_ok(0.0)
    g.set_impedance(1000.0, 0.0)
    d = g.step(StimRequest(0.0, "prop", params), 0.0)
    if d.allowed:
        assert oracle_violations(profile, caps, d.params) == []
        # Never undercounts; equal up to rounding (abs_tol: subnormal amplitudes lose relative precision).
        assert g.dose.charge_uc >= oracle_charge_uc(d.params) * (1 - 1e-12)
        assert math.isclose(g.dose.charge_uc, oracle_charge_uc(d.params), rel_tol=1e-12, abs_tol=1e-300)
    else:
        assert g.dose.bursts == 0 and g.dose.charge_uc == 0.0


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from([MACRO_RNS, MICRO, TES]),
       field=st.sampled_from(["max_amplitude_ua", "hard_max_amplitude_ua", "shannon_k_max", "max_frequency_hz",
                              "max_charge_density_uc_cm2", "max_session_charge_uc", "max_session_stim_s"]),
       value=st.floats(0.0, 1e7))
def test_profile_construction_refuses_beyond_kind_ceilings(base, field, value):
    data = {**base.model_dump(), field: value}
    if field == "hard_max_amplitude_ua":
        data["max_amplitude_ua"] = min(value, base.max_amplitude_ua)
    try:
        p = SafetyProfile(**data)
    except UnsafeProfileError as e:
        assert e.field and e.rule and e.field in str(e)
        return
    # accepted: then it must respect the kind's ceilings (REFERENCE.md §3, §4)
    if p.kind == "tes":
        assert p.hard_max_amplitude_ua <= 4000 and p.max_session_stim_s <= 2400 and p.max_session_charge_uc <= 7.2e6
    if p.kind == "macro":
        assert p.hard_max_amplitude_ua <= 12_000 and p.max_frequency_hz <= 333 and p.max_charge_density_uc_cm2 <= 25
    if p.shannon_k_max is not None:
        assert p.shannon_k_max < 1.85
    assert p.max_amplitude_ua <= p.hard_max_amplitude_ua


# The timing tests need an allowed first burst, drawn from requests within and across the profile's
# limits: about 1 in 4 is allowed (99 of 400 draws), so Hypothesis's filtering health check can fire
# on an unlucky start (7 valid of 57 seen, in CI) although every example it runs is a valid one.
FIRST_BURST_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


@FIRST_BURST_SETTINGS
@given(profile=st.sampled_from(PROFILES), caps=caps_strategy, data=st.data(),
       first_at=st.one_of(st.none(), st.floats(0.0, 1.0)), dt=st.floats(0.0, 2.0),
       second_at=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_no_command_reaches_a_device_still_holding_a_burst(profile, caps, data, first_at, dt, second_at):
    """The device holds one burst at a time, running or scheduled, and answers BUSY (a fault) to
    another command meanwhile: the governor allows a command only once every burst it allowed has
    ended, with DEVICE_BUSY_GUARD_S to spare for transport."""
    caps = dataclasses.replace(caps, waveforms=tuple(set(caps.waveforms) | set(profile.allowed_waveforms)),
                               scheduled_trigger=True)
    g = SafetyGovernor(profile, caps)
    g.heartbeat_ok(0.0)
    g.set_impedance(1000.0, 0.0)
    d1 = g.step(StimRequest(0.0, "prop", data.draw(profile_params(profile, caps)), at=first_at), 0.0)
    assume(d1.allowed)
    end1 = (first_at or 0.0) + d1.params.burst_duration_s
    g.heartbeat_ok(dt)
    at2 = None if second_at is None else dt + second_at
    d2 = g.step(StimRequest(dt, "prop", data.draw(profile_params(profile, caps)), at=at2), dt)
    if end1 + DEVICE_BUSY_GUARD_S > dt:
        assert not d2.allowed
    if not d2.allowed and d2.events[-1].data["rule"] == "device_busy":
        assert end1 + DEVICE_BUSY_GUARD_S > dt      # refused only while the device is busy


@FIRST_BURST_SETTINGS
@given(profile=st.sampled_from(PROFILES), caps=caps_strategy, data=st.data(), late=st.floats(0.0, 0.3),
       dt=st.floats(0.0, 0.5), second_at=st.one_of(st.none(), st.floats(0.0, 0.5)))
def test_the_next_burst_keeps_its_distance_from_where_the_device_started_the_last(profile, caps, data, late, dt,
                                                                                  second_at):
    """The device starts an immediate burst when its TRIGGER arrives, ``late`` after the decision (retries);
    once the actuator reports it (confirm_start), the interval, no-overlap and device-busy rules hold
    against that start, not the decision time."""
    caps = dataclasses.replace(caps, waveforms=tuple(set(caps.waveforms) | set(profile.allowed_waveforms)),
                               scheduled_trigger=True)
    g = SafetyGovernor(profile, caps)
    g.heartbeat_ok(0.0)
    g.set_impedance(1000.0, 0.0)
    d1 = g.step(StimRequest(0.0, "prop", data.draw(profile_params(profile, caps))), 0.0)
    assume(d1.allowed)
    assert g.confirm_start(0.0, late, late) == late
    t2 = late + dt
    g.heartbeat_ok(t2)
    at2 = None if second_at is None else t2 + second_at
    d2 = g.step(StimRequest(t2, "prop", data.draw(profile_params(profile, caps)), at=at2), t2)
    if d2.allowed:
        dur1 = d1.params.burst_duration_s
        start2 = t2 if at2 is None else at2
        assert start2 - late >= max(profile.min_interval_s, dur1) - 1e-9
        assert late + dur1 + DEVICE_BUSY_GUARD_S <= t2 + 1e-9
    assert g.dose.bursts == (2 if d2.allowed else 1)
