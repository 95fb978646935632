"""Fault injection for the hardware-in-the-loop simulator (and the simulated-time runner).

Three layers, from pure to imperative:

* :class:`FaultSpec` — one fault as configured (``[[faults]]`` in TOML), validated.
* :class:`FaultSchedule` — pure: which faults are active at a patient time, which
  start/end in ``[t0, t1)``, and :meth:`FaultSchedule.apply_signal_faults` for the
  faults that live in the samples (``nan_burst``, ``saturation``, ``sample_gap``,
  ``clock_jump``), vectorized per chunk.
* Hooks: :class:`FaultLog` (ground truth of what was injected, when),
  :class:`DeviceFaultInjector` (a thread in the HIL process that drives the
  emulator knobs and unplugs/replugs the pty), :func:`apply_sim_faults` (one call
  per chunk from the simulated-time runner). Stream-side faults (``stream_stall``,
  ``stream_loss``) are applied by :class:`hil_sim.outlet.PatientOutlet`, which
  owns the LSL outlet.

Times in a spec (``at_s``) are **patient time** (seconds since the patient's
first sample); the HIL process maps them to the LSL clock as ``t0 + at_s``.
See ``docs/faults.md``.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

__all__ = ["FaultKind", "FaultSpec", "FaultSchedule", "Transition", "FaultLog", "DeviceFaultInjector",
           "apply_sim_faults", "FaultConfigError", "FAULT_KINDS", "SIGNAL_KINDS", "STREAM_KINDS",
           "DEVICE_KINDS", "SIM_KINDS"]

FaultKind = Literal["stream_stall", "stream_loss", "sample_gap", "nan_burst", "saturation", "clock_jump",
                    "device_mute", "corrupt_frames", "device_unplug"]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]
#: applied to the samples/timestamps of a chunk (pure)
SIGNAL_KINDS = frozenset({"nan_burst", "saturation", "sample_gap", "clock_jump"})
#: applied by the LSL outlet (it owns the outlet object)
STREAM_KINDS = frozenset({"stream_stall", "stream_loss"})
#: applied to the stimulator emulator / its pty
DEVICE_KINDS = frozenset({"device_mute", "corrupt_frames", "device_unplug"})
#: what the simulated-time runner can reproduce (no LSL outlet, no pty there)
SIM_KINDS = frozenset(SIGNAL_KINDS | {"device_mute"})

# Fields each kind needs (required) and may have (optional); anything else is refused.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "stream_stall": (frozenset({"duration_s"}), frozenset({"resume"})),
    "stream_loss": (frozenset({"duration_s"}), frozenset()),
    "sample_gap": (frozenset({"n_samples"}), frozenset()),
    "nan_burst": (frozenset({"duration_s"}), frozenset({"channels"})),
    "saturation": (frozenset({"duration_s", "level_uv"}), frozenset({"channels"})),
    "clock_jump": (frozenset({"offset_s"}), frozenset()),
    "device_mute": (frozenset({"duration_s"}), frozenset()),
    "corrupt_frames": (frozenset({"n"}), frozenset()),
    "device_unplug": (frozenset({"duration_s"}), frozenset()),
}
_OPTIONAL_NAMES = ("duration_s", "n_samples", "channels", "level_uv", "offset_s", "n", "resume")

# Bounds that keep a schedule meaningful for a session; a longer fault is a config typo.
MAX_DURATION_S = 3600.0
MAX_CLOCK_JUMP_S = 86_400.0
MAX_CORRUPT_FRAMES = 10_000


class FaultConfigError(ValueError):
    """A fault list cannot be used (bad spec, unknown channel, kind not supported where asked)."""


class FaultSpec(BaseModel):
    """One scheduled fault. ``at_s`` is patient time (s); kind-specific fields:

    ============== ======================================================================
    stream_stall   ``duration_s``; ``resume`` = ``"backlog"`` (default: the held samples
                   are pushed at once when the stall ends, timestamps intact) or
                   ``"skip"`` (they are discarded: a timestamp gap after the stall)
    stream_loss    ``duration_s``: outlet destroyed, then a new outlet (same name and
                   source_id, new uid); samples of the outage are lost
    sample_gap     ``n_samples`` samples not sent: timestamps jump
    nan_burst      ``duration_s`` of NaN on ``channels`` (default: all)
    saturation     ``duration_s`` clipped at ±``level_uv`` on ``channels`` (default: all)
    clock_jump     ``offset_s`` added to every timestamp from ``at_s`` on (cumulative)
    device_mute    ``duration_s``: the emulator reads and discards everything
    corrupt_frames ``n`` replies with a flipped CRC bit (commands still executed)
    device_unplug  ``duration_s``: pty closed, stable port symlink removed; then a new pty
    ============== ======================================================================
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FaultKind
    at_s: float
    duration_s: float | None = None
    n_samples: int | None = None
    channels: tuple[int, ...] | None = None
    level_uv: float | None = None
    offset_s: float | None = None
    n: int | None = None
    resume: Literal["backlog", "skip"] | None = None

    @field_validator("at_s")
    @classmethod
    def _check_at(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"at_s={v!r}: expected a finite patient time >= 0 s")
        return v

    @model_validator(mode="after")
    def _check_fields(self) -> "FaultSpec":
        required, optional = _FIELDS[self.kind]
        given = {name for name in _OPTIONAL_NAMES if getattr(self, name) is not None}
        missing = sorted(required - given)
        if missing:
            raise ValueError(f"fault kind={self.kind!r} at_s={self.at_s}: missing {', '.join(missing)} "
                             f"(fields for {self.kind}: {', '.join(sorted(required | optional))})")
        extra = sorted(given - required - optional)
        if extra:
            raise ValueError(f"fault kind={self.kind!r} at_s={self.at_s}: {', '.join(extra)} does not apply "
                             f"(fields for {self.kind}: {', '.join(sorted(required | optional))})")
        d = self.duration_s
        if d is not None and not (math.isfinite(d) and 0 < d <= MAX_DURATION_S):
            raise ValueError(f"fault kind={self.kind!r}: duration_s={d!r}, expected 0 < duration_s <= "
                             f"{MAX_DURATION_S:g} s")
        if self.n_samples is not None and not 1 <= self.n_samples <= 10_000_000:
            raise ValueError(f"fault kind={self.kind!r}: n_samples={self.n_samples!r}, expected 1..10000000")
        if self.channels is not None:
            if len(self.channels) == 0:
                raise ValueError(f"fault kind={self.kind!r}: channels=[] is empty; omit it for all channels")
            if min(self.channels) < 0 or len(set(self.channels)) != len(self.channels):
                raise ValueError(f"fault kind={self.kind!r}: channels={list(self.channels)}, expected distinct "
                                 f"indices >= 0")
        lv = self.level_uv
        if lv is not None and not (math.isfinite(lv) and lv > 0):
            raise ValueError(f"fault kind={self.kind!r}: level_uv={lv!r}, expected a finite level > 0 µV")
        off = self.offset_s
        if off is not None and not (math.isfinite(off) and off != 0 and abs(off) <= MAX_CLOCK_JUMP_S):
            raise ValueError(f"fault kind={self.kind!r}: offset_s={off!r}, expected a non-zero jump with "
                             f"|offset_s| <= {MAX_CLOCK_JUMP_S:g} s")
        if self.n is not None and not 1 <= self.n <= MAX_CORRUPT_FRAMES:
            raise ValueError(f"fault kind={self.kind!r}: n={self.n!r}, expected 1..{MAX_CORRUPT_FRAMES} frames")
        return self

    @property
    def resume_mode(self) -> str:
        """``stream_stall`` only: ``"backlog"`` unless configured ``"skip"``."""
        return self.resume or "backlog"

    def end_s(self, fs_hz: float | None = None) -> float:
        """Patient time the fault ends: ``at_s`` for instantaneous kinds, ``inf`` for ``clock_jump``."""
        if self.duration_s is not None:
            return self.at_s + self.duration_s
        if self.kind == "sample_gap":
            if fs_hz is None:
                raise FaultConfigError("sample_gap end time needs fs_hz (the schedule was built without it)")
            return self.at_s + self.n_samples / fs_hz
        if self.kind == "clock_jump":
            return math.inf
        return self.at_s  # corrupt_frames: armed at at_s, ends when the n replies are out

    def to_record(self) -> dict:
        """The configured fields (``None`` ones left out), for ground truth."""
        d = self.model_dump(exclude_none=True)
        if "channels" in d:
            d["channels"] = list(d["channels"])
        return d


