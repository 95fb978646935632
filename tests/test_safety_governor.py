"""Governor rules one by one: clamp vs refuse, events, latches, dose, rate limits."""
import json
import math

import numpy as np
import pytest

from controller.events import EventKind
from controller.safety.governor import DEVICE_BUSY_GUARD_S
from controller.safety import (MACRO_RNS, MICRO, TES, SafetyGovernor, SafetyProfile, StimRequest, check_params,
                               conservative_charge_uc)
from drivers.params import DeviceCapabilities, StimParams, Waveform

CAPS = DeviceCapabilities(n_channels=4, waveforms=tuple(Waveform), max_amplitude_ua=12_000.0,
                          min_pulse_width_us=20.0, max_pulse_width_us=1000.0, max_frequency_hz=333.0)
RNS_BURST = StimParams(channel=1, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)


def gov(profile=MACRO_RNS, caps=CAPS, now=0.0):
    g = SafetyGovernor(profile, caps)
    g.heartbeat_ok(now)
    if profile.require_impedance_check:
        g.set_impedance(1000.0, now)
    return g


def req(params, t=0.0, at=None, **meta):
    return StimRequest(t=t, source="test", params=params, at=at, meta=meta)


def kinds(decision):
    return [e.kind for e in decision.events]


def test_typical_rns_burst_allowed_unchanged_with_decision_event():
    g = gov()
    d = g.step(req(RNS_BURST), 0.0)
    assert d.allowed and d.params == RNS_BURST
    assert kinds(d) == [EventKind.DECISION]
    assert g.dose.bursts == 1 and g.dose.charge_uc == pytest.approx(2 * 20 * 1500 * 160e-6)
    assert g.dose.stim_s == pytest.approx(0.1)


def test_amplitude_above_max_is_clamped_with_clamp_event():
    p = MACRO_RNS.model_copy(update={"max_amplitude_ua": 3000.0})
    d = gov(p).step(req(RNS_BURST.with_(amplitude_ua=5000.0)), 0.0)
    assert d.allowed and d.params.amplitude_ua == 3000.0
    assert kinds(d) == [EventKind.CLAMP, EventKind.DECISION]
    c = d.events[0].data
    assert (c["field"], c["requested"], c["clamped"], c["rule"]) == ("amplitude_ua", 5000.0, 3000.0, "max_amplitude")


def test_amplitude_above_hard_max_is_refused_even_in_clamp_mode():
    d = gov().step(req(RNS_BURST.with_(amplitude_ua=12_001.0)), 0.0)
    assert not d.allowed and kinds(d) == [EventKind.REFUSAL]
    assert d.events[0].data["rule"] == "hard_max_amplitude" and "12001" in d.reason


def test_refuse_mode_refuses_instead_of_clamping():
    p = MACRO_RNS.model_copy(update={"max_amplitude_ua": 3000.0, "on_violation": {"amplitude": "refuse"}})
    d = gov(p).step(req(RNS_BURST.with_(amplitude_ua=5000.0)), 0.0)
    assert not d.allowed and d.events[0].data["rule"] == "max_amplitude"


def test_charge_density_clamps_amplitude_to_25_uc_per_cm2():
    d = gov().step(req(RNS_BURST.with_(amplitude_ua=12_000.0, pulse_width_us=500.0)), 0.0)
    assert d.allowed
    density = d.params.charge_per_phase_uc / MACRO_RNS.electrode_area_cm2
    assert density <= 25.0 and density == pytest.approx(25.0)
    assert [e.data.get("rule") for e in d.events if e.kind is EventKind.CLAMP] == ["charge_density"]


def test_shannon_limit_for_microstimulation():
    g = gov(MICRO)
    d = g.step(req(StimParams(amplitude_ua=100.0, pulse_width_us=1000.0, frequency_hz=100.0, n_pulses=1)), 0.0)
    assert d.allowed
    q = d.params.charge_per_phase_uc
    k = math.log10(q / MICRO.electrode_area_cm2) + math.log10(q)
    assert k < MICRO.shannon_k_max and k == pytest.approx(MICRO.shannon_k_max, abs=1e-6)
    assert d.events[0].data["rule"] == "shannon"


