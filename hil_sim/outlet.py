"""Real-time LSL outlet pacing a :class:`~hil_sim.patient.SimulatedPatient`.

Patient time maps to the LSL clock as ``t_lsl = t0 + t_patient``: the sample
with patient time t carries the LSL timestamp t0 + t, and a chunk is pushed
once the clock has passed its last sample (a sample cannot leave an amplifier
before it has been measured). Deadlines are computed from ``t0`` and the sample
count, never accumulated, so the stream cannot drift; waiting is sleep-then-spin
(REFERENCE.md §1: plain ``time.sleep`` is up to ~1.8 ms late, spinning the last
stretch brings it to ~10 µs).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

try:  # the loopback-only LSL config must be in place before liblsl loads
    from controller.lsl_config import ensure_lsl_config
except ImportError:  # pragma: no cover - only when the controller package is absent
    ensure_lsl_config = None
if ensure_lsl_config is not None:
    ensure_lsl_config()
import pylsl  # noqa: E402

from hil_sim.patient import SimulatedPatient  # noqa: E402

__all__ = ["PatientOutlet", "stream_patient", "make_stream_info"]

_SPIN_S = 0.001  # wake this long before a deadline and spin the rest


def make_stream_info(patient: SimulatedPatient, stream_name: str = "stimloop-sim",
                     source_id: str | None = None) -> "pylsl.StreamInfo":
    """LSL StreamInfo for ``patient``: type EEG, float32, nominal rate fs, labels and units (µV)."""
    sid = source_id if source_id is not None else f"stimloop-sim-{patient.seed}"
    info = pylsl.StreamInfo(stream_name, "EEG", patient.n_channels, patient.fs_hz, pylsl.cf_float32, sid)
    desc = info.desc()
    desc.append_child_value("manufacturer", "stimloop hil_sim")
    chans = desc.append_child("channels")
    for name in patient.channel_names:
        ch = chans.append_child("channel")
        ch.append_child_value("label", name)
        ch.append_child_value("unit", "microvolts")
        ch.append_child_value("type", "iEEG")
    return info


class PatientOutlet:
    """Streams a patient over an LSL outlet in real time.

    ``lock`` guards the patient: hold it when calling ``patient.stimulate`` from
    another thread. ``t0`` (LSL clock at patient time 0) is known once
    :meth:`run` has started (``started`` is set then).
    """

    def __init__(self, patient: SimulatedPatient, stream_name: str = "stimloop-sim",
                 source_id: str | None = None, chunk_s: float = 1 / 64,
                 clock: Callable[[], float] = pylsl.local_clock, t0: float | None = None,
                 lock: threading.Lock | None = None) -> None:
        if not (0 < chunk_s <= 1.0):
            raise ValueError(f"PatientOutlet chunk_s={chunk_s!r}: expected a duration in (0, 1] s")
        self.patient = patient
        self.chunk_n = max(1, int(round(chunk_s * patient.fs_hz)))
        self.clock = clock
        self.t0 = t0
        self.lock = lock if lock is not None else threading.Lock()
        self.started = threading.Event()
        self.info = make_stream_info(patient, stream_name, source_id)
        self.source_id = self.info.source_id()
        self.outlet = pylsl.StreamOutlet(self.info, self.chunk_n, 360)
        self.n_pushed = 0

    def lsl_time(self, t_patient: float) -> float:
        """LSL clock time of patient time ``t_patient``."""
        if self.t0 is None:
            raise RuntimeError("PatientOutlet.lsl_time: t0 unknown, the outlet has not started")
        return self.t0 + t_patient

    def patient_time(self, t_lsl: float) -> float:
        """Patient time of LSL clock time ``t_lsl``."""
        if self.t0 is None:
            raise RuntimeError("PatientOutlet.patient_time: t0 unknown, the outlet has not started")
        return t_lsl - self.t0

    def run(self, stop_event: threading.Event, duration_s: float | None = None) -> float:
        """Push paced chunks until ``stop_event`` is set (or ``duration_s`` of patient time passed); return t0."""
        p, fs, clock = self.patient, self.patient.fs_hz, self.clock
        if self.t0 is None:
            self.t0 = clock() - p.t
        self.started.set()
        t_end = None if duration_s is None else p.t + duration_s
        while not stop_event.is_set():
            if t_end is not None and p.t >= t_end - 1e-12:
                break
            with self.lock:
                n_next = p.n_samples + self.chunk_n
                x = p.step(self.chunk_n)
            t_last = self.t0 + (n_next - 1) / fs
            # Sleep-then-spin until the last sample of the chunk "exists".
            while True:
                wait = t_last - clock()
                if wait <= 0 or stop_event.is_set():
                    break
                if wait > _SPIN_S:
                    time.sleep(wait - _SPIN_S)
            self.outlet.push_chunk(x, t_last, True)
            self.n_pushed += x.shape[0]
        return self.t0


def stream_patient(patient: SimulatedPatient, stream_name: str = "stimloop-sim",
                   source_id: str | None = None, chunk_s: float = 1 / 64,
                   stop_event: threading.Event | None = None,
                   clock: Callable[[], float] = pylsl.local_clock, t0: float | None = None,
                   on_start: Callable[[PatientOutlet], None] | None = None,
                   duration_s: float | None = None) -> float:
    """Stream ``patient`` over LSL in real time until ``stop_event`` is set; return t0.

    ``on_start(outlet)`` is called once the outlet exists and t0 is fixed, so a
    caller running this in a thread learns ``outlet.t0`` and ``outlet.lock``.
    """
    stop_event = stop_event if stop_event is not None else threading.Event()
    out = PatientOutlet(patient, stream_name, source_id, chunk_s, clock, t0)
    if out.t0 is None:
        out.t0 = clock() - patient.t
    if on_start is not None:
        on_start(out)
    return out.run(stop_event, duration_s)
