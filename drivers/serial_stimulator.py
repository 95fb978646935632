"""``SerialStimulator``: the stimloop binary protocol (``drivers/PROTOCOL.md``) over pyserial.

Every command is one request frame answered by an ACK or NACK carrying the
same ``seq``. The driver writes, then waits on ``select`` for the reply with a
short deadline; on timeout it resends the identical frame (same ``seq``, so the
device acts once) up to ``retries`` times. No sleeps anywhere.
"""
from __future__ import annotations

import os
import random
import select
import threading
from typing import Callable

import pylsl
import serial

from drivers import protocol as P
from drivers.base import CommandReceipt, DeviceTimeout, Stimulator, StimulatorError, nack_error
from drivers.params import DeviceCapabilities, StimParams


class SerialStimulator(Stimulator):
    """A stimulator on a serial port speaking protocol version 1.

    ``timeout_s`` is the wait for one reply; a command gives up after
    ``1 + retries`` attempts, i.e. at most ``(1 + retries) * timeout_s``.
    ``connect_timeout_s`` is how long ``open()`` keeps saying HELLO to a device
    that does not answer yet (a board still starting, or one that resets when
    its port opens, as USB CDC boards with auto-reset do): new HELLOs until
    that much time has passed since the port opened, at least one full command
    (``1 + retries`` attempts). 0 = that one command only.
    ``clock`` stamps ``sent_t``/``acked_t`` (the session clock shared with the device).
    """

    def __init__(self, port: str, baudrate: int = 1_000_000, timeout_s: float = 0.05, retries: int = 3,
                 clock: Callable[[], float] = pylsl.local_clock, connect_timeout_s: float = 2.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s {timeout_s} invalid, expected > 0 seconds")
        if not connect_timeout_s >= 0:
            raise ValueError(f"connect_timeout_s {connect_timeout_s} invalid, expected >= 0 seconds")
        if retries < 0:
            raise ValueError(f"retries {retries} invalid, expected >= 0")
        if baudrate <= 0:
            raise ValueError(f"baudrate {baudrate} invalid, expected > 0")
        self.port = port
        self.baudrate = int(baudrate)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.connect_timeout_s = float(connect_timeout_s)
        self.clock = clock
        self.capabilities = DeviceCapabilities()
        self.device_version: int | None = None
        self.device_watchdog_s: float | None = None
        self.low_latency = False
        self.last_receipt_device_t: float | None = None
        self.device_events: list[tuple[int, float]] = []   # unsolicited EVENT frames: (code, device_t)
        self.retries_used = 0                                # resends over the driver's life
        # Set by the first successful open(): from then on a closed port may leave a device stimulating
        # (a failed reconnect), so stop() must not report it as stopped.
        self.was_opened = False
        self._events_drained = 0                             # device_events[:n] already handed out
        self._ser: serial.Serial | None = None
        self._fd = -1
        # Not 0: a host restarted against a still-powered device would resend the seqs of its previous
        # session, which the device's dedup memory may still hold (PROTOCOL.md §4).
        self._seq = random.SystemRandom().randrange(P.SEQ_MOD)
        self._decoder = P.FrameDecoder()
        self._lock = threading.Lock()
        self._rbuf = bytearray(4096)

    # ------------------------------------------------------------ lifecycle

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    @property
    def decoder_errors(self) -> dict[str, int]:
        return dict(self._decoder.errors)

    def open(self) -> None:
        """Open the port, try low-latency mode, then HELLO: version check and capabilities."""
        if self._ser is not None:
            return
        if "://" not in self.port and not os.path.exists(self.port):
            raise StimulatorError(f"serial port {self.port} not found: expected an existing serial device "
                                  "path (e.g. /dev/ttyUSB0, /dev/ttyACM0 or a pty slave /dev/pts/N)")
        try:
            ser = serial.Serial(self.port, self.baudrate, timeout=0, exclusive=True)   # writes: _write_all
        except (serial.SerialException, OSError, ValueError) as e:
            raise StimulatorError(f"serial port {self.port} cannot be opened at {self.baudrate} baud: {e}") from e
        # FTDI latency timer 16 ms -> 1 ms; raises on a pty or a non-FTDI device (REFERENCE.md §8).
        try:
            ser.set_low_latency_mode(True)
            self.low_latency = True
        except (ValueError, OSError, AttributeError, NotImplementedError):
            self.low_latency = False
        ser.reset_input_buffer()
        self._ser = ser
        self._fd = ser.fileno()
        self._decoder.reset()
        try:
            reply = self._hello_until(self.clock() + self.connect_timeout_s)
            _, _, body = P.decode_ack(reply.payload)
            ver, caps, wd = P.decode_capabilities(body)
        except P.ProtocolError as e:
            self.close()
            raise StimulatorError(f"device on {self.port} answered HELLO with a malformed reply: {e}") from e
        except BaseException:
            self.close()
            raise
        if ver != P.PROTOCOL_VERSION:
            self.close()
            raise StimulatorError(f"device on {self.port} speaks protocol version {ver}, "
                                  f"expected {P.PROTOCOL_VERSION}")
        self.device_version = ver
        self.capabilities = caps
        self.device_watchdog_s = wd
        # An EVENT read before the HELLO was answered is about the previous host (a device left
        # powered trips its watchdog after that host went quiet), not about this session: kept in
        # device_events, never handed out as this session's fault.
        with self._lock:
            self._events_drained = len(self.device_events)
        self.was_opened = True

    def _hello_until(self, deadline: float) -> P.Frame:
        """HELLO, again with a new seq after each timed-out command, until one is answered or ``deadline``."""
        n_commands = 0
        while True:
            try:
                reply, _, _, _ = self._transact(P.MsgType.HELLO, P.encode_hello())
                return reply
            except DeviceTimeout as e:
                n_commands += 1
                if self.clock() >= deadline:
                    tried = (f"within {self.connect_timeout_s} s of opening it ({n_commands * (1 + self.retries)} "
                             f"attempts, {self.timeout_s} s each)")
                    errors = self._decoder.errors
                    if sum(errors.values()):
                        # Bytes that never made a frame: something answers, in another language or at
                        # another baud rate; silence is a device off, on another port, or still starting.
                        why = (f"no valid reply from {self.port} {tried}, only bytes that are no protocol frames "
                               f"({errors['garbage_bytes']} skipped, {errors['crc']} failed CRCs): is it a device "
                               f"speaking protocol v{P.PROTOCOL_VERSION} (drivers/PROTOCOL.md), at "
                               f"device.baudrate = {self.baudrate}?")
                    else:
                        why = (f"no reply from {self.port} {tried}: is the device powered, on this port and "
                               f"speaking protocol v{P.PROTOCOL_VERSION} (drivers/PROTOCOL.md)?")
                    raise DeviceTimeout(f"HELLO: {why} A device that needs longer to start needs a longer "
                                        "device.connect_timeout_s") from e

    def close(self) -> None:
        ser, self._ser, self._fd = self._ser, None, -1
        if ser is not None:
            try:
                ser.close()
            except (OSError, serial.SerialException):
                pass

    # ------------------------------------------------------------ commands

    def configure(self, params: StimParams) -> CommandReceipt:
        """Load ``params`` on ``params.channel``; NACK -> StimulatorError naming the code."""
        try:
            payload = P.encode_configure(params)
        except P.ProtocolError as e:
            raise StimulatorError(f"CONFIGURE not sent: {e}") from e
        return self._command(P.MsgType.CONFIGURE, payload)

    def trigger(self, channel: int, at: float | None = None) -> CommandReceipt:
        """Deliver the configured burst on ``channel`` now, or at session-clock time ``at``."""
        try:
            payload = P.encode_trigger(channel, at)
        except P.ProtocolError as e:
            raise StimulatorError(f"TRIGGER not sent: {e}") from e
        return self._command(P.MsgType.TRIGGER, payload)

    def warm(self, channel: int) -> None:
        """Encode a TRIGGER frame for ``channel`` and drop it: no byte is written, no seq is used."""
        P.encode_frame(P.MsgType.TRIGGER, self._seq, P.encode_trigger(channel, None))

    def heartbeat(self) -> CommandReceipt:
        """Keep the device watchdog from stopping stimulation."""
        return self._command(P.MsgType.HEARTBEAT, P.encode_heartbeat(self.clock()))

    def status(self) -> P.DeviceStatus:
        """Ask the device for its channel masks and counters."""
        reply, _, _, _ = self._transact(P.MsgType.STATUS, b"")
        try:
            _, _, body = P.decode_ack(reply.payload)
            return P.decode_status(body)
        except P.ProtocolError as e:
            raise StimulatorError(f"STATUS seq {reply.seq}: malformed reply from {self.port}: {e}") from e

    def drain_device_events(self) -> list[tuple[int, float]]:
        """EVENT frames read since the last call (``device_events`` keeps them all)."""
        if len(self.device_events) == self._events_drained:
            return []   # the usual case, on the command path: no lock taken
        with self._lock:
            new = self.device_events[self._events_drained:]
            self._events_drained = len(self.device_events)
        return new

    def stop(self) -> CommandReceipt | None:
        """All channels off. Never raises for device trouble and never waits longer
        than ``(1 + max(retries, 3)) * timeout_s``; a receipt with ``ok=False`` when the
        device did not confirm, or when the port is closed after having been open
        (a failed reconnect, a capabilities change): no STOP could leave the host, and
        the device may still be stimulating until its watchdog trips. ``None`` only for
        a driver never opened, which cannot have started anything.
        """
        sent_t = self.clock()
        if self._ser is None:
            if not self.was_opened:
                return None
            return CommandReceipt(seq=self._seq, sent_t=sent_t, acked_t=float("nan"), ok=False,
                                  error=f"port not open: STOP not sent ({self.port} closed after being open)")
        try:
            return self._command(P.MsgType.STOP, b"", retries=max(self.retries, 3))
        except StimulatorError as e:
            return CommandReceipt(seq=self._seq, sent_t=sent_t, acked_t=float("nan"), ok=False, error=str(e))

    # ------------------------------------------------------------ transport

    def _command(self, msg_type: P.MsgType, payload: bytes, retries: int | None = None) -> CommandReceipt:
        reply, sent_t, acked_t, device_t = self._transact(msg_type, payload, retries)
        return CommandReceipt(seq=reply.seq, sent_t=sent_t, acked_t=acked_t, device_t=device_t)

    def _transact(self, msg_type: P.MsgType, payload: bytes,
                  retries: int | None = None) -> tuple[P.Frame, float, float, float]:
        """Send one request and return ``(ACK frame, sent_t, acked_t, device receipt time)``; NACK/timeout raise."""
        if self._ser is None:
            raise StimulatorError(f"{msg_type.name} on {self.port}: port not open, call open() first")
        n_retries = self.retries if retries is None else retries
        with self._lock:
            self._seq = (self._seq + 1) % P.SEQ_MOD
            seq = self._seq
            frame = P.encode_frame(msg_type, seq, payload)
            first_sent_t = None
            for attempt in range(n_retries + 1):
                if attempt:
                    self.retries_used += 1
                sent_t = self.clock()
                if first_sent_t is None:
                    first_sent_t = sent_t
                self._write_all(frame, f"{msg_type.name} seq {seq}")
                reply = self._await_reply(seq, sent_t + self.timeout_s)
                if reply is None:
                    continue
                acked_t = self.clock()
                # A reply with the right seq and CRC but a payload that does not decode is device
                # trouble like any other: StimulatorError, so stop() keeps its promise not to raise.
                if reply.version != P.PROTOCOL_VERSION:   # its payload would be read in another layout
                    raise StimulatorError(f"{msg_type.name} seq {seq}: the device on {self.port} answers in "
                                          f"protocol version {reply.version}, expected {P.PROTOCOL_VERSION} "
                                          "(drivers/PROTOCOL.md)")
                try:
                    if reply.msg_type == P.MsgType.NACK:
                        acked, code, detail, dev_t = P.decode_nack(reply.payload)
                    else:
                        acked, dev_t, _ = P.decode_ack(reply.payload)
                except P.ProtocolError as e:
                    raise StimulatorError(f"{msg_type.name} seq {seq}: malformed "
                                          f"{P.MsgType(reply.msg_type).name} from {self.port}: {e}") from e
                if acked != seq:   # PROTOCOL.md §3: the seq is in the header and in the payload, alike
                    raise StimulatorError(f"{msg_type.name} seq {seq}: malformed {P.MsgType(reply.msg_type).name} "
                                          f"from {self.port}: its payload acknowledges seq {acked}")
                self.last_receipt_device_t = dev_t
                if reply.msg_type == P.MsgType.NACK:
                    raise nack_error(code)(
                        f"device refused {msg_type.name} seq {seq}: {P.error_name(code)} "
                        f"({P.ERROR_TEXT.get(code, 'unknown error')}){_detail_text(msg_type, code, detail)}")
                return reply, first_sent_t, acked_t, dev_t
            raise DeviceTimeout(f"{msg_type.name} seq {seq}: no reply from {self.port} within "
                                f"{self.timeout_s} s after {n_retries + 1} attempts")

    def _write_all(self, frame: bytes, what: str) -> None:
        """Every byte of ``frame`` to the port, waiting at most ``timeout_s`` for room, or StimulatorError.

        Not pyserial's ``write``: with a write timeout it raises when the call *took* longer than
        the timeout even if every byte went out (pyserial issue #281, open), and a process
        descheduled for 50 ms on a loaded machine turned a sent HEARTBEAT into a fault.
        """
        view = memoryview(frame)
        deadline = self.clock() + self.timeout_s
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                pass
            except OSError as e:
                raise StimulatorError(f"{what}: write to {self.port} failed: {e}") from e
            if not view:
                return
            left = deadline - self.clock()
            try:
                ready = left > 0 and select.select([], [self._fd], [], left)[1]
            except (OSError, ValueError) as e:
                raise StimulatorError(f"{what}: write to {self.port} failed: {e}") from e
            if not ready:
                raise StimulatorError(f"{what}: write to {self.port} timed out: {len(view)} of {len(frame)} "
                                      f"bytes not taken within {self.timeout_s} s (is the device reading?)")

    def _await_reply(self, seq: int, deadline: float) -> P.Frame | None:
        """Read until an ACK/NACK for ``seq`` arrives or ``deadline`` (clock time) passes."""
        fd = self._fd
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                # Line quiet: a false header in garbage may hide a complete reply.
                return self._match(self._decoder.flush(), seq)
            try:
                r, _, _ = select.select([fd], [], [], remaining)
            except (OSError, ValueError) as e:
                raise StimulatorError(f"reading {self.port} failed: {e}") from e
            if not r:
                continue
            try:
                n = os.readv(fd, [self._rbuf])
            except BlockingIOError:
                continue
            except OSError as e:
                raise StimulatorError(f"reading {self.port} failed: {e}") from e
            if n == 0:
                raise StimulatorError(f"serial port {self.port} closed by the device side")
            found = self._match(self._decoder.feed(memoryview(self._rbuf)[:n]), seq)
            if found is not None:
                return found

    def _match(self, frames: list[P.Frame], seq: int) -> P.Frame | None:
        found = None
        for f in frames:
            if f.msg_type == P.MsgType.EVENT:
                try:
                    self.device_events.append(P.decode_event(f.payload))
                except P.ProtocolError:
                    pass
            elif f.msg_type in (P.MsgType.ACK, P.MsgType.NACK) and f.seq == seq and found is None:
                found = f
            # Anything else is a stale reply to an earlier attempt: ignore it.
        return found


def _detail_text(msg_type: P.MsgType, code: int, detail: int) -> str:
    if msg_type == P.MsgType.CONFIGURE and code in (P.ErrorCode.OUT_OF_RANGE, P.ErrorCode.BAD_CHANNEL,
                                                    P.ErrorCode.UNSUPPORTED_WAVEFORM):
        if 0 <= detail < len(P.CONFIGURE_FIELDS):
            return f", field {P.CONFIGURE_FIELDS[detail]}"
    if code == P.ErrorCode.VERSION_MISMATCH:
        return f", device speaks version {detail}"
    return ""
