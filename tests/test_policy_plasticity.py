"""PlasticityAwarePolicy: best predicted Δw among allowed values (vs brute force), schedule, triggers, errors."""
import itertools
import shutil

import numpy as np
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.policies.base import Policy
from controller.policies.plasticity_aware import PlasticityAwarePolicy
from controller.safety import MACRO_RNS, SafetyGovernor
from drivers.params import StimParams, Waveform
from drivers.simulated import SimulatedStimulator
from models.plasticity.surrogate import DEFAULT_MODEL_PATH, PlasticityPredictor

STIM = StimParams(amplitude_ua=1000.0, pulse_width_us=200.0, frequency_hz=50.0, n_pulses=60)
FREQS = [1.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0]
PWS = [60.0, 100.0, 200.0, 400.0]


@pytest.fixture(scope="module")
def predictor():
    return PlasticityPredictor()


def brute_force(pred, freqs, pws, stim, timing_ms, baseline_w=0.5, reward=0.0, reward_delay_s=0.0):
    """Δw of every (f, pw) with predict_many on raw rows (columns in input_names order)."""
    combos = list(itertools.product(freqs, pws))
    rows = np.array([[f, 0.0, pw, timing_ms, stim.n_pulses, baseline_w, reward, reward_delay_s, stim.amplitude_ua]
                     for f, pw in combos])
    assert pred.input_names == ("frequency_hz", "waveform", "pulse_width_us", "timing_ms", "n_pulses",
                                "baseline_w", "reward_um", "reward_delay_s", "amplitude_ua")
    return combos, pred.predict_many(rows)


@pytest.mark.parametrize("target, timing_ms", [("potentiate", 10.0), ("depress", -10.0), ("potentiate", -10.0),
                                               ("depress", 10.0)])
def test_choice_is_the_brute_force_best_among_allowed(predictor, target, timing_ms):
    pol = PlasticityAwarePolicy(FREQS, PWS, STIM, target=target, protocol={"timing_ms": timing_ms},
                                predictor=predictor)
    combos, dw = brute_force(predictor, FREQS, PWS, STIM, timing_ms)
    i = int(np.argmax(dw) if target == "potentiate" else np.argmin(dw))
    assert (pol.choice["frequency_hz"], pol.choice["pulse_width_us"]) == combos[i]
    assert pol.choice["delta_w"] == pytest.approx(dw[i], abs=1e-6)
    assert pol.params.frequency_hz in FREQS and pol.params.pulse_width_us in PWS
    # the delivered burst is the predicted protocol
    assert (pol.params.amplitude_ua, pol.params.n_pulses) == (STIM.amplitude_ua, STIM.n_pulses)


def test_allowed_values_are_respected_when_the_global_best_is_excluded(predictor):
    combos, dw = brute_force(predictor, FREQS, PWS, STIM, 10.0)
    f_best, pw_best = combos[int(np.argmax(dw))]
    freqs = [f for f in FREQS if f != f_best]
    pol = PlasticityAwarePolicy(freqs, PWS, STIM, protocol={"timing_ms": 10.0}, predictor=predictor)
    assert pol.choice["frequency_hz"] != f_best and pol.choice["frequency_hz"] in freqs
    sub_combos, sub_dw = brute_force(predictor, freqs, PWS, STIM, 10.0)
    assert pol.choice["delta_w"] == pytest.approx(sub_dw.max(), abs=1e-6)


def test_reward_and_baseline_enter_the_prediction_and_rechoose_records_it(predictor):
    prot = {"timing_ms": 10.0, "reward": 0.5, "reward_delay_s": 1.0, "baseline_w": 0.3}
    pol = PlasticityAwarePolicy(FREQS, PWS, STIM, protocol=prot, predictor=predictor)
    _, dw = brute_force(predictor, FREQS, PWS, STIM, 10.0, baseline_w=0.3, reward=0.5, reward_delay_s=1.0)
    assert pol.choice["delta_w"] == pytest.approx(dw.max(), abs=1e-6)
    events = pol.rechoose(12.0, baseline_w=0.9)
    _, dw9 = brute_force(predictor, FREQS, PWS, STIM, 10.0, baseline_w=0.9, reward=0.5, reward_delay_s=1.0)
    assert events[0].t == 12.0 and events[0].data["predicted_delta_w"] == pytest.approx(dw9.max(), abs=1e-6)
    assert events[0].data["protocol"]["baseline_w"] == 0.9


