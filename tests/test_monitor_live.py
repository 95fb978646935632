"""The monitor's state and screen fed by a real publisher in another process.

The child publishes what the real-time loop publishes: a decimated signal, the
seizure predictor's PREDICTION events and the actuator's real COMMAND events
(governor + simulated stimulator), then an operator pause (SAFE_STATE + MARK).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import queue
import time

import numpy as np
import pytest
from rich.console import Console

from controller.monitor import MonitorState, render
from controller.telemetry import TelemetrySubscriber


def _loop_like_publisher(address_q, go, done_q) -> None:
    from controller.actuator import Actuator
    from controller.events import Event, EventKind
    from controller.safety import SafetyGovernor, StimRequest, build_profile
    from controller.telemetry import TelemetryPublisher
    from drivers.params import StimParams, Waveform
    from drivers.simulated import SimulatedStimulator

    clock = time.monotonic
    driver = SimulatedStimulator(clock)
    driver.open()
    act = Actuator(SafetyGovernor(build_profile("macro", {"max_bursts_per_min": 600}), driver.capabilities),
                   driver, clock)
    act.open()
    act.heartbeat()
    params = StimParams(channel=0, waveform=Waveform.BIPHASIC, amplitude_ua=1500.0, pulse_width_us=160.0,
                        frequency_hz=200.0, n_pulses=10)
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=10_000) as pub:
        address_q.put(pub.endpoint)
        # Slow joiner: offer status messages until the parent's subscription is in place.
        while not go.wait(0.02):
            pub.publish_event(Event(clock(), EventKind.STATUS, "loop", {"status": "started"}))
        fs_hz, n = 512.0, 8
        last_p, last_seq = None, None
        for i in range(120):  # ~2.4 s at 20 ms per chunk
            for e in act.heartbeat():  # the governor refuses stimulation without a live device
                pub.publish_event(e)
            now = clock()
            ts = now - (n - 1 - np.arange(n)) / fs_hz
            x = (40 * np.sin(2 * np.pi * 6 * ts)[:, None] * np.ones((1, 4))).astype(np.float32)
            pub.publish_signal(ts, x, fs_hz, decimate=8, channel_names=["LA1", "LA2", "LA3", "LA4"])
            window_end = float(ts[-1])
            last_p = round(0.05 + 0.9 * (i % 30) / 29, 4)
            pub.publish_event(Event(clock(), EventKind.PREDICTION, "seizure", {
                "window_end_t": window_end, "p": last_p, "valid": True, "threshold": 0.5,
                "t_inference": clock()}))
            if i % 30 == 29:  # a detection: the real actuator checks and triggers
                req = StimRequest(clock(), "responsive", params)
                req.meta["window_end_t"] = window_end
                for e in act.submit(req):
                    pub.publish_event(e)
                    if e.kind is EventKind.COMMAND:
                        last_seq = e.data["seq"]
            time.sleep(0.02)
        for e in act.safe_state("paused by the operator (local)"):
            pub.publish_event(e)
        pub.publish_event(Event(clock(), EventKind.MARK, "control", {"cmd": "pause", "who": "local", "ok": True}))
        done_q.put((last_p, last_seq))
        time.sleep(1.0)  # keep the socket open while the parent drains
    act.close()


def _screen(state: MonitorState, now: float) -> str:
    console = Console(width=140, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(render(state, now))
    return console.file.getvalue()


@pytest.mark.timeout(60)
def test_monitor_shows_latest_prediction_and_stimulation_from_a_live_publisher():
    ctx = mp.get_context("spawn")
    address_q, done_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_loop_like_publisher, args=(address_q, go, done_q), daemon=True)
    proc.start()
    try:
        address = address_q.get(timeout=30)
        state = MonitorState(address=address)
        with TelemetrySubscriber(address) as sub:
            while (msg := sub.recv(timeout_ms=5000)) is None:
                pass
            state.update(*msg, received=time.monotonic())
            go.set()
            last = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                msg = sub.recv(timeout_ms=300)
                if msg is None:
                    try:
                        last = done_q.get_nowait()
                    except queue.Empty:
                        continue
                    break
                state.update(*msg, received=time.monotonic())
            # Whatever was still in flight when the child said done.
            while (msg := sub.recv(timeout_ms=300)) is not None:
                state.update(*msg, received=time.monotonic())
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    assert last is not None, "publisher never finished"
    last_p, last_seq = last
    assert last_seq is not None
    out = _screen(state, time.monotonic())
    # Latest prediction and latest stimulation command, in a person's terms.
    assert f"p={last_p:.4g}" in out and "threshold=0.5" in out
    assert f"seq={last_seq}" in out and "1500 µA" in out and "160 µs" in out and "200 Hz × 10" in out
    assert "window end → sent" in out
    assert "LA1" in out and "LA4" in out and "signal (decimated" in out
    # The operator's pause: stimulation shown off with the reason, the command in the operator list.
    assert "OFF: paused by the operator (local)" in out
    assert "cmd=pause" in out and "who=local" in out
    assert "4 command(s) since the monitor started" in out
    assert state.n_faults == 0  # an operator pause is a wanted safe state, not a fault
    assert "window end → prediction p50" in out and "→ command p50" in out and "deadline misses 0" in out
    # The pause's mark is history, not a status field that sticks forever.
    assert "cmd" not in state.status and state.status.get("status") == "started"
