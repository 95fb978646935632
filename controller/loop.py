"""The real-time control loop process: ring -> seizure loop -> actuator -> device.

Owns the one actuator (governor + driver) of the session. With a spike policy it
also pulls the source into the ring itself (``source_spec``): the fast path of
ARCHITECTURE.md, a spike detected in the process that receives its chunk, with
no hop through another process before the decision (the acquisition process then
only records the ring). Never prints; every
stage time is recorded on the LSL clock so ``metrics.json`` can split the
end-to-end latency into stages. Any fault puts the actuator in the safe state
(stimulation off) before it is reported.
"""
from __future__ import annotations

import time
from pathlib import Path


def make_driver(cfg, port: str | None, clock):
    """The stimulator driver the config asks for (serial for hil and serial, else in-process)."""
    if cfg.device.kind in ("hil", "serial"):
        from drivers.serial_stimulator import SerialStimulator
        return SerialStimulator(port, baudrate=cfg.device.baudrate, timeout_s=cfg.device.timeout_ms / 1e3,
                                retries=cfg.device.retries, clock=clock,
                                connect_timeout_s=cfg.device.connect_timeout_s)
    from drivers.simulated import SimulatedStimulator
    return SimulatedStimulator(clock=clock)


def known_capabilities(cfg):
    """The capabilities of the built-in devices (the emulator, the in-process simulated stimulator),
    known before any is opened; ``None`` for a serial device, which tells its own at HELLO."""
    if cfg.device.kind == "hil":
        from hil_sim.emulator import DEFAULT_CAPABILITIES
        return DEFAULT_CAPABILITIES
    if cfg.device.kind == "simulated":
        from drivers.simulated import SIMULATED_CAPABILITIES
        return SIMULATED_CAPABILITIES
    return None


def make_actuator(cfg, driver, clock):
    """Open ``driver`` (it may learn its capabilities there) and wrap it with the governor.

    The returned actuator is the only holder of the driver from here on.
    """
    from controller.actuator import Actuator
    from controller.safety import SafetyGovernor, build_profile
    profile = build_profile(cfg.safety.profile, cfg.safety.overrides)  # unsafe profiles are refused here
    driver.open()
    # The device's own watchdog is known only now (serial: its HELLO). A host heartbeat slower than a
    # third of it (drivers/PROTOCOL.md §7) lets the device stop between two heartbeats: a device_watchdog
    # fault that latches the session for good. Config validation checks device.watchdog_s, which only
    # sets the emulator's.
    watchdog_s = driver.device_watchdog_s
    if watchdog_s is not None and cfg.device.heartbeat_s > watchdog_s / 3 * (1 + 1e-9):
        driver.close()   # nothing sent since it opened (a serial device's HELLO stopped whatever ran)
        raise ValueError(f"device.heartbeat_s = {cfg.device.heartbeat_s:g} s is more than a third of the "
                         f"device's watchdog ({watchdog_s:g} s, reported at its HELLO): the device would stop "
                         "all stimulation between two heartbeats (drivers/PROTOCOL.md §7); set "
                         f"device.heartbeat_s <= {watchdog_s / 3:.4g}")
    actuator = Actuator(SafetyGovernor(profile, driver.capabilities), driver, clock)
    actuator.open()
    if cfg.device.impedance_ohm is not None:  # protocol v1 has no impedance readback: measured beforehand
        actuator.set_impedance(cfg.device.impedance_ohm)
    return actuator


#: How often the loop publishes its state (paused, latch reasons) on telemetry: a monitor started
#: after a stop learns the stop from it, since events are published only when they happen.
STATE_PERIOD_S = 1.0
#: On the fast path, how often the loop wakes the recording process (which records the ring):
#: a chunk at a time would wake it 1000 times a second at 1 ms chunks, each wake-up one more
#: task for the two cores the next chunk's way to the loop needs. The ring holds seconds.
RECORDING_WAKE_S = 0.02


def new_session_id(session_dir: Path) -> str:
    """The folder's name plus a random part: folders of two runs can share a name (one second, two
    out dirs or machines), and the id must tell a session's control server from any other's."""
    import secrets
    return f"{Path(session_dir).name}-{secrets.token_hex(4)}"


def open_remote(cfg, control, session_dir: Path, session_id: str | None = None):
    """Telemetry publisher and control server as configured; endpoints written to ``endpoints.json``.

    ``session_id`` goes into ``endpoints.json`` and every control reply; the control server refuses
    a request that names another session (``controller.control``).
    """
    from controller.recorder import write_json
    tele = server = None
    if cfg.telemetry.enabled:
        from controller.telemetry import TelemetryPublisher
        tele = TelemetryPublisher(cfg.telemetry.address, hwm=cfg.telemetry.hwm)
    if cfg.control.enabled:
        from controller.control import ControlServer
        c = cfg.control
        server = ControlServer(c.address, handler=control.handle, server_secret_key=c.server_secret_key or None,
                               authorized_clients_dir=c.authorized_clients_dir or None, require_auth=c.require_auth,
                               session_id=session_id)
    write_json(session_dir / "endpoints.json", {
        "session_id": session_id,
        "telemetry": getattr(tele, "endpoint", None), "control": getattr(server, "endpoint", None),
        "control_auth": bool(cfg.control.require_auth or cfg.control.server_secret_key)})
    return tele, server