@pytest.mark.parametrize("params, rule", [
    (RNS_BURST.with_(waveform=Waveform.MONOPHASIC), "waveform"),
    (RNS_BURST.with_(frequency_hz=500.0), "frequency"),
    (RNS_BURST.with_(frequency_hz=0.5), "frequency"),
    (RNS_BURST.with_(pulse_width_us=30.0), "pulse_width"),      # below min: never lengthened
    (RNS_BURST.with_(amplitude_ua=-1.0), "amplitude"),
    (RNS_BURST.with_(amplitude_ua=math.nan), "invalid_request"),
    (RNS_BURST.with_(pulse_width_us=math.inf), "invalid_request"),
    (RNS_BURST.with_(n_pulses=0), "invalid_request"),
    (RNS_BURST.with_(channel=4), "channel"),
    (RNS_BURST.with_(channel=-1), "channel"),
    (RNS_BURST.with_(frequency_hz=333.0, pulse_width_us=1000.0, interphase_gap_us=1500.0, amplitude_ua=100.0),
     "pulse_overlap"),
])
def test_out_of_range_requests_are_refused_with_rule(params, rule):
    d = gov().step(req(params), 0.0)
    assert not d.allowed and d.params is None
    assert kinds(d) == [EventKind.REFUSAL] and d.events[0].data["rule"] == rule
    json.loads(d.events[0].to_json())  # NaN/inf inputs still give a valid JSON line


def test_device_capabilities_are_enforced_too():
    caps = DeviceCapabilities(n_channels=2, max_amplitude_ua=2000.0, max_frequency_hz=150.0, max_pulse_width_us=200.0)
    g = gov(caps=caps)
    assert g.step(req(RNS_BURST), 0.0).events[0].data["rule"] == "frequency"
    d = g.step(req(RNS_BURST.with_(frequency_hz=100.0, amplitude_ua=3000.0, pulse_width_us=300.0)), 1.0)
    assert d.allowed and d.params.amplitude_ua == 2000.0 and d.params.pulse_width_us == 200.0


def test_burst_duration_clamps_number_of_pulses():
    d = gov().step(req(RNS_BURST.with_(n_pulses=5000, frequency_hz=200.0)), 0.0)
    assert d.allowed and d.params.n_pulses == 1000 and d.params.burst_duration_s <= MACRO_RNS.max_burst_duration_s


def test_min_interval_and_no_overlap():
    g = gov()
    assert g.step(req(RNS_BURST), 0.0).allowed                   # 0.1 s burst
    d = g.step(req(RNS_BURST), 0.05)
    assert not d.allowed and d.events[0].data["rule"] == "min_interval"
    # Back to back is no overlap, but the device would still hold the first burst when the command
    # arrives (BUSY, a fault): refused here, and allowed once the device-busy guard has passed.
    d = g.step(req(RNS_BURST), 0.1)
    assert not d.allowed and d.events[0].data["rule"] == "device_busy" and "running" in d.reason
    assert g.step(req(RNS_BURST), 0.1 + DEVICE_BUSY_GUARD_S).allowed
    # a scheduled burst landing on top of an allowed one is refused as well
    g.heartbeat_ok(0.5)
    assert g.step(req(RNS_BURST, at=1.0), 0.5).allowed
    d = g.step(req(RNS_BURST, at=0.95), 0.6)
    assert not d.allowed and d.events[0].data["rule"] == "min_interval"
    # and a burst far enough from it, sent while it is still scheduled on the device
    d = g.step(req(RNS_BURST), 0.6)
    assert not d.allowed and d.events[0].data["rule"] == "device_busy" and "scheduled" in d.reason


def test_rate_limit_per_minute():
    p = MACRO_RNS.model_copy(update={"max_bursts_per_min": 3})
    g = gov(p)
    for i in range(3):
        g.heartbeat_ok(i)
        assert g.step(req(RNS_BURST), float(i)).allowed
    g.heartbeat_ok(3.0)
    d = g.step(req(RNS_BURST), 3.0)
    assert not d.allowed and d.events[0].data["rule"] == "rate_limit"
    g.heartbeat_ok(60.5)
    assert g.step(req(RNS_BURST), 60.5).allowed   # the burst at t=0 left the window


