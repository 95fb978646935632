"""The simulated patient as one process: LSL stream out, stimulator emulator on a pty.

Used by ``stimloop run`` (default source and device) and ``stimloop hil``.
The emulator runs in a child process of its own
(:class:`hil_sim.emulator_process.EmulatorProcess`), so its receipt stamps never
wait for this process's GIL while the patient's next block is produced. It
timestamps every frame it receives on the LSL clock, and what it delivers comes
back here and is applied to the patient (under the outlet's lock, since the
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


#: firing rate of each trigger unit of the spiking simulator (as ``stimloop bench ads``)
SPIKING_UNIT_RATE_HZ = 2.5


def spiking_layout(n_channels: int, trigger_channels) -> tuple[int, int]:
    """Target-unit and stimulation-site channels for a spiking simulator of ``n_channels``.

    The target sits mid-array (away from the trigger units) and the stimulation
    site three quarters along, as in ``hil_sim.ads_sim`` (8 channels: target 4, site 6).
    """
    trig = {int(c) for c in trigger_channels}
    free = [c for c in range(n_channels) if c not in trig]
    if not free:
        raise ValueError(f"spiking simulator n_channels={n_channels!r}: trigger_channels {sorted(trig)} "
                         "leave no channel for the target unit; expected n_channels > len(trigger_channels)")
    target = n_channels // 2 if n_channels // 2 in free else free[0]
    site = min(n_channels - 1, (3 * n_channels) // 4)
    return target, site


def make_spiking(spec: dict):
    """``SpikingUnits`` for a session spec (``model = "spiking"``): trigger units on ``trigger_channels``."""
    from hil_sim.spiking import SpikingUnits

    trig = tuple(int(c) for c in spec.get("trigger_channels", (0, 1)))
    target, site = spiking_layout(int(spec["n_channels"]), trig)
    return SpikingUnits(fs_hz=float(spec["fs_hz"]), n_channels=int(spec["n_channels"]), seed=int(spec["seed"]),
                        trigger_channels=trig, target_channel=target, stim_site_channel=site,
                        rate_hz=float(spec.get("unit_rate_hz", SPIKING_UNIT_RATE_HZ)))


def patient_params_for(spec: dict):
    """The cohort patient's parameters with the session's seizure and alpha settings applied.

    ``seizure_rate_per_hour`` overrides the cohort's draw (e.g. short comparisons): onsets may then
    come every 0.5 × 3600 / rate s, so seizures longer than 90 % of that are shortened to fit
    (a patient with seizures every 30 s cannot keep 30 s seizures). A rate even the shortest
    possible seizure cannot fit is a ``ValueError`` naming the config key.
    """
    from hil_sim.cohort import patient_params

    params = patient_params(spec["patient"])
    if spec.get("alpha_uv"):
        params = dataclasses.replace(params, alpha_uv=float(spec["alpha_uv"]),
                                     alpha_hz=float(spec.get("alpha_hz", params.alpha_hz)))
    if not spec.get("spontaneous_seizures", False):
        return dataclasses.replace(params, seizure_rate_per_hour=0.0)
    rate = spec.get("seizure_rate_per_hour")
    if rate is None:
        return params
    min_interval_s = min(params.min_interval_s, 0.5 * 3600.0 / rate)
    lo, hi = params.seizure_duration_s
    shortest = params.onset_duration_s + params.transition_s + params.termination_s
    fit = 0.9 * min_interval_s
    if fit < shortest:
        raise ValueError(f"simulator.seizure_rate_per_hour = {rate:g}: patient {spec['patient']}'s seizures last at "
                         f"least {shortest:.3g} s, so at most {0.9 * 0.5 * 3600.0 / shortest:.3g} per hour fit")
    return dataclasses.replace(params, seizure_rate_per_hour=float(rate), min_interval_s=min_interval_s,
                               seizure_duration_s=(min(lo, fit), min(hi, fit)) if hi > fit else (lo, hi))


def make_patient(spec: dict):
    """The simulated source of a session spec: a Wendling patient, or spiking units (``model = "spiking"``)."""
    if spec.get("model", "wendling") == "spiking":
        return make_spiking(spec)
    from hil_sim.patient import SimulatedPatient

    patient = SimulatedPatient(fs_hz=spec["fs_hz"], n_channels=spec["n_channels"], seed=spec["seed"],
                               params=patient_params_for(spec))
    for onset in spec.get("seizure_onsets_s", []):
        patient.schedule_seizure(float(onset))
    return patient


def run_hil(spec: dict, ready, stop_event, session_dir: str | None = None) -> None:
    """Process body. ``spec``: fs_hz, n_channels, patient, seed, seizure_onsets_s,
    spontaneous_seizures, stream, chunk_s, watchdog_s, faults (list of fault tables).
    Puts ``{"stream", "source_id", "port", "pty", "t0", "emulator_pid"}`` (or ``{"error": ...}``) on ``ready``:
    ``port`` is the stable symlink to use, ``pty`` the current slave it points to,
    ``emulator_pid`` the stimulator emulator's process (a new one after a replug).
    Runs until ``stop_event`` is set (or, in a child process, a few seconds after SIGTERM;
    Ctrl-C is ignored there: the parent orders the shutdown)."""
    from controller.process_watch import stop_on_signals
    # SIGTERM to the whole group (systemctl/docker stop): the stimulator must outlive the loop's
    # STOP, which the runner orders before stopping us; the grace is the fallback without it.
    stop_on_signals(stop_event, sigterm_grace_s=6.0)
    from controller.process_watch import stop_when_parent_dies
    stop_when_parent_dies(stop_event)
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl

    from hil_sim.emulator_process import EmulatorProcess
    from hil_sim.faults import DEVICE_KINDS, DeviceFaultInjector, FaultLog, FaultSchedule
    from hil_sim.outlet import PatientOutlet

    out = Path(session_dir) if session_dir else None
    link_dir = out if out is not None else Path(tempfile.mkdtemp(prefix="stimloop-hil-"))
    device = patient = outlet = injector = None
    fault_log = FaultLog()
    try:
        schedule = FaultSchedule(spec.get("faults") or [], fs_hz=spec["fs_hz"], n_channels=spec["n_channels"])
        patient = make_patient(spec)
        spiking = spec.get("model", "wendling") == "spiking"
        if spiking:
            # The outlet and the thread applying the device's pulses share the GIL: with the default
            # 5 ms switch interval one can hold the other for ms (as hil_sim/ads_sim.py).
            import sys
            sys.setswitchinterval(2e-4)
        # First sample slightly in the future so the controller is attached before data flows.
        # Spiking units come in ~1 ms chunks: paced by plain sleeps, spinning would take a core.
        source_id = spec.get("source_id") or f"stimloop-hil-{spec['patient']}"
        outlet = PatientOutlet(patient, spec["stream"], source_id,
                               spec.get("chunk_s", 1 / 64), pylsl.local_clock, t0=pylsl.local_clock() + 0.5,
                               faults=schedule, fault_log=fault_log, **({"spin_s": 0.0} if spiking else {}))

        def deliver(t_lsl: float, params) -> None:
            with outlet.lock:
                # A pulse just before the first sample (t0) lands on it: patient time starts at 0.
                patient.stimulate(max(0.0, t_lsl - outlet.t0), params)

        def stop_bursts(t_lsl: float, channels: list[int]) -> None:
            # A burst the device cut short (STOP, watchdog, HELLO) is cut in the patient too (the
            # spiking units get single ADS pulses: nothing to cut there).
            if hasattr(patient, "stop_stimulation"):
                with outlet.lock:
                    patient.stop_stimulation(max(0.0, t_lsl - outlet.t0), channels)

        def make_emulator(fd: int) -> EmulatorProcess:
            # Replugged emulators append to the same device log: one ground truth per session.
            return EmulatorProcess(fd, watchdog_s=spec.get("watchdog_s", 0.5), on_deliver=deliver,
                                   on_stop=stop_bursts, log_path=(out / "device_log.jsonl") if out else None)

        device = EmulatedDevice(make_emulator, link_dir / PORT_LINK_NAME)
        pty = device.plug()
        if schedule.kinds & DEVICE_KINDS:
            injector = DeviceFaultInjector(schedule, device, pylsl.local_clock, outlet.t0, fault_log).start()
        from controller.low_latency import freeze_gc
        freeze_gc()   # a full collection would hold the outlet's next chunk for tens of ms
        ready.put({"stream": spec["stream"], "source_id": source_id, "port": str(device.link_path), "pty": pty,
                   "t0": outlet.t0, "emulator_pid": device.emulator.pid})
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
            with outlet.lock:  # the emulator may still deliver into the patient
                write_ground_truth(out / "ground_truth.json", patient, outlet.t0, pylsl.local_clock(),
                                   faults=fault_log.records(),
                                   fault_errors=injector.errors if injector is not None else None,
                                   outlet=outlet, stimulator_only=bool(spec.get("stimulator_only", False)))


#: the simulator's chunk push times, beside ``ground_truth.json`` (``write_ground_truth``)
PUSH_FILE = "push_t.f64"


def write_ground_truth(path: Path, patient, t0: float, end_t: float, faults: list[dict] | None = None,
                       fault_errors: list[str] | None = None, outlet=None, stimulator_only: bool = False) -> None:
    """Seizures on the session clock (``t0 + patient time``), written atomically.

    ``outlet`` (the :class:`~hil_sim.outlet.PatientOutlet`): when each chunk was pushed goes to
    ``push_t.f64`` beside ``path`` (float64, one per chunk), described under ``"push"``, so a
    session measures its controller from the moment the data left the amplifier.

    ``faults``: injected faults (:meth:`hil_sim.faults.FaultLog.records`), each
    with its configured fields and real ``t_start``/``t_end`` on the session clock.
    A spiking simulator (``SpikingUnits``) writes ``"spiking"`` instead of seizures
    (see :func:`spiking_truth`).

    ``stimulator_only``: the session recorded another source (its own LSL stream or board) and
    used the simulator for its stimulator only. Then the patient is not what was recorded, so no
    seizures, spikes or push times are written (a report would score the user's data against
    them), only ``"stimulator_only": true`` and the device faults.
    """
    from hil_sim.spiking import SpikingUnits
    data: dict = {"t0": t0, "end_t": end_t, "clock": "session"}
    if stimulator_only:
        data.update(stimulator_only=True, seizures=[])
        data["faults"] = list(faults or [])
        if fault_errors:
            data["fault_errors"] = list(fault_errors)
        _write_atomic(path, data)
        return
    if isinstance(patient, SpikingUnits):
        data.update(model="spiking", seizures=[], spiking=spiking_truth(patient, t0))
    else:
        gt = patient.ground_truth.to_dict()
        data["seizures"] = [{"onset_t": t0 + s["onset_s"],
                             "offset_t": (t0 + s["offset_s"]) if s.get("offset_s") is not None else None,
                             "terminated_by_stim": bool(s.get("terminated_by_stim", False))}
                            for s in gt.get("seizures", [])]
        data["patient"] = gt
    if outlet is not None and outlet.n_push_t:
        outlet.push_times().astype("<f8").tofile(Path(path).parent / PUSH_FILE)
        data["push"] = {"file": PUSH_FILE, "chunk_n": outlet.chunk_n, "first_sample": outlet.push_first_sample,
                        "n_chunks": int(outlet.n_push_t), "fs_hz": float(patient.fs_hz)}
    data["faults"] = list(faults or [])
    if fault_errors:
        data["fault_errors"] = list(fault_errors)
    _write_atomic(path, data)


def spiking_truth(units, t0: float) -> dict:
    """What the spiking simulator knows, on the session clock (``t0 + unit time``).

    ``trigger_spikes`` (``t`` of each true trough, ``channel``), ``target_spikes``
    (``t``, ``cause``), ``pulses`` (each delivered burst with its onset ``t`` and
    artifact length), ``weight`` (the trigger → target STDP weight over time).
    """
    gt = units.ground_truth()
    tr, ta, w = gt["trigger_spikes"], gt["target_spikes"], gt["weight"]
    return {
        "fs_hz": gt["fs_hz"], "duration_s": gt["duration_s"], "n_channels": units.n_channels,
        "trigger_channels": list(units.trigger_channels),
        "target_channel": units.target_channel, "stim_site_channel": units.stim_site_channel,
        "trigger_spikes": {"t": (tr["t_s"] + t0).tolist(), "channel": tr["channel"].tolist(),
                           "unit": tr["unit"].tolist()},
        "target_spikes": {"t": (ta["t_s"] + t0).tolist(), "cause": list(ta["cause"])},
        "pulses": [{**p, "t": p["t_s"] + t0} for p in gt["pulses"]],
        "weight": {"t": (w["t_s"] + t0).tolist(), "w": w["w"].tolist()},
        "w_init": float(w["w"][0]), "w_final": float(gt["w_final"]),
    }


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
