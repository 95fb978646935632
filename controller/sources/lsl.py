"""``LslSource``: an LSL stream inlet feeding the ring, with drop and loss detection.

Call :func:`controller.lsl_config.ensure_lsl_config` before this module is
imported (it imports pylsl, which reads its configuration once).

Timestamps are the sender's LSL timestamps plus ``inlet.time_correction()``,
i.e. mapped into this machine's ``pylsl.local_clock()`` (the session clock).
No dejitter: smoothing would hide the very gaps we count as dropped samples.
The offset is re-estimated every ``time_correction_interval_s``; a new estimate
is slewed in, at most a quarter sample period per chunk, never stepped: the
estimates wander by tens of µs (19 µs measured between refreshes on one idle
host, more between machines), more than a sample period at 30 kHz (33 µs), and
a step that size would look like a timestamp gap or a clock jump downstream
(``DataQuality``: bad data, stimulation off). A real jump of the sender's own
timestamps is not smoothed and is still seen as one. After a reconnect the new
stream's first estimate is taken at once: it may be another instance on another
clock, and the stream was lost anyway (the loop is in the safe state).

``time_correction=False`` uses the sender's timestamps as they are: for a sender
known to stamp with this machine's own ``local_clock`` (the built-in simulator,
a child of the session), where the true offset is 0 and an estimate only adds
its error. That error, about −19 µs in sessions on the CI VM (0.57 of a sample
period at 30 kHz), put every sample that opens a 1 ms chunk one sample early on
the simulator's grid, in the previous chunk: a spike there was timed from that
chunk's push, 1 ms too long.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pylsl
from pylsl.util import LostError
from pylsl.util import TimeoutError as LslTimeoutError

from controller.events import EventKind
from controller.sources.base import GAP_FACTOR, Source, SourceError, SourceInfo, StreamIncompatible, count_gaps
from controller.units import KNOWN_UNITS, uv_factor


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"stream property {value!r}: single quotes are not supported in LSL predicates")
    return f"'{value}'"


def build_predicate(name: str | None, type: str | None, source_id: str | None) -> str:
    """XPath predicate for ``pylsl.resolve_bypred`` matching all given properties."""
    parts = [f"{key}={_quote(val)}" for key, val in (("name", name), ("type", type), ("source_id", source_id))
             if val]
    if not parts:
        raise ValueError("LslSource: give at least one of name, type or source_id to select a stream")
    return " and ".join(parts)


def pull_into(inlet: pylsl.StreamInlet, buf: np.ndarray, wait_s: float, busy_poll: bool = False) -> np.ndarray:
    """Pull what the inlet has into ``buf`` (rows = samples); return the samples' timestamps.

    Waits at most ``wait_s`` for the first sample and returns as soon as there
    is one. Blocking (default): liblsl wakes this thread when a sample lands.
    ``busy_poll``: ask again and again without sleeping (yielding the core to
    any other runnable task between asks), which saves that wake-up and spends a
    CPU core (docs/performance_log.md, "Busy polling").
    """
    if not busy_poll:
        # min_samples=1: back with the first sample (without it liblsl waits for a full buffer)
        return inlet.pull_chunk(timeout=wait_s, max_samples=buf.shape[0], dest_obj=buf, min_samples=1,
                                as_numpy=True)[1]
    give_up = pylsl.local_clock() + wait_s
    while True:   # each call returns at once, and ctypes lets go of the GIL during it
        ts = inlet.pull_chunk(timeout=0.0, max_samples=buf.shape[0], dest_obj=buf, as_numpy=True)[1]
        if ts.shape[0] or pylsl.local_clock() >= give_up:
            return ts
        # Let whatever else is runnable on this core go first: liblsl's receiving thread, the
        # sender, the stimulator's side. Without it a waking task could wait out the spinner's time
        # slice; on the 2-core VM the peer's p99 was 0.47-1.23 ms without, 0.36-0.37 with, and the
        # sender fell up to 30-45 ms behind its clock instead of 9-33 (two 45 s pairs, 2026-11-22).
        os.sched_yield()


#: How long ``open`` listens for a second stream matching the same predicate after the first answered
#: (without a source_id): one query wave of liblsl (0.5 s, lsl_config's loopback discovery) and a margin.
AMBIGUITY_WAIT_S = 0.75


class LslSource(Source):
    """Pulls an LSL stream into a ring.

    - resolves by ``name``/``type``/``source_id`` (all given ones must match);
      raises :class:`SourceError` listing the streams seen when nothing matches
      within ``resolve_timeout_s``, and listing the matches when more than one
      answers (which would be taken is chance: give ``source_id``);
    - pulls into preallocated arrays (``chunk`` samples at most per read,
      waiting at most ``wait_s`` for the first one); ``max_buflen_s`` (10 s) holds
      the backlog of a stall that long (a shorter buffer lost samples of a 2 s USB
      hiccup), far below pylsl's 360 s default whose lag would go unseen
      (REFERENCE.md §1); lag cannot hide here anyway, windows are timed by their
      samples' timestamps;
    - ``busy_poll``: wait for the first sample by polling the inlet without
      sleeping instead of blocking in liblsl. It saves the thread's wake-up
      (0.02–0.1 ms at p50, 0.1–0.3 ms at p99 in the runs of docs/performance_log.md,
      "Busy polling") and costs a whole CPU core while it waits: for a machine
      with a core to spare;
    - samples are delivered in µV: channels declaring V, mV or nV (any spelling of
      ``controller.units``) are scaled, µV and undeclared ones pass as they are
      (``SourceInfo.units`` says which were undeclared, ``declared_units`` what the
      stream said); a channel declaring a unit that is no voltage stimloop knows is
      refused at open, since every amplitude downstream would be off by an unknown
      factor. ``units`` (config ``source.units``) overrides the stream's declaration;
    - timestamp steps above ``gap_factor / fs`` are reported as ``DROPPED`` events;
    - no data for ``stall_timeout_s`` or a ``LostError`` → ``FAULT`` event
      (``what="stream_lost"``); the source keeps looking for a stream matching
      the same predicate and resumes with a ``STATUS`` event
      (``what="stream_recovered"``) when data flows again. A stream that comes
      back with another channel count, nominal rate, channel format or (when
      the first had one) ``source_id`` is refused
      (one ``reconnect_failed`` event per stream instance): the stream stays lost.
      One that is found but does not answer in time (a busy host) is retried,
      ``recover_poll_s`` after the first failure and twice as long after each
      next one (at most 5 s), with one ``reconnect_retrying`` event per instance.
    """

    event_source = "lsl"

    def __init__(self, name: str | None = None, type: str | None = None, source_id: str | None = None,
                 resolve_timeout_s: float = 5.0, max_buflen_s: int = 10, chunk: int = 256,
                 wait_s: float = 0.005, stall_timeout_s: float = 1.0, gap_factor: float = GAP_FACTOR,
                 time_correction_interval_s: float = 2.0, recover_poll_s: float = 0.1, busy_poll: bool = False,
                 time_correction: bool = True, units: str | None = None):
        super().__init__()
        self.predicate = build_predicate(name, type, source_id)
        self.source_id = source_id or None   # the user's explicit pick of one outlet, if given
        self._wanted = " ".join(f"{label} {val!r}" for label, val in
                                (("named", name), ("of type", type), ("with source_id", source_id)) if val)
        for label, value, lo in (("resolve_timeout_s", resolve_timeout_s, 0.0), ("wait_s", wait_s, 0.0),
                                 ("stall_timeout_s", stall_timeout_s, 0.0), ("gap_factor", gap_factor, 1.0)):
            if not (value > lo and np.isfinite(value)):
                raise ValueError(f"LslSource {label}={value!r}: expected a finite number > {lo}")
        if int(max_buflen_s) != max_buflen_s or max_buflen_s < 1:
            raise ValueError(f"LslSource max_buflen_s={max_buflen_s!r}: expected an integer >= 1 (liblsl takes whole seconds)")
        if not 1 <= chunk <= 1_000_000:
            raise ValueError(f"LslSource chunk={chunk!r}: expected 1..1000000 samples per pull")
        self.resolve_timeout_s = float(resolve_timeout_s)
        self.max_buflen_s = int(max_buflen_s)
        self.chunk = int(chunk)
        self.wait_s = float(wait_s)
        self.stall_timeout_s = float(stall_timeout_s)
        self.gap_factor = float(gap_factor)
        self.time_correction_interval_s = float(time_correction_interval_s)
        self.recover_poll_s = float(recover_poll_s)
        if not isinstance(busy_poll, bool):
            raise ValueError(f"LslSource busy_poll={busy_poll!r}: expected true or false")
        self.busy_poll = busy_poll
        if not isinstance(time_correction, bool):
            raise ValueError(f"LslSource time_correction={time_correction!r}: expected true or false")
        self.time_correction = time_correction
        if units is not None and uv_factor(units) is None:
            raise ValueError(f"LslSource units={units!r}: expected a voltage unit ({', '.join(KNOWN_UNITS)}) "
                             "or None to take the stream's own")
        self.units = units
        self._scale: np.ndarray | None = None   # per channel, to µV; None: already µV
        self._declared: tuple[str, ...] | None = None
        self._inlet: pylsl.StreamInlet | None = None
        self._uid = ""
        self._fmt: int | None = None
        self._refused: set[str] = set()  # uids of streams that came back unusable: refused once, not per poll
        self._retry: dict[str, tuple[int, float]] = {}  # uid -> (failed attempts, next attempt at) for slow ones
        self._resolver: pylsl.ContinuousResolver | None = None
        self._lost_since: float | None = None
        self._last_data_t = 0.0
        self._last_ts: float | None = None
        self._offset_s = 0.0          # applied to the timestamps
        self._offset_target_s = 0.0   # latest time_correction estimate, slewed into _offset_s
        self._offset_stale = False    # after a reconnect, until the new stream's first estimate
        self._slew_s = 0.0            # most the applied offset moves per chunk
        self._next_tc_t = 0.0
        self._next_poll_t = 0.0
        self._buf: np.ndarray | None = None
        self._buf32: np.ndarray | None = None
        self._checked_ring: str | None = None
        #: totals since open(), for status reports
        self.n_samples = 0
        self.n_dropped = 0
        self.n_lost_events = 0

    # ------------------------------------------------------------------ open
    def open(self) -> SourceInfo:
        found = pylsl.resolve_bypred(self.predicate, 1, self.resolve_timeout_s)
        if not found:
            seen = pylsl.resolve_streams(0.5)
            listing = ", ".join(f"(name={s.name()!r}, type={s.type()!r}, source_id={s.source_id()!r}, "
                                f"{s.channel_count()} ch, {s.nominal_srate():g} Hz)" for s in seen) or "none"
            raise SourceError(f"no LSL stream {self._wanted} within {self.resolve_timeout_s:g} s "
                              f"(source.resolve_timeout_s; predicate [{self.predicate}]); streams seen: {listing}")
        if len(found) == 1 and not self.source_id:
            # The resolve returns with the first answer; another matching outlet may answer only in
            # the next query wave (0.5 s later under the project's discovery settings): listen that
            # long for a second one. A given source_id is the user's explicit pick: not waited for.
            found = pylsl.resolve_bypred(self.predicate, 2, AMBIGUITY_WAIT_S) or found
        if len(found) > 1:
            # Which one answered first is chance: a second amplifier, or another session's simulator,
            # under the same name would be taken as often as the intended one.
            listing = ", ".join(f"(source_id={s.source_id()!r}, type={s.type()!r}, host={s.hostname()!r}, "
                                f"{s.channel_count()} ch, {s.nominal_srate():g} Hz)" for s in found)
            raise SourceError(f"{len(found)} LSL streams {self._wanted}: {listing}; say which with "
                              "source.source_id (or source.stream_type)")
        self._connect(found[0], self.resolve_timeout_s)
        return self.info

    def _connect(self, stream: pylsl.StreamInfo, timeout_s: float, wait_time_correction: bool = True) -> None:
        """Open an inlet on ``stream``. :class:`StreamIncompatible` when it can never feed the ring,
        plain :class:`SourceError` when it did not answer within ``timeout_s`` (worth retrying)."""
        fmt = stream.channel_format()
        if self.info is not None:
            # The ring, the recording and the model were sized for the first stream: one that comes
            # back different cannot be fed into them (a silently new rate would shift every window).
            # Checked on the resolved info, before opening an inlet.
            n_ch, fs = stream.channel_count(), float(stream.nominal_srate())
            if n_ch != self.info.n_channels:
                raise StreamIncompatible(f"LSL stream {stream.name()!r} came back with {n_ch} channels, "
                                         f"expected {self.info.n_channels}")
            if fs != self.info.fs_hz:
                raise StreamIncompatible(f"LSL stream {stream.name()!r} came back at {fs:g} Hz, "
                                         f"expected {self.info.fs_hz:g} Hz")
            if fmt != self._fmt:
                raise StreamIncompatible(f"LSL stream {stream.name()!r} came back with channel format {fmt}, "
                                         f"expected {self._fmt}")
            if self.info.source_id and stream.source_id() != self.info.source_id:
                # Same name, another device (or another session's simulator): never the stream this
                # session decides on. A stream without a source_id cannot be told apart: taken.
                raise StreamIncompatible(f"LSL stream {stream.name()!r} came back from another source: source_id "
                                         f"{stream.source_id()!r}, expected {self.info.source_id!r}")
        if fmt in (pylsl.cf_string, pylsl.cf_undefined):
            raise StreamIncompatible(f"LSL stream {stream.name()!r} has a string/undefined channel format; "
                                     f"expected a numeric stream")
        if not stream.nominal_srate() > 0:
            # The ring, windows and gap checks are all in samples at a fixed rate; an irregular
            # stream (markers, events) is usually the wrong stream picked by name or type.
            raise StreamIncompatible(f"LSL stream {stream.name()!r} (type {stream.type()!r}) is irregular (nominal "
                                     f"rate {stream.nominal_srate():g} Hz); expected a signal stream with a fixed "
                                     f"sample rate")
        inlet = pylsl.StreamInlet(stream, max_buflen=self.max_buflen_s, max_chunklen=0, recover=False)
        try:
            full = inlet.info(timeout_s)
            inlet.open_stream(timeout_s)
            if wait_time_correction and self.time_correction:  # the first estimate takes ~0.6 s (measured here)
                # Before any data: applied at once, nothing to slew from.
                self._offset_s = self._offset_target_s = inlet.time_correction(timeout_s)
        except (LslTimeoutError, LostError) as exc:
            inlet.close_stream()
            raise SourceError(f"LSL stream {stream.name()!r} found but not readable: {exc}") from exc
        n_ch = full.channel_count()
        names, units = [], []
        ch = full.desc().child("channels").child("channel")
        for i in range(n_ch):
            names.append(ch.child_value("label") or f"ch{i}")
            units.append(ch.child_value("unit"))
            ch = ch.next_sibling() if not ch.empty() else ch
        declared = tuple(units)
        try:
            if self._declared is not None and declared != self._declared and self.units is None:
                raise StreamIncompatible(f"LSL stream {full.name()!r} came back declaring units {list(declared)}, "
                                         f"expected {list(self._declared)}")
            scale, delivered = self._to_uv(full.name(), names, declared)
        except StreamIncompatible:
            inlet.close_stream()
            raise
        self._declared, self._scale = declared, scale
        self.info = SourceInfo(name=full.name(), type=full.type(), source_id=full.source_id(), n_channels=n_ch,
                               channel_names=tuple(names), units=delivered, fs_hz=float(full.nominal_srate()),
                               gap_factor=self.gap_factor,
                               declared_units=declared if delivered != declared else None,
                               unit_override=self.units)
        self._inlet = inlet
        self._fmt = fmt
        self._uid = full.uid()
        self._buf = np.empty((self.chunk, n_ch), dtype=inlet.np_dtype)
        self._buf32 = self._buf if self._buf.dtype == np.float32 else np.empty((self.chunk, n_ch), np.float32)
        # A quarter period keeps the boundary step within 0.75-1.25 periods: neither backwards nor a gap
        # (1.5 periods), whatever the estimates do.
        self._slew_s = 0.25 / self.info.fs_hz
        # Without a fresh estimate keep the previous offset (same host: ~0) and poll it soon.
        self._next_tc_t = (math.inf if not self.time_correction else
                           pylsl.local_clock() + (self.time_correction_interval_s if wait_time_correction else 0.0))
        # A reconnected stream may be another instance on another clock (the sender rebooted, a spare
        # host took over): its first estimate replaces the old offset at once. Slewing it in would keep
        # the old instance's offset, possibly hours off, for as long as the slew takes.
        self._offset_stale = self.time_correction and not wait_time_correction
        self._last_data_t = pylsl.local_clock()

    def _to_uv(self, name: str, channels: list[str], declared: tuple[str, ...]) -> tuple:
        """(per-channel factor to µV or None when all are 1, the units delivered): rules in the class doc."""
        if self.units is not None:
            factors = [uv_factor(self.units)] * len(declared)
            delivered = tuple("uV" for _ in declared)
        else:
            unknown = [(i, u) for i, u in enumerate(declared) if u.strip() and uv_factor(u) is None]
            if unknown:
                i, u = unknown[0]
                more = f" (and {len(unknown) - 1} more channel(s))" if len(unknown) > 1 else ""
                raise StreamIncompatible(
                    f"LSL stream {name!r} channel {i} ({channels[i]!r}) declares unit {u!r}{more}, not a voltage "
                    f"stimloop knows ({', '.join(KNOWN_UNITS)}): it works in µV (the model's amplitude features, "
                    f"the data-quality limits), so set source.units to the unit the values are in (e.g. \"uV\")")
            factors = [uv_factor(u) or 1.0 for u in declared]
            # Converted channels are µV now; undeclared ones stay undeclared (taken as µV, not known to be).
            delivered = tuple("uV" if uv_factor(u) is not None else u for u in declared)
        scale = np.asarray(factors, dtype=np.float32)
        return (None if np.all(scale == 1.0) else scale), delivered

    # ------------------------------------------------------------------ loss / recovery
    def _declare_lost(self, now: float, reason: str) -> None:
        if self._lost_since is None:
            self._lost_since = now
            self.n_lost_events += 1
            self._emit(now, EventKind.FAULT, what="stream_lost", reason=reason, predicate=self.predicate,
                       last_data_t=self._last_data_t)
            if self._resolver is None:
                self._resolver = pylsl.ContinuousResolver(pred=self.predicate, forget_after=2.0)

    def _recovered(self, now: float, how: str) -> None:
        self._emit(now, EventKind.STATUS, what="stream_recovered", how=how, predicate=self.predicate,
                   outage_s=now - (self._lost_since if self._lost_since is not None else now))
        self._lost_since = None
        self._resolver = None  # stop background resolve traffic while healthy

    def _try_reconnect(self, now: float) -> None:
        if now < self._next_poll_t or self._resolver is None:
            return
        self._next_poll_t = now + self.recover_poll_s
        for stream in self._resolver.results():
            uid = stream.uid()
            if uid == self._uid or uid in self._refused:  # want a new outlet instance (the old one is gone or stalled)
                continue
            n_failed, next_t = self._retry.get(uid, (0, now))
            if now < next_t:
                continue
            old = self._inlet
            try:
                self._connect(stream, min(self.resolve_timeout_s, 1.0), wait_time_correction=False)
            except StreamIncompatible as exc:
                self._refused.add(uid)
                self._retry.pop(uid, None)
                self._emit(now, EventKind.STATUS, what="reconnect_failed", error=str(exc))
                continue
            except SourceError as exc:
                # Found but not answering in time: a busy host or a slow start, not a wrong stream.
                # Backing off bounds what a stream that never answers costs (each try blocks up to 2 s).
                n_failed += 1
                self._retry[uid] = (n_failed, pylsl.local_clock() + min(self.recover_poll_s * 2 ** n_failed, 5.0))
                if n_failed == 1:
                    self._emit(now, EventKind.STATUS, what="reconnect_retrying", error=str(exc))
                continue
            self._retry.clear()
            if old is not None:
                old.close_stream()
            self._last_ts = None  # new stream instance: its clock restarted, no gap to count
            self._recovered(now, "reconnected")
            return

    # ------------------------------------------------------------------ read
    def read_into(self, ring) -> int:
        """Pull what is available (waiting at most ``wait_s``) into ``ring``; return samples written."""
        if self.info is None:
            raise SourceError("LslSource: open() before read_into()")
        if self._checked_ring != ring.name:
            self.check_ring(ring)
            if ring.capacity < self.chunk:
                raise SourceError(f"ring {ring.name!r} capacity {ring.capacity} < LslSource chunk {self.chunk}")
            self._checked_ring = ring.name
        if self._lost_since is not None:
            self._try_reconnect(pylsl.local_clock())
        inlet = self._inlet
        if inlet is None:
            time.sleep(self.wait_s)  # nothing to block on while reconnecting: do not spin
            return 0
        try:
            ts = pull_into(inlet, self._buf, self.wait_s, self.busy_poll)
        except LostError:
            self._inlet = None
            inlet.close_stream()
            self._declare_lost(pylsl.local_clock(), "lost_error")
            return 0
        n = ts.shape[0]
        if n == 0:
            now = pylsl.local_clock()
            if now - self._last_data_t > self.stall_timeout_s:
                self._declare_lost(now, "stall")
            return 0
        # Commit first, account after: a reader may be waiting for exactly this chunk (the loop is
        # woken as soon as we return), and nothing below changes what is written.
        off = self._offset_s
        if off != self._offset_target_s:   # slew (module doc): a refresh must not look like a gap or a jump
            d = self._offset_target_s - off
            off = self._offset_target_s if abs(d) <= self._slew_s else off + math.copysign(self._slew_s, d)
            self._offset_s = off
        last_raw = float(ts[-1])
        ts += off
        if self._scale is not None:   # to µV (the source declared V, mV or nV)
            np.multiply(self._buf[:n], self._scale, out=self._buf32[:n], casting="unsafe")
        elif self._buf32 is not self._buf:
            self._buf32[:n] = self._buf[:n]
        ring.write(self._buf32[:n], ts)
        now = pylsl.local_clock()
        # Gaps are counted on the sender's own clock: the applied offset moves later timestamps (up to
        # a quarter period per chunk while a new estimate slews in), which is no lost sample. So the
        # previous chunk's last raw stamp is shifted by this chunk's offset.
        n_gaps, n_lost, t_gap = count_gaps(ts, None if self._last_ts is None else self._last_ts + off,
                                           self.info.fs_hz, self.gap_factor)
        if n_gaps:
            self.n_dropped += n_lost
            self._emit(now, EventKind.DROPPED, n_lost=n_lost, n_gaps=n_gaps, at_t=t_gap, reason="timestamp_gap")
        if now >= self._next_tc_t:   # slewed in from the next chunk on
            try:
                self._offset_target_s = inlet.time_correction(0.0)
                self._next_tc_t = now + self.time_correction_interval_s
                if self._offset_stale:   # the first estimate after a reconnect: stepped (_connect)
                    self._offset_s = self._offset_target_s
                    self._offset_stale = False
            except (LslTimeoutError, LostError):
                # Keep the previous estimate; a real loss shows up on the next pull. Asked again on the
                # next chunk while the offset is stale, else at the next refresh.
                self._next_tc_t = now if self._offset_stale else now + self.time_correction_interval_s
        self._last_ts = last_raw
        self._last_data_t = now
        self.n_samples += n
        if self._lost_since is not None:
            self._recovered(now, "data_resumed")
        return n

    def close(self) -> None:
        inlet, self._inlet = self._inlet, None
        self._resolver = None
        if inlet is not None:
            inlet.close_stream()