def test_session_charge_and_time_dose_are_refused_when_exceeded():
    per_burst = 2 * 20 * 1500 * 160e-6
    p = MACRO_RNS.model_copy(update={"max_session_charge_uc": 2.5 * per_burst})
    g = gov(p)
    for t in (0.0, 1.0):
        g.heartbeat_ok(t)
        assert g.step(req(RNS_BURST), t).allowed
    g.heartbeat_ok(2.0)
    d = g.step(req(RNS_BURST), 2.0)
    assert not d.allowed and d.events[0].data["rule"] == "dose_charge"
    assert g.dose.bursts == 2 and g.dose.charge_uc == pytest.approx(2 * per_burst)
    p = MACRO_RNS.model_copy(update={"max_session_stim_s": 0.15})
    g = gov(p)
    assert g.step(req(RNS_BURST), 0.0).allowed
    assert g.step(req(RNS_BURST), 1.0).events[0].data["rule"] == "dose_time"


def test_impedance_interlock_refuses_until_back_in_window():
    g = gov()
    assert g.step(req(RNS_BURST), 0.0).allowed
    ev = g.set_impedance(5000.0, 0.5)
    assert ev[0].kind is EventKind.FAULT and ev[0].data["rule"] == "impedance"
    assert g.step(req(RNS_BURST), 1.0).events[0].data["rule"] == "impedance"
    g.set_impedance(math.nan, 1.1)
    assert not g.impedance_ok()
    assert g.set_impedance(1200.0, 1.2)[0].kind is EventKind.STATUS
    assert g.step(req(RNS_BURST), 1.5).allowed


def test_tes_requires_an_impedance_measurement_first():
    g = SafetyGovernor(TES, CAPS)
    g.heartbeat_ok(0.0)
    dc = StimParams(waveform=Waveform.DC, amplitude_ua=1000.0, duration_s=600.0, ramp_s=10.0)
    assert g.step(req(dc), 0.0).events[0].data["rule"] == "impedance"
    g.set_impedance(1500.0, 0.0)
    assert g.step(req(dc), 0.0).allowed


def test_heartbeat_timeout_refuses_and_recovers():
    g = SafetyGovernor(MACRO_RNS, CAPS)
    assert g.step(req(RNS_BURST), 0.0).events[0].data["rule"] == "heartbeat"   # none yet
    g.heartbeat_ok(0.0)
    assert g.step(req(RNS_BURST), 1.0).allowed
    assert g.step(req(RNS_BURST), 2.5).events[0].data["rule"] == "heartbeat"
    g.heartbeat_ok(2.6)
    assert g.step(req(RNS_BURST), 2.6).allowed


def test_fault_latches_until_reset_and_reset_keeps_dose():
    g = gov()
    assert g.step(req(RNS_BURST), 0.0).allowed
    ev = g.fault("driver timeout", 0.2)
    assert ev[0].kind is EventKind.FAULT and g.latched == "driver timeout"
    for t in (0.5, 1.0, 1.5):
        g.heartbeat_ok(t)
        assert g.step(req(RNS_BURST), t).events[0].data["rule"] == "safe_state"
    dose = g.dose
    g.reset(1.6)
    assert g.latched is None and g.dose == dose
    assert g.step(req(RNS_BURST), 1.6).allowed
    g.emergency_stop(1.7)
    assert g.latched.startswith("emergency_stop")
    assert "emergency_stop" in g.step(req(RNS_BURST), 1.8).reason


def test_clock_going_backwards_or_nan_is_refused():
    g = gov()
    assert g.step(req(RNS_BURST), 0.5).allowed
    assert g.step(req(RNS_BURST), 0.4).events[0].data["rule"] == "clock"
    assert g.step(req(RNS_BURST), math.nan).events[0].data["rule"] == "invalid_time"


def test_schedule_horizon_and_capability():
    g = gov()
    assert g.step(req(RNS_BURST, at=5.0), 0.0).events[0].data["rule"] == "schedule"
    assert g.step(req(RNS_BURST, at=math.inf), 0.0).events[0].data["rule"] == "invalid_request"
    caps = DeviceCapabilities(scheduled_trigger=False)
    assert gov(caps=caps).step(req(RNS_BURST, at=0.5), 0.0).events[0].data["rule"] == "schedule"


