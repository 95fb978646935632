"""Open-loop controls: periodic grid, seeded Poisson rate, catch-up rule, matched total charge."""
import math

import numpy as np
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.policies.base import Policy
from controller.policies.open_loop import PeriodicPolicy, PoissonPolicy, matched_periodic
from controller.safety import MACRO_RNS, SafetyGovernor
from controller.safety.governor import conservative_charge_uc
from drivers.params import StimParams, Waveform
from drivers.simulated import SimulatedStimulator

STIM = StimParams(amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)  # 0.1 s


def drive(pol, times):
    reqs, events = [], []
    for t in times:
        r, e = pol.step(float(t))
        reqs += r
        events += e
    return reqs, events


def test_periodic_exact_grid_with_jittered_steps():
    pol = PeriodicPolicy(2.5, STIM, start_t=1.0)
    assert isinstance(pol, Policy)
    rng = np.random.default_rng(1)
    steps = np.sort(rng.uniform(0, 1000, 20_000))   # irregular runner cadence, ~0.05 s
    reqs, events = drive(pol, steps)
    due = [r.meta["due_t"] for r in reqs]
    # exact grid 1 + 2.5 k (computed from k, no accumulated float error), none twice, none skipped
    assert due == [1.0 + 2.5 * k for k in range(len(due))]
    assert len(due) == len(pol.due_times(steps[-1]))
    assert pol.n_skipped == 0
    # each request is made at the first step at or after its due time
    for r in reqs:
        i = np.searchsorted(steps, r.meta["due_t"])
        assert r.t == steps[i] and r.at is None
    assert [e.data["what"] for e in events] == ["stim_request"] * len(reqs)


def test_periodic_lookahead_schedules_at_the_due_time():
    pol = PeriodicPolicy(1.0, STIM, start_t=0.0, lookahead_s=0.3)
    reqs, _ = drive(pol, np.arange(0.05, 10, 0.25))
    # due 0 is late at the first step (now); later ones are scheduled ahead at exactly k
    assert reqs[0].at is None and reqs[0].meta["due_t"] == 0.0
    assert [r.at for r in reqs[1:]] == [float(k) for k in range(1, 11)]  # 10.0 from the step at 9.8
    assert all(r.t < r.at <= r.t + 0.3 for r in reqs[1:])


def test_catch_up_requests_only_the_latest_due_time():
    pol = PeriodicPolicy(1.0, STIM)
    r0, _ = pol.step(0.0)
    r1, _ = pol.step(4.5)     # due 1, 2, 3, 4 passed
    r2, _ = pol.step(4.6)
    assert [r.meta["due_t"] for r in r0 + r1] == [0.0, 4.0]
    assert r1[0].meta["skipped"] == 3 and pol.n_skipped == 3 and r2 == []


def test_periodic_stop_t_and_reset():
    pol = PeriodicPolicy(1.0, STIM, start_t=0.0, stop_t=3.0)
    reqs, _ = drive(pol, np.arange(0, 10, 0.5))
    assert [r.meta["due_t"] for r in reqs] == [0.0, 1.0, 2.0]
    pol.reset()
    assert len(drive(pol, np.arange(0, 10, 0.5))[0]) == 3


def test_poisson_rate_within_statistical_bounds_and_seeded():
    rate = 0.5
    pol = PoissonPolicy(rate, STIM, seed=42, dead_time_s=0.5)
    duration = 4000.0
    reqs, _ = drive(pol, np.arange(0, duration, 0.05))
    n = len(reqs)
    # Poisson count: mean rate*T = 2000, sd ~ sqrt(2000) ≈ 45 (a bit less with the dead time); 4 sd bounds
    assert abs(n - rate * duration) < 4 * math.sqrt(rate * duration)
    due = np.array([r.meta["due_t"] for r in reqs])
    isi = np.diff(due)
    assert isi.min() >= 0.5                                  # dead time honoured
    assert abs(isi.mean() - 1 / rate) < 4 * isi.std() / math.sqrt(len(isi))
    # coefficient of variation of (isi - dead) ≈ 1 for an exponential
    assert 0.9 < (isi - 0.5).std() / (isi - 0.5).mean() < 1.1
    # same seed → same due times, whatever the step cadence; other seed → different
    same, _ = drive(PoissonPolicy(rate, STIM, seed=42, dead_time_s=0.5), np.arange(0, duration, 0.013))
    np.testing.assert_array_equal([r.meta["due_t"] for r in same], due)
    other, _ = drive(PoissonPolicy(rate, STIM, seed=43, dead_time_s=0.5), np.arange(0, 100, 0.05))
    assert [r.meta["due_t"] for r in other] != list(due[:len(other)])


