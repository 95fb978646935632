"""AdaptivePolicy (aDBS-like) and BandPowerBiomarker: thresholds, exact ramps, blanking, chunking."""
import math

import numpy as np
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.features import band_powers
from controller.policies.adaptive import (RCS_BLANKING_S, RCS_DECISION_PERIOD_S, RCS_RAMP_DOWN_UA_PER_S,
                                          RCS_RAMP_UP_UA_PER_S, AdaptivePolicy, BandPowerBiomarker)
from controller.policies.base import Policy
from controller.safety import MACRO_RNS, SafetyGovernor
from drivers.params import StimParams
from drivers.simulated import SimulatedStimulator

STIM = StimParams(amplitude_ua=0.0, pulse_width_us=60.0, frequency_hz=130.0, n_pulses=65)  # 0.5 s bursts
DT = 0.5  # biomarker every 500 ms (RC+S FFT cadence, REFERENCE.md §3)


def make(**kw):
    args = dict(thresholds=(1.0,), stim=STIM, min_amplitude_ua=500.0, max_amplitude_ua=2000.0, stim_period_s=1.0)
    args.update(kw)
    return AdaptivePolicy(**args)


def run(pol, values, t0=0.0, dt=DT):
    reqs, events = [], []
    for i, v in enumerate(values):
        r, e = pol.step(v, t0 + i * dt)
        reqs += r
        events += e
    return reqs, events


def states(events):
    return [(e.t, e.data["state"]) for e in events if e.data.get("what") == "adaptive_state"]


def test_defaults_are_the_rcs_example_and_policy_protocol():
    pol = make()
    assert isinstance(pol, Policy)
    assert (pol.decision_period_s, pol.blanking_s) == (RCS_DECISION_PERIOD_S, RCS_BLANKING_S) == (30.0, 15.0)
    assert (pol.ramp_up_ua_per_s, pol.ramp_down_ua_per_s) == (RCS_RAMP_UP_UA_PER_S, RCS_RAMP_DOWN_UA_PER_S) == (30.0, 120.0)


def test_single_threshold_up_then_down_with_exact_ramps():
    pol = make()
    t = np.arange(0, 200, DT)
    # high biomarker for the first 90 s, low after
    reqs, events = run(pol, np.where(t < 90, 3.0, 0.2).tolist())
    assert states(events) == [(30.0, "high"), (120.0, "low")]
    ev_high = [e for e in events if e.data.get("what") == "adaptive_state"][0]
    assert ev_high.kind is EventKind.DECISION and ev_high.data["biomarker"] == pytest.approx(3.0)
    assert ev_high.data["amplitude_ua"] == 500.0 and ev_high.data["target_ua"] == 2000.0

    def expected(tt):
        if tt <= 30:
            return 500.0
        up = min(2000.0, 500.0 + 30.0 * (tt - 30))        # 0.03 mA/s (REFERENCE.md §3)
        if tt <= 120:
            return up
        return max(500.0, up - 120.0 * (tt - 120))       # 0.12 mA/s, from the value at t=120

    # one request per second on the grid, amplitude = exact piecewise-linear ramp
    assert [r.t for r in reqs] == [float(k) for k in range(200)]
    amps = np.array([r.params.amplitude_ua for r in reqs])
    np.testing.assert_allclose(amps, [expected(r.t) for r in reqs], rtol=0, atol=1e-9)
    assert amps.max() == 2000.0 and amps[-1] == 500.0
    # slopes: +30 µA/s while ramping up, -120 µA/s while ramping down
    d = np.diff(amps)
    assert set(np.round(d[(d > 0)], 9)) == {30.0}
    down = d[d < 0]
    # 1500 µA at 120 µA/s = 12.5 s: twelve full seconds, then the last half second stops at the bound
    assert set(np.round(down[:-1], 9)) == {-120.0} and down[-1] == pytest.approx(-60.0)
    assert all(r.params.pulse_width_us == 60.0 and r.params.frequency_hz == 130.0 for r in reqs)


def test_amplitude_does_not_depend_on_step_cadence():
    a, b = make(), make()
    ta = np.arange(0, 100, 0.5)
    tb = np.arange(0, 100, 0.1)
    for tt in ta:
        a.step(3.0, float(tt))
    for tt in tb:
        b.step(3.0, float(tt))
    for q in (31.0, 45.3, 79.9, 99.0):
        assert a.amplitude_at(q) == pytest.approx(b.amplitude_at(q), abs=1e-9)
    assert a.amplitude_at(99.0) == 2000.0


