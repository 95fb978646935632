"""ResponsivePolicy: hysteresis, minimum duration, up to two bursts, refractory, NaN handling."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.actuator import Actuator
from controller.events import EventKind
from controller.policies import Policy, ResponsivePolicy
from controller.safety import MACRO_RNS, SafetyGovernor
from drivers.params import StimParams
from drivers.simulated import SimulatedStimulator

STIM = StimParams(channel=0, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)  # 0.1 s


def policy(**kw):
    args = dict(threshold_on=0.8, threshold_off=0.5, min_duration_s=0.5, refractory_s=5.0, stim=STIM,
                bursts_per_detection=2, burst_interval_s=1.0)
    args.update(kw)
    return ResponsivePolicy(**args)


def run(pol, ps, dt=0.25):
    reqs, events = [], []
    for i, p in enumerate(ps):
        r, e = pol.step(p, i * dt)
        reqs += r
        events += e
    return reqs, events


def names(events):
    return [e.data.get("what") for e in events]


def test_is_a_policy():
    assert isinstance(policy(), Policy)


def test_detection_needs_min_duration_then_two_bursts():
    pol = policy()
    # above threshold for 0.25 s only: no detection
    reqs, ev = run(pol, [0.9, 0.1, 0.1])
    assert reqs == [] and ev == []
    pol = policy()
    ps = [0.1] * 4 + [0.9] * 16 + [0.1] * 4        # onset at t=1.0, detection at t=1.5
    reqs, ev = run(pol, ps)
    assert [r.t for r in reqs] == [1.5, 2.5]
    assert [r.meta["burst_index"] for r in reqs] == [1, 2] and reqs[0].meta["window_end_t"] == 1.5
    assert all(r.params == STIM and r.at is None for r in reqs)
    assert names(ev) == ["detection_start", "stim_request", "stim_request", "detection_end"]
    start = ev[0]
    assert start.kind is EventKind.DECISION and start.data["onset_t"] == 1.0


def test_hysteresis_keeps_detection_between_thresholds():
    pol = policy(bursts_per_detection=1)
    ps = [0.9, 0.9, 0.9, 0.6, 0.6, 0.6, 0.9, 0.4]
    _, ev = run(pol, ps)
    assert names(ev) == ["detection_start", "stim_request", "detection_end"]   # 0.6 does not end it
    assert ev[-1].t == 7 * 0.25


def test_second_burst_only_if_detection_persists():
    pol = policy()
    ps = [0.9] * 3 + [0.1] * 10
    reqs, _ = run(pol, ps)
    assert len(reqs) == 1


def test_refractory_delays_the_next_therapy():
    pol = policy(bursts_per_detection=1, refractory_s=5.0, min_duration_s=0.0)
    ps = [0.9, 0.1, 0.9, 0.9, 0.9] + [0.9] * 20 + [0.1]
    reqs, ev = run(pol, ps, dt=0.25)
    # first detection at 0 → burst; second detection starts at 0.5 inside refractory,
    # treated when the refractory period ends (t=5.0) as it is still present
    assert [r.t for r in reqs] == [0.0, 5.0]
    starts = [e for e in ev if e.data.get("what") == "detection_start"]
    assert starts[1].data["suppressed"] == "refractory"


def test_nan_never_stimulates_and_emits_fault_event():
    pol = policy(min_duration_s=0.5)
    ps = [0.9, 0.9, math.nan, 0.9, 0.9, np.float32(0.9)]
    reqs, ev = run(pol, ps)
    faults = [e for e in ev if e.kind is EventKind.FAULT]
    assert len(faults) == 1 and faults[0].data["what"] == "invalid_detector_output"
    faults[0].to_json()
    # the onset timer restarted after NaN: detection at t=1.25 (0.75 + 0.5), not at t=0.5
    assert [r.t for r in reqs] == [1.25]
    pol = policy()
    reqs, _ = run(pol, [math.nan] * 10 + [math.inf] * 10)
    assert reqs == []


def run_with_holes(pol, trace, dt=0.25):
    """``trace``: p per window, or None for a window the loop could not evaluate (``invalid``)."""
    reqs, events = [], []
    for i, p in enumerate(trace):
        r, e = pol.invalid(i * dt, "bad samples") if p is None else pol.step(p, i * dt)
        reqs += r
        events += e
    return reqs, events


def test_an_invalid_window_restarts_an_onset_not_yet_confirmed():
    """Above threshold at 0.0, a fault, above again from 1.0: the above-threshold time does not run across
    the fault, so the detection comes min_duration_s after 1.0 (1.5), not at the first valid window after it."""
    pol = policy(min_duration_s=0.5)
    reqs, ev = run_with_holes(pol, [0.9] + [None] * 3 + [0.9] * 4)
    assert [r.t for r in reqs] == [1.5]
    starts = [e for e in ev if e.data.get("what") == "detection_start"]
    assert starts[0].data["onset_t"] == 1.0
    # one event for the restart, none per invalid window, and no FAULT (blanking spans many windows)
    restarted = [e for e in ev if e.data.get("what") == "onset_restarted"]
    assert len(restarted) == 1 and restarted[0].t == 0.25 and restarted[0].data["onset_t"] == 0.0
    assert restarted[0].kind is EventKind.STATUS and not any(e.kind is EventKind.FAULT for e in ev)
    # nothing pending: invalid windows say nothing at all
    assert run_with_holes(policy(), [None] * 4 + [0.1, None]) == ([], [])


def test_invalid_windows_leave_an_ongoing_detection_and_its_burst_cadence_alone():
    """Our own burst blanks the windows after it: the detection goes on, and the second burst, due
    burst_interval_s after the first, comes at the first valid window from then on that still shows the
    detection (p >= threshold_off) — as if the blanked windows had been skipped."""
    holes = [0.9] * 3 + [None] * 6 + [0.6] * 4 + [0.1]   # detection at 0.5, blanked 0.75-2.0
    reqs, ev = run_with_holes(policy(min_duration_s=0.5), holes)
    assert [r.t for r in reqs] == [0.5, 2.25]
    assert [r.meta["detection_id"] for r in reqs] == [1, 1]
    assert names(ev) == ["detection_start", "stim_request", "stim_request", "detection_end"]
    # blanking shorter than the interval: same cadence as with no hole at all
    short = [0.9] * 3 + [None] * 2 + [0.9] * 6 + [0.1]
    full = [0.9] * 11 + [0.1]
    assert [r.t for r in run_with_holes(policy(), short)[0]] == [r.t for r in run(policy(), full)[0]] == [0.5, 1.5]
    # a therapy held back by the refractory period waits through invalid windows too
    pol = policy(bursts_per_detection=1, refractory_s=2.0, min_duration_s=0.0)
    reqs, _ = run_with_holes(pol, [0.9, 0.1, 0.9] + [None] * 4 + [0.9] * 4 + [0.1])
    assert [r.t for r in reqs] == [0.0, 2.0]


def test_invalid_time_must_not_go_backwards():
    pol = policy()
    pol.step(0.1, 1.0)
    with pytest.raises(ValueError, match="backwards"):
        pol.invalid(0.5, "bad samples")


@pytest.mark.parametrize("kw, word", [
    ({"threshold_off": 0.9}, "threshold_off"),
    ({"bursts_per_detection": 3}, "bursts_per_detection"),
    ({"min_duration_s": -1.0}, "min_duration_s"),
    ({"refractory_s": math.nan}, "refractory_s"),
    ({"burst_interval_s": 0.05}, "burst_interval_s"),
])
def test_bad_configuration_is_refused_with_name(kw, word):
    with pytest.raises(ValueError, match=word):
        policy(**kw)


def test_time_must_not_go_backwards():
    pol = policy()
    pol.step(0.1, 1.0)
    with pytest.raises(ValueError, match="backwards"):
        pol.step(0.1, 0.5)


@settings(max_examples=200, deadline=None)
@given(ps=st.lists(st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)), max_size=200),
       bursts=st.sampled_from([1, 2]), refractory_s=st.floats(0.0, 10.0), min_duration_s=st.floats(0.0, 2.0))
def test_properties_for_any_detector_trace(ps, bursts, refractory_s, min_duration_s):
    pol = policy(bursts_per_detection=bursts, refractory_s=refractory_s, min_duration_s=min_duration_s)
    reqs = []
    for i, p in enumerate(ps):
        t = i * 0.25
        r, _ = pol.step(p, t)
        assert not (r and not (isinstance(p, float) and math.isfinite(p) and p >= pol.threshold_off)), \
            "requests only on finite evidence of an ongoing detection"
        reqs += r
    by_det: dict[int, list] = {}
    for r in reqs:
        by_det.setdefault(r.meta["detection_id"], []).append(r.t)
    for ts in by_det.values():
        assert len(ts) <= bursts
        assert all(b - a >= pol.burst_interval_s for a, b in zip(ts, ts[1:]))
    firsts = sorted(ts[0] for ts in by_det.values())
    lasts = sorted(ts[-1] for ts in by_det.values())
    for prev_last, nxt_first in zip(lasts, firsts[1:]):
        assert nxt_first - prev_last >= refractory_s


@settings(max_examples=200, deadline=None)
@given(trace=st.lists(st.one_of(st.none(), st.floats(0, 1)), max_size=200), bursts=st.sampled_from([1, 2]),
       min_duration_s=st.floats(0.0, 2.0))
def test_no_onset_is_confirmed_across_an_invalid_window(trace, bursts, min_duration_s):
    pol = policy(bursts_per_detection=bursts, min_duration_s=min_duration_s)
    holes = []
    for i, p in enumerate(trace):
        t = i * 0.25
        if p is None:
            holes.append(t)
            r, e = pol.invalid(t, "stimulation (blanking)")
            assert r == [] and not any(x.kind is EventKind.FAULT for x in e)
            continue
        r, e = pol.step(p, t)
        for x in e:
            if x.data.get("what") == "detection_start":
                # the whole above-threshold stretch that confirmed it was seen, without a hole
                assert not any(x.data["onset_t"] <= h <= t for h in holes)
                assert t - x.data["onset_t"] >= min_duration_s


def test_closed_loop_policy_governor_simulated_device():
    """Detector trace → policy → actuator → simulated device: bursts delivered, all governed."""
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    pol = policy(stim=STIM.with_(amplitude_ua=20_000.0))   # above the hard max: every request is refused
    t = np.arange(0, 20, 0.25)
    p = ((t >= 2) & (t < 8)) | ((t >= 14) & (t < 18))
    kinds = []
    for ti, pi in zip(t, p.astype(float)):
        clock.t = float(ti)
        act.heartbeat()
        reqs, ev = pol.step(float(pi), float(ti))
        for r in reqs:
            ev += act.submit(r)
        kinds += [e.kind for e in ev]
    assert drv.delivered == [] and kinds.count(EventKind.REFUSAL) == 4
    pol = policy()
    for ti, pi in zip(t + 20, p.astype(float)):
        clock.t = float(ti)
        act.heartbeat()
        for r in pol.step(float(pi), float(ti))[0]:
            act.submit(r)
        act.poll()
    assert [d[0] for d in drv.delivered] == [22.5, 23.5, 34.5, 35.5]
    assert act.dose.bursts == 4