def test_periodic_schedule_and_choice_event(predictor):
    pol = PlasticityAwarePolicy(FREQS, PWS, STIM, protocol={"timing_ms": 10.0}, period_s=10.0, predictor=predictor)
    assert isinstance(pol, Policy)
    reqs, events = [], []
    for t in np.arange(5.0, 60.0, 0.5):
        r, e = pol.step(float(t))
        reqs += r
        events += e
    choice = [e for e in events if e.data["what"] == "plasticity_choice"]
    assert len(choice) == 1 and choice[0].t == 5.0 and choice[0].kind is EventKind.DECISION
    assert choice[0].data["n_candidates"] == len(FREQS) * len(PWS)
    assert choice[0].data["predicted_delta_w"] == pol.choice["delta_w"]
    assert [r.meta["due_t"] for r in reqs] == [5.0, 15.0, 25.0, 35.0, 45.0, 55.0]
    assert all(r.params == pol.params and r.meta["predicted_delta_w"] == pol.choice["delta_w"] for r in reqs)


def test_trigger_mode_one_burst_per_trigger_not_while_busy(predictor):
    pol = PlasticityAwarePolicy([50.0], [200.0], STIM, protocol={"timing_ms": 10.0}, predictor=predictor)
    # 60 pulses at 50 Hz: 1.2 s burst
    out = [pol.step(t, trigger=trig)[0] for t, trig in [(0.0, False), (1.0, True), (1.5, True), (2.3, True),
                                                         (3.0, False)]]
    assert [len(r) for r in out] == [0, 1, 0, 1, 0] and pol.n_ignored == 1


def test_max_burst_duration_excludes_candidates_the_governor_would_shorten(predictor):
    # 60 pulses at 1-10 Hz last 6-60 s; macro_rns allows 5 s bursts
    pol = PlasticityAwarePolicy(FREQS, PWS, STIM, target="depress", protocol={"timing_ms": -10.0},
                                predictor=predictor, max_burst_duration_s=MACRO_RNS.max_burst_duration_s)
    assert pol.choice["frequency_hz"] >= 60 / 5.0
    assert pol.params.burst_duration_s <= 5.0
    with pytest.raises(ValueError, match="max_burst_duration_s=5.0"):
        PlasticityAwarePolicy([1.0, 3.0], PWS, STIM, predictor=predictor, max_burst_duration_s=5.0)


def test_chosen_protocol_passes_the_governor_unchanged(predictor):
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    pol = PlasticityAwarePolicy(FREQS, [60.0, 100.0, 200.0], STIM.with_(amplitude_ua=500.0),
                                protocol={"timing_ms": 10.0}, period_s=10.0, predictor=predictor,
                                max_burst_duration_s=MACRO_RNS.max_burst_duration_s)
    kinds = []
    for t in np.arange(0.0, 35.0, 0.25):
        clock.t = float(t)
        act.heartbeat()
        for r in pol.step(float(t))[0]:
            kinds += [e.kind for e in act.submit(r)]
        act.poll()
    assert EventKind.REFUSAL not in kinds and EventKind.CLAMP not in kinds
    assert [p for _, p in drv.delivered] == [pol.params] * 4


def test_sine_candidates_count_peaks_over_the_duration(predictor):
    sine = StimParams(waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=2.0, ramp_s=0.5)
    pol = PlasticityAwarePolicy([5.0, 10.0, 40.0], [200.0], sine, protocol={"timing_ms": 10.0}, predictor=predictor)
    assert {c["frequency_hz"]: c["n_pulses"] for c in pol.candidates()} == {5.0: 10, 10.0: 20, 40.0: 80}
    assert all(c["waveform"] == "sine" for c in pol.candidates())


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "plasticity_v1.onnx"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        PlasticityAwarePolicy(FREQS, PWS, STIM, model_path=missing)
    # a real copy of the shipped file at another path works (no hidden dependency on the default path)
    shutil.copy(DEFAULT_MODEL_PATH, missing)
    assert PlasticityAwarePolicy([10.0], [200.0], STIM, model_path=missing).choice["frequency_hz"] == 10.0