@pytest.mark.parametrize("ctor, needle", [
    (lambda: PeriodicPolicy(0.0, STIM), "period_s=0.0"),
    (lambda: PeriodicPolicy(0.05, STIM), "period_s=0.05"),
    # back to back: the device would still hold the previous burst (governor rule device_busy)
    (lambda: PeriodicPolicy(0.1, STIM), "period_s=0.1 invalid, expected >= 0.105 s"),
    (lambda: PeriodicPolicy(1.0, "stim"), "StimParams"),
    (lambda: PoissonPolicy(-1.0, STIM, seed=0), "rate_hz=-1.0"),
    (lambda: PoissonPolicy(20.0, STIM, seed=0), "rate_hz=20.0"),
    (lambda: PoissonPolicy(1.0, STIM, seed=1.5), "seed=1.5"),
    (lambda: PoissonPolicy(1.0, STIM, seed=0, dead_time_s=0.01), "dead_time_s=0.01"),
])
def test_bad_parameters_are_named(ctor, needle):
    with pytest.raises((ValueError, TypeError), match=needle.replace("(", r"\(").replace(".", r"\.")):
        ctor()


def test_matched_periodic_gives_the_reference_total_charge_through_the_governor():
    """A reference charge → period → periodic arm through governor + device: same charge (metrics' count)."""
    q = conservative_charge_uc(STIM)
    total = 37 * q
    period = matched_periodic(total, 600.0, STIM)
    assert period == pytest.approx(600.0 / 37)
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    pol = PeriodicPolicy(period, STIM, start_t=0.0, stop_t=600.0)
    for t in np.arange(0, 700, 0.25):
        clock.t = float(t)
        act.heartbeat()
        for r in pol.step(float(t))[0]:
            assert not any(e.kind is EventKind.REFUSAL for e in act.submit(r))
        act.poll()
    assert len(drv.delivered) == 37
    assert act.dose.charge_uc == pytest.approx(total, rel=1e-12)


def test_matched_periodic_rounds_to_whole_bursts_and_checks_inputs():
    q = conservative_charge_uc(STIM)
    assert matched_periodic(10.4 * q, 100.0, STIM) == pytest.approx(10.0)
    assert matched_periodic(10.6 * q, 110.0, STIM) == pytest.approx(10.0)
    sine = StimParams(waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=60.0, ramp_s=10.0)
    # continuous waveform: counted like the governor (peak × duration), 3 segments in 1 h
    assert matched_periodic(3 * 1000.0 * 60.0, 3600.0, sine) == pytest.approx(1200.0)
    with pytest.raises(ValueError, match="total_charge_uc"):
        matched_periodic(0.4 * q, 100.0, STIM)
    with pytest.raises(ValueError, match="burst duration"):
        matched_periodic(2000 * q, 100.0, STIM)
    with pytest.raises(ValueError, match="duration_s=-1"):
        matched_periodic(q, -1, STIM)


