"""Monitor: pure state/render, and run_monitor against a publisher in another process."""
from __future__ import annotations

import io
import multiprocessing as mp
import time

import numpy as np
import pytest
from rich.console import Console

from controller.monitor import MonitorState, render, run_monitor, sparkline, status_line


def screen(state: MonitorState, now: float) -> str:
    console = Console(width=110, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(render(state, now))
    return console.file.getvalue()


def test_sparkline_maps_min_to_lowest_and_max_to_highest_bar():
    assert sparkline(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])) == "▁▂▃▄▅▆▇█"
    assert sparkline(np.array([5.0, 5.0, 5.0])) == "▄▄▄"
    assert sparkline(np.array([np.nan, np.nan])) == ""
    assert len(sparkline(np.arange(500.0), width=40)) == 40


def test_state_keeps_a_bounded_signal_history_and_recent_events():
    state = MonitorState(history_samples=50)
    for i in range(10):
        block = np.full((20, 3), float(i), np.float32)
        state.update("signal", float(i), {"x": block, "fs_hz": 125.0, "channels": ["a", "b", "c"]}, received=i)
    assert state.signal.shape == (50, 3) and state.signal[-1, 0] == 9.0 and state.signal[0, 0] == 7.0
    for i in range(10):
        state.update("stim", 100.0 + i, {"kind": "command", "source": "actuator", "seq": i}, received=10)
    assert len(state.stim) == 6 and state.stim[-1][1]["seq"] == 9
    assert state.counts == {"signal": 10, "stim": 10} and state.n_messages == 20


def test_render_shows_signal_prediction_stim_latency_and_faults():
    state = MonitorState(address="tcp://10.0.0.5:5556")
    t = np.arange(100) / 10
    state.update("signal", 1.0, {"x": np.c_[50 * np.sin(t), 20 * np.cos(t)].astype(np.float32),
                                 "fs_hz": 125.0, "channels": ["Fz", "Cz"]}, received=0.0)
    state.update("prediction", 1.1, {"kind": "prediction", "source": "seizure", "p": 0.93}, received=0.0)
    state.update("stim", 1.2, {"kind": "command", "source": "actuator", "seq": 41, "amplitude_ua": 750.0}, received=0.0)
    state.update("clamp", 1.25, {"kind": "clamp", "source": "governor", "reason": "max_amplitude"}, received=0.0)
    state.update("status", 1.3, {"kind": "status", "source": "runner", "latency_p99_ms": 4.25, "state": "running"},
                 received=0.0)
    out = screen(state, now=0.5)
    assert "tcp://10.0.0.5:5556" in out and "Fz" in out and "Cz" in out
    assert "▁" in out and "█" in out
    assert "p=0.93" in out and "seq=41" in out and "amplitude_ua=750" in out
    assert "reason=max_amplitude" in out and "latency_p99_ms=4.25" in out and "state=running" in out
    assert "NO DATA" not in out
    state.update("fault", 2.0, {"kind": "fault", "source": "actuator", "error": "DeviceTimeout"}, received=0.5)
    out = screen(state, now=10.0)
    assert "error=DeviceTimeout" in out and "NO DATA for 9.5 s" in out


def test_status_line_says_what_the_screen_says_in_one_line():
    state = MonitorState(address="tcp://127.0.0.1:5556")
    assert status_line(state, now=0.0) == "tcp://127.0.0.1:5556: waiting for telemetry…"
    state.update("prediction", 3.0, {"kind": "prediction", "source": "seizure", "p": 0.91, "threshold": 0.82,
                                     "valid": False, "invalid": "flat_signal"}, received=0.0)
    state.update("fault", 3.1, {"kind": "safe_state", "source": "loop", "reason": "flat_signal"}, received=0.0)
    line = status_line(state, now=5.0)
    assert "\n" not in line and "t=3.100 s" in line and "p=0.91 (threshold 0.82) not acted on: flat_signal" in line
    assert "stimulation OFF: flat_signal" in line and "faults 1" in line and "NO DATA for 5.0 s" in line


def test_render_before_any_message_says_waiting():
    text = screen(MonitorState(address="tcp://127.0.0.1:5556"), now=0.0)
    assert "waiting for telemetry" in text and "unknown: no session heard from yet" in text and "armed" not in text


def _publisher_process(address_q: mp.Queue, stop: mp.Event) -> None:
    from controller.events import Event, EventKind
    from controller.telemetry import TelemetryPublisher

    with TelemetryPublisher("tcp://127.0.0.1:*") as pub:
        address_q.put(pub.endpoint)
        block = (30 * np.sin(np.arange(32) / 3)).astype(np.float32)[:, None]
        t = 0.0
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            pub.publish_signal(t, block, fs_hz=250.0, channel_names=["EEG1"])
            pub.publish_event(Event(t, EventKind.PREDICTION, "seizure", {"p": 0.42}))
            pub.publish_event(Event(t, EventKind.COMMAND, "actuator", {"seq": int(t * 100)}))
            t += 0.02
            time.sleep(0.02)


