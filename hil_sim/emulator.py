"""A stimulator emulator speaking ``drivers/PROTOCOL.md`` on a serial line (pty master).

It behaves as the device firmware should: validates every frame and field,
answers ACK/NACK stamped with its receipt time on the shared clock,
de-duplicates retried sequence numbers (never HELLO, which starts a new host
session from nothing: PROTOCOL.md §4), delivers scheduled triggers on time
(sleep, then a short spin), runs the heartbeat watchdog, and records ground
truth of what it was asked and what it delivered, so tests and benchmarks can
compare the controller's view with the device's.

Run standalone: ``python -m hil_sim.emulator --fd N`` (an inherited pty master)
or ``--pty`` (opens a pair and prints the slave path).
"""
from __future__ import annotations

import argparse
import errno
import heapq
import json
import math
import os
import select
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import pylsl

from drivers import protocol as P
from drivers.params import DeviceCapabilities, StimParams, Waveform

DEFAULT_CAPABILITIES = DeviceCapabilities(
    n_channels=4,
    waveforms=(Waveform.BIPHASIC, Waveform.MONOPHASIC, Waveform.SINE, Waveform.DC, Waveform.TI),
    # RNS envelope, REFERENCE.md §3: 0–12 mA, up to 333 Hz, pulse width 40..~1000 µs (upper bound unverified).
    max_amplitude_ua=12_000.0, min_pulse_width_us=40.0, max_pulse_width_us=1_000.0, max_frequency_hz=333.0,
    scheduled_trigger=True, name="stimloop-emu", firmware="emu-1.0",
)
# time.sleep lateness p99 ≈ 180 µs, max 1.8 ms; sleep-then-spin p99 ≈ 10 µs (REFERENCE.md §1, measured figures).
SPIN_MARGIN_S = 0.002
# A deliver-at time this far in the past is still delivered (late); beyond it the trigger is refused.
LATE_TOLERANCE_S = 0.002
MAX_SCHEDULE_AHEAD_S = P.MAX_SCHEDULE_AHEAD_S
DEDUP_DEPTH = 32
FLUSH_EVERY_S = 0.5
# A partial frame still waiting for bytes after the line has been quiet this long is abandoned
# (FrameDecoder.flush, counted ``truncated``) and what follows it is rescanned (PROTOCOL.md §2
# step 4). Far above the byte gaps inside one frame (the largest, 202 bytes, takes ~2 ms at
# 1 Mbaud), far below the host's default 50 ms reply timeout: a command hidden behind a false
# header in line noise is answered before the host gives up on it and calls it failed.
QUIET_FLUSH_S = 0.010
# Records of every kind kept in memory (``recent_records``); the JSONL log keeps them all.
RECENT_RECORDS = 1000
# Routine successful frames: kept in the log and in ``recent_records`` only, not in ``records``
# (heartbeats every 0.1 s would otherwise grow it by ~290 MB a day).
_ROUTINE_TYPES = frozenset({"HEARTBEAT", "STATUS"})


@dataclass(slots=True)
class _Pending:
    at: float
    seq: int
    channel: int
    params: StimParams
    t_received: float
    cancelled: bool = False

    def __lt__(self, other: "_Pending") -> bool:
        return self.at < other.at


