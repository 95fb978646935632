"""The real-time control loop process: ring -> seizure loop -> actuator -> device.

Owns the one actuator (governor + driver) of the session. Never prints; every
stage time is recorded on the LSL clock so ``metrics.json`` can split the
end-to-end latency into stages. Any fault puts the actuator in the safe state
(stimulation off) before it is reported.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def make_driver(cfg, port: str | None, clock):
    """The stimulator driver the config asks for (serial for hil and serial, else in-process)."""
    if cfg.device.kind in ("hil", "serial"):
        from drivers.serial_stimulator import SerialStimulator
        return SerialStimulator(port, baudrate=cfg.device.baudrate, timeout_s=cfg.device.timeout_ms / 1e3,
                                retries=cfg.device.retries, clock=clock)
    from drivers.simulated import SimulatedStimulator
    return SimulatedStimulator(clock=clock)


def make_actuator(cfg, driver, clock):
    """Open ``driver`` (it may learn its capabilities there) and wrap it with the governor.

    The returned actuator is the only holder of the driver from here on.
    """
    from controller.actuator import Actuator
    from controller.safety import SafetyGovernor, build_profile
    profile = build_profile(cfg.safety.profile, cfg.safety.overrides)  # unsafe profiles are refused here
    driver.open()
    actuator = Actuator(SafetyGovernor(profile, driver.capabilities), driver, clock)
    actuator.open()
    return actuator


def run_loop(cfg_json: str, ring_name: str, port: str | None, session_dir: str, stop_event, ready) -> None:
    """Process body; puts ``{"ok": True}`` or ``{"error": ...}`` on ``ready`` once the device is open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent orders the shutdown
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    from pylsl import local_clock as clock

    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.config import Config
    from controller.events import Event, EventKind
    from controller.recorder import EventLog
    from controller.ring import Overrun, SharedRing

    cfg = Config.model_validate_json(cfg_json)
    log = EventLog(Path(session_dir) / "events.jsonl")
    ring = SharedRing.attach(ring_name)
    parent = os.getppid()
    actuator = None
    try:
        try:
            loop = SeizureLoop.from_config(cfg, ring.fs_hz, ring.n_channels)
            driver = make_driver(cfg, port, clock)
            actuator = make_actuator(cfg, driver, clock)
            events_start = actuator.heartbeat()
        except Exception as exc:
            log.append(Event(clock(), EventKind.FAULT, "loop", {"reason": f"start-up: {exc}"}))
            ready.put({"error": str(exc)})
            return
        ready.put({"ok": True})
        reader = ring.reader(start="now", max_read=min(ring.capacity, int(ring.fs_hz * 2) + 1))
        hb_period = cfg.device.heartbeat_s
        next_hb = clock()
        log.append(Event(clock(), EventKind.STATUS, "loop", {"status": "started", "threshold": loop.threshold,
                                                             "model_sha256": loop.predictor.sha256}))
        step = ChunkStep(loop, actuator, clock)
        events: list = list(events_start)
        while not stop_event.is_set():
            try:
                res = reader.read_new()
            except Overrun as exc:
                events.append(Event(clock(), EventKind.DROPPED, "loop", {"n": exc.lost, "reason": "ring overrun"}))
                continue
            got = res.samples.shape[0]
            if got:
                events.extend(step.step(res.samples, res.timestamps))
            now = clock()
            if now >= next_hb:
                events.extend(actuator.heartbeat())
                next_hb = now + hb_period
                if os.getppid() != parent:  # orphaned: the runner died; stop stimulating
                    events.extend(actuator.safe_state("runner process disappeared"))
                    break
            if events:
                log.extend(events)
                events.clear()
            log.maybe_flush(now)
            if not got:
                time.sleep(0.0005)
    finally:
        if actuator is not None:
            log.extend(actuator.close())
        log.close()
        ring.close()