@pytest.mark.timeout(60)
def test_run_monitor_shows_a_remote_publisher():
    ctx = mp.get_context("spawn")
    address_q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_publisher_process, args=(address_q, stop), daemon=True)
    proc.start()
    try:
        address = address_q.get(timeout=30)
        console = Console(width=100, file=io.StringIO(), force_terminal=True, color_system=None)
        state = run_monitor(address, duration_s=1.5, refresh_hz=4, console=console)
        # Not a terminal (`stimloop monitor > log`): a live screen would print nothing until the end.
        log = Console(width=100, file=io.StringIO(), force_terminal=False, color_system=None)
        log_state = run_monitor(address, duration_s=2.5, refresh_hz=4, console=log)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert state.counts.get("signal", 0) > 5 and state.counts.get("prediction", 0) > 5
    assert state.signal is not None and state.channels == ["EEG1"] and state.prediction["p"] == 0.42
    assert "EEG1" in console.file.getvalue() and "p=0.42" in console.file.getvalue()
    lines = log.file.getvalue().splitlines()
    # One line a second (the first before any message may arrive) and one at the end, no screen drawing.
    assert 3 <= len(lines) <= 5 and "┃" not in log.file.getvalue() and "│" not in log.file.getvalue(), lines
    assert "p=0.42" in lines[-1] and "stimulation armed" in lines[-1] and f"commands {log_state.n_commands}" in lines[-1]
    assert log_state.n_commands > 5
    with pytest.raises(ValueError, match="refresh_hz=0"):
        run_monitor(address, duration_s=0.1, refresh_hz=0)


def _governor_session():
    import types

    from controller.actuator import Actuator
    from controller.safety import SafetyGovernor, build_profile
    from controller.session_control import SessionControl
    from drivers.simulated import SimulatedStimulator

    clock = time.monotonic
    drv = SimulatedStimulator(clock)
    drv.open()
    act = Actuator(SafetyGovernor(build_profile("macro", {}), drv.capabilities), drv, clock)
    act.open()
    act.heartbeat()
    return act, SessionControl(types.SimpleNamespace(paused=False), act, clock)


def _feed(state: MonitorState, events) -> None:
    """Through the wire format, as the loop publishes them."""
    from controller.telemetry import EVENT_TOPIC, decode, encode
    for e in events:
        state.update(*decode(encode(EVENT_TOPIC[e.kind], e.t, {"kind": str(e.kind), "source": e.source, **e.data})),
                     received=time.monotonic())


def test_a_reset_of_one_reason_leaves_stimulation_off_while_another_holds():
    from controller.closed_loop import STALE_REASON

    act, ctl = _governor_session()
    state = MonitorState()
    _feed(state, act.fault(STALE_REASON))                        # the stream stalls
    _feed(state, (ctl.handle({"cmd": "emergency_stop", "who": "local"}), ctl.drain())[1])   # stimloop stop
    _feed(state, act.reset(STALE_REASON))                        # the stream resumes: only its latch goes
    assert act.governor.latched
    assert state.stim_off and "emergency stop by the operator" in state.stim_off
    assert "OFF: emergency_stop: emergency stop by the operator" in screen(state, time.monotonic())
    _feed(state, act.reset())                                    # everything released
    assert state.stim_off is None and "armed" in screen(state, time.monotonic())


@pytest.mark.timeout(30)
def test_a_monitor_started_after_a_stop_learns_it_from_the_loops_state_message():
    from controller.telemetry import TelemetryPublisher, TelemetrySubscriber

    with TelemetryPublisher("tcp://127.0.0.1:*") as pub, TelemetrySubscriber(pub.endpoint) as sub:
        state = MonitorState()
        latched = {"kind": "state", "source": "loop", "session": "S-1", "paused": True,
                   "latched": ["emergency_stop: emergency stop by the operator (local)"]}
        t_end = time.monotonic() + 10
        while state.n_messages == 0 and time.monotonic() < t_end:   # the subscription takes a moment
            pub.publish("status", 1.0, latched)
            msg = sub.recv(timeout_ms=20)
            if msg is not None:
                state.update(*msg, received=time.monotonic())
        assert state.stim_off == "emergency_stop: emergency stop by the operator (local)"
        shown = screen(state, time.monotonic())
        assert "OFF: emergency_stop: emergency stop by the operator" in shown and "session S-1" in shown
        assert "state" not in state.status.values()       # state is not an event: not in the status row
        pub.publish("status", 2.0, {**latched, "paused": False, "latched": []})
        state.update(*sub.recv(timeout_ms=2000), received=time.monotonic())
        assert state.stim_off is None


def test_nan_in_a_payload_is_sent_as_null_in_strict_json_and_the_monitor_shows_it():
    import json

    from controller.telemetry import decode, encode

    frames = encode("prediction", 3.0, {"kind": "prediction", "p": float("nan"), "threshold": np.float64(np.inf),
                                        "window_end_t": np.float32("nan"), "x": np.zeros(2)})

    def refuse(word):
        raise ValueError(f"not strict JSON: {word}")

    header = json.loads(bytes(frames[1]), parse_constant=refuse)
    assert header["p"] == {"kind": "prediction", "p": None, "threshold": None, "window_end_t": None}
    state = MonitorState()
    state.update(*decode(frames), received=1.0)
    assert state.prediction["p"] is None and "p=–" in screen(state, 1.0)
    # The common case is not cleaned (and costs nothing more): numbers stay numbers.
    assert json.loads(bytes(encode("prediction", 1.0, {"p": np.float32(0.5)})[1]))["p"] == {"p": 0.5}