def read_chunk(reader):
    """The reader's new samples ``-> (samples, timestamps)``, copied out of the ring.

    Copied (into the reader's preallocated buffers, overwritten by the next read) so that
    the ring's own check after the copy covers the data the loop computes on: a zero-copy
    view could be overwritten by a writer lapping the reader while features and the model
    run on it, unnoticed. A lapped read raises :class:`controller.ring.Overrun`.
    """
    res = reader.read_new(copy=True)
    return res.samples, res.timestamps


def open_heartbeating(source, actuator, heartbeat_s: float) -> list:
    """``source.open()`` while a helper thread heartbeats the device every ``heartbeat_s``.

    The device's watchdog runs from its HELLO, and opening a stream can outlast it: resolving
    an LSL stream took over 0.5 s (the emulator's watchdog) on the 2-core VM with a test suite
    running beside it, and the device stopped everything and latched the session. Nothing
    else uses the actuator meanwhile (this thread waits in ``open``). Returns the heartbeats'
    events, ending with one sent as the source is open; ``open``'s error, if any, is raised.
    """
    import threading

    events: list = []
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat_s):
            events.extend(actuator.heartbeat())
    th = threading.Thread(target=beat, name="start-up-heartbeat", daemon=True)
    th.start()
    try:
        source.open()
    finally:
        done.set()
        th.join()
    events.extend(actuator.heartbeat())
    return events