def test_tes_ramps_and_session_limits():
    g = gov(TES)
    dc = StimParams(waveform=Waveform.DC, amplitude_ua=2000.0, duration_s=1200.0, ramp_s=10.0)
    assert g.step(req(dc.with_(ramp_s=2.0)), 0.0).events[0].data["rule"] == "ramp"        # too short
    assert g.step(req(dc.with_(ramp_s=700.0)), 0.0).events[0].data["rule"] == "ramp"      # > duration/2
    assert g.step(req(dc.with_(amplitude_ua=3000.0)), 0.0).params.amplitude_ua == 2000.0  # clamped to 2 mA
    g.heartbeat_ok(1300.0)
    assert g.step(req(dc), 1300.0).allowed
    g.heartbeat_ok(2600.0)
    d = g.step(req(dc), 2600.0)   # 3 × 20 min > 40 min
    assert not d.allowed and d.events[0].data["rule"] in ("dose_time", "dose_charge")
    assert g.dose.stim_s == pytest.approx(2400.0) and g.dose.stim_s <= TES.max_session_stim_s


def test_ti_charge_is_booked_for_both_pairs():
    p = SafetyProfile(**{**TES.model_dump(), "allowed_waveforms": (Waveform.DC, Waveform.SINE, Waveform.TI)})
    ti = StimParams(waveform=Waveform.TI, amplitude_ua=1000.0, frequency_hz=10.0, carrier_hz=2000.0,
                    duration_s=60.0, ramp_s=10.0)
    assert conservative_charge_uc(ti) == pytest.approx(2 * 1000.0 * 60.0)
    assert conservative_charge_uc(ti) >= ti.burst_charge_uc
    g = gov(p)
    assert g.step(req(ti), 0.0).allowed and g.dose.charge_uc == pytest.approx(120_000.0)
    # A fresh heartbeat first: at t=100 without one the refusal would be the stale heartbeat's, not the carrier's.
    g.heartbeat_ok(100.0)
    d = g.step(req(ti.with_(carrier_hz=5.0)), 100.0)
    assert not d.allowed and d.events[0].data["rule"] == "invalid_request"
    assert "carrier_hz=5.0" in d.events[0].data["reason"]
    assert g.dose.charge_uc == pytest.approx(120_000.0)            # a refusal books nothing
    assert g.step(req(ti), 100.0).allowed                           # the same burst with a kHz carrier passes


def test_ti_carrier_must_be_khz_not_only_above_the_beat():
    """REFERENCE.md §7: TI's carriers are kHz, which neurons do not follow. A 500 Hz carrier is above a
    10 Hz beat, and it is plain low-frequency stimulation at the TI amplitude: refused."""
    p = SafetyProfile(**{**TES.model_dump(), "allowed_waveforms": (Waveform.DC, Waveform.SINE, Waveform.TI)})
    ti = StimParams(waveform=Waveform.TI, amplitude_ua=1000.0, frequency_hz=10.0, carrier_hz=500.0,
                    duration_s=60.0, ramp_s=10.0)
    d = gov(p).step(req(ti), 0.0)
    assert not d.allowed and d.events[0].data["rule"] == "invalid_request" and "1000" in d.events[0].data["reason"]
    assert any("carrier_hz" in v for v in check_params(p, CAPS, ti))
    assert gov(p).step(req(ti.with_(carrier_hz=1000.0)), 0.0).allowed
    assert check_params(p, CAPS, ti.with_(carrier_hz=1000.0)) == []


def test_numpy_scalars_are_accepted_and_normalised():
    p = RNS_BURST.with_(channel=np.int64(2), amplitude_ua=np.float32(1000.0), n_pulses=np.int64(10))
    d = gov().step(req(p), 0.0)
    assert d.allowed and type(d.params.channel) is int and type(d.params.amplitude_ua) is float
    json.loads(d.events[-1].to_json())


def test_garbage_request_is_refused_not_raised():
    g = gov()
    assert g.step("not a request", 0.0).events[0].data["rule"] == "invalid_request"
    assert g.step(StimRequest(0.0, "x", params={"amplitude_ua": 1}), 0.0).events[0].data["rule"] == "invalid_request"


