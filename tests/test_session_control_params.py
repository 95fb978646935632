"""``set_param`` on a running loop: the policy's own checks run again (a value its constructor refuses is
refused, nothing changes), and the threshold the session reports is the one the policy acts on."""
import json
import math
import time

import numpy as np
import pytest
import zmq

from controller.events import EventKind
from controller.policies import AdaptivePolicy, PeriodicPolicy, PoissonPolicy, ResponsivePolicy
from drivers.params import StimParams

FS, N_CH = 256.0, 2
STIM = StimParams(amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)  # 0.1 s


def _control(**policy):
    """SessionControl over the session's chunk path (simulated time) built from ``[policy]`` overrides."""
    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.config import load_config
    from controller.loop import make_actuator
    from controller.runners.simulated import VirtualClock
    from controller.session_control import SessionControl
    from drivers.simulated import SimulatedStimulator

    cfg = load_config(None, {"policy": policy} if policy else None)
    clock = VirtualClock()
    act = make_actuator(cfg, SimulatedStimulator(clock=clock), clock)
    step = ChunkStep(SeizureLoop.from_config(cfg, FS, N_CH), act, clock, modeled_latency_s=0.002)
    return SessionControl(step, act, clock), step


def test_the_reported_threshold_is_the_one_the_policy_acts_on():
    ctl, step = _control()
    assert step.loop.threshold == step.loop.policy.threshold_on == step.loop.start_threshold
    assert ctl.handle({"cmd": "set_param", "name": "threshold_off", "value": 0.4})["ok"]
    assert ctl.handle({"cmd": "set_param", "name": "threshold_on", "value": 0.5}) == {"ok": True, "threshold_on": 0.5}
    assert step.loop.policy.threshold_on == 0.5
    assert ctl.handle({"cmd": "status"})["threshold"] == 0.5
    n = int(FS * 12)
    x = (np.random.default_rng(0).normal(size=(n, N_CH)) * 20).astype(np.float32)
    preds = [e for e in step.step(x, np.arange(n) / FS) if e.kind is EventKind.PREDICTION]
    assert preds and {e.data["threshold"] for e in preds} == {0.5}


@pytest.mark.parametrize("name, value, needle", [
    # two bursts per detection: the second must leave the device free (burst 0.5 s + 5 ms)
    ("burst_interval_s", 0.0, "burst_interval_s=0.0 invalid, expected >= 0.505 s"),
    ("burst_interval_s", 0.3, "burst_interval_s=0.3 invalid"),
    # a longer burst than burst_interval_s leaves room for: the governor's profile allows it, the policy not
    ("n_pulses", 400, "burst_interval_s=1.0 invalid, expected >= 2.005 s"),
])
def test_a_value_the_policy_refuses_is_refused_and_nothing_changes(name, value, needle):
    ctl, step = _control(bursts_per_detection=2)
    pol = step.loop.policy
    before = pol.params()
    r = ctl.handle({"cmd": "set_param", "name": name, "value": value})
    assert r["ok"] is False and "refused by the ResponsivePolicy" in r["error"] and needle in r["error"], r
    assert pol.params() == before


@pytest.mark.parametrize("name, value, needle", [
    ("n_pulses", 2.7, "n_pulses=2.7 invalid, expected a whole number"),          # int() would run 2
    ("n_pulses", math.inf, "n_pulses=inf invalid, expected a finite number"),    # int(inf): OverflowError
    ("n_pulses", 10 ** 400, "invalid, expected a finite number"),
    ("amplitude_ua", -math.inf, "amplitude_ua=-inf invalid, expected a finite number"),
    ("amplitude_ua", 10 ** 400, "invalid, expected a finite number"),            # float(): OverflowError
    ("min_duration_s", math.inf, "min_duration_s=inf invalid, expected a finite number"),
    ("refractory_s", 10 ** 400, "invalid, expected a finite number >= 0"),
    ("threshold_on", math.nan, "NaN is invalid"),                               # refused by the server itself
])
def test_non_integral_and_non_finite_values_are_refused_over_the_control_socket(name, value, needle):
    """Through the real server: a refusal (a not-ok MARK), not a handler crash recorded as a FAULT."""
    from controller.control import ControlServer

    ctl, step = _control(bursts_per_detection=2)
    pol = step.loop.policy
    before = pol.params()
    server = ControlServer("tcp://127.0.0.1:*", ctl.handle)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 3000)
    req.connect(server.endpoint)
    try:
        # Python's json writes inf/NaN as Infinity/NaN and reads them back: a client can send them.
        req.send(json.dumps({"cmd": "set_param", "name": name, "value": value}).encode())
        events: list = []
        t_end = time.monotonic() + 3
        while not events and time.monotonic() < t_end:
            server.poll_once(0.0, events)
            time.sleep(0.002)
        r = json.loads(req.recv())
    finally:
        req.close(0)
        ctx.term()
        server.close()
    assert r["ok"] is False and needle in r["error"], r
    assert [e.kind for e in events] == [EventKind.MARK] and events[0].data["ok"] is False
    assert pol.params() == before