def test_dual_threshold_low_hold_high():
    pol = make(mode="dual", thresholds=(1.0, 2.0), blanking_s=0.0)
    t = np.arange(0, 150.0 + DT, DT)
    # (0,30]: 3 → high; (30,60]: 1.5 → hold; (60,90]: 3 → high (from hold); (90,120]: 0.5 → low; then 1.5 → hold
    v = np.select([t <= 30, t <= 60, t <= 90, t <= 120], [3.0, 1.5, 3.0, 0.5], 1.5)
    reqs, events = run(pol, v.tolist())
    assert states(events) == [(30.0, "high"), (60.0, "hold"), (90.0, "high"), (120.0, "low"), (150.0, "hold")]
    # hold freezes the amplitude where the ramp was at t=60: 500 + 30*30 = 1400
    hold_ev = [e for e in events if e.data.get("what") == "adaptive_state" and e.t == 60.0][0]
    assert hold_ev.data["amplitude_ua"] == hold_ev.data["target_ua"] == 1400.0
    hold = [r.params.amplitude_ua for r in reqs if 60 <= r.t <= 90]
    assert set(hold) == {1400.0}
    assert [r.params.amplitude_ua for r in reqs if r.t == 100.0] == [min(2000.0, 1400.0 + 30.0 * 10)]
    # unchanged decisions are STATUS events, not state changes
    assert all(e.kind is EventKind.STATUS for e in events if e.data.get("what") == "adaptive_decision")


def test_single_mode_no_change_gives_status_only():
    pol = make()
    _, events = run(pol, [0.5] * 200)  # 100 s below threshold
    assert states(events) == []
    assert [e.t for e in events if e.data.get("what") == "adaptive_decision"] == [30.0, 60.0, 90.0]


def test_blanking_ignores_values_after_a_state_change():
    pol = make(blanking_s=15.0)
    t = np.arange(0, 61, DT)
    # huge values during the 15 s after the change at t=30 would keep the state high if they were used
    v = np.select([t <= 30, t < 45], [3.0, 1e6], 0.1)
    _, events = run(pol, v.tolist())
    assert states(events) == [(30.0, "high"), (60.0, "low")]
    low = [e for e in events if e.data.get("what") == "adaptive_state"][1]
    assert low.data["n_values"] == 31          # t in [45, 60]
    assert low.data["biomarker"] == pytest.approx(0.1)
    assert pol.n_blanked == 30                 # t in [30, 45)
    # without blanking the same trace stays high
    pol2 = make(blanking_s=0.0)
    _, events2 = run(pol2, v.tolist())
    assert states(events2) == [(30.0, "high")]


def test_blanking_longer_than_decision_period_keeps_state():
    pol = make(blanking_s=40.0)
    t = np.arange(0, 61, DT)
    _, events = run(pol, np.where(t <= 30, 3.0, 0.0).tolist())
    at60 = [e for e in events if e.t == 60.0]
    assert at60[0].data["reason"] == "no_valid_biomarker" and pol.state == "high"


def test_non_finite_biomarker_is_a_fault_event_and_ignored():
    pol = make()
    _, events = run(pol, [3.0] * 10 + [math.nan] + [3.0] * 60)
    faults = [e for e in events if e.kind is EventKind.FAULT]
    assert len(faults) == 1 and faults[0].data["what"] == "invalid_biomarker" and faults[0].t == 5.0
    assert states(events) == [(30.0, "high")]


def test_zero_amplitude_bursts_are_not_requested():
    pol = make(min_amplitude_ua=0.0)
    reqs, _ = run(pol, [0.0] * 100)
    assert reqs == [] and pol.n_zero == 50


def test_late_steps_catch_up_to_one_request():
    pol = make()
    pol.step(0.0, 0.0)
    reqs, _ = pol.step(0.0, 5.5)   # runner stalled: due times 1..5 passed
    assert len(reqs) == 1 and reqs[0].meta["due_t"] == 5.0 and reqs[0].meta["skipped"] == 4