def test_reused_params_object_gets_the_same_decision_and_equal_values_are_checked_anew():
    """The per-params check result is reused only for the very same object (policies resend theirs)."""
    g = gov()

    def step(params, t):
        g.heartbeat_ok(t)
        return g.step(req(params, t=t), t)

    big = RNS_BURST.with_(amplitude_ua=20_000.0)          # above MACRO's hard limit: refused
    first = step(RNS_BURST, 0.0)
    second = step(RNS_BURST, 10.0)
    assert first.allowed and second.allowed and second.params == first.params
    assert second.events[-1].data["params"] == first.events[-1].data["params"]
    # The event's params dict is a copy: editing one cannot change what the next decision reports.
    second.events[-1].data["params"]["amplitude_ua"] = -1.0
    assert step(RNS_BURST, 20.0).events[-1].data["params"]["amplitude_ua"] == 1500.0
    refused = step(big, 30.0)
    assert not refused.allowed and refused.events[-1].data["rule"] == "hard_max_amplitude"
    # An *equal* object with a bool where a number belongs (True == 1.0) is not the cached one: refused.
    one_ua = RNS_BURST.with_(amplitude_ua=1.0)
    assert step(one_ua, 40.0).allowed
    sneaky = RNS_BURST.with_(amplitude_ua=True)
    assert sneaky == one_ua and hash(sneaky) == hash(one_ua)
    d = step(sneaky, 50.0)
    assert not d.allowed and d.events[-1].data["rule"] == "invalid_request"


def test_subnormal_amplitudes_and_durations_are_refused_not_booked():
    """Found by the property test: a 2e-311 µA amplitude booked a charge a few ulps below its own."""
    g = gov()
    for params in (RNS_BURST.with_(amplitude_ua=2.225073858507e-311), RNS_BURST.with_(amplitude_ua=1e-7)):
        d = g.step(req(params), 0.0)
        assert not d.allowed and d.events[-1].data["rule"] == "invalid_request" and "amplitude_ua" in d.reason
    tes = gov(TES)
    sine = StimParams(channel=0, waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=1e-310)
    d = tes.step(req(sine), 0.0)
    assert not d.allowed and "duration_s" in d.reason
    assert g.dose.bursts == 0 and tes.dose.charge_uc == 0.0
    zero = g.step(req(RNS_BURST.with_(amplitude_ua=0.0), t=1.0), 1.0)   # no current stays allowed
    assert zero.allowed and g.dose.charge_uc == 0.0


TES_TI = SafetyProfile(**{**TES.model_dump(), "allowed_waveforms": (Waveform.DC, Waveform.SINE, Waveform.TI)})
CONTINUOUS = [
    StimParams(channel=0, waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=60.0, ramp_s=10.0),
    StimParams(channel=0, waveform=Waveform.DC, amplitude_ua=1000.0, duration_s=60.0, ramp_s=10.0),
    StimParams(channel=0, waveform=Waveform.TI, amplitude_ua=1000.0, frequency_hz=10.0, carrier_hz=2000.0,
               duration_s=60.0, ramp_s=10.0),
]


@pytest.mark.parametrize("params", CONTINUOUS, ids=lambda p: str(p.waveform))
@pytest.mark.parametrize("n_pulses", [-1, 0, None, True, 2.0, 10**5000],
                         ids=["-1", "0", "None", "True", "2.0", "10**5000"])
def test_continuous_waveforms_refuse_a_garbage_n_pulses(params, n_pulses):
    """n_pulses means nothing to sine/DC/TI, but it reached the devices unchecked: the serial encoder
    refused -1 as a fault (None: an unwrapped TypeError) while the simulated device took it, and a
    DECISION carrying 10**5000 could not be written as JSON. The pulsed rule, for every waveform."""
    g = gov(TES_TI)
    d = g.step(req(params.with_(n_pulses=n_pulses)), 0.0)
    assert not d.allowed and d.events[0].data["rule"] == "invalid_request"
    assert "n_pulses" in d.reason and "leave the default 1" in d.reason
    json.loads(d.events[0].to_json())
    assert g.dose.bursts == 0
    assert any("n_pulses" in v for v in check_params(TES_TI, CAPS, params.with_(n_pulses=n_pulses)))


