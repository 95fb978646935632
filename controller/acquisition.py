"""The acquisition process: source → shared ring, plus a crash-safe raw recording.

``run_acquisition`` is the body of a process (spawn-safe: it takes only plain
data). ``start_acquisition`` launches it. In a session with a spike policy the loop
process pulls the source itself (the fast path, ``controller.loop``), and this
process only follows the ring and records it (``follow=``). ``load_raw`` reads a recording back,
also after the process was killed with SIGKILL.

Raw recording layout in ``raw_dir``:

- ``samples.f32``: float32 little-endian, sample-major ``(n, n_channels)``, appended;
- ``timestamps.f64``: float64 little-endian ``(n,)``, session clock, appended;
- ``meta.json``: ``n_channels``, ``fs_hz``, ``source`` (the source's ``SourceInfo``: ``channel_names``,
  ``units``, ...; :func:`source_meta`) and, once the first samples are written, ``start_utc``:
  the wall-clock UTC time of sample 0 (ISO 8601, microseconds), which the EDF export uses.

Data go to the kernel with ``os.write`` once about 64 KiB are staged
(``RawRecorder.flush_bytes``), and at least every ``raw_flush_s`` (1 s): after a SIGKILL at most that
much is lost, and a half-written last record is
ignored by :func:`load_raw`. (Power loss is another matter: no fsync on the
real-time path.) A write that fails partway (disk full) is cut back to the last
whole record in both files before the error goes up, and the staged samples
stay staged, so a later flush writes them once, in place.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np

from controller.events import Event, EventKind
from controller.lsl_config import ensure_lsl_config
from controller.recorder import read_json_object

SAMPLES_FILE = "samples.f32"
TIMESTAMPS_FILE = "timestamps.f64"
META_FILE = "meta.json"


class EventSink:
    """Buffers events and hands them on at most every ``flush_s``.

    ``target`` is a path (the session's JSON-lines event log,
    :class:`controller.recorder.EventLog`) or an object with ``put`` (a
    multiprocessing queue; events are put as they come).
    """

    def __init__(self, target, flush_s: float = 0.5):
        from controller.recorder import EventLog

        self.flush_s = flush_s
        self._queue = target if hasattr(target, "put") else None
        self._log = None
        if self._queue is None and target is not None:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._log = EventLog(target, flush_interval_s=flush_s)
        # The caller's clock, not ours: -inf makes the first maybe_flush write, whatever clock it passes.
        self._last_flush = float("-inf")

    def emit(self, event: Event) -> None:
        if self._queue is not None:
            self._queue.put(event)
        elif self._log is not None:
            self._log.append(event)

    def due(self, now: float) -> bool:
        """``flush_s`` has passed since the last timed flush (``now`` on the caller's clock)."""
        return now - self._last_flush >= self.flush_s

    def maybe_flush(self, now: float) -> None:
        if self.due(now):
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class RawRecorder:
    """Append-only raw recording with a preallocated staging buffer, written in pieces of about
    ``flush_bytes`` and at least every ``flush_s``.

    Small pieces keep the acquisition's pull loop moving: one second of 30 kHz × 32 channels
    (3.8 MB) written at once held it for 0.7–6.6 ms on the CI VM, and the chunks that arrived
    meanwhile reached the loop that much later; a 64 KiB write took 0.02 / 0.04 ms (p50 / p99),
    at about the same cost per MB (docs/performance_log.md, "Spike-triggered path in a session").

    Reopening an existing recording with the same channel count appends to it,
    after trimming a torn tail so samples and timestamps stay aligned.
    """

    def __init__(self, raw_dir: str | Path, n_channels: int, fs_hz: float, meta: dict | None = None,
                 flush_s: float = 1.0, stage_samples: int | None = None, session_clock=None,
                 wall_clock=time.time, flush_bytes: int = 64 * 1024):
        """``session_clock`` (optional): the clock the timestamps are on (``pylsl.local_clock``);
        with it, ``start_utc`` is written into ``meta.json`` when the first samples are. Leave it
        out when the timestamps are not on a real clock (the simulated runner's virtual time)."""
        self.raw_dir = Path(raw_dir)
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.n_channels = int(n_channels)
        self.flush_s = float(flush_s)
        # Staged rows (samples + timestamp) that make a write of about flush_bytes; at least one.
        self._flush_rows = max(1, int(flush_bytes) // (4 * self.n_channels + 8))
        meta_path = self.raw_dir / META_FILE
        s_path, t_path = self.raw_dir / SAMPLES_FILE, self.raw_dir / TIMESTAMPS_FILE
        old = {}
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if int(old.get("n_channels", -1)) != self.n_channels:
                raise ValueError(f"raw recording {self.raw_dir} has n_channels={old.get('n_channels')}, "
                                 f"this source delivers {self.n_channels}: use another raw_dir")
        n_before = min(s_path.stat().st_size // (4 * self.n_channels) if s_path.exists() else 0,
                       t_path.stat().st_size // 8 if t_path.exists() else 0)
        full_meta = {"format": "stimloop-raw-1", "n_channels": self.n_channels, "fs_hz": float(fs_hz),
                     "samples_file": SAMPLES_FILE, "samples_dtype": "<f4", "layout": "sample-major",
                     "timestamps_file": TIMESTAMPS_FILE, "timestamps_dtype": "<f8",
                     "clock": "session clock (pylsl.local_clock)", **(meta or {})}
        # Appending to a recording: its sample 0 is the old one, so is its start time.
        if n_before and "start_utc" in old:
            full_meta.update({k: old[k] for k in ("start_utc", "start_utc_from") if k in old})
        self._meta_path = meta_path
        self._meta = full_meta
        self._session_clock = session_clock
        self._wall_clock = wall_clock
        self._start_pending = session_clock is not None and not n_before
        self._meta_dirty = False
        self._write_meta()
        self._fd_s = os.open(s_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fd_t = os.open(t_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        n_done = min(os.fstat(self._fd_s).st_size // (4 * self.n_channels), os.fstat(self._fd_t).st_size // 8)
        os.truncate(s_path, n_done * 4 * self.n_channels)  # drop a torn tail from an earlier crash
        os.truncate(t_path, n_done * 8)
        # Stage ~2 flush periods of data so a chunk rarely forces an early write.
        cap = stage_samples or max(256, int(2 * self.flush_s * max(fs_hz, 1.0)))
        self._stage = np.empty((cap, self.n_channels), dtype="<f4")
        self._stage_t = np.empty((cap,), dtype="<f8")
        self._k = 0
        self._needs_trim = False   # a failed write could not be cut back: do it before the next one
        # Timed flushes run on the caller's clock (monotonic in acquisition, virtual in the simulated
        # runner): -inf makes the first maybe_flush write, whatever clock it passes.
        self._last_flush = float("-inf")
        self.n_written = n_done

    def _write_meta(self) -> None:
        tmp = self._meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._meta, indent=1))
        os.replace(tmp, self._meta_path)  # a reader never sees a half-written meta.json
        self._meta_dirty = False

    def _stamp_start(self, t0: float) -> None:
        """``start_utc`` of the sample at session-clock time ``t0``.

        The offset between the session clock and the wall clock is taken now, right after the
        sample arrived: the two clocks drift apart (NTP slews the wall clock, not local_clock),
        so an offset from another moment would misplace the start by that drift. Both clocks are
        read around each other and the midpoint used, to halve what the reads themselves cost.
        """
        c0 = self._session_clock()
        wall = self._wall_clock()
        c1 = self._session_clock()
        start = float(t0) + (wall - 0.5 * (c0 + c1))
        self._meta["start_utc"] = (dt.datetime.fromtimestamp(start, tz=dt.timezone.utc)
                                   .isoformat(timespec="microseconds").replace("+00:00", "Z"))
        self._meta["start_utc_from"] = ("timestamp of sample 0 + (wall clock - session clock) "
                                        "read when it was recorded")
        self._start_pending = False
        self._meta_dirty = True  # written with the samples, at the next flush

    def append(self, samples: np.ndarray, timestamps: np.ndarray) -> None:
        n = samples.shape[0]
        if self._start_pending and n:
            self._stamp_start(float(timestamps[0]))
        if self._k + n > self._stage.shape[0]:
            self.flush()
        if n > self._stage.shape[0]:  # bigger than the stage: straight to the files
            self._write(np.ascontiguousarray(samples, dtype="<f4"), np.ascontiguousarray(timestamps, dtype="<f8"))
            return
        self._stage[self._k:self._k + n] = samples
        self._stage_t[self._k:self._k + n] = timestamps
        self._k += n

    def maybe_flush(self, now: float) -> None:
        """Write the staged samples if about ``flush_bytes`` are staged, or if ``flush_s`` has passed
        since the last timed flush (``now`` on the caller's clock)."""
        if now - self._last_flush >= self.flush_s:
            self.flush()
            self._last_flush = now
        elif self._k >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        if self._k:
            self._write(self._stage[:self._k], self._stage_t[:self._k])
            self._k = 0

    def _write(self, samples: np.ndarray, timestamps: np.ndarray) -> None:
        if self._needs_trim:
            self._trim_to_written()
        # Samples first, timestamps second: a record counts once both are on disk.
        try:
            _write_all(self._fd_s, memoryview(samples).cast("B"))
            _write_all(self._fd_t, memoryview(timestamps).cast("B"))
        except OSError:
            # Torn bytes left behind would sit in front of the retry (the stage is written again
            # whole) and shift every later row against its timestamp.
            self._needs_trim = True
            try:
                self._trim_to_written()
            except OSError:
                pass   # retried before the next write; the write's error is the one to report
            raise
        self.n_written += samples.shape[0]
        if self._meta_dirty:
            self._write_meta()

    def _trim_to_written(self) -> None:
        """Cut both files back to the ``n_written`` whole records (shrinking needs no space)."""
        os.ftruncate(self._fd_s, self.n_written * 4 * self.n_channels)
        os.ftruncate(self._fd_t, self.n_written * 8)
        self._needs_trim = False

    def n_on_disk(self) -> int:
        """Whole records in both files now (what :func:`load_raw` returns), whatever writes failed."""
        s_size = (self.raw_dir / SAMPLES_FILE).stat().st_size
        t_size = (self.raw_dir / TIMESTAMPS_FILE).stat().st_size
        return min(s_size // (4 * self.n_channels), t_size // 8)

    def close(self) -> None:
        """Write what is staged and close the files; a failed write is raised, the files are closed anyway."""
        if self._fd_s is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd_s)
            os.close(self._fd_t)
            self._fd_s = self._fd_t = None


def source_meta(info) -> dict:
    """What the acquisition writes into ``meta.json`` about its source (a ``SourceInfo``).

    Channel names and units sit under ``"source"``; the EDF export reads them there.
    """
    return {"source": info.to_dict()}


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


def load_raw(raw_dir: str | Path, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a raw recording back ``-> (samples (n, ch) float32, timestamps (n,) float64)``.

    Tolerates a truncated last record (process killed mid-write): only whole
    records present in both files are returned.
    """
    raw_dir = Path(raw_dir)
    meta_path = raw_dir / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no raw recording meta.json in {raw_dir}")
    n_ch = read_json_object(meta_path).get("n_channels")
    if isinstance(n_ch, bool) or not isinstance(n_ch, int) or n_ch < 1:
        raise ValueError(f"{meta_path}: n_channels = {n_ch!r}, expected a whole number >= 1")
    s_path, t_path = raw_dir / SAMPLES_FILE, raw_dir / TIMESTAMPS_FILE
    n = min(s_path.stat().st_size // (4 * n_ch), t_path.stat().st_size // 8)
    if mmap and n > 0:
        samples = np.memmap(s_path, dtype="<f4", mode="r", shape=(n, n_ch))
        timestamps = np.memmap(t_path, dtype="<f8", mode="r", shape=(n,))
        return samples, timestamps
    samples = np.fromfile(s_path, dtype="<f4", count=n * n_ch).reshape(n, n_ch)
    timestamps = np.fromfile(t_path, dtype="<f8", count=n)
    return samples, timestamps


def load_raw_meta(raw_dir: str | Path) -> dict:
    """The ``meta.json`` of a raw recording."""
    return json.loads((Path(raw_dir) / META_FILE).read_text())


#: Following, the longest the recording sleeps without a wake-up from the writer (which wakes it
#: every ``controller.loop.RECORDING_WAKE_S``): a stalled writer still gets its ring recorded.
FOLLOW_WAIT_S = 0.05


def run_acquisition(source_spec: dict, ring_name: str, stop_event, events_queue_or_path,
                    raw_dir: str | Path | None = None, *, raw_flush_s: float = 1.0,
                    events_flush_s: float = 0.5, ready_event=None, wakeup_path: str | None = None,
                    wrap_ring=None, nice: int | None = None, follow=None) -> int:
    """Body of the acquisition process: read the source into the ring until ``stop_event`` is set.

    ``source_spec`` is a plain dict for :func:`controller.sources.build_source`.
    Events (source faults, dropped samples, NaN samples, start/stop) go to
    ``events_queue_or_path``. ``ready_event`` (optional) is set once the source
    is open. ``wakeup_path`` (optional): a named pipe poked after every ring
    write, so a reader can block instead of polling (``controller.wakeup``).
    ``wrap_ring(ring) -> ring-like`` (optional, picklable) wraps the ring the
    source writes into; the latency benchmark uses it to stamp every write.
    ``nice`` (optional): run this process at that nice value
    (:func:`controller.low_latency.set_nice`; the outcome is in ``acquisition_started``),
    unless the source busy-polls (:func:`controller.low_latency.nice_for`).

    ``follow`` (a :class:`~controller.sources.SourceInfo`): another process writes the ring
    from the source (a session's loop, on the spike fast path); this one records the ring
    from its first sample, woken through ``wakeup_path`` (required then), and
    ``source_spec`` is unused. ``follow`` is the source's description for the recording.
    After ``stop_event`` it records what the writer left in the ring, so stopping the
    writer first loses nothing.

    Returns 0 on a clean stop. Anything else emits a ``FAULT`` event naming the cause
    (``source_open_failed``, ``source_read_failed``, ``recording_flush_failed`` — then
    ``acquisition_stopped`` reports the samples really on disk —, ``acquisition_crashed``)
    and re-raises. In a child process Ctrl-C is ignored and SIGTERM stops it (after a short
    grace, see :func:`controller.process_watch.stop_on_signals`).
    """
    from controller.process_watch import stop_on_signals, stop_when_parent_dies
    stop_when_parent_dies(stop_event)  # a killed runner must not leave this process recording forever
    # Ctrl-C is the runner's to order; on SIGTERM keep recording until the runner stops us after
    # the loop (stimulation off first), or stop by ourselves if it does not within the grace.
    stop_on_signals(stop_event, sigterm_grace_s=3.0)

    ensure_lsl_config()  # before any backend imports pylsl
    import pylsl

    from controller.low_latency import nice_for, set_nice
    own_nice = nice_for(nice, bool((source_spec or {}).get("busy_poll")))
    nice_status = "unchanged" if own_nice is None else set_nice(own_nice)   # before the source starts its threads

    from controller.ring import Overrun, SharedRing
    from controller.sources import build_source

    sink = EventSink(events_queue_or_path, flush_s=events_flush_s)
    clock = pylsl.local_clock
    source = None
    ring = None
    recorder = None
    wakeup = None
    reported = False  # a FAULT naming the cause is already out
    # NaN rows are reported aggregated, one event per events flush; what is counted when the
    # acquisition stops or fails is reported then, so no NaN stretch goes unreported.
    nan = {"n": 0, "first_t": None}

    def report_nan() -> None:
        if nan["n"]:
            sink.emit(Event(clock(), EventKind.STATUS, "acquisition",
                            {"what": "nan_samples", "n_samples": nan["n"], "first_t": nan["first_t"]}))
            nan["n"], nan["first_t"] = 0, None

    try:
        ring = SharedRing.attach(ring_name)
        if wrap_ring is not None:
            ring = wrap_ring(ring)
        if follow is None:
            source = build_source(source_spec)
            try:
                info = source.open()
                source.check_ring(ring)
            except Exception as exc:
                sink.emit(Event(clock(), EventKind.FAULT, "acquisition", {"what": "source_open_failed",
                                                                          "error": str(exc)}))
                reported = True
                raise
        elif wakeup_path is None:
            raise ValueError("run_acquisition(follow=...) needs wakeup_path: the writer wakes the recording")
        else:
            info = follow
        if raw_dir is not None:
            recorder = RawRecorder(raw_dir, info.n_channels, info.fs_hz, meta=source_meta(info),
                                   flush_s=raw_flush_s, session_clock=clock)
        # Following, every sample the writer puts in the (fresh) ring is recorded, even one written
        # before this process got here.
        reader = ring.reader("now" if follow is None else "oldest")
        if wakeup_path is not None:
            from controller.wakeup import WakeupReader, WakeupWriter
            wakeup = WakeupWriter(wakeup_path) if follow is None else WakeupReader(wakeup_path)
        from controller.low_latency import freeze_gc
        gc_status = freeze_gc()   # no full collection of start-up's objects in the middle of a pull
        sink.emit(Event(clock(), EventKind.STATUS, "acquisition",
                        {"what": "acquisition_started", "ring": ring_name, "nice": nice_status, "gc": gc_status,
                         "role": "source" if follow is None else "recorder", **info.to_dict()}))
        sink.flush()
        if ready_event is not None:
            ready_event.set()
        stopping = False
        while not stopping:
            stopping = stop_event.is_set()   # following: one more pass records what the writer left
            if follow is not None:
                if not stopping:
                    wakeup.wait(FOLLOW_WAIT_S)
                n = reader.available()
            else:
                if stopping:
                    break
                try:
                    n = source.read_into(ring)
                except Exception as exc:  # the device read failed (BrainFlow, ...): nothing left to record
                    sink.emit(Event(clock(), EventKind.FAULT, "acquisition",
                                    {"what": "source_read_failed", "error": f"{type(exc).__name__}: {exc}"}))
                    reported = True
                    raise
                if n and wakeup is not None:
                    wakeup.notify()  # first: the loop's latency, then our own bookkeeping
            if n:
                try:
                    samples, ts, _ = reader.read_new()
                except Overrun as exc:  # a ring's worth in one call, or (following) the recording fell that far behind
                    sink.emit(Event(clock(), EventKind.DROPPED, "acquisition",
                                    {"n_lost": exc.lost, "reason": "recording_overrun"}))
                    samples, ts, _ = reader.read_new()
                nan_rows = np.isnan(samples).any(axis=1)
                if nan_rows.any():
                    nan["n"] += int(nan_rows.sum())
                    if nan["first_t"] is None:
                        nan["first_t"] = float(ts[np.argmax(nan_rows)])
                if recorder is not None:
                    recorder.append(samples, ts)
            for ev in (source.drain_events() if source is not None else ()):
                sink.emit(ev)
            mono = time.monotonic()
            if recorder is not None:
                recorder.maybe_flush(mono)
            if sink.due(mono):
                report_nan()
                sink.maybe_flush(mono)
        report_nan()
        flush_error = None
        if recorder is not None:
            try:
                recorder.close()  # the last write can fail (disk full): report what is really on disk
            except OSError as exc:
                flush_error = exc
                sink.emit(Event(clock(), EventKind.FAULT, "acquisition",
                                {"what": "recording_flush_failed", "error": f"{type(exc).__name__}: {exc}",
                                 "n_recorded": recorder.n_on_disk()}))
        sink.emit(Event(clock(), EventKind.STATUS, "acquisition",
                        {"what": "acquisition_stopped", "n_samples": ring.counter,
                         "n_recorded": recorder.n_on_disk() if recorder else 0}))
        if flush_error is not None:
            reported = True
            raise flush_error  # samples were lost: not a clean stop
        return 0
    except Exception as exc:
        report_nan()
        if not reported:  # e.g. a recording write failing mid-session
            sink.emit(Event(clock(), EventKind.FAULT, "acquisition", {"what": "acquisition_crashed",
                                                                      "error": f"{type(exc).__name__}: {exc}"}))
        raise
    finally:
        for what, closer in (("source", source.close if source else None),
                             ("recorder", recorder.close if recorder else None),
                             ("wakeup", wakeup.close if wakeup else None),
                             ("ring", ring.close if ring else None)):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # every resource still gets its chance to close
                    sink.emit(Event(clock(), EventKind.FAULT, "acquisition",
                                    {"what": "close_failed", "resource": what,
                                     "error": f"{type(exc).__name__}: {exc}"}))
        sink.close()


def start_acquisition(source_spec: dict, ring_name: str, events_queue_or_path, raw_dir: str | Path | None = None,
                      ready_timeout_s: float = 15.0, **kwargs):
    """Spawn the acquisition process; return ``(process, stop_event)`` once the source is open.

    Raises ``RuntimeError`` if it is not ready within ``ready_timeout_s`` (the
    process is stopped first). Stop it with ``stop_event.set(); process.join()``.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop_event, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=run_acquisition, name="stimloop-acquisition",
                       args=(source_spec, ring_name, stop_event, events_queue_or_path,
                             str(raw_dir) if raw_dir is not None else None),
                       kwargs={**kwargs, "ready_event": ready}, daemon=True)
    proc.start()
    deadline = time.monotonic() + ready_timeout_s
    while not ready.wait(0.05):
        if not proc.is_alive() or time.monotonic() > deadline:
            stop_event.set()
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            raise RuntimeError(f"acquisition process for source {source_spec.get('kind')!r} not ready within "
                               f"{ready_timeout_s:g} s (exit code {proc.exitcode}); see its events for the fault")
    return proc, stop_event
