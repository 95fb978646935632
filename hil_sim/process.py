"""The simulated patient as one process: LSL stream out, stimulator emulator on a pty.

Used by ``stimloop run`` (default source and device) and ``stimloop hil``.
The emulator timestamps every frame it receives on the LSL clock and applies
delivered stimulation to the patient, so the controller's claims can be
checked against ground truth written into the session folder.
"""
from __future__ import annotations

import json
import signal
import threading
from pathlib import Path


class _SharedPatient:
    """The patient seen by two threads: the outlet steps it, the emulator stimulates it.

    Stimulation is handed over through a list and applied before the next
    ``step``, so the patient itself never runs concurrently.
    """

    def __init__(self, patient, t0: float):
        self._p = patient
        self.t0 = t0
        self._pending: list = []
        self._lock = threading.Lock()
        self.fs_hz = patient.fs_hz
        self.n_channels = patient.n_channels
        self.channel_names = patient.channel_names

    @property
    def t(self) -> float:
        return self._p.t

    def deliver(self, t_lsl: float, params) -> None:
        with self._lock:
            self._pending.append((t_lsl - self.t0, params))

    def step(self, n: int):
        with self._lock:
            pending, self._pending = self._pending, []
        for t, params in pending:
            self._p.stimulate(t, params)
        return self._p.step(n)

    @property
    def ground_truth(self):
        return self._p.ground_truth


def run_hil(spec: dict, ready, stop_event, session_dir: str | None = None) -> None:
    """Process body. ``spec``: fs_hz, n_channels, patient, seed, seizure_onsets_s,
    spontaneous_seizures, stream, chunk_s, watchdog_s. Puts ``{"stream", "port", "t0"}``
    (or ``{"error": ...}``) on ``ready``; runs until ``stop_event`` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent orders the shutdown
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl

    from hil_sim.cohort import patient_params
    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.outlet import stream_patient
    from hil_sim.patient import SimulatedPatient
    from hil_sim.pty_pair import close_pty_pair, open_pty_pair

    out = Path(session_dir) if session_dir else None
    emulator = None
    fds = None
    try:
        params = patient_params(spec["patient"])
        if not spec.get("spontaneous_seizures", False):
            params = params.without_spontaneous() if hasattr(params, "without_spontaneous") else params
        patient = SimulatedPatient(fs_hz=spec["fs_hz"], n_channels=spec["n_channels"], seed=spec["seed"], params=params)
        for onset in spec.get("seizure_onsets_s", []):
            patient.schedule_seizure(float(onset))
        fds = open_pty_pair()
        master_fd, port = fds
        t0 = pylsl.local_clock() + 0.5  # first sample slightly in the future: outlet and emulator share t0
        shared = _SharedPatient(patient, t0)
        emulator = StimulatorEmulator(master_fd, clock=pylsl.local_clock, watchdog_s=spec.get("watchdog_s", 0.5),
                                      on_deliver=shared.deliver,
                                      log_path=(out / "device_log.jsonl") if out else None)
        emulator.start()
        ready.put({"stream": spec["stream"], "port": port, "t0": t0})
        stream_patient(shared, stream_name=spec["stream"], source_id=f"stimloop-hil-{spec['patient']}",
                       chunk_s=spec.get("chunk_s", 1 / 64), stop_event=stop_event, clock=pylsl.local_clock, t0=t0)
    except Exception as exc:  # reported to the parent, which turns it into a clear error
        ready.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        if emulator is not None:
            emulator.stop()
        if fds is not None:
            close_pty_pair(*fds)
        if out is not None and "patient" in locals():
            write_ground_truth(out / "ground_truth.json", patient, locals().get("t0", 0.0), pylsl.local_clock())


def write_ground_truth(path: Path, patient, t0: float, end_t: float) -> None:
    """Seizures on the session clock (``t0 + patient time``)."""
    gt = patient.ground_truth.to_dict()
    seizures = [{"onset_t": t0 + s["onset_s"],
                 "offset_t": (t0 + s["offset_s"]) if s.get("offset_s") is not None else None,
                 "terminated_by_stim": bool(s.get("terminated_by_stim", False))}
                for s in gt.get("seizures", [])]
    data = {"t0": t0, "end_t": end_t, "clock": "lsl", "seizures": seizures, "patient": gt}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