def test_a_late_burst_pushes_out_a_due_time_the_device_would_refuse():
    """A burst requested 10 ms late starts then, so the next grid point (period 0.11 s for a 0.1 s
    burst + 5 ms device-busy guard) would reach the device while it still holds it: that due time
    is skipped and counted, and every request passes the governor."""
    pol = PeriodicPolicy(0.11, STIM)
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    got = []
    for t in (0.0, 0.12, 0.22, 0.23, 0.33):
        clock.t = t
        act.heartbeat()
        for r in pol.step(t)[0]:
            ev = act.submit(r)
            assert ev[-1].kind is EventKind.COMMAND, ev
            got.append((r.meta["due_t"], t))
        act.poll()
    assert got == [(0.0, 0.0), (pytest.approx(0.11), 0.12), (pytest.approx(0.33), 0.33)]
    assert pol.n_skipped == 1 and len(drv.delivered) == 3


# -- anchored at the first step: a session clock that does not start at 0 (LSL local_clock) ------------------

@pytest.mark.parametrize("offset_s", [0.0, 3600.123, 86_400.0 * 30])
def test_periodic_and_poisson_count_from_their_first_step(offset_s):
    """The same policy stepped from t0 = 0, one hour or thirty days of uptime gives the same due times
    relative to t0: the first periodic burst start_delay_s after the first step, Poisson draws from the
    same seed, and no burst "skipped" for the time before the session."""
    steps = np.arange(0.0, 120.0, 1 / 64)
    per = PeriodicPolicy(10.0, STIM, start_delay_s=5.0)
    reqs, _ = drive(per, offset_s + steps)
    assert [round(r.meta["due_t"] - offset_s, 6) for r in reqs] == [5.0 + 10.0 * k for k in range(12)]
    assert per.anchor_t == offset_s + 5.0 and per.n_skipped == 0
    assert all(r.meta["skipped"] == 0 for r in reqs)
    poi = PoissonPolicy(0.2, STIM, seed=7, start_delay_s=5.0)
    reqs, _ = drive(poi, offset_s + steps)
    ref, _ = drive(PoissonPolicy(0.2, STIM, seed=7, start_t=5.0), steps)   # the sequence from a clock at 0
    np.testing.assert_allclose([r.meta["due_t"] - offset_s for r in reqs], [r.meta["due_t"] for r in ref],
                               atol=1e-6)
    assert len(reqs) > 5 and reqs[0].meta["due_t"] > offset_s + 5.0 and poi.n_skipped == 0


def test_a_session_drive_starts_open_loop_bursts_start_s_after_its_first_chunk():
    """build_drive (what a session runs) with policy.open_loop.start_s = 5: in real time the clock is
    LSL's local_clock, e.g. an hour after boot; the first burst must still come 5 s into the session,
    not on the first chunk with hundreds of phantom skips."""
    from controller.config import load_config
    from controller.policy_drive import build_drive

    for kind in ("periodic", "poisson"):
        cfg = load_config(None, {"policy": {"kind": kind, "open_loop": {"start_s": 5.0, "period_s": 10.0,
                                                                        "rate_hz": 0.1}}})
        got = {}
        for t0 in (0.0, 3600.123):
            d = build_drive(cfg, 512.0, 4, 0.82)
            out = []
            for k in range(1, 60 * 64):
                t = t0 + k / 64
                reqs, _ = d.on_chunk(np.zeros((8, 4), np.float32), np.array([t]))
                out += [(round(r.t - t0, 6), round(r.meta["due_t"] - t0, 6), r.meta["skipped"]) for r in reqs]
            got[t0] = out
            assert d.policy.n_skipped == 0
        assert got[0.0] == got[3600.123] and got[0.0], kind
        assert got[0.0][0][1] >= 5.0 + 1 / 64 and all(s == 0 for *_, s in got[0.0])


def test_due_times_before_the_first_step_say_when_the_grid_starts():
    pol = PeriodicPolicy(1.0, STIM)
    with pytest.raises(ValueError, match="first step"):
        pol.due_times(10.0)
    pol.step(100.0)
    assert list(pol.due_times(103.0)) == [100.0, 101.0, 102.0]
    pol.reset()                      # a new session anchors again
    assert pol.anchor_t is None and pol.step(7.0)[0][0].meta["due_t"] == 7.0
    with pytest.raises(ValueError, match="start_delay_s=-1"):
        PeriodicPolicy(1.0, STIM, start_delay_s=-1)
