"""Pause and emergency stop report what the device confirmed: a stop the device did not acknowledge is
never answered "stimulation off", over the socket or by `stimloop stop` (real sockets, real CLI)."""
import subprocess
import sys
import threading
import time
import types
from contextlib import contextmanager

import pytest

from controller.actuator import Actuator
from controller.control import ControlClient, ControlServer
from controller.events import EventKind
from controller.safety import SafetyGovernor, build_profile
from controller.session_control import SessionControl
from drivers.simulated import SimulatedStimulator

pytestmark = pytest.mark.timeout(60)


def _control(mute: bool):
    clock = time.monotonic
    drv = SimulatedStimulator(clock)
    drv.open()
    act = Actuator(SafetyGovernor(build_profile("macro", {}), drv.capabilities), drv, clock)
    act.open()
    act.heartbeat()
    drv.set_mute(mute)   # a device that no longer answers: STOP is not acknowledged (serial: DeviceTimeout)
    return SessionControl(types.SimpleNamespace(paused=False), act, clock), act


@pytest.mark.parametrize("cmd", ["emergency_stop", "pause"])
def test_an_unconfirmed_stop_is_reported_as_not_done(cmd):
    ctl, act = _control(mute=True)
    r = ctl.handle({"cmd": cmd, "who": "local"})
    assert r["ok"] is False and r["stimulation"] == "unknown" and r["latched"] is True
    assert r["stop_errors"] and all("no reply" in e for e in r["stop_errors"])
    assert "NOT confirmed by the device" in r["error"] and "cut the stimulator's output or power now" in r["error"]
    # The governor is latched all the same (nothing new is sent), and the event says the stop failed.
    assert act.governor.latched and ctl.step.paused
    stop = [e for e in ctl.drain() if e.kind is EventKind.SAFE_STATE]
    assert stop and stop[0].data["stop_ok"] is False


def test_a_confirmed_stop_is_reported_as_off():
    ctl, act = _control(mute=False)
    assert ctl.handle({"cmd": "emergency_stop", "who": "local"}) == {"ok": True, "stimulation": "off"}
    assert ctl.handle({"cmd": "pause", "who": "local"}) == {"ok": True, "paused": True}
    assert all(e.data["stop_ok"] for e in ctl.drain() if e.kind is EventKind.SAFE_STATE)


@contextmanager
def _serving(ctl):
    server = ControlServer("tcp://127.0.0.1:*", ctl.handle, session_id="test-session")
    events: list = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            server.poll_once(time.monotonic(), events)
            events.extend(ctl.drain())
            time.sleep(0.002)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield server, events
    finally:
        stop.set()
        th.join(5)
        server.close()


def _stimloop(*args):
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=60)


def test_stop_over_the_socket_and_the_cli_says_when_the_device_did_not_confirm():
    ctl, _ = _control(mute=True)
    with _serving(ctl) as (server, events):
        with ControlClient(server.endpoint, timeout_ms=3000) as client:
            r = client.emergency_stop()
        assert r["ok"] is False and r["stimulation"] == "unknown" and r["session"] == "test-session"
        cli = _stimloop("stop", "--address", server.endpoint)
        time.sleep(0.05)
        marks = [e for e in events if e.kind is EventKind.MARK]
    assert cli.returncode == 3, (cli.stdout, cli.stderr)
    assert "stimulation off" not in cli.stdout
    err = " ".join(cli.stderr.split())
    assert "emergency stop NOT confirmed by the device" in err and "cut the stimulator's output or power now" in err
    assert [m.data["ok"] for m in marks] == [False, False] and "NOT confirmed" in marks[0].data["error"]


def test_stop_cli_exits_zero_when_the_device_confirmed():
    ctl, _ = _control(mute=False)
    with _serving(ctl) as (server, _):
        cli = _stimloop("stop", "--address", server.endpoint)
    assert cli.returncode == 0, cli.stderr
    assert "stimulation off" in cli.stdout and "test-session" in cli.stdout


def test_stop_cli_without_an_answer_says_the_state_is_unknown():
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)        # bound but never answers: a hung loop
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        cli = _stimloop("stop", "--address", f"tcp://127.0.0.1:{port}")
    finally:
        sock.close(0)
        ctx.term()
    assert cli.returncode != 0
    assert "STIMULATION STATE UNKNOWN: use the stimulator's hardware stop now" in " ".join(cli.stderr.split())