def test_a_whole_float_is_taken_for_an_integer_field():
    ctl, step = _control()
    assert ctl.handle({"cmd": "set_param", "name": "n_pulses", "value": 30.0}) == {"ok": True, "n_pulses": 30}
    assert step.loop.policy.stim.n_pulses == 30


def test_accepted_changes_keep_the_running_state():
    """A change mid-detection neither ends the detection nor restarts its timers."""
    ctl, step = _control(bursts_per_detection=2)
    pol = step.loop.policy
    for i in range(12):                               # 0.25 s windows: a detection at 1.5 s
        pol.step(0.95, i * 0.25)
    assert pol.detecting
    assert ctl.handle({"cmd": "set_param", "name": "burst_interval_s", "value": 2.0})["ok"]
    assert ctl.handle({"cmd": "set_param", "name": "amplitude_ua", "value": 1000})["ok"]
    assert pol.detecting and pol.burst_interval_s == 2.0 and pol.stim.amplitude_ua == 1000.0


def test_a_stim_change_passes_the_open_loop_policys_spacing_check():
    ctl, step = _control(kind="periodic", open_loop={"period_s": 1.0})
    pol = step.loop.policy
    r = ctl.handle({"cmd": "set_param", "name": "n_pulses", "value": 300})    # 1.5 s burst, period 1 s
    assert r["ok"] is False and "refused by the PeriodicPolicy: PeriodicPolicy period_s=1.0 invalid" in r["error"]
    assert pol.stim.n_pulses == 100
    assert ctl.handle({"cmd": "set_param", "name": "n_pulses", "value": 150}) == {"ok": True, "n_pulses": 150}
    assert pol.stim.n_pulses == 150


def test_a_stim_field_the_policy_sets_itself_is_refused_as_doing_nothing():
    ctl, step = _control(kind="adaptive", adaptive={"biomarker": "band_power", "thresholds": [10.0]})
    before = step.loop.policy.stim
    r = ctl.handle({"cmd": "set_param", "name": "amplitude_ua", "value": 100})
    assert r["ok"] is False and "sets amplitude_ua itself" in r["error"] and step.loop.policy.stim == before


@pytest.mark.parametrize("make", [
    lambda: PeriodicPolicy(0.5, STIM),
    lambda: PoissonPolicy(0.5, STIM, seed=3, dead_time_s=0.5),   # a default dead time stays the first stim's
    lambda: AdaptivePolicy((1.0,), STIM, 0.0, 2000.0, stim_period_s=0.5),
    lambda: ResponsivePolicy(0.8, 0.5, 0.5, 5.0, STIM, bursts_per_detection=2, burst_interval_s=0.5),
])
def test_update_runs_the_constructors_checks_and_refreshes_the_schedule(make):
    pol = make()
    args = (0.1, 0.0) if isinstance(pol, (AdaptivePolicy, ResponsivePolicy)) else (0.0,)
    pol.step(*args)
    long = STIM.with_(n_pulses=200)                   # 1 s: longer than every spacing above
    with pytest.raises(ValueError, match="invalid, expected >= 1.005 s"):
        pol.update(stim=long)
    assert pol.stim == STIM
    longer = STIM.with_(n_pulses=80)                  # 0.4 s: fits, the skip rule must know it
    assert pol.update(stim=longer) == {"stim": longer} and pol.stim == longer
    sched = getattr(pol, "_sched", None)
    if sched is not None:
        assert sched.min_spacing_s == pytest.approx(0.405)
    with pytest.raises(ValueError, match="has no parameter nope"):
        pol.update(nope=1)


def test_a_policy_without_update_takes_no_changes():
    """Plasticity-aware: its protocol is chosen from stim at the start; a new stim behind its back would
    not be the protocol it predicted (and was never sent: it sends its chosen params)."""
    ctl, step = _control(kind="plasticity", stim={"amplitude_ua": 1000.0, "n_pulses": 20})
    r = ctl.handle({"cmd": "set_param", "name": "amplitude_ua", "value": 900})
    assert r["ok"] is False and "takes no parameter changes while it runs" in r["error"]


def test_the_cli_sends_a_negative_value_to_the_governor_and_refuses_a_misspelt_option():
    """`stimloop ctl set_param amplitude_ua -5` was refused by the command line as "No such option: -5"."""
    import threading

    from typer.testing import CliRunner

    from controller.cli import app
    from controller.control import ControlServer

    ctl, step = _control()
    before = step.loop.policy.params()
    server = ControlServer("tcp://127.0.0.1:*", ctl.handle)
    done = threading.Event()

    def serve():
        events: list = []
        while not done.is_set():
            server.poll_once(0.0, events)
            time.sleep(0.002)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = CliRunner().invoke(app, ["ctl", "--address", server.endpoint, "set_param", "amplitude_ua", "-5"])
        typo = CliRunner().invoke(app, ["ctl", "status", "--adress", server.endpoint])
    finally:
        done.set()
        t.join(5)
        server.close()
    assert res.exit_code == 2 and "refused" in res.output and "amplitude_ua=-5" in res.output, res.output
    assert step.loop.policy.params() == before
    assert typo.exit_code == 2 and "no such option: --adress" in typo.output, typo.output
