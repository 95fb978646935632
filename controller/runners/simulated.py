"""Simulated-time session: the same controller objects on a virtual clock, in one process.

The simulated patient produces chunks; the seizure loop, policy, governor and
actuator run exactly as in real time, but the clock is the patient's sample
time, and processing latency is modeled (``simulator.stim_latency_ms``: window
end → command received by the device). Deterministic from the seed and far
faster than real time, so tests, training data and cohort sweeps use it.

Writes the same session folder as ``stimloop run``.
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from controller.config import Config
from controller.events import Event, EventKind
from controller.recorder import EventLog, new_session_dir, write_json


@dataclass
class VirtualClock:
    """The session clock in simulated time: seconds of patient time, set by the runner."""

    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        """Move forward to ``t``; never back (the governor refuses a clock that goes back)."""
        if t > self.now:
            self.now = t


def run_simulated(cfg: Config, session_dir: Path | None = None, write_report: bool = True,
                  progress: Callable[[float, float], None] | None = None) -> Path:
    """Run ``cfg.session.duration_s`` of simulated time; return the session folder."""
    from controller.acquisition import RawRecorder
    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.loop import make_actuator
    from drivers.simulated import SimulatedStimulator
    from hil_sim.faults import SIM_KINDS, FaultLog, FaultSchedule, apply_sim_faults
    from hil_sim.process import make_patient, write_ground_truth

    sim = cfg.simulator
    if sim.model != "wendling":
        # The spiking units run at 30 kHz with sample-exact pulse scheduling; their simulated-time
        # runner is hil_sim.ads_sim.run_simulated, exposed as `stimloop sim compare-ads`.
        raise ValueError(f"simulator.model={sim.model!r}: the simulated-time session runs the Wendling patient; "
                         "for ADS / random stimulation in simulated time use `stimloop sim compare-ads`, "
                         "in real time `stimloop run`")
    loop = SeizureLoop.from_config(cfg, sim.fs_hz, sim.n_channels)  # contract errors before any folder exists
    schedule = FaultSchedule([f.model_dump(mode="json", exclude_none=True) for f in cfg.faults],
                             fs_hz=sim.fs_hz, n_channels=sim.n_channels)
    schedule.require_kinds(SIM_KINDS, "simulated runner")   # and faults it cannot inject: no half-made folder
    if session_dir:
        session_dir = Path(session_dir)
        (session_dir / "raw").mkdir(parents=True, exist_ok=True)
    else:
        session_dir = new_session_dir(cfg.session.out_dir)
    (session_dir / "config.toml").write_text(cfg.to_toml())
    write_json(session_dir / "session.json", {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
        "python": sys.version, "platform": platform.platform(), "runner": "simulated",
        "clock": "virtual (patient time, s)",
    })
    from controller.runners.realtime import hil_spec
    patient = make_patient(hil_spec(cfg))   # the patient a real-time session's simulator would build
    fault_log = FaultLog()
    clock = VirtualClock()
    latency_s = sim.stim_latency_ms / 1e3
    log = EventLog(session_dir / "events.jsonl", flush_interval_s=1.0)
    device_log = EventLog(session_dir / "device_log.jsonl", flush_interval_s=1.0)

    def deliver(t: float, params) -> None:
        patient.stimulate(t, params)

    driver = SimulatedStimulator(clock=clock, on_deliver=deliver)
    actuator = make_actuator(cfg, driver, clock)
    raw = RawRecorder(session_dir / "raw", sim.n_channels, sim.fs_hz,
                      meta={"channel_names": patient.channel_names, "clock": "virtual"})
    chunk_n = max(1, int(round(sim.sim_chunk_s * sim.fs_hz)))
    n_total = int(round(cfg.session.duration_s * sim.fs_hz))
    events: list[Event] = []
    events.extend(actuator.heartbeat())
    events.append(Event(0.0, EventKind.STATUS, "sim", {"status": "started", "policy": loop.drive.kind, "threshold": loop.threshold,
                                                       "min_detect_s": loop.min_detect_s,
                                                       "model_sha256": loop.predictor.sha256}))
    step = ChunkStep(loop, actuator, clock, modeled_latency_s=latency_s, source="sim",
                     heartbeat_s=cfg.device.heartbeat_s, blanking_s=cfg.policy.blanking_s)
    done = 0
    try:
        while done < n_total:
            n = min(chunk_n, n_total - done)
            x = patient.step(n)
            ts = (done + np.arange(n)) / sim.fs_hz
            x, ts = apply_sim_faults(schedule, x, ts, done / sim.fs_hz, stimulator=driver, log=fault_log)
            done += n
            if not ts.size:  # a sample gap swallowed the whole chunk
                continue
            clock.advance_to(float(ts[-1]))
            actuator.poll()  # simulated time: deliver scheduled bursts that are due
            events.extend(step.housekeeping())
            raw.append(x, ts)
            new = step.step(x, ts)
            for e in new:
                if e.kind is EventKind.COMMAND and e.data.get("op") == "trigger":
                    # The simulated device "receives" the command when the modeled latency is spent.
                    device_log.append({"type": "TRIGGER", "seq": e.data.get("seq"), "t_received": e.t, "ok": True})
            events.extend(new)
            log.extend(events)
            events.clear()
            log.maybe_flush(clock.now)
            device_log.maybe_flush(clock.now)
            raw.maybe_flush(clock.now)
            if progress is not None:
                progress(done / sim.fs_hz, n_total / sim.fs_hz)
    finally:
        log.extend(events)
        log.extend(actuator.close())
        log.close()
        device_log.close()
        raw.close()
        write_ground_truth(session_dir / "ground_truth.json", patient, 0.0, done / sim.fs_hz,
                           faults=fault_log.records())
    if write_report:
        from controller.report import build_report
        build_report(session_dir)
    return session_dir
