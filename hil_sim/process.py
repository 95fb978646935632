"""The simulated patient as one process: LSL stream out, stimulator emulator on a pty.

Used by ``stimloop run`` (default source and device) and ``stimloop hil``.
The emulator timestamps every frame it receives on the LSL clock and applies
delivered stimulation to the patient (under the outlet's lock, since the
outlet thread steps the same patient), so the controller's claims can be
checked against ground truth written into the session folder.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import threading
from pathlib import Path


def make_patient(spec: dict):
    from hil_sim.cohort import patient_params
    from hil_sim.patient import SimulatedPatient

    params = patient_params(spec["patient"])
    if not spec.get("spontaneous_seizures", False):
        params = dataclasses.replace(params, seizure_rate_per_hour=0.0)
    patient = SimulatedPatient(fs_hz=spec["fs_hz"], n_channels=spec["n_channels"], seed=spec["seed"], params=params)
    for onset in spec.get("seizure_onsets_s", []):
        patient.schedule_seizure(float(onset))
    return patient


def run_hil(spec: dict, ready, stop_event, session_dir: str | None = None) -> None:
    """Process body. ``spec``: fs_hz, n_channels, patient, seed, seizure_onsets_s,
    spontaneous_seizures, stream, chunk_s, watchdog_s. Puts ``{"stream", "port", "t0"}``
    (or ``{"error": ...}``) on ``ready``; runs until ``stop_event`` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent orders the shutdown
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl

    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.outlet import PatientOutlet
    from hil_sim.pty_pair import close_pty_pair, open_pty_pair

    out = Path(session_dir) if session_dir else None
    emulator = fds = patient = outlet = None
    try:
        patient = make_patient(spec)
        # First sample slightly in the future so the controller is attached before data flows.
        outlet = PatientOutlet(patient, spec["stream"], f"stimloop-hil-{spec['patient']}",
                               spec.get("chunk_s", 1 / 64), pylsl.local_clock, t0=pylsl.local_clock() + 0.5)

        def deliver(t_lsl: float, params) -> None:
            with outlet.lock:
                patient.stimulate(t_lsl - outlet.t0, params)

        fds = open_pty_pair()
        emulator = StimulatorEmulator(fds[0], clock=pylsl.local_clock, watchdog_s=spec.get("watchdog_s", 0.5),
                                      on_deliver=deliver, log_path=(out / "device_log.jsonl") if out else None)
        emulator.start()
        ready.put({"stream": spec["stream"], "port": fds[1], "t0": outlet.t0})
        outlet.run(stop_event)
    except Exception as exc:  # reported to the parent, which turns it into a clear error
        ready.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        if emulator is not None:
            emulator.stop()
        if fds is not None:
            close_pty_pair(*fds)
        if out is not None and outlet is not None:
            write_ground_truth(out / "ground_truth.json", patient, outlet.t0, pylsl.local_clock())


def write_ground_truth(path: Path, patient, t0: float, end_t: float) -> None:
    """Seizures on the session clock (``t0 + patient time``), written atomically."""
    gt = patient.ground_truth.to_dict()
    seizures = [{"onset_t": t0 + s["onset_s"],
                 "offset_t": (t0 + s["offset_s"]) if s.get("offset_s") is not None else None,
                 "terminated_by_stim": bool(s.get("terminated_by_stim", False))}
                for s in gt.get("seizures", [])]
    data = {"t0": t0, "end_t": end_t, "clock": "session", "seizures": seizures, "patient": gt}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
