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

from hil_sim.faults import SIGNAL_KINDS, STREAM_KINDS, FaultLog, FaultSchedule, log_signal_faults  # noqa: E402
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

    ``faults`` (a :class:`~hil_sim.faults.FaultSchedule`) are applied in the
    chunk path: signal faults to the samples/timestamps, ``stream_stall`` by
    holding (or discarding) chunks, ``stream_loss`` by destroying the outlet and
    creating a new one (same name and source_id, new uid) afterwards. What was
    injected, and when on the LSL clock, goes to ``fault_log``.
    """

    def __init__(self, patient: SimulatedPatient, stream_name: str = "stimloop-sim",
                 source_id: str | None = None, chunk_s: float = 1 / 64,
                 clock: Callable[[], float] = pylsl.local_clock, t0: float | None = None,
                 lock: threading.Lock | None = None, faults: FaultSchedule | None = None,
                 fault_log: FaultLog | None = None, spin_s: float = _SPIN_S) -> None:
        if not (0 < chunk_s <= 1.0):
            raise ValueError(f"PatientOutlet chunk_s={chunk_s!r}: expected a duration in (0, 1] s")
        self.patient = patient
        self.chunk_n = max(1, int(round(chunk_s * patient.fs_hz)))
        if not (0 <= spin_s <= 0.01):
            raise ValueError(f"PatientOutlet spin_s={spin_s!r}: expected 0..0.01 s")
        # 0: plain sleep. Spinning before 1 ms chunks would take a whole core (hil_sim/ads_sim.py).
        self.spin_s = float(spin_s)
        self.clock = clock
        self.t0 = t0
        self.lock = lock if lock is not None else threading.Lock()
        self.started = threading.Event()
        self.stream_name = stream_name
        self.info = make_stream_info(patient, stream_name, source_id)
        self.source_id = self.info.source_id()
        self.outlet: pylsl.StreamOutlet | None = pylsl.StreamOutlet(self.info, self.chunk_n, 360)
        self.n_pushed = 0
        # When each chunk left (LSL clock), chunk k holding samples from push_first_sample + k * chunk_n:
        # the ground truth a session measures the controller from (not from the spike's place in its chunk).
        # NaN for a chunk that did not leave whole, in one push, with its own nominal timestamps (faults).
        self._push_t = np.full(4096, np.nan)
        self.n_push_t = 0
        self.push_first_sample: int | None = None
        if faults is not None and not (faults.kinds & (SIGNAL_KINDS | STREAM_KINDS)):
            faults = None  # nothing for the outlet to do: keep the plain push path
        if faults is not None and faults.fs_hz is not None and faults.fs_hz != patient.fs_hz:
            raise ValueError(f"PatientOutlet faults built for fs_hz={faults.fs_hz!r}, the patient runs at "
                             f"{patient.fs_hz!r} Hz: build the FaultSchedule with the patient's rate")
        self.faults = faults
        self.fault_log = fault_log if fault_log is not None else FaultLog()
        self._stall: int | None = None                  # schedule index of the running stall
        self._backlog: list[tuple[np.ndarray, np.ndarray]] = []
        self._loss: int | None = None                   # schedule index of the running loss
        self._ts_base = np.arange(self.chunk_n, dtype=np.float64) / patient.fs_hz

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
        p, fs, clock, spin = self.patient, self.patient.fs_hz, self.clock, self.spin_s
        if self.t0 is None:
            self.t0 = clock() - p.t
        self.started.set()
        t_end = None if duration_s is None else p.t + duration_s
        while not stop_event.is_set():
            if t_end is not None and p.t >= t_end - 1e-12:
                break
            n_next = p.n_samples + self.chunk_n   # only this thread steps the patient
            t_last = self.t0 + (n_next - 1) / fs
            # Sleep-then-spin until the last sample of the chunk "exists".
            while True:
                wait = t_last - clock()
                if wait <= 0 or stop_event.is_set():
                    break
                # sleep(0) in the spin releases the GIL: the emulator's reader shares this
                # process and must stamp a command's arrival at once, not after the spin.
                time.sleep(wait - spin if wait > spin else 0)
            if clock() < t_last:
                break  # stopped while waiting: a chunk never leaves before its last sample exists
            # Computed only now that its last sample exists, as an amplifier measures it: a pulse
            # delivered while we waited is in it (computed before the wait, a burst starting within
            # one chunk of a push never showed in the signal).
            with self.lock:
                n0 = p.n_samples
                x = p.step(self.chunk_n)
            if self.faults is None:
                # Stamped as the chunk is handed over, not after push_chunk returns: the reader may
                # have it before the call returns (a 32-channel chunk's call: p50 30 µs, p99 ~250 µs
                # here), and a push time after the read would make latency negative.
                t_push = clock()
                self.outlet.push_chunk(x, t_last, True)
                self._record_push(n0, t_push)
                self.n_pushed += x.shape[0]
            else:  # chunks may be altered, held, split or dropped
                self._push_with_faults(x, n0)
        return self.t0

    # ------------------------------------------------------------ faults

    def _record_push(self, n0: int, t: float) -> None:
        """Chunk starting at sample ``n0`` left whole at ``t``; chunks skipped since stay NaN."""
        if self.push_first_sample is None:
            self.push_first_sample = n0
        k = (n0 - self.push_first_sample) // self.chunk_n
        while k >= self._push_t.size:
            self._push_t = np.concatenate([self._push_t, np.full_like(self._push_t, np.nan)])
        self._push_t[k] = t
        self.n_push_t = max(self.n_push_t, k + 1)

    def _skip_push(self, n0: int) -> None:
        """Chunk starting at sample ``n0`` did not leave whole (dropped, shortened, split or re-stamped)."""
        if self.push_first_sample is None:
            self.push_first_sample = n0
        self.n_push_t = max(self.n_push_t, (n0 - self.push_first_sample) // self.chunk_n + 1)

    def push_times(self) -> np.ndarray:
        """LSL-clock push time of every chunk so far, chunk k holding samples from
        ``push_first_sample + k * chunk_n``: NaN for a chunk that did not leave whole, in one push,
        with its own nominal timestamps (dropped by a stream fault, cut by a ``sample_gap``,
        re-stamped by a ``clock_jump``); a chunk held by a backlog stall has the time it left."""
        return self._push_t[:self.n_push_t]

    def _push_with_faults(self, x: np.ndarray, n0: int) -> None:
        """The fault-aware chunk path: signal faults, then stream loss, then stall."""
        fs, faults, log, n = self.patient.fs_hz, self.faults, self.fault_log, x.shape[0]
        t_first = n0 / fs
        ts_nominal = self._ts_base[:n] + (self.t0 + t_first)
        x, ts = faults.apply_signal_faults(x, ts_nominal, t_first)
        log_signal_faults(faults, log, n0, n, self.lsl_time)
        # nan_burst and saturation change values only; sample_gap and clock_jump change the rows or
        # their timestamps, so the chunk no longer maps to its samples by position.
        whole = ts is ts_nominal or (ts.shape == ts_nominal.shape and np.array_equal(ts, ts_nominal))
        if not whole:
            self._skip_push(n0)
        # Edges are decided per chunk on its first sample: a chunk is all-in or all-out.
        loss = faults.active_index("stream_loss", t_first)
        if loss is not None:
            if self.outlet is not None:
                t_lost = self.clock()  # before: destroying an outlet blocks while liblsl joins its threads
                self.outlet = None  # last reference: liblsl destroys the outlet, inlets see it vanish
                self._loss = loss
                log.start(loss, faults.specs[loss], t_lost, first_lost_t=self.lsl_time(t_first))
            self._skip_push(n0)
            return  # samples produced during the outage never leave the amplifier
        if self.outlet is None:
            self.info = make_stream_info(self.patient, self.stream_name, self.source_id)
            self.outlet = pylsl.StreamOutlet(self.info, self.chunk_n, 360)
            if self._loss is not None:
                log.end(self._loss, self.clock(), resumed_at_t=self.lsl_time(t_first))
                self._loss = None
        stall = faults.active_index("stream_stall", t_first)
        if stall is not None:
            if self._stall is None:
                self._stall = stall
                log.start(stall, faults.specs[stall], self.clock(), first_held_t=self.lsl_time(t_first))
            if faults.specs[stall].resume_mode == "backlog":
                self._backlog.append((x, ts, n0, whole))
            else:
                self._skip_push(n0)
            return
        if self._stall is not None:
            for xb, tb, nb, wb in self._backlog:
                self._push_segments(xb, tb, nb if wb else None)
            log.end(self._stall, self.clock(), n_backlog=int(sum(b[0].shape[0] for b in self._backlog)))
            self._backlog.clear()
            self._stall = None
        self._push_segments(x, ts, n0 if whole else None)

    def _push_segments(self, x: np.ndarray, ts: np.ndarray, n0: int | None = None) -> None:
        """Push with the chunk's own timestamps: one push per regularly spaced run.

        liblsl stamps a chunk from its last sample back at the nominal rate, so a
        gap or clock jump inside a chunk needs the chunk split there. ``n0``: the
        chunk is whole (starting at sample ``n0``) and its push time is recorded.
        """
        n = x.shape[0]
        if n == 0:
            return
        if n0 is not None:  # whole, nominal timestamps: one push, stamped as it is handed over
            t_push = self.clock()
            self.outlet.push_chunk(x, float(ts[-1]), True)
            self._record_push(n0, t_push)
            self.n_pushed += n
            return
        fs = self.patient.fs_hz
        cuts = np.flatnonzero(np.abs(np.diff(ts) - 1.0 / fs) > 0.5 / fs) + 1
        start = 0
        for stop in (*cuts.tolist(), n):
            self.outlet.push_chunk(x[start:stop], float(ts[stop - 1]), True)
            start = stop
        self.n_pushed += n


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
