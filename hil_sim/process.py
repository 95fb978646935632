"""The simulated patient as one process: LSL stream out, stimulator emulator on a pty.

Used by ``stimloop run`` (default source and device) and ``stimloop hil``.
The emulator timestamps every frame it receives on the LSL clock and applies
delivered stimulation to the patient (under the outlet's lock, since the
outlet thread steps the same patient), so the controller's claims can be
checked against ground truth written into the session folder.

The stimulator's port is a **stable symlink** (``<session>/device_port``, or a
temporary folder without a session) to the current pty slave, so a controller
can reconnect after a ``device_unplug`` fault gives the emulator a new pty.
``spec["faults"]`` (``[[faults]]`` tables, see ``docs/faults.md``) are injected
on schedule and recorded with their real start/end on the LSL clock in
``ground_truth.json`` (``"faults"``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

#: name of the stable port symlink in the session folder
PORT_LINK_NAME = "device_port"


class EmulatedDevice:
    """The emulator on a pty that can be unplugged and plugged again, behind a stable symlink.

    ``make_emulator(master_fd)`` builds a (not yet started) emulator. ``plug()``
    opens a new pty pair, starts an emulator on it and points ``link_path`` at
    the slave (atomically); ``unplug()`` removes the link (as udev removes a
    ``/dev/serial/by-id`` link), stops the emulator and closes the master, so a
    host holding the old slave gets I/O errors. The mute knob survives replugs.
    """

    def __init__(self, make_emulator: Callable[[int], object], link_path: Path) -> None:
        self.make_emulator = make_emulator
        self.link_path = Path(link_path)
        self.emulator = None
        self.pty_path: str | None = None
        self._fd: int | None = None
        self._muted = False
        self._lock = threading.Lock()

    def plug(self) -> str:
        """Attach a fresh pty + emulator; returns the new pty slave path."""
        from hil_sim.pty_pair import close_pty_pair, open_pty_pair
        with self._lock:
            if self.emulator is not None:
                raise RuntimeError(f"EmulatedDevice.plug: already plugged on {self.pty_path}")
            fd, path = open_pty_pair()
            try:
                emu = self.make_emulator(fd)
                emu.set_mute(self._muted)
                emu.start()
            except BaseException:
                close_pty_pair(fd)
                raise
            self._fd, self.pty_path, self.emulator = fd, path, emu
            tmp = self.link_path.with_name(self.link_path.name + ".tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(path, tmp)
            os.replace(tmp, self.link_path)
            return path

    def unplug(self) -> str | None:
        """Detach: link removed, emulator stopped, pty master closed. Returns the old pty path."""
        from hil_sim.pty_pair import close_pty_pair
        with self._lock:
            if self.link_path.is_symlink():
                self.link_path.unlink()
            emu, fd, path = self.emulator, self._fd, self.pty_path
            self.emulator, self._fd, self.pty_path = None, None, None
        if emu is not None:
            emu.stop()
        if fd is not None:
            close_pty_pair(fd)
        return path

    def set_mute(self, mute: bool) -> None:
        """Mute the current emulator and any emulator plugged later, until unmuted."""
        with self._lock:
            self._muted = bool(mute)
            if self.emulator is not None:
                self.emulator.set_mute(self._muted)

    def close(self) -> None:
        self.unplug()


def make_patient(spec: dict):
    from hil_sim.cohort import patient_params
    from hil_sim.patient import SimulatedPatient

    params = patient_params(spec["patient"])
    if not spec.get("spontaneous_seizures", False):
        params = dataclasses.replace(params, seizure_rate_per_hour=0.0)
    elif spec.get("seizure_rate_per_hour") is not None:  # override the cohort's draw (e.g. short comparisons)
        params = dataclasses.replace(params, seizure_rate_per_hour=float(spec["seizure_rate_per_hour"]),
                                     min_interval_s=min(params.min_interval_s, 0.5 * 3600.0 / spec["seizure_rate_per_hour"]))
    patient = SimulatedPatient(fs_hz=spec["fs_hz"], n_channels=spec["n_channels"], seed=spec["seed"], params=params)
    for onset in spec.get("seizure_onsets_s", []):
        patient.schedule_seizure(float(onset))
    return patient


def run_hil(spec: dict, ready, stop_event, session_dir: str | None = None) -> None:
    """Process body. ``spec``: fs_hz, n_channels, patient, seed, seizure_onsets_s,
    spontaneous_seizures, stream, chunk_s, watchdog_s, faults (list of fault tables).
    Puts ``{"stream", "port", "pty", "t0"}`` (or ``{"error": ...}``) on ``ready``:
    ``port`` is the stable symlink to use, ``pty`` the current slave it points to.
    Runs until ``stop_event`` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent orders the shutdown
    from controller.process_watch import stop_when_parent_dies
    stop_when_parent_dies(stop_event)
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl

    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.faults import DEVICE_KINDS, DeviceFaultInjector, FaultLog, FaultSchedule
    from hil_sim.outlet import PatientOutlet

    out = Path(session_dir) if session_dir else None
    link_dir = out if out is not None else Path(tempfile.mkdtemp(prefix="stimloop-hil-"))
    device = patient = outlet = injector = None
    fault_log = FaultLog()
    try:
        schedule = FaultSchedule(spec.get("faults") or [], fs_hz=spec["fs_hz"], n_channels=spec["n_channels"])
        patient = make_patient(spec)
        # First sample slightly in the future so the controller is attached before data flows.
        outlet = PatientOutlet(patient, spec["stream"], f"stimloop-hil-{spec['patient']}",
                               spec.get("chunk_s", 1 / 64), pylsl.local_clock, t0=pylsl.local_clock() + 0.5,
                               faults=schedule, fault_log=fault_log)

        def deliver(t_lsl: float, params) -> None:
            with outlet.lock:
                patient.stimulate(t_lsl - outlet.t0, params)

        def make_emulator(fd: int) -> StimulatorEmulator:
            # Replugged emulators append to the same device log: one ground truth per session.
            return StimulatorEmulator(fd, clock=pylsl.local_clock, watchdog_s=spec.get("watchdog_s", 0.5),
                                      on_deliver=deliver, log_path=(out / "device_log.jsonl") if out else None)

        device = EmulatedDevice(make_emulator, link_dir / PORT_LINK_NAME)
        pty = device.plug()
        if schedule.kinds & DEVICE_KINDS:
            injector = DeviceFaultInjector(schedule, device, pylsl.local_clock, outlet.t0, fault_log).start()
        ready.put({"stream": spec["stream"], "port": str(device.link_path), "pty": pty, "t0": outlet.t0})
        outlet.run(stop_event)
    except Exception as exc:  # reported to the parent, which turns it into a clear error
        ready.put({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        if injector is not None:
            injector.stop()
        if device is not None:
            device.close()
        if out is None:
            shutil.rmtree(link_dir, ignore_errors=True)
        if out is not None and outlet is not None:
            write_ground_truth(out / "ground_truth.json", patient, outlet.t0, pylsl.local_clock(),
                               faults=fault_log.records(),
                               fault_errors=injector.errors if injector is not None else None)


def write_ground_truth(path: Path, patient, t0: float, end_t: float, faults: list[dict] | None = None,
                       fault_errors: list[str] | None = None) -> None:
    """Seizures on the session clock (``t0 + patient time``), written atomically.

    ``faults``: injected faults (:meth:`hil_sim.faults.FaultLog.records`), each
    with its configured fields and real ``t_start``/``t_end`` on the session clock.
    """
    gt = patient.ground_truth.to_dict()
    seizures = [{"onset_t": t0 + s["onset_s"],
                 "offset_t": (t0 + s["offset_s"]) if s.get("offset_s") is not None else None,
                 "terminated_by_stim": bool(s.get("terminated_by_stim", False))}
                for s in gt.get("seizures", [])]
    data = {"t0": t0, "end_t": end_t, "clock": "session", "seizures": seizures, "patient": gt,
            "faults": list(faults or [])}
    if fault_errors:
        data["fault_errors"] = list(fault_errors)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