@pytest.mark.parametrize("kw, needle", [
    (dict(mode="triple"), "mode='triple'"),
    (dict(mode="dual", thresholds=(1.0,)), "expected 2 value"),
    (dict(mode="dual", thresholds=(2.0, 1.0)), "threshold_low < threshold_high"),
    (dict(max_amplitude_ua=100.0), "max_amplitude_ua=100.0"),
    (dict(ramp_up_ua_per_s=0.0), "ramp_up_ua_per_s=0.0"),
    (dict(decision_period_s=-1.0), "decision_period_s=-1.0"),
    (dict(stim_period_s=0.1), "stim_period_s=0.1"),
    (dict(thresholds=(math.nan,)), "thresholds[0]=nan"),
])
def test_bad_parameters_are_named(kw, needle):
    with pytest.raises(ValueError, match=re_escape(needle)):
        make(**kw)


def re_escape(s):
    import re
    return re.escape(s)


def test_time_going_backwards_is_refused():
    pol = make()
    pol.step(1.0, 5.0)
    with pytest.raises(ValueError, match="t=4.0"):
        pol.step(1.0, 4.0)


# ---- BandPowerBiomarker ------------------------------------------------------------

def test_biomarker_matches_band_powers_and_is_chunking_invariant():
    fs = 250.0
    rng = np.random.default_rng(3)
    x = rng.normal(0, 10, (int(fs * 20), 2)).astype(np.float32)
    ts = np.arange(x.shape[0]) / fs
    one = BandPowerBiomarker(fs, window_s=1.0, hop_s=0.5, n_channels=2)
    t1, v1 = one.step(x, ts)
    # first window ends after 250 samples, then every 125
    assert t1[0] == ts[249] and np.allclose(np.diff(t1), 0.5)
    assert len(t1) == 1 + (x.shape[0] - 250) // 125
    # value = mean over channels of band_powers on the same window (features.py, not reimplemented)
    k = 7
    end = 250 + k * 125
    ref = band_powers(x[end - 250:end], fs, [(8.0, 30.0)])[0].mean()
    assert v1[k] == pytest.approx(ref, rel=1e-5)  # float64 buffer vs float32 input
    chunked = BandPowerBiomarker(fs, window_s=1.0, hop_s=0.5, n_channels=2)
    parts_t, parts_v = [], []
    edges = np.cumsum(rng.integers(1, 400, 200))
    edges = edges[edges < x.shape[0]]
    for a, b in zip(np.r_[0, edges], np.r_[edges, x.shape[0]]):
        tt, vv = chunked.step(x[a:b], ts[a:b])
        parts_t.append(tt)
        parts_v.append(vv)
    np.testing.assert_array_equal(np.concatenate(parts_t), t1)
    np.testing.assert_allclose(np.concatenate(parts_v), v1, rtol=1e-12)


def test_biomarker_rejects_bad_shapes_and_bands():
    with pytest.raises(ValueError, match="band="):
        BandPowerBiomarker(100.0, band=(8.0, 60.0))
    bm = BandPowerBiomarker(250.0, n_channels=2)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        bm.step(np.zeros((10, 3)), np.arange(10.0))


def test_beta_burst_drives_amplitude_up_through_governor_and_device():
    """Signal → biomarker → policy → actuator (MACRO_RNS governor) → simulated device."""
    fs = 250.0
    rng = np.random.default_rng(0)
    n = int(fs * 130)
    ts = np.arange(n) / fs
    x = rng.normal(0, 5, n)
    x[ts >= 20] += 20 * np.sin(2 * np.pi * 20.0 * ts[ts >= 20])   # beta from t=20 s
    x = x[:, None].astype(np.float32)
    bm = BandPowerBiomarker(fs)
    quiet = bm.step(x[:int(fs * 10)], ts[:int(fs * 10)])[1].mean()
    bm.reset()
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    # macro_rns allows 20 bursts/min and 0.1 s min interval: a burst every 5 s fits
    pol = AdaptivePolicy((10 * quiet,), STIM, 500.0, 2000.0, decision_period_s=10.0, blanking_s=5.0,
                         stim_period_s=5.0)
    refused = 0
    hop = int(fs * 0.1)
    for a in range(0, n, hop):
        tt, vv = bm.step(x[a:a + hop], ts[a:a + hop])
        for ti, vi in zip(tt.tolist(), vv.tolist()):
            clock.t = ti
            act.heartbeat()
            reqs, _ = pol.step(vi, ti)
            for r in reqs:
                refused += sum(e.kind is EventKind.REFUSAL for e in act.submit(r))
            act.poll()
    delivered = [(round(t, 6), p.amplitude_ua) for t, p in drv.delivered]
    assert refused == 0 and len(delivered) > 20
    assert all(a == 500.0 for t, a in delivered if t < 20)
    assert max(a for _, a in delivered) == 2000.0
    assert pol.state == "high"
