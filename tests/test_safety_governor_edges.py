"""The governor at its edges: the governor never raises, bad impedance readings stop
stimulation without a window, and the start-up check refuses what the governor would always refuse."""
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.actuator import Actuator
from controller.config import ConfigError, load_config, parse_config
from controller.events import EventKind
from controller.safety import (MACRO_RNS, MICRO, TES, SafetyGovernor, SafetyProfile, StimRequest,
                               UnsafeProfileError, build_profile, check_params, check_session_safety)
from drivers.params import DeviceCapabilities, StimParams, Waveform
from drivers.simulated import SimulatedStimulator

CAPS = DeviceCapabilities(n_channels=4, waveforms=tuple(Waveform), max_amplitude_ua=12_000.0,
                          min_pulse_width_us=20.0, max_pulse_width_us=1000.0, max_frequency_hz=333.0)
RNS_BURST = StimParams(channel=1, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HUGE = 10 ** 400   # beyond float range: math.isfinite and int / float raise OverflowError on it


def _gov(profile=MACRO_RNS):
    g = SafetyGovernor(profile, CAPS)
    g.heartbeat_ok(0.0)
    if profile.require_impedance_check:
        g.set_impedance(1000.0, 0.0)
    return g


# ---------------------------------------------------------------- huge ints, never raise

@pytest.mark.parametrize("field", ["amplitude_ua", "pulse_width_us", "interphase_gap_us", "frequency_hz",
                                   "duration_s", "ramp_s", "carrier_hz", "n_pulses"])
def test_ints_beyond_float_range_are_refused_as_invalid_request(field):
    for value in (HUGE, -HUGE):
        d = _gov().step(StimRequest(0.0, "t", RNS_BURST.with_(**{field: value})), 0.0)
        assert not d.allowed and d.events[-1].data["rule"] == "invalid_request", d.reason
        json.loads(d.events[-1].to_json())


def test_huge_times_are_refused_not_raised():
    g = _gov()
    d = g.step(StimRequest(0.0, "t", RNS_BURST, at=HUGE), 0.0)
    assert d.events[-1].data["rule"] == "invalid_request"
    d = g.step(StimRequest(0.0, "t", RNS_BURST), HUGE)
    assert d.events[-1].data["rule"] == "invalid_time"
    # A time no log can hold is not the event's time: the last good one is, the bad one is in the data.
    assert d.events[-1].t == 0.0 and "bits" in d.events[-1].data["now"]
    json.loads(d.events[-1].to_json())
    assert g.step(StimRequest(0.0, "t", RNS_BURST), 10 ** 5000).events[-1].data["rule"] == "invalid_time"
    assert not g.heartbeat_fresh(HUGE)
    g.heartbeat_ok(HUGE)          # ignored, not raised
    assert g.set_impedance(HUGE, 0.0)[0].kind is EventKind.FAULT


@pytest.mark.parametrize("fields", [{"pulse_width_us": 2 ** 1023, "amplitude_ua": 4450},
                                    {"pulse_width_us": 2 ** 1023, "amplitude_ua": 0.0, "frequency_hz": 1.0}])
def test_the_stateless_check_refuses_ints_whose_products_overflow(fields):
    """2**1023 is a finite float, but 2 * 2**1023 or 4450 * 2**1023 is not: check_params raised
    OverflowError (found by the property test below in CI); it now names the params as refused."""
    params = RNS_BURST.with_(**fields)
    v = check_params(MICRO, CAPS, params)
    assert v and any("overflow" in x or "outside" in x for x in v)
    # The governor refuses it, or clamps it into a burst the same check passes (0 µA: pulse width clamped).
    d = _gov(MICRO).step(StimRequest(0.0, "t", params), 0.0)
    assert not d.allowed or (check_params(MICRO, CAPS, d.params) == [] and d.params.pulse_width_us <= 1000.0)
    json.loads(d.events[-1].to_json())


def test_an_error_inside_the_checks_is_a_refusal_with_rule_internal():
    class Hostile(StimParams):
        @property
        def is_pulsed(self):
            raise RuntimeError("a params object that breaks the governor's arithmetic")

    g = _gov()
    d = g.step(StimRequest(0.0, "t", Hostile(amplitude_ua=100.0)), 0.0)
    assert not d.allowed and d.events[-1].kind is EventKind.REFUSAL
    assert d.events[-1].data["rule"] == "internal" and "RuntimeError" in d.reason
    assert g.dose.bursts == 0
    json.loads(d.events[-1].to_json())
    assert g.step(StimRequest(1.0, "t", RNS_BURST), 1.0).allowed   # the governor goes on


ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.sampled_from([HUGE, -HUGE, 10 ** 5000, 2 ** 1024, 2 ** 1023, -1, 0, True, math.nan, math.inf, -math.inf]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(amplitude_ua=ANY_NUMBER, pulse_width_us=ANY_NUMBER, interphase_gap_us=ANY_NUMBER, frequency_hz=ANY_NUMBER,
       n_pulses=ANY_NUMBER, duration_s=ANY_NUMBER, ramp_s=ANY_NUMBER, carrier_hz=ANY_NUMBER, channel=ANY_NUMBER,
       waveform=st.sampled_from(list(Waveform)), t=ANY_NUMBER, at=st.one_of(st.none(), ANY_NUMBER),
       now=ANY_NUMBER, profile=st.sampled_from([MACRO_RNS, MICRO, TES]))
def test_step_never_raises_and_every_event_serialises(amplitude_ua, pulse_width_us, interphase_gap_us, frequency_hz,
                                                      n_pulses, duration_s, ramp_s, carrier_hz, channel, waveform,
                                                      t, at, now, profile):
    g = _gov(profile)
    params = StimParams(channel=channel, waveform=waveform, amplitude_ua=amplitude_ua, pulse_width_us=pulse_width_us,
                        interphase_gap_us=interphase_gap_us, frequency_hz=frequency_hz, n_pulses=n_pulses,
                        duration_s=duration_s, ramp_s=ramp_s, carrier_hz=carrier_hz)
    for step_now in (now, 0.0):
        d = g.step(StimRequest(t, "hypothesis", params, at=at), step_now)
        assert d.events and d.events[-1].kind in (EventKind.DECISION, EventKind.REFUSAL)
        for e in d.events:
            json.loads(e.to_json())
        if d.allowed:
            assert check_params(profile, CAPS, d.params) == []
    assert check_params(profile, CAPS, params) is not None   # the stateless check never raises either


# ---------------------------------------------------------------- impedance without a window

@pytest.mark.parametrize("ohm", [math.nan, -5.0, 0.0, math.inf, HUGE])
def test_a_bad_impedance_reading_refuses_even_without_a_window(ohm):
    assert MICRO.impedance_min_ohm is None
    g = _gov(MICRO)
    burst = StimParams(amplitude_ua=50.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=2)
    assert g.set_impedance(ohm, 0.0)[0].kind is EventKind.FAULT
    assert not g.impedance_ok()
    assert g.step(StimRequest(0.0, "t", burst), 0.0).events[-1].data["rule"] == "impedance"
    g.set_impedance(5000.0, 0.1)   # a good reading again: stimulation may go on
    assert g.impedance_ok() and g.step(StimRequest(0.1, "t", burst), 0.1).allowed


def test_actuator_stops_and_delivers_nothing_after_a_nan_impedance_without_window():
    t = [0.0]
    drv = SimulatedStimulator(clock=lambda: t[0])
    drv.open()
    act = Actuator(SafetyGovernor(MICRO, drv.capabilities), drv, lambda: t[0])
    act.heartbeat()
    ev = act.set_impedance(math.nan)
    assert [e.kind for e in ev] == [EventKind.FAULT, EventKind.SAFE_STATE]
    t[0] = 0.1
    ev = act.submit(StimRequest(t[0], "t", StimParams(amplitude_ua=50.0, pulse_width_us=100.0)))
    assert [e.kind for e in ev] == [EventKind.REFUSAL] and drv.delivered == []


# ---------------------------------------------------------------- the start-up check

@pytest.mark.parametrize("overrides, rule", [
    ({"policy": {"stim": {"pulse_width_us": 20.0}}}, "pulse_width"),                        # below macro min
    ({"policy": {"stim": {"pulse_width_us": 1000.0, "interphase_gap_us": 1500.0, "frequency_hz": 333.0,
                          "amplitude_ua": 100.0}}}, "pulse_overlap"),
    ({"safety": {"profile": "micro"}, "policy": {"stim": {"amplitude_ua": 300.0, "pulse_width_us": 100.0}}},
     "hard_max_amplitude"),                                                                  # never clamped
    ({"safety": {"profile": "tes"}, "device": {"impedance_ohm": 1000.0},
      "policy": {"stim": {"waveform": "dc", "amplitude_ua": 1000.0, "duration_s": 60.0, "ramp_s": 0.0}}}, "ramp"),
    ({"safety": {"profile": "tes", "overrides": {"allowed_waveforms": ["dc", "sine", "ti"]}},
      "device": {"impedance_ohm": 1000.0},
      "policy": {"stim": {"waveform": "ti", "amplitude_ua": 1000.0, "frequency_hz": 10.0, "duration_s": 60.0,
                          "ramp_s": 10.0}}}, "carrier_hz"),
    # A clamp the profile turned into a refusal (on_violation) is hard too.
    ({"safety": {"profile": "macro", "overrides": {"max_amplitude_ua": 5000.0, "on_violation": {"amplitude": "refuse"}}},
      "policy": {"stim": {"amplitude_ua": 6000.0}}}, "max_amplitude"),
])
def test_start_up_refuses_what_the_governor_refuses_on_every_request(overrides, rule):
    cfg = parse_config(overrides)
    with pytest.raises(UnsafeProfileError) as info:
        check_session_safety(cfg)
    assert rule in str(info.value) and "policy.stim" in str(info.value)


def test_start_up_refuses_an_impedance_required_profile_without_impedance():
    cfg = parse_config({"safety": {"profile": "tes"},
                        "policy": {"stim": {"waveform": "dc", "amplitude_ua": 1000.0, "duration_s": 60.0,
                                            "ramp_s": 10.0}}})
    with pytest.raises(UnsafeProfileError, match="device.impedance_ohm"):
        check_session_safety(cfg)
    with pytest.raises(UnsafeProfileError, match="impedance window"):
        check_session_safety(cfg.model_copy(update={"device": cfg.device.model_copy(update={"impedance_ohm": 50.0})}))
    ok = cfg.model_copy(update={"device": cfg.device.model_copy(update={"impedance_ohm": 1000.0})})
    assert check_session_safety(ok).name == "tes"


@pytest.mark.parametrize("overrides, profile, clamped", [
    ({"policy": {"stim": {"pulse_width_us": 160.0, "amplitude_ua": 3000.0}}}, "macro_rns", None),  # inside
    ({"safety": {"profile": "micro"}, "policy": {"stim": {"amplitude_ua": 150.0, "pulse_width_us": 100.0}}},
     "micro", "amplitude_ua=150.0 outside 0..100.0"),                                   # above the cap: clamped
    ({"policy": {"stim": {"amplitude_ua": 12_000.0, "pulse_width_us": 1000.0}}}, "macro_rns", "charge density"),
    ({"policy": {"stim": {"n_pulses": 5000}}}, "macro_rns", "burst duration"),
])
def test_start_up_accepts_what_the_governor_only_clamps(overrides, profile, clamped):
    from controller.policy_drive import stim_params

    cfg = parse_config(overrides)
    got = check_session_safety(cfg)
    assert got.name == profile
    # The clamped cases do lie outside the profile (else they would test nothing), and the governor's
    # answer to them is a clamp, not a refusal.
    caps = DeviceCapabilities(n_channels=1, waveforms=tuple(Waveform), max_amplitude_ua=1e9, min_pulse_width_us=0.0,
                              max_pulse_width_us=1e9, max_frequency_hz=1e9)
    stim = stim_params(cfg.policy.stim)
    violations = check_params(got, caps, stim)
    if clamped is None:
        assert violations == []
        return
    assert any(clamped in v for v in violations), violations
    gov = SafetyGovernor(got, caps)
    gov.heartbeat_ok(0.0)
    decision = gov.step(StimRequest(t=0.0, source="test", params=stim), now=0.0)
    clamps = [e for e in decision.events if e.kind is EventKind.CLAMP]
    assert decision.allowed and clamps and check_params(got, caps, decision.params) == []


def test_start_up_checks_the_built_in_devices_limits_and_leaves_a_serial_devices_to_its_hello():
    """A channel the emulator lacks passed the start-up check; the session then ran, every burst refused."""
    for kind in ("hil", "simulated"):
        with pytest.raises(UnsafeProfileError, match=r"channel=9, expected an int in 0..3"):
            check_session_safety(parse_config({"device": {"kind": kind}, "policy": {"stim": {"channel": 9}}}))
    serial = parse_config({"device": {"kind": "serial", "port": "/dev/ttyACM0"}, "policy": {"stim": {"channel": 9}}})
    assert check_session_safety(serial).name == "macro_rns"   # its channels are known only at HELLO


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_shipped_examples_pass_the_start_up_check(example):
    cfg = load_config(EXAMPLES / example)
    assert check_session_safety(cfg).name == build_profile(cfg.safety.profile, cfg.safety.overrides).name


def test_profiles_cannot_schedule_further_ahead_than_devices_accept():
    with pytest.raises(UnsafeProfileError, match="max_schedule_ahead_s"):
        SafetyProfile(**{**MACRO_RNS.model_dump(), "max_schedule_ahead_s": 61.0})
    assert SafetyProfile(**{**MACRO_RNS.model_dump(), "max_schedule_ahead_s": 60.0}).max_schedule_ahead_s == 60.0


def test_a_ti_session_is_configurable_and_its_carrier_reaches_the_governor():
    """policy.stim.carrier_hz is how a TI session names its carrier: without it every TI command was refused."""
    from controller.policy_drive import stim_params
    base = {"safety": {"profile": "tes", "overrides": {"allowed_waveforms": ["dc", "sine", "ti"]}},
            "device": {"impedance_ohm": 1000.0}}
    stim = {"waveform": "ti", "amplitude_ua": 1000.0, "frequency_hz": 10.0, "duration_s": 60.0, "ramp_s": 10.0}
    cfg = parse_config({**base, "policy": {"stim": {**stim, "carrier_hz": 2000.0}}})
    assert check_session_safety(cfg).name == "tes"
    assert stim_params(cfg.policy.stim).carrier_hz == 2000.0
    with pytest.raises(UnsafeProfileError, match="carrier_hz"):     # a carrier neurons follow
        check_session_safety(parse_config({**base, "policy": {"stim": {**stim, "carrier_hz": 200.0}}}))
    with pytest.raises(ConfigError, match="carrier_hz=2000.0 applies to waveform 'ti' only"):
        parse_config({"policy": {"stim": {"carrier_hz": 2000.0}}})