class StimulatorEmulator:
    """Device emulator on the master end of a pty (or any serial device path).

    Ground truth, one dict per received frame once its outcome is final
    (triggers when delivered or cancelled, also when the emulator stops), plus
    ``WATCHDOG`` entries. The JSONL log (``log_path``) holds every record.
    In memory, ``records`` holds every record except successful HEARTBEAT and
    STATUS frames (routine: ~10 a second for as long as a session runs), so it
    grows with the commands that matter (HELLO, CONFIGURE, TRIGGER, STOP,
    refusals, retries of those, watchdog trips), not with time;
    ``recent_records`` holds the last ``RECENT_RECORDS`` records of every kind.
    ``counters`` holds protocol counters (``records_routine``: routine records
    left out of ``records``); ``decoder.errors`` the decoder's error counts.
    """

    def __init__(self, master_fd: int | str, clock: Callable[[], float] = pylsl.local_clock,
                 capabilities: DeviceCapabilities = DEFAULT_CAPABILITIES, watchdog_s: float = 0.5,
                 on_deliver: Callable[[float, StimParams], None] | None = None,
                 log_path: str | os.PathLike | None = None,
                 on_stop: Callable[[float, list[int]], None] | None = None) -> None:
        if not watchdog_s > 0:
            raise ValueError(f"watchdog_s {watchdog_s} invalid, expected > 0 seconds")
        if not 1 <= capabilities.n_channels <= 8:
            # STATUS reports channels as 8-bit masks (PROTOCOL.md §5).
            raise ValueError(f"capabilities.n_channels {capabilities.n_channels} out of range, expected 1..8")
        if isinstance(master_fd, (str, os.PathLike)):
            import tty
            self._fd = os.open(os.fspath(master_fd), os.O_RDWR | os.O_NOCTTY)
            tty.setraw(self._fd)
            self._owns_fd = True
        else:
            self._fd = int(master_fd)
            self._owns_fd = False
        self.clock = clock
        self.capabilities = capabilities
        self.watchdog_s = float(watchdog_s)
        self.on_deliver = on_deliver
        # Called (with the emulator's lock held: it must not call back into the emulator) when bursts
        # running on channels are cut short (STOP, watchdog, HELLO, stop()): (t, channels).
        self.on_stop = on_stop
        self.records: list[dict] = []
        self.recent_records: deque[dict] = deque(maxlen=RECENT_RECORDS)
        self.counters: dict[str, int] = {"frames": 0, "acks": 0, "nacks": 0, "duplicates": 0,
                                         "deliveries": 0, "watchdog_trips": 0, "replies_dropped": 0,
                                         "replies_corrupted": 0, "records_routine": 0}
        self.decoder = P.FrameDecoder()
        self._lock = threading.Condition()
        self._configs: dict[int, StimParams] = {}
        self._active_until: dict[int, float] = {}
        self._pending: list[_Pending] = []
        self._handshake = False
        self._dedup: OrderedDict[int, tuple[int, bytes, bytes]] = OrderedDict()
        self._last_valid_t: float | None = None
        self._watchdog_tripped = False
        self._event_seq = 0
        self._mute = False
        self._corrupt_next = 0
        self._drop_next = 0
        self._knob_lock = threading.Lock()   # the two knobs above: set by a fault injector, spent by _send
        self._stop_evt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log = open(log_path, "a", encoding="utf-8") if log_path is not None else None
        self._log_dirty = False
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "StimulatorEmulator":
        """Start the reader and scheduler threads."""
        if self._threads:
            raise RuntimeError("emulator already started")
        self._stop_evt.clear()
        for target, name in ((self._reader_loop, "emu-reader"), (self._scheduler_loop, "emu-scheduler")):
            th = threading.Thread(target=target, name=name, daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> None:
        """Stop the threads, flush and close the log (and the fd if we opened it).

        The device goes off: running bursts end and scheduled triggers not yet delivered are
        cancelled and recorded (``cancelled: emulator stopped``), so the ground truth holds
        every TRIGGER the device accepted, also when a session ends or the device is unplugged.
        """
        self._stop_evt.set()
        with self._lock:
            self._lock.notify_all()
        for th in self._threads:
            th.join(timeout=2.0)
        self._threads = []
        with self._lock:
            # After the join: a trigger the scheduler was delivering is delivered (and off the
            # heap) or still pending here, never both.
            self._stop_all_locked(self.clock(), "emulator stopped")
        with self._write_lock:
            if self._log is not None:
                self._log.flush()
                self._log.close()
                self._log = None
        if self._owns_fd:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __enter__(self) -> "StimulatorEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ fault knobs

    def set_mute(self, mute: bool) -> None:
        """Muted: the device reads and discards everything (a dead link); no action, no reply."""
        self._mute = bool(mute)

    def corrupt_next(self, n: int = 1) -> None:
        """Flip a bit in the CRC of ``n`` more replies (the command itself is still executed). Adds to
        any still pending, so overlapping faults each get theirs."""
        with self._knob_lock:
            self._corrupt_next += int(n)

    def drop_next_replies(self, n: int = 1) -> None:
        """Execute ``n`` more commands but lose their replies (forces host retries); adds to any pending."""
        with self._knob_lock:
            self._drop_next += int(n)

    # ------------------------------------------------------------ views

    @property
    def active_channels(self) -> list[int]:
        now = self.clock()
        with self._lock:
            return sorted(ch for ch, until in self._active_until.items() if until > now)

    def deliveries(self) -> list[dict]:
        """Records of triggers actually delivered, in delivery order."""
        with self._lock:
            out = [r for r in self.records if r.get("t_delivered") is not None]
        return sorted(out, key=lambda r: r["t_delivered"])

    def status(self) -> P.DeviceStatus:
        now = self.clock()
        with self._lock:
            return self._status_locked(now)

    # ------------------------------------------------------------ threads

    def _reader_loop(self) -> None:
        fd = self._fd
        # monotonic time of the last read that left a partial frame in the decoder, else None
        partial_since: float | None = None
        while not self._stop_evt.is_set():
            timeout = 0.05
            if partial_since is not None:
                timeout = max(0.0, min(timeout, partial_since + QUIET_FLUSH_S - time.monotonic()))
            try:
                r, _, _ = select.select([fd], [], [], timeout)
            except (OSError, ValueError):
                return
            if not r:
                if partial_since is not None and time.monotonic() - partial_since >= QUIET_FLUSH_S:
                    partial_since = None
                    if not self._mute:
                        self._flush_decoder()
                continue
            try:
                data = os.read(fd, 4096)
            except OSError as e:
                if e.errno == errno.EIO:
                    # Linux pty master: EIO while no process has the slave open. Wait for the host.
                    self._stop_evt.wait(0.01)
                    continue
                return
            if not data:
                self._stop_evt.wait(0.01)
                continue
            now = self.clock()
            if self._mute:
                continue
            for frame in self.decoder.feed(data):
                self._handle(frame, now)
            # A lone trailing sync byte cannot hide a frame; anything longer may be a false header.
            partial_since = time.monotonic() if self.decoder.pending >= len(P.SYNC) else None

    def _flush_decoder(self) -> None:
        """The line went quiet with a partial frame buffered (PROTOCOL.md §2 step 4): abandon it
        (``truncated``, part of STATUS ``rx_errors``) and act on the frames found behind it.

        Those frames are stamped with the time the device could decode them, now: a deliver-at
        time is then judged late or not from when the device could act on it.
        """
        frames = self.decoder.flush()
        if frames:
            now = self.clock()
            for frame in frames:
                self._handle(frame, now)

    def _scheduler_loop(self) -> None:
        last_flush = self.clock()
        while not self._stop_evt.is_set():
            due: _Pending | None = None
            with self._lock:
                now = self.clock()
                self._check_watchdog(now)
                while self._pending and self._pending[0].cancelled:
                    heapq.heappop(self._pending)
                wait_s = FLUSH_EVERY_S
                if self._last_valid_t is not None and not self._watchdog_tripped:
                    # The deadline only moves later, so waking early just re-checks.
                    wait_s = min(wait_s, self._last_valid_t + self.watchdog_s - now + 1e-4)
                if self._pending:
                    head = self._pending[0]
                    if head.at - now <= SPIN_MARGIN_S:
                        due = head
                    else:
                        wait_s = min(wait_s, head.at - now - SPIN_MARGIN_S)
                if due is None:
                    self._lock.wait(timeout=max(wait_s, 0.0))
            if due is not None:
                # Spin outside the lock; sleep(0) yields the GIL so the reader keeps answering.
                while self.clock() < due.at and not due.cancelled:
                    time.sleep(0)
                with self._lock:
                    if self._pending and self._pending[0] is due:
                        heapq.heappop(self._pending)
                    else:
                        try:
                            self._pending.remove(due)
                            heapq.heapify(self._pending)
                        except ValueError:
                            pass
                    if due.cancelled:
                        continue
                    t = self.clock()
                    self._active_until[due.channel] = t + due.params.burst_duration_s
                    self.counters["deliveries"] += 1
                    rec = self._record(due.t_received, due.seq, "TRIGGER", due.channel, due.params,
                                       True, "", t_delivered=t, at=due.at)
                self._emit(rec)
                if self.on_deliver is not None:
                    self.on_deliver(t, due.params)
            now = self.clock()
            if now - last_flush >= FLUSH_EVERY_S:
                last_flush = now
                self._flush_log()

    # ------------------------------------------------------------ protocol

    def _handle(self, frame: P.Frame, now: float) -> None:
        self.counters["frames"] += 1
        deliver: tuple[float, StimParams] | None = None
        recs: list[dict] = []
        with self._lock:
            n_pending = len(self._pending)
            first_frame = self._last_valid_t is None or self._watchdog_tripped
            self._last_valid_t = now
            self._watchdog_tripped = False
            key = frame.seq
            cached = self._dedup.get(key)
            # HELLO is never a retry: a restarted host starts its seq anew and may repeat a HELLO
            # remembered from the previous host session; answering that from memory would keep the
            # old session's dedup entries and configurations alive (PROTOCOL.md §4).
            # The version is part of what is remembered: a frame of another version is answered
            # VERSION_MISMATCH, never with a version-1 reply from memory.
            if (cached is not None and frame.msg_type != P.MsgType.HELLO
                    and cached[0] == (frame.version, frame.msg_type) and cached[1] == frame.payload):
                # Retried command: answer again, act once (PROTOCOL.md §4).
                self.counters["duplicates"] += 1
                reply = cached[2]
                recs.append(self._record(now, frame.seq, _type_name(frame.msg_type), None, None, True, "",
                                         duplicate=True))
            else:
                reply, rec, deliver = self._execute(frame, now)
                if rec is not None:
                    recs.append(rec)
                if frame.msg_type == P.MsgType.HELLO and rec is not None and rec["ok"]:
                    # Only an executed HELLO starts a new host session: a refused one (another version,
                    # a bad length) left the configurations in place, and so must it leave the memory
                    # that keeps a retried TRIGGER from firing twice.
                    self._dedup.clear()
                self._dedup[key] = ((frame.version, frame.msg_type), frame.payload, reply)
                while len(self._dedup) > DEDUP_DEPTH:
                    self._dedup.popitem(last=False)
            if n_pending != len(self._pending) or first_frame:
                # Wake the scheduler only when its plan changed: a needless wake-up
                # competes for the GIL with the reply on the hot path.
                self._lock.notify_all()
        self._send(reply)
        for rec in recs:
            self._emit(rec)
        if deliver is not None and self.on_deliver is not None:
            self.on_deliver(*deliver)

    def _execute(self, frame: P.Frame, now: float) -> tuple[bytes, dict | None, tuple[float, StimParams] | None]:
        """Act on one new frame (lock held). Returns (reply frame, record or None, immediate delivery)."""
        seq, mtype = frame.seq, frame.msg_type
        tname = _type_name(mtype)

        def nack(code: P.ErrorCode, detail: int = 0, msg: str = "", channel=None, params=None):
            self.counters["nacks"] += 1
            rec = self._record(now, seq, tname, channel, params, False, code.name + (f": {msg}" if msg else ""))
            return _reply(P.MsgType.NACK, seq, P.encode_nack(seq, code, now, detail)), rec, None

        def ack(body: bytes = b"", channel=None, params=None, **extra):
            self.counters["acks"] += 1
            rec = self._record(now, seq, tname, channel, params, True, "", **extra)
            return _reply(P.MsgType.ACK, seq, P.encode_ack(seq, now, body)), rec, None

        if frame.version != P.PROTOCOL_VERSION:
            return nack(P.ErrorCode.VERSION_MISMATCH, detail=P.PROTOCOL_VERSION)
        try:
            if mtype == P.MsgType.HELLO:
                host_ver = P.decode_hello(frame.payload)
                if host_ver != P.PROTOCOL_VERSION:
                    return nack(P.ErrorCode.VERSION_MISMATCH, detail=P.PROTOCOL_VERSION,
                                msg=f"host version {host_ver}")
                # A new host session starts from nothing: what the previous host configured or
                # scheduled was approved by its governor, not by this host's (PROTOCOL.md §4, §5.1).
                stopped = self._stop_all_locked(now, "hello")
                self._configs.clear()
                self._handshake = True
                return ack(P.encode_capabilities(self.capabilities, self.watchdog_s), stopped_channels=stopped)
            if mtype not in (P.MsgType.CONFIGURE, P.MsgType.TRIGGER, P.MsgType.STOP,
                             P.MsgType.HEARTBEAT, P.MsgType.STATUS):
                return nack(P.ErrorCode.UNKNOWN_TYPE, detail=mtype & 0xFF)
            if mtype == P.MsgType.STOP:
                # STOP is always obeyed, handshake or not: it is the safe state.
                if frame.payload:
                    return nack(P.ErrorCode.BAD_LENGTH)
                stopped = self._stop_all_locked(now, "stopped")
                return ack(stopped_channels=stopped)
            if not self._handshake:
                return nack(P.ErrorCode.NO_HANDSHAKE)
            if mtype == P.MsgType.HEARTBEAT:
                if len(frame.payload) != P.HEARTBEAT_FMT.size:
                    return nack(P.ErrorCode.BAD_LENGTH)
                return ack()
            if mtype == P.MsgType.STATUS:
                if frame.payload:
                    return nack(P.ErrorCode.BAD_LENGTH)
                return ack(P.encode_status(self._status_locked(now)))
            if mtype == P.MsgType.CONFIGURE:
                if len(frame.payload) != P.CONFIGURE_FMT.size:
                    return nack(P.ErrorCode.BAD_LENGTH)
                try:
                    params = P.decode_configure(frame.payload)
                except P.ProtocolError as e:
                    return nack(P.ErrorCode.UNSUPPORTED_WAVEFORM, detail=1, msg=str(e))
                bad = P.check_params(params, self.capabilities)
                if bad is not None:
                    return nack(bad[0], detail=bad[1], msg=bad[2], channel=params.channel, params=params)
                if self._busy_locked(params.channel, now):
                    return nack(P.ErrorCode.BUSY, channel=params.channel, params=params)
                self._configs[params.channel] = params
                return ack(channel=params.channel, params=params)
            # TRIGGER
            if len(frame.payload) != P.TRIGGER_FMT.size:
                return nack(P.ErrorCode.BAD_LENGTH)
            channel, at = P.decode_trigger(frame.payload)
            if not 0 <= channel < self.capabilities.n_channels:
                return nack(P.ErrorCode.BAD_CHANNEL, detail=0, channel=channel)
            params = self._configs.get(channel)
            if params is None:
                return nack(P.ErrorCode.NOT_CONFIGURED, channel=channel)
            if not math.isfinite(at) or at < 0:
                # NaN compares false with every deadline: accepted, it would never come due and
                # hold the channel BUSY for good.
                return nack(P.ErrorCode.OUT_OF_RANGE, detail=1, msg=f"deliver-at {at!r} is not a finite time >= 0",
                            channel=channel, params=params)
            if self._busy_locked(channel, now):
                return nack(P.ErrorCode.BUSY, channel=channel, params=params)
            if at != 0.0:
                if not self.capabilities.scheduled_trigger:
                    return nack(P.ErrorCode.OUT_OF_RANGE, detail=1, msg="scheduled triggers not supported",
                                channel=channel, params=params)
                if at < now - LATE_TOLERANCE_S:
                    return nack(P.ErrorCode.TOO_LATE, msg=f"at {at:.6f} is {now - at:.6f} s in the past",
                                channel=channel, params=params)
                if at > now + MAX_SCHEDULE_AHEAD_S:
                    return nack(P.ErrorCode.OUT_OF_RANGE, detail=1,
                                msg=f"at {at:.6f} more than {MAX_SCHEDULE_AHEAD_S} s ahead",
                                channel=channel, params=params)
                heapq.heappush(self._pending, _Pending(at, seq, channel, params, now))
                self.counters["acks"] += 1
                # The record is written when the trigger is delivered or cancelled.
                return _reply(P.MsgType.ACK, seq, P.encode_ack(seq, now)), None, None
            t = self.clock()
            self._active_until[channel] = t + params.burst_duration_s
            self.counters["deliveries"] += 1
            self.counters["acks"] += 1
            rec = self._record(now, seq, tname, channel, params, True, "", t_delivered=t, at=0.0)
            return _reply(P.MsgType.ACK, seq, P.encode_ack(seq, now)), rec, (t, params)
        except P.ProtocolError as e:
            return nack(P.ErrorCode.BAD_LENGTH, msg=str(e))

    def _busy_locked(self, channel: int, now: float) -> bool:
        if self._active_until.get(channel, -1.0) > now:
            return True
        return any(p.channel == channel and not p.cancelled for p in self._pending)

    def _stop_all_locked(self, now: float, reason: str) -> list[int]:
        """Everything off: end running bursts, cancel scheduled triggers (recorded as not delivered)."""
        stopped = sorted(ch for ch, until in self._active_until.items() if until > now)
        for ch in stopped:
            self._active_until[ch] = now
        if stopped and self.on_stop is not None:
            self.on_stop(now, list(stopped))
        for p in self._pending:
            if not p.cancelled:
                p.cancelled = True
                stopped.append(p.channel)
                self._emit(self._record(p.t_received, p.seq, "TRIGGER", p.channel, p.params, False,
                                              f"cancelled: {reason}", at=p.at))
        self._pending.clear()
        return sorted(set(stopped))

    def _check_watchdog(self, now: float) -> None:
        """Lock held. Trip once per silence longer than watchdog_s (after the first valid frame)."""
        if self._last_valid_t is None or self._watchdog_tripped:
            return
        if now - self._last_valid_t <= self.watchdog_s:
            return
        self._watchdog_tripped = True
        self.counters["watchdog_trips"] += 1
        stopped = self._stop_all_locked(now, "watchdog")
        rec = self._record(now, None, "WATCHDOG", None, None, True, "", stopped_channels=stopped,
                           silence_s=now - self._last_valid_t)
        self._emit(rec)
        self._event_seq = (self._event_seq + 1) % P.SEQ_MOD
        self._send(_reply(P.MsgType.EVENT, self._event_seq, P.encode_event(P.EventCode.WATCHDOG, now)),
                   is_reply=False)

    def _status_locked(self, now: float) -> P.DeviceStatus:
        active = sum(1 << ch for ch, until in self._active_until.items() if until > now)
        conf = sum(1 << ch for ch in self._configs)
        pend = 0
        for p in self._pending:
            if not p.cancelled:
                pend |= 1 << p.channel
        err = self.decoder.errors
        return P.DeviceStatus(active, conf, pend, self.counters["watchdog_trips"],
                              err["crc"] + err["oversized"] + err["truncated"])

    # ------------------------------------------------------------ output

    def _send(self, frame: bytes, is_reply: bool = True) -> None:
        if self._mute:   # a dead link carries nothing either way: no reply, no unsolicited EVENT
            return
        if is_reply and (self._drop_next or self._corrupt_next):
            with self._knob_lock:
                if self._drop_next > 0:
                    self._drop_next -= 1
                    self.counters["replies_dropped"] += 1
                    return
                if self._corrupt_next > 0:
                    self._corrupt_next -= 1
                    self.counters["replies_corrupted"] += 1
                    frame = frame[:-1] + bytes([frame[-1] ^ 0x01])
        try:
            os.write(self._fd, frame)
        except OSError:
            pass  # host side closed: nothing to tell it

    def _record(self, t_received, seq, tname, channel, params, ok, error, t_delivered=None, **extra) -> dict:
        rec = {"t_received": t_received, "t_delivered": t_delivered, "seq": seq, "type": tname,
               "channel": channel, "ok": ok, "error": error}
        rec.update(extra)
        if params is not None:
            # Expanded in _emit, after the reply is on the wire (asdict costs ~10 µs).
            rec["_params"] = params
        return rec

    def _emit(self, rec: dict) -> None:
        params = rec.pop("_params", None)
        if params is not None:
            for k, v in params.to_dict().items():
                if k != "channel":
                    rec[k] = v
        with self._lock:
            self.recent_records.append(rec)
            if rec["ok"] and rec["type"] in _ROUTINE_TYPES:
                self.counters["records_routine"] += 1
            else:
                self.records.append(rec)
        with self._write_lock:
            if self._log is not None:
                self._log.write(json.dumps(rec, separators=(",", ":")) + "\n")
                self._log_dirty = True

    def _flush_log(self) -> None:
        with self._write_lock:
            if self._log is not None and self._log_dirty:
                self._log.flush()
                self._log_dirty = False


def _reply(msg_type: P.MsgType, seq: int, payload: bytes) -> bytes:
    return P.encode_frame(msg_type, seq, payload)


def _type_name(mtype: int) -> str:
    try:
        return P.MsgType(mtype).name
    except ValueError:
        return f"0x{mtype:02x}"


def main(argv: list[str] | None = None) -> int:
    """Run an emulator until SIGTERM/SIGINT (used by benchmarks as a separate process)."""
    import signal

    from hil_sim.pty_pair import open_pty_pair

    ap = argparse.ArgumentParser(prog="python -m hil_sim.emulator", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--fd", type=int, help="inherited pty master file descriptor")
    g.add_argument("--pty", action="store_true", help="open a pty pair and print the slave path")
    ap.add_argument("--watchdog-s", type=float, default=0.5)
    ap.add_argument("--log", default=None, help="append-only JSONL ground-truth log")
    args = ap.parse_args(argv)
    if args.pty:
        fd, path = open_pty_pair()
        print(path, flush=True)
    else:
        fd = args.fd
    emu = StimulatorEmulator(fd, watchdog_s=args.watchdog_s, log_path=args.log)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    # A benchmark killed outright must not leave its emulator running, holding the pty.
    from controller.process_watch import stop_when_parent_dies
    stop_when_parent_dies(done)
    emu.start()
    print("ready", flush=True)
    while not done.wait(0.5):
        pass
    emu.stop()
    print(json.dumps({"counters": emu.counters, "decoder_errors": emu.decoder.errors}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