@dataclass(frozen=True, slots=True)
class Transition:
    """A fault edge in patient time: ``edge`` is ``"start"`` or ``"end"``."""

    t_s: float
    edge: str
    index: int          # position of the spec in the schedule
    spec: FaultSpec


class FaultSchedule:
    """A validated, time-ordered list of faults. Pure: no clock, no I/O.

    ``fs_hz`` is needed to turn sample counts into times and to apply signal
    faults; ``n_channels`` (if given) is checked against ``channels`` fields.
    Signal faults act on whole samples: a fault covers the samples whose index
    ``k = round(t_patient * fs_hz)`` lies in ``[ceil(at_s * fs_hz), +n)``.
    """

    def __init__(self, specs: Iterable[FaultSpec | dict] = (), fs_hz: float | None = None,
                 n_channels: int | None = None) -> None:
        if fs_hz is not None and not (math.isfinite(fs_hz) and fs_hz > 0):
            raise FaultConfigError(f"FaultSchedule fs_hz={fs_hz!r}: expected a finite rate > 0 Hz")
        parsed: list[FaultSpec] = []
        for i, s in enumerate(specs):
            if isinstance(s, FaultSpec):
                parsed.append(s)
                continue
            if not isinstance(s, dict):
                raise FaultConfigError(f"faults[{i}]={s!r}: expected a table with kind and at_s")
            try:
                parsed.append(FaultSpec.model_validate(s))
            except ValidationError as exc:
                msgs = "; ".join((f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
                                 + e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise FaultConfigError(f"faults[{i}] ({s.get('kind', '?')!r}): {msgs}") from None
        self.specs: tuple[FaultSpec, ...] = tuple(sorted(parsed, key=lambda f: f.at_s))
        self.fs_hz = None if fs_hz is None else float(fs_hz)
        self.n_channels = n_channels
        for i, f in enumerate(self.specs):
            if f.channels is not None and n_channels is not None and max(f.channels) >= n_channels:
                raise FaultConfigError(f"fault kind={f.kind!r} at_s={f.at_s}: channels={list(f.channels)}, "
                                       f"expected indices 0..{n_channels - 1} ({n_channels} channels)")
            if f.kind == "sample_gap" and self.fs_hz is None:
                raise FaultConfigError("FaultSchedule with a sample_gap needs fs_hz to place it in time")
        self._ends = tuple(f.end_s(self.fs_hz) for f in self.specs)
        # Signal faults as sample-index ranges [start, stop), precomputed once for the chunk path.
        sig = [(i, f) for i, f in enumerate(self.specs) if f.kind in SIGNAL_KINDS]
        self._signal = tuple(f for _, f in sig)
        self._signal_index = tuple(i for i, _ in sig)
        if sig and self.fs_hz is None:
            raise FaultConfigError("FaultSchedule with signal faults (nan_burst, saturation, sample_gap, "
                                   "clock_jump) needs fs_hz")
        fs = self.fs_hz or 1.0
        starts = np.array([math.ceil(f.at_s * fs - 1e-6) for f in self._signal], dtype=np.int64)
        stops = np.array([_stop_index(f, s, fs) for f, s in zip(self._signal, starts)], dtype=np.int64)
        self._sig_start, self._sig_stop = starts, stops
        self._chan_idx = tuple(slice(None) if f.channels is None else np.asarray(f.channels, np.intp)
                               for f in self._signal)

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.specs)

    def __bool__(self) -> bool:
        return bool(self.specs)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(f.kind for f in self.specs)

    def require_kinds(self, allowed: Iterable[str], where: str) -> None:
        """Raise :class:`FaultConfigError` if a fault kind cannot be injected by ``where``."""
        allowed = frozenset(allowed)
        bad = sorted(self.kinds - allowed)
        if bad:
            raise FaultConfigError(f"{where} cannot inject fault kind(s) {', '.join(bad)}; "
                                   f"supported there: {', '.join(sorted(allowed))}")

    def end_s(self, index: int) -> float:
        """End (patient time) of ``specs[index]``."""
        return self._ends[index]

    def sample_range(self, spec: FaultSpec) -> tuple[int, int]:
        """``[start, stop)`` sample indices of a signal fault (stop may be a huge int for clock_jump)."""
        k = self._signal.index(spec)
        return int(self._sig_start[k]), int(self._sig_stop[k])

    def active(self, t_s: float, kinds: Iterable[str] | None = None) -> list[FaultSpec]:
        """Faults with ``at_s <= t_s < end`` (``clock_jump`` stays active; ``corrupt_frames`` never is)."""
        ks = None if kinds is None else frozenset(kinds)
        return [f for f, end in zip(self.specs, self._ends)
                if f.at_s <= t_s < end and (ks is None or f.kind in ks)]

    def active_kind(self, kind: str, t_s: float) -> FaultSpec | None:
        """The first active fault of ``kind`` at ``t_s``, or ``None``."""
        i = self.active_index(kind, t_s)
        return None if i is None else self.specs[i]

    def active_index(self, kind: str, t_s: float) -> int | None:
        """Schedule index of the first active fault of ``kind`` at ``t_s``, or ``None``."""
        for i, (f, end) in enumerate(zip(self.specs, self._ends)):
            if f.kind == kind and f.at_s <= t_s < end:
                return i
        return None

    def starting(self, t0_s: float, t1_s: float) -> list[FaultSpec]:
        """Faults whose ``at_s`` lies in ``[t0_s, t1_s)``."""
        return [f for f in self.specs if t0_s <= f.at_s < t1_s]

    def ending(self, t0_s: float, t1_s: float) -> list[FaultSpec]:
        """Faults with a duration whose end lies in ``[t0_s, t1_s)``."""
        return [f for f, end in zip(self.specs, self._ends)
                if end != f.at_s and t0_s <= end < t1_s]

    def transitions(self, t0_s: float, t1_s: float, kinds: Iterable[str] | None = None) -> list[Transition]:
        """Start and end edges in ``[t0_s, t1_s)``, time-ordered (ends before starts at equal times)."""
        ks = None if kinds is None else frozenset(kinds)
        out = []
        for i, (f, end) in enumerate(zip(self.specs, self._ends)):
            if ks is not None and f.kind not in ks:
                continue
            if t0_s <= f.at_s < t1_s:
                out.append(Transition(f.at_s, "start", i, f))
            if end != f.at_s and math.isfinite(end) and t0_s <= end < t1_s:
                out.append(Transition(end, "end", i, f))
        out.sort(key=lambda tr: (tr.t_s, tr.edge != "end", tr.index))
        return out

    def device_muted(self, t_s: float) -> bool:
        """True while a ``device_mute`` fault is active at ``t_s``."""
        return self.active_kind("device_mute", t_s) is not None

    def clock_offset_s(self, t_s: float) -> float:
        """Sum of the ``clock_jump`` offsets in force at patient time ``t_s``."""
        return float(sum(f.offset_s for f in self.specs if f.kind == "clock_jump" and f.at_s <= t_s))

    # ------------------------------------------------------------ signal faults

    def touches(self, t0_patient: float, n: int) -> bool:
        """True if a signal fault covers any of the ``n`` samples starting at patient time ``t0_patient``."""
        if not self._signal or n <= 0:
            return False
        i0 = int(round(t0_patient * self.fs_hz))
        return bool(np.any((self._sig_start < i0 + n) & (self._sig_stop > i0)))

    def apply_signal_faults(self, x: np.ndarray, ts: np.ndarray, t0_patient: float) -> tuple[np.ndarray, np.ndarray]:
        """Apply nan_burst, saturation, clock_jump and sample_gap to one chunk.

        ``x`` ``(n, ch)`` and ``ts`` ``(n,)`` are consecutive samples, the first at
        patient time ``t0_patient``. Returns ``(x, ts)``: the inputs themselves
        when no fault touches the chunk (no copy), else new arrays (inputs are
        never modified). ``sample_gap`` removes rows, so the result can be shorter.
        """
        n = x.shape[0]
        if ts.shape != (n,):
            raise ValueError(f"apply_signal_faults: ts shape {ts.shape}, expected ({n},) to match x {x.shape}")
        if x.ndim != 2 or (self.n_channels is not None and x.shape[1] != self.n_channels):
            raise ValueError(f"apply_signal_faults: x shape {x.shape}, expected (n, {self.n_channels or 'ch'})")
        if not self._signal or n == 0:
            return x, ts
        i0 = int(round(t0_patient * self.fs_hz))
        i1 = i0 + n
        hit = np.flatnonzero((self._sig_start < i1) & (self._sig_stop > i0))
        if hit.size == 0:
            return x, ts
        x_out, ts_out, keep = x, ts, None
        for k in hit:
            f = self._signal[k]
            a = int(max(self._sig_start[k], i0) - i0)
            b = int(min(self._sig_stop[k], i1) - i0)
            ch = self._chan_idx[k]
            if f.kind == "nan_burst" or f.kind == "saturation":
                if x_out is x:
                    x_out = x.copy()
                if f.kind == "nan_burst":
                    x_out[a:b, ch] = np.nan
                else:
                    lv = np.float32(f.level_uv)
                    x_out[a:b, ch] = np.clip(x_out[a:b, ch], -lv, lv)
            elif f.kind == "clock_jump":
                if ts_out is ts:
                    ts_out = ts.copy()
                ts_out[a:] += f.offset_s
            else:  # sample_gap
                if keep is None:
                    keep = np.ones(n, dtype=bool)
                keep[a:b] = False
        if keep is not None:
            x_out, ts_out = x_out[keep], ts_out[keep]
        return x_out, ts_out


def _stop_index(f: FaultSpec, start: int, fs: float) -> int:
    if f.kind == "clock_jump":
        return np.iinfo(np.int64).max // 2
    if f.kind == "sample_gap":
        return start + int(f.n_samples)
    return start + max(1, int(round(f.duration_s * fs)))


# ---------------------------------------------------------------- ground truth

class FaultLog:
    """Ground truth of injected faults: one record per fault, with its real start/end.

    Thread-safe (the outlet thread and the device injector thread both write).
    ``t_start``/``t_end`` are session-clock seconds (LSL clock in the HIL
    process, virtual clock in simulated time); ``t_end`` stays ``None`` if the
    session ended first.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[dict] = []
        self._by_key: dict[object, dict] = {}

    def start(self, key: object, spec: FaultSpec, t_start: float, **extra) -> dict:
        """Record that fault ``key`` (e.g. its schedule index) started at ``t_start``; idempotent per key."""
        with self._lock:
            rec = self._by_key.get(key)
            if rec is None:
                rec = {**spec.to_record(), "t_start": float(t_start), "t_end": None, **extra}
                self._by_key[key] = rec
                self._records.append(rec)
            return rec

    def end(self, key: object, t_end: float, **extra) -> None:
        """Record the end of fault ``key`` (ignored if it never started or already ended)."""
        with self._lock:
            rec = self._by_key.get(key)
            if rec is not None and rec["t_end"] is None:
                rec["t_end"] = float(t_end)
                rec.update(extra)

    def started(self, key: object) -> bool:
        with self._lock:
            return key in self._by_key

    def records(self) -> list[dict]:
        """Copies of the records in start order."""
        with self._lock:
            return [dict(r) for r in sorted(self._records, key=lambda r: r["t_start"])]


def log_signal_faults(schedule: FaultSchedule, log: FaultLog, i0: int, n: int, to_clock: Callable[[float], float],
                      **extra) -> None:
    """Record signal faults touched by samples ``[i0, i0 + n)``: start/end at their sample times.

    ``to_clock(t_patient)`` maps patient time to the session clock. The end of a
    fault is the time just after its last affected sample (``clock_jump`` never ends).
    """
    if not schedule._signal:
        return
    fs = schedule.fs_hz
    i1 = i0 + n
    for k in np.flatnonzero((schedule._sig_start < i1) & (schedule._sig_stop > i0)):
        f, key = schedule._signal[k], schedule._signal_index[k]
        s, e = int(schedule._sig_start[k]), int(schedule._sig_stop[k])
        if s >= i0:
            log.start(key, f, to_clock(s / fs), **extra)
        elif not log.started(key):  # the session began inside the fault
            log.start(key, f, to_clock(i0 / fs), **extra)
        if f.kind != "clock_jump" and e <= i1:
            log.end(key, to_clock(e / fs))


# ---------------------------------------------------------------- simulated time

def apply_sim_faults(schedule: FaultSchedule, x: np.ndarray, ts: np.ndarray, t0_patient: float,
                     stimulator=None, log: FaultLog | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of the simulated-time runner: signal faults, device mute, ground truth.

    ``ts`` are virtual-clock timestamps of the chunk (patient time there),
    ``t0_patient`` the patient time of its first sample. Sets
    ``stimulator.set_mute(...)`` to whether a ``device_mute`` fault covers the
    chunk's first sample (chunk granularity), records started/ended faults in
    ``log`` on the virtual clock, and returns ``schedule.apply_signal_faults(x, ts, t0_patient)``.
    Call :meth:`FaultSchedule.require_kinds` with :data:`SIM_KINDS` once at start-up.
    """
    n = x.shape[0]
    fs = schedule.fs_hz
    if log is not None and n:
        i0 = int(round(t0_patient * fs))
        log_signal_faults(schedule, log, i0, n, lambda t: t)
        for tr in schedule.transitions(t0_patient, t0_patient + n / fs, kinds=("device_mute",)):
            if tr.edge == "start":
                log.start(tr.index, tr.spec, tr.t_s)
            else:
                log.end(tr.index, tr.t_s)
    if stimulator is not None:
        stimulator.set_mute(schedule.device_muted(t0_patient))
    return schedule.apply_signal_faults(x, ts, t0_patient)


# ---------------------------------------------------------------- HIL device faults

class DeviceFaultInjector:
    """Drives device faults in the HIL process on the LSL clock (a thread body).

    ``device`` is the plug-able emulated device (:class:`hil_sim.process.EmulatedDevice`):
    ``set_mute(bool)``, ``emulator`` (``corrupt_next(n)``, ``counters``),
    ``unplug() -> str`` and ``plug() -> str`` (pty paths). A fault at patient
    time ``at_s`` is applied at ``t0 + at_s``; the sleep wakes within a few ms,
    and the recorded ``t_start``/``t_end`` are the clock readings when the knob
    was actually turned. ``corrupt_frames`` ends when the emulator has sent the
    ``n`` corrupted replies (checked every ``poll_s``).
    """

    def __init__(self, schedule: FaultSchedule, device, clock: Callable[[], float], t0: float,
                 log: FaultLog, poll_s: float = 0.01) -> None:
        self.schedule = schedule
        self.device = device
        self.clock = clock
        self.t0 = float(t0)
        self.log = log
        self.poll_s = float(poll_s)
        self.errors: list[str] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._plan = [(t0 + tr.t_s, tr) for tr in schedule.transitions(-math.inf, math.inf, kinds=DEVICE_KINDS)]

    def start(self) -> "DeviceFaultInjector":
        self._thread = threading.Thread(target=self.run, name="fault-injector", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def run(self) -> None:
        """Apply each device fault edge at its time until the plan is done or :meth:`stop`."""
        # schedule index -> (the emulator corrupting, its corrupted-replies count to reach)
        watching: dict[int, tuple[object, int]] = {}
        plan = list(self._plan)
        while not self._done.is_set() and (plan or watching):
            now = self.clock()
            for idx, (emu, target) in list(watching.items()):
                if self.device.emulator is not emu:
                    # unplugged (and maybe plugged again: a fresh emulator, fresh counters) before
                    # the corrupted replies were all sent: what was left of the fault went with it
                    self.log.end(idx, now, cut_short_by="device_unplug")
                    del watching[idx]
                elif emu.counters["replies_corrupted"] >= target:
                    self.log.end(idx, now)
                    del watching[idx]
            while plan and plan[0][0] <= now:
                _, tr = plan.pop(0)
                try:
                    self._apply(tr, watching)
                except Exception as exc:  # an injector failure must not kill the patient stream
                    self.errors.append(f"{tr.spec.kind} {tr.edge}: {type(exc).__name__}: {exc}")
            wait = self.poll_s if watching else math.inf
            if plan:
                wait = min(wait, plan[0][0] - self.clock())
            if wait == math.inf:
                break
            self._done.wait(max(wait, 0.0))

    def _apply(self, tr: Transition, watching: dict[int, int]) -> None:
        f, dev = tr.spec, self.device
        if f.kind == "device_mute":
            # From the whole schedule, not this edge: when two mutes overlap, the first to end must
            # not unmute the device while the other holds (as the simulated-time runner does).
            dev.set_mute(self.schedule.device_muted(tr.t_s))
            if tr.edge == "start":
                self.log.start(tr.index, f, self.clock())
            else:
                self.log.end(tr.index, self.clock())
        elif f.kind == "corrupt_frames":
            emu = dev.emulator
            if emu is None:   # unplugged at that moment: no device to corrupt replies of
                self.log.start(tr.index, f, self.clock())
                self.log.end(tr.index, self.clock(), skipped="device unplugged")
                return
            watching[tr.index] = (emu, emu.counters["replies_corrupted"] + f.n)
            emu.corrupt_next(f.n)
            self.log.start(tr.index, f, self.clock())
        elif f.kind == "device_unplug":
            if tr.edge == "start":
                # Stamped before: the controller can see the port go (a heartbeat's write failing)
                # while unplug() is still returning, 0.1 ms before a stamp taken after it.
                t0 = self.clock()
                old = dev.unplug()
                self.log.start(tr.index, f, t0, old_pty=old)
            else:
                new = dev.plug()
                self.log.end(tr.index, self.clock(), new_pty=new)


# ---------------------------------------------------------------- benchmark

def bench(n_iter: int = 20_000, chunk_n: int = 8, n_channels: int = 16, fs_hz: float = 512.0) -> dict:
    """Cost of :meth:`FaultSchedule.apply_signal_faults` per chunk: untouched vs inside a fault."""
    import time

    sched = FaultSchedule([{"kind": "nan_burst", "at_s": 1.0, "duration_s": 1e3, "channels": [0, 3]},
                           {"kind": "saturation", "at_s": 1.0, "duration_s": 1e3, "level_uv": 50.0},
                           {"kind": "sample_gap", "at_s": 1.0, "n_samples": 3},
                           {"kind": "clock_jump", "at_s": 1.0, "offset_s": 0.5}], fs_hz=fs_hz, n_channels=n_channels)
    x = np.random.default_rng(0).standard_normal((chunk_n, n_channels)).astype(np.float32)
    ts = np.arange(chunk_n) / fs_hz
    out = {"chunk_n": chunk_n, "n_channels": n_channels, "fs_hz": fs_hz, "n_iter": n_iter}
    for label, t0p in (("untouched", 0.0), ("all_four_faults", 1.0)):
        lat = np.empty(n_iter)
        for i in range(n_iter):
            t = time.perf_counter_ns()
            sched.apply_signal_faults(x, ts, t0p)
            lat[i] = time.perf_counter_ns() - t
        out[label] = {"p50_us": float(np.percentile(lat, 50) / 1e3), "p99_us": float(np.percentile(lat, 99) / 1e3),
                      "max_us": float(lat.max() / 1e3)}
    return out


if __name__ == "__main__":
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m hil_sim.faults", description="benchmark the signal-fault applier")
    ap.add_argument("--out", default=None, help="JSON file (default: stdout)")
    ap.add_argument("--n-iter", type=int, default=20_000)
    args = ap.parse_args()
    text = json.dumps(bench(args.n_iter), indent=1)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