@pytest.mark.parametrize("kw, needle", [
    (dict(allowed_frequencies_hz=[]), "allowed_frequencies_hz"),
    (dict(allowed_frequencies_hz=[500.0]), r"allowed_frequencies_hz\[0\]=500\.0"),
    (dict(allowed_pulse_widths_us=[10.0]), r"allowed_pulse_widths_us\[0\]=10\.0"),
    (dict(target="both"), "target='both'"),
    (dict(protocol={"n_pulses": 5}), "n_pulses"),
    (dict(stim=STIM.with_(amplitude_ua=50.0)), r"stim\.amplitude_ua=50\.0"),
    (dict(stim=STIM.with_(waveform=Waveform.DC, duration_s=1.0)), "waveform=dc"),
])
def test_bad_parameters_are_named(predictor, kw, needle):
    args = dict(allowed_frequencies_hz=FREQS, allowed_pulse_widths_us=PWS, stim=STIM, predictor=predictor)
    args.update(kw)
    with pytest.raises(ValueError, match=needle):
        PlasticityAwarePolicy(**args)


def _governed_run(pol, t_stop, rechoose_at, baseline_w, dt=0.25):
    """Step ``pol`` through a MACRO_RNS governor; rechoose once. Returns (rechoose events, requests, refusal rules)."""
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    ev, reqs, refused = [], [], []
    for t in np.arange(0.0, t_stop, dt):
        clock.t = float(t)
        act.heartbeat()
        if t == rechoose_at:
            ev = pol.rechoose(float(t), baseline_w=baseline_w)
        for r in pol.step(float(t))[0]:
            reqs.append(r)
            refused += [e.data.get("rule") for e in act.submit(r) if e.kind is EventKind.REFUSAL]
        act.poll()
    return ev, reqs, refused


def test_rechoose_keeps_the_old_choice_when_the_new_burst_does_not_fit_the_period(predictor):
    """At baseline_w 0.9 the best of {15, 50} Hz is 15 Hz: 60 pulses last 4 s, longer than the 3.5 s
    period. Taking it made the governor refuse 7 of 18 bursts (device_busy); it is refused instead."""
    pol = PlasticityAwarePolicy([15.0, 50.0], [200.0], STIM, protocol={"timing_ms": 10.0, "baseline_w": 0.5},
                                period_s=3.5, predictor=predictor,
                                max_burst_duration_s=MACRO_RNS.max_burst_duration_s)
    assert pol.choice["frequency_hz"] == 50.0
    before = (dict(pol.protocol), dict(pol.choice), pol.params)
    ev, reqs, refused = _governed_run(pol, 60.0, 10.0, 0.9)
    (e,) = ev
    assert e.kind is EventKind.DECISION and e.data["what"] == "plasticity_choice_kept"
    assert "period_s=3.5" in e.data["reason"] and e.data["rejected"]["frequency_hz"] == 15.0
    assert e.data["frequency_hz"] == 50.0 and e.data["rejected_protocol_updates"] == {"baseline_w": 0.9}
    assert (pol.protocol, pol.choice, pol.params) == before        # choice and its protocol kept together
    assert refused == [] and {r.params.frequency_hz for r in reqs} == {50.0} and len(reqs) == 18


def test_rechoose_to_a_longer_burst_that_fits_updates_the_schedule_spacing(predictor):
    """50 → 15 Hz under a 4.5 s period: the 4 s burst fits. A burst requested late (step at 7 s for the
    4.5 s due time) must push the next one past its end; with the 50 Hz burst's 1.2 s spacing the
    schedule requested it at 9 s, into the running burst (device_busy)."""
    pol = PlasticityAwarePolicy([15.0, 50.0], [200.0], STIM, protocol={"timing_ms": 10.0, "baseline_w": 0.5},
                                period_s=4.5, predictor=predictor,
                                max_burst_duration_s=MACRO_RNS.max_burst_duration_s)
    assert pol.choice["frequency_hz"] == 50.0
    reqs = pol.step(0.0)[0]
    (e,) = pol.rechoose(1.0, baseline_w=0.9)
    assert e.data["what"] == "plasticity_choice" and pol.params.frequency_hz == 15.0
    for t in (7.0, 9.0, 10.0, 12.0, 13.5):
        reqs += pol.step(t)[0]
    assert [r.t for r in reqs] == [0.0, 7.0, 13.5]
    assert [r.params.frequency_hz for r in reqs] == [50.0, 15.0, 15.0]
    _, _, refused = _governed_run(
        PlasticityAwarePolicy([15.0, 50.0], [200.0], STIM, protocol={"timing_ms": 10.0, "baseline_w": 0.5},
                              period_s=4.5, predictor=predictor), 40.0, 10.0, 0.9, dt=1.0)
    assert refused == []