def run_loop(cfg_json: str, ring_name: str, port: str | None, session_dir: str, stop_event, ready,
             wakeup_path: str | None = None, customize=None, source_spec: dict | None = None) -> None:
    """Process body; puts ``{"ok": True}`` or ``{"error": ...}`` on ``ready`` once the device is open.

    ``wakeup_path``: the named pipe (``controller.wakeup``) the acquisition process pokes after
    each ring write; the loop waits on it for samples. With ``source_spec`` (the spike fast
    path) the roles turn: this process opens that source (``controller.sources.build_source``)
    and pulls it into the ring, waiting in the pull, and pokes the pipe (at most every
    ``RECORDING_WAKE_S``) so that the acquisition process, which then only records
    (``run_acquisition(follow=...)``), wakes. A source that
    fails to open fails the start-up; one that fails to read is a ``source_read_failed`` fault
    (stimulation off first).

    ``customize(loop, cfg)`` (a picklable callable, e.g. a module-level function or a partial of
    one) may adjust the ``SeizureLoop`` before it runs; the latency benchmark uses it to request a
    burst on every window.
    """
    from controller.process_watch import stop_on_signals
    stop_on_signals(stop_event)  # SIGTERM: leave the loop now, stimulation off in `finally`
    from controller.process_watch import stop_when_parent_dies
    stop_when_parent_dies(stop_event)  # orphaned (runner killed): leave the loop, stimulation off in `finally`
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    from pylsl import local_clock as clock

    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.config import Config
    from controller.events import Event, EventKind
    from controller.recorder import EventLog
    from controller.session_control import SessionControl
    from controller.ring import Overrun, SharedRing

    cfg = Config.model_validate_json(cfg_json)
    from controller.low_latency import nice_for, set_nice
    # Before the device's, telemetry's and the source's threads start: they inherit it. A loop that
    # busy-polls its source keeps its priority (nice_for says why).
    own_nice = cfg.session.nice if source_spec is None else nice_for(cfg.session.nice, bool(source_spec.get("busy_poll")))
    nice = "unchanged" if own_nice is None else set_nice(own_nice)
    log = EventLog(Path(session_dir) / "events.jsonl")
    ring = SharedRing.attach(ring_name)
    actuator = tele = server = wakeup = source = None
    reported = False   # a FAULT naming the cause is already in `events`
    events: list = []
    if wakeup_path is not None and source_spec is None:
        from controller.wakeup import WakeupReader
        wakeup = WakeupReader(wakeup_path)
    try:
        try:
            loop = SeizureLoop.from_config(cfg, ring.fs_hz, ring.n_channels)
            if customize is not None:
                customize(loop, cfg)
            # Before the device opens: its watchdog runs from the HELLO, and the collection takes
            # ~40 ms (far longer on a loaded machine) with no heartbeat sent.
            from controller.low_latency import freeze_gc
            gc_status = freeze_gc()
            driver = make_driver(cfg, port, clock)
            actuator = make_actuator(cfg, driver, clock)
            events_start = actuator.heartbeat()
            step = ChunkStep(loop, actuator, clock, stall_timeout_s=cfg.source.stall_timeout_s,
                             heartbeat_s=cfg.device.heartbeat_s, blanking_s=cfg.policy.blanking_s,
                             cpu_clock=time.thread_time)   # ~1 µs a read: on- and off-CPU split of stage tails
            control = SessionControl(step, actuator, clock)
            session_id = new_session_id(Path(session_dir))
            tele, server = open_remote(cfg, control, Path(session_dir), session_id)
            if source_spec is not None:
                # Last: what the inlet buffers while the device and sockets open would reach the
                # policy as a backlog of spikes too old to pair (refused as too late).
                from controller.sources import build_source
                source = build_source(source_spec)
                events_start.extend(open_heartbeating(source, actuator, cfg.device.heartbeat_s))
                source.check_ring(ring)
                if wakeup_path is not None:
                    from controller.wakeup import WakeupWriter
                    wakeup = WakeupWriter(wakeup_path)
        except Exception as exc:
            log.append(Event(clock(), EventKind.FAULT, "loop", {"reason": f"start-up: {exc}"}))
            ready.put({"error": str(exc)})
            return
        ready.put({"ok": True})
        reader = ring.reader(start="now", max_read=min(ring.capacity, int(ring.fs_hz * 2) + 1))
        log.append(Event(clock(), EventKind.STATUS, "loop", {"status": "started", "nice": nice, "policy": loop.drive.kind,
                                                             "pulls_source": source is not None, "gc": gc_status,
                                                             "threshold": loop.threshold,
                                                             "min_detect_s": loop.min_detect_s,
                                                             "model_sha256": loop.predictor.sha256 if loop.predictor is not None else None}))
        decim = max(1, int(round(ring.fs_hz / cfg.telemetry.signal_hz)))
        events.extend(events_start)
        next_state = 0.0
        next_recording_wake = float("-inf")
        try:
            while not stop_event.is_set():
                if source is not None:   # the fast path: wait for the chunk here, then decide on it
                    try:
                        source.read_into(ring)
                    except Exception as exc:
                        events.append(Event(clock(), EventKind.FAULT, "loop", {
                            "what": "source_read_failed", "error": f"{type(exc).__name__}: {exc}"}))
                        reported = True
                        raise
                try:
                    samples, timestamps = read_chunk(reader)
                except Overrun as exc:
                    events.append(Event(clock(), EventKind.DROPPED, "loop", {"n": exc.lost, "reason": "ring overrun"}))
                    continue
                got = samples.shape[0]
                if got:
                    events.extend(step.step(samples, timestamps))
                    if source is not None and wakeup is not None:
                        t_wake = clock()
                        if t_wake >= next_recording_wake:
                            wakeup.notify()   # the recording follows, once the chunk's decision is out
                            next_recording_wake = t_wake + RECORDING_WAKE_S
                    if tele is not None:
                        tele.publish_signal(timestamps, samples, ring.fs_hz, decimate=decim)
                if source is not None:
                    events.extend(source.drain_events())   # gaps, a lost stream: after the decision
                now = clock()
                if server is not None:  # never waits; emergency stop acts within this iteration
                    try:
                        server.poll_once(now, events)
                    finally:
                        # An emergency stop's SAFE_STATE, already sent to the device, is recorded even
                        # if the control socket fails on a later request of the same batch.
                        events.extend(control.drain())
                events.extend(step.housekeeping())
                if events:
                    if tele is not None:
                        for e in events:
                            tele.publish_event(e)
                    log.extend(events)
                    events.clear()
                if tele is not None and now >= next_state:
                    tele.publish("status", now, {"kind": "state", "source": "loop", "session": session_id,
                                                 "paused": bool(step.paused),
                                                 "latched": list(actuator.governor.latch_reasons)})
                    next_state = now + STATE_PERIOD_S
                log.maybe_flush(now)
                if source is not None:
                    # The next wait is in the pull: rehearse the command path now (Actuator.warm;
                    # without it the governor's p50 doubled), and notice a stalled stream.
                    if got:
                        actuator.warm()
                    else:
                        events.extend(step.idle())
                elif not got:
                    events.extend(step.idle())
                    if wakeup is not None:
                        wakeup.wait(0.005)  # woken by the acquisition process as soon as samples land
                    else:
                        time.sleep(0.0005)
        except Exception as exc:
            if reported:
                raise
            events.append(Event(clock(), EventKind.FAULT, "loop", {"what": "loop_crashed",
                                                                   "reason": f"{type(exc).__name__}: {exc}"}))
            raise
    finally:
        # Stimulation off before anything that could fail (writing the log); the iteration's
        # pending events are then written ahead of the close's own, keeping the log in time order.
        closing = actuator.close() if actuator is not None else []
        log.extend(events)
        log.extend(closing)
        for closable in (server, tele, wakeup, source):
            if closable is not None:
                closable.close()
        log.close()
        ring.close()