@pytest.mark.parametrize("params", CONTINUOUS, ids=lambda p: str(p.waveform))
@pytest.mark.parametrize("n_pulses", [1, 100, 2**32, np.int64(7)])
def test_continuous_waveforms_send_every_device_n_pulses_1(params, n_pulses):
    """A valid but meaningless count (e.g. the config's pulse count carried into a sine) is normalised
    to 1, which every device encodes (PROTOCOL.md §5.2 is a uint32; 2**32 was a serial-only fault)."""
    from drivers import protocol as P
    from drivers.simulated import SimulatedStimulator

    d = gov(TES_TI).step(req(params.with_(n_pulses=n_pulses)), 0.0)
    assert d.allowed and type(d.params.n_pulses) is int and d.params.n_pulses == 1
    assert d.events[-1].data["params"]["n_pulses"] == 1 and EventKind.CLAMP not in kinds(d)   # no stimulus change
    assert P.decode_configure(P.encode_configure(d.params)) == d.params                       # serial device
    sim = SimulatedStimulator(lambda: 0.0)
    sim.open()
    assert sim.configure(d.params).ok                                                         # simulated device


def test_a_late_device_start_is_booked_and_the_next_request_is_judged_against_it():
    """An immediate burst starts when its TRIGGER reaches the device, which retries can delay by 50 ms or
    more. Judged against the decision time, a burst 0.12 s later on another channel passed min_interval
    (0.1 s) while the device's first burst, started at 0.05, still ran: two overlapping bursts."""
    g = gov()
    d = g.step(req(RNS_BURST), 0.0)                                 # 0.1 s, booked at 0.0
    before = g.dose
    assert g.confirm_start(d.events[-1].data["start_t"], 0.05, 0.06) == 0.05
    assert g.dose == before                                          # the same burst, booked once
    other = RNS_BURST.with_(channel=2)
    g.heartbeat_ok(0.12)
    r = g.step(req(other), 0.12)
    assert not r.allowed and r.events[0].data["rule"] == "min_interval" and "0.05" in r.reason
    g.heartbeat_ok(0.152)                                            # past min_interval, inside the device's burst
    r = g.step(req(other), 0.152)
    assert not r.allowed and r.events[0].data["rule"] == "device_busy" and "until 0.15" in r.reason
    g.heartbeat_ok(0.156)
    assert g.step(req(other), 0.156).allowed                         # the device's end + DEVICE_BUSY_GUARD_S


def test_confirm_start_only_ever_moves_the_start_later():
    g = gov()
    g.step(req(RNS_BURST), 1.0)
    assert g.confirm_start(1.0, 0.9, 1.01) == 1.0                    # earlier (a device clock behind): kept
    assert g.confirm_start(1.0, 5.0, 1.01) == 1.01                   # after the caller's now: at most now
    assert g.confirm_start(1.01, math.nan, 1.02) == 1.02             # unknown: as late as it can be, now
    assert g.confirm_start(1.02, None, math.nan) == 1.02             # nothing to go on: kept
    g.heartbeat_ok(1.11)
    assert g.step(req(RNS_BURST), 1.11).events[0].data["rule"] == "min_interval"   # from 1.02 (from 1.0: allowed)
    g.heartbeat_ok(2.0)
    s = g.step(req(RNS_BURST, at=2.5), 2.0)                          # a scheduled burst whose TRIGGER
    assert s.allowed and g.confirm_start(2.5, 2.0003, 2.001) == 2.5  # reached the device early: starts at `at`
    with pytest.raises(ValueError, match="no allowed burst starts at 7.0"):
        g.confirm_start(7.0, 7.1, 7.2)
    assert g.dose.bursts == 2


def test_a_moved_start_still_counts_once_in_the_rate_limit():
    p = MACRO_RNS.model_copy(update={"max_bursts_per_min": 2, "min_interval_s": 0.1})
    g = gov(p)
    for t in (0.0, 1.0):
        g.heartbeat_ok(t)
        g.step(req(RNS_BURST, t=t), t)
        g.confirm_start(t, t + 0.03, t + 0.04)
    g.heartbeat_ok(2.0)
    d = g.step(req(RNS_BURST, t=2.0), 2.0)
    assert not d.allowed and d.events[0].data["rule"] == "rate_limit" and "): 2 bursts within" in d.reason
