"""Pure codec for the stimloop serial protocol, version 1 (see ``drivers/PROTOCOL.md``).

No I/O and no clock reads: the driver (``drivers.serial_stimulator``) and the
device emulator (``hil_sim.emulator``) both build on these functions, so the two
sides cannot drift apart.

Frame (little-endian)::

    A5 5A | ver u8 | type u8 | seq u16 | len u16 | payload[len] | crc u16

The CRC-16/CCITT-FALSE covers ``ver .. payload`` (everything but the sync bytes).
"""
from __future__ import annotations

import binascii
import math
import struct
from dataclasses import dataclass
from enum import IntEnum

from drivers.params import DeviceCapabilities, StimParams, Waveform

PROTOCOL_VERSION = 1
SYNC = b"\xa5\x5a"
HEADER = struct.Struct("<2sBBHH")      # sync, version, type, seq, payload length
CRC = struct.Struct("<H")
HEADER_SIZE = HEADER.size              # 8
OVERHEAD = HEADER_SIZE + CRC.size      # 10 bytes around every payload
# Small on purpose: a false header found in line garbage can at most make the
# decoder wait for this many bytes before it gives up on it and resynchronizes.
MAX_PAYLOAD = 192
SEQ_MOD = 1 << 16
# A device refuses a TRIGGER whose deliver-at time is further ahead than this (PROTOCOL.md §5.3).
MAX_SCHEDULE_AHEAD_S = 60.0


class MsgType(IntEnum):
    """Message type byte. Host → device below 0x80, device → host from 0x80."""

    HELLO = 0x01
    CONFIGURE = 0x02
    TRIGGER = 0x03
    STOP = 0x04
    HEARTBEAT = 0x05
    STATUS = 0x06
    ACK = 0x80
    NACK = 0x81
    EVENT = 0x82   # unsolicited device report (watchdog trip, ...)


class ErrorCode(IntEnum):
    """NACK error codes (PROTOCOL.md §6)."""

    BAD_CRC = 1            # never sent in a NACK (seq untrusted); used in counters
    UNKNOWN_TYPE = 2
    BAD_LENGTH = 3
    OUT_OF_RANGE = 4       # a field is outside the device range; detail = field index
    NOT_CONFIGURED = 5
    VERSION_MISMATCH = 6
    BUSY = 7               # a burst is running or scheduled on that channel
    BAD_CHANNEL = 8
    UNSUPPORTED_WAVEFORM = 9
    TOO_LATE = 10          # deliver-at time already passed by more than the device tolerance
    NO_HANDSHAKE = 11      # command before HELLO


ERROR_TEXT = {
    ErrorCode.BAD_CRC: "bad CRC",
    ErrorCode.UNKNOWN_TYPE: "unknown message type",
    ErrorCode.BAD_LENGTH: "payload length does not match the message type",
    ErrorCode.OUT_OF_RANGE: "parameter out of device range",
    ErrorCode.NOT_CONFIGURED: "channel not configured",
    ErrorCode.VERSION_MISMATCH: "protocol version mismatch",
    ErrorCode.BUSY: "channel busy (burst running or scheduled)",
    ErrorCode.BAD_CHANNEL: "channel does not exist on the device",
    ErrorCode.UNSUPPORTED_WAVEFORM: "waveform not supported by the device",
    ErrorCode.TOO_LATE: "deliver-at time already passed",
    ErrorCode.NO_HANDSHAKE: "HELLO handshake required first",
}


class EventCode(IntEnum):
    """Codes of unsolicited EVENT frames."""

    WATCHDOG = 1           # no valid frame within watchdog_s: all stimulation stopped


# Waveform codes on the wire; the order is part of protocol version 1.
WAVEFORM_CODES: dict[Waveform, int] = {
    Waveform.BIPHASIC: 0, Waveform.MONOPHASIC: 1, Waveform.SINE: 2, Waveform.DC: 3, Waveform.TI: 4,
}
CODE_WAVEFORMS: dict[int, Waveform] = {v: k for k, v in WAVEFORM_CODES.items()}

# Payload layouts (PROTOCOL.md §5).
HELLO_FMT = struct.Struct("<B")                   # host protocol version
CONFIGURE_FMT = struct.Struct("<BBddddIddd")      # ch, waveform, amp, pw, ipg, freq, n_pulses, dur, ramp, carrier
TRIGGER_FMT = struct.Struct("<Bd")                # channel, deliver-at (0 = now)
HEARTBEAT_FMT = struct.Struct("<d")               # host clock at send (informative)
ACK_FMT = struct.Struct("<Hd")                    # acked seq, device receipt time
NACK_FMT = struct.Struct("<HBBd")                 # acked seq, error code, detail, device receipt time
EVENT_FMT = struct.Struct("<Bd")                  # event code, device time
CAPS_FMT = struct.Struct("<BBBBddddd16s16s")      # HELLO ACK body
STATUS_FMT = struct.Struct("<BBBHI")              # STATUS ACK body

CONFIGURE_FIELDS = ("channel", "waveform", "amplitude_ua", "pulse_width_us", "interphase_gap_us",
                    "frequency_hz", "n_pulses", "duration_s", "ramp_s", "carrier_hz")
_U8 = 0xFF


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; ``payload`` is a bytes copy owned by the frame."""

    version: int
    msg_type: int
    seq: int
    payload: bytes


class ProtocolError(ValueError):
    """A payload that does not fit its message type or a value that cannot be encoded."""


def crc16_ccitt_false(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, xorout 0).

    ``binascii.crc_hqx`` is exactly this polynomial, non-reflected, in C.
    """
    return binascii.crc_hqx(data, 0xFFFF)


def encode_frame(msg_type: int, seq: int, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    """Frame ``payload`` with sync, header and CRC."""
    if not 0 <= seq < SEQ_MOD:
        raise ProtocolError(f"seq {seq} out of range, expected 0..65535")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes too long, expected at most {MAX_PAYLOAD}")
    if not 0 <= msg_type <= _U8:
        raise ProtocolError(f"msg_type {msg_type} out of range, expected 0..255")
    head = HEADER.pack(SYNC, version, msg_type, seq, len(payload))
    crc = crc16_ccitt_false(head[2:] + payload)
    return head + payload + CRC.pack(crc)


class FrameDecoder:
    """Incremental frame parser that skips garbage and resynchronizes.

    ``feed(data)`` returns the complete valid frames found so far. Rejected
    candidates are counted in ``errors`` by kind: ``crc`` (checksum failed),
    ``oversized`` (length field above MAX_PAYLOAD), ``truncated`` (a partial
    frame dropped by :meth:`flush`), ``garbage_bytes`` (bytes skipped while
    looking for a sync pattern).

    After a rejected candidate the search restarts one byte after its sync, so
    a valid frame swallowed by a false header in the garbage is still found.
    """

    __slots__ = ("_buf", "errors", "frames_ok")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.errors: dict[str, int] = {"crc": 0, "oversized": 0, "truncated": 0, "garbage_bytes": 0}
        self.frames_ok = 0

    @property
    def pending(self) -> int:
        """Bytes buffered but not yet decided (partial frame or lone sync byte)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Append ``data`` and return every complete, valid frame now available."""
        if data:
            self._buf += data
        return self._parse()

    def flush(self) -> list[Frame]:
        """Give up on a partial frame at the head of the buffer and rescan what follows.

        Call it when the line has gone quiet (e.g. on a read timeout): a false
        header in garbage may be waiting for bytes that will never come, hiding
        a complete valid frame behind it.
        """
        # After _parse the buffer is empty, a lone first sync byte, or a partial
        # candidate starting with SYNC: drop that candidate's sync and rescan.
        out: list[Frame] = []
        while len(self._buf) >= len(SYNC):
            self.errors["truncated"] += 1
            del self._buf[:1]
            out += self._parse()
        return out

    def reset(self) -> None:
        """Drop everything buffered (counters are kept)."""
        self._buf.clear()

    def _parse(self) -> list[Frame]:
        buf = self._buf
        out: list[Frame] = []
        start = 0
        n = len(buf)
        while True:
            i = buf.find(SYNC, start)
            if i < 0:
                # Keep a trailing lone first sync byte: it may start the next frame.
                keep = 1 if n > start and buf[n - 1] == SYNC[0] else 0
                self.errors["garbage_bytes"] += n - start - keep
                start = n - keep
                break
            self.errors["garbage_bytes"] += i - start
            if n - i < HEADER_SIZE:
                start = i
                break
            _, version, msg_type, seq, length = HEADER.unpack_from(buf, i)
            if length > MAX_PAYLOAD:
                self.errors["oversized"] += 1
                start = i + 1
                continue
            end = i + HEADER_SIZE + length + CRC.size
            if end > n:
                start = i
                break
            (crc,) = CRC.unpack_from(buf, end - CRC.size)
            if crc16_ccitt_false(memoryview(buf)[i + 2:end - CRC.size]) != crc:
                self.errors["crc"] += 1
                start = i + 1
                continue
            out.append(Frame(version, msg_type, seq, bytes(buf[i + HEADER_SIZE:end - CRC.size])))
            self.frames_ok += 1
            start = end
        if start:
            del buf[:start]
        return out


# ---------------------------------------------------------------- payloads

def _check_len(frame_or_payload: bytes, fmt: struct.Struct, what: str, at_least: bool = False) -> None:
    n = len(frame_or_payload)
    if (n < fmt.size) if at_least else (n != fmt.size):
        raise ProtocolError(f"{what} payload is {n} bytes, expected {'at least ' if at_least else ''}{fmt.size}")


def encode_hello(version: int = PROTOCOL_VERSION) -> bytes:
    return HELLO_FMT.pack(version)


def decode_hello(payload: bytes) -> int:
    _check_len(payload, HELLO_FMT, "HELLO")
    return HELLO_FMT.unpack(payload)[0]


def encode_configure(params: StimParams) -> bytes:
    """CONFIGURE payload for ``params``; raises ProtocolError when a value cannot go on the wire."""
    if not 0 <= params.channel <= _U8:
        raise ProtocolError(f"channel {params.channel} cannot be encoded, expected 0..255")
    if not 0 <= params.n_pulses <= 0xFFFFFFFF:
        raise ProtocolError(f"n_pulses {params.n_pulses} cannot be encoded, expected 0..4294967295")
    try:
        code = WAVEFORM_CODES[Waveform(params.waveform)]
    except ValueError as e:
        raise ProtocolError(f"waveform {params.waveform!r} unknown, expected one of {[str(w) for w in Waveform]}") from e
    return CONFIGURE_FMT.pack(params.channel, code, params.amplitude_ua, params.pulse_width_us,
                              params.interphase_gap_us, params.frequency_hz, int(params.n_pulses),
                              params.duration_s, params.ramp_s, params.carrier_hz)


def decode_configure(payload: bytes) -> StimParams:
    """Inverse of :func:`encode_configure`. Unknown waveform codes raise ProtocolError."""
    _check_len(payload, CONFIGURE_FMT, "CONFIGURE")
    ch, code, amp, pw, ipg, freq, n, dur, ramp, carrier = CONFIGURE_FMT.unpack(payload)
    if code not in CODE_WAVEFORMS:
        raise ProtocolError(f"waveform code {code} unknown, expected 0..{len(CODE_WAVEFORMS) - 1}")
    return StimParams(channel=ch, waveform=CODE_WAVEFORMS[code], amplitude_ua=amp, pulse_width_us=pw,
                      interphase_gap_us=ipg, frequency_hz=freq, n_pulses=n, duration_s=dur,
                      ramp_s=ramp, carrier_hz=carrier)


def encode_trigger(channel: int, at: float | None = None) -> bytes:
    """TRIGGER payload; ``at`` None or 0.0 means "now"."""
    if not 0 <= channel <= _U8:
        raise ProtocolError(f"channel {channel} cannot be encoded, expected 0..255")
    at_f = 0.0 if at is None else float(at)
    if not math.isfinite(at_f) or at_f < 0:
        raise ProtocolError(f"deliver-at time {at!r} invalid, expected a finite clock time >= 0 (0 = now)")
    return TRIGGER_FMT.pack(channel, at_f)


def decode_trigger(payload: bytes) -> tuple[int, float]:
    _check_len(payload, TRIGGER_FMT, "TRIGGER")
    return TRIGGER_FMT.unpack(payload)


def encode_heartbeat(host_t: float) -> bytes:
    return HEARTBEAT_FMT.pack(host_t)


def encode_ack(acked_seq: int, device_t: float, body: bytes = b"") -> bytes:
    return ACK_FMT.pack(acked_seq, device_t) + body


def decode_ack(payload: bytes) -> tuple[int, float, bytes]:
    """``(acked_seq, device_t, body)``; body is the reply data of HELLO/STATUS, else empty."""
    _check_len(payload, ACK_FMT, "ACK", at_least=True)
    seq, t = ACK_FMT.unpack_from(payload)
    return seq, t, bytes(payload[ACK_FMT.size:])


def encode_nack(acked_seq: int, code: int, device_t: float, detail: int = 0) -> bytes:
    return NACK_FMT.pack(acked_seq, int(code), detail, device_t)


def decode_nack(payload: bytes) -> tuple[int, int, int, float]:
    """``(acked_seq, code, detail, device_t)``."""
    _check_len(payload, NACK_FMT, "NACK")
    return NACK_FMT.unpack(payload)


def encode_event(code: int, device_t: float) -> bytes:
    return EVENT_FMT.pack(int(code), device_t)


def decode_event(payload: bytes) -> tuple[int, float]:
    _check_len(payload, EVENT_FMT, "EVENT")
    return EVENT_FMT.unpack(payload)


def error_name(code: int) -> str:
    """``"OUT_OF_RANGE"`` for 4; ``"UNKNOWN_ERROR_<n>"`` for codes this version does not know."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"UNKNOWN_ERROR_{code}"


def _fixed_str(s: str, n: int = 16) -> bytes:
    return s.encode("utf-8")[:n].ljust(n, b"\0")


def encode_capabilities(caps: DeviceCapabilities, watchdog_s: float) -> bytes:
    """HELLO ACK body: what the device can do and its watchdog period."""
    mask = 0
    for w in caps.waveforms:
        mask |= 1 << WAVEFORM_CODES[Waveform(w)]
    flags = 1 if caps.scheduled_trigger else 0
    return CAPS_FMT.pack(PROTOCOL_VERSION, caps.n_channels, mask, flags, caps.max_amplitude_ua,
                         caps.min_pulse_width_us, caps.max_pulse_width_us, caps.max_frequency_hz,
                         watchdog_s, _fixed_str(caps.name), _fixed_str(caps.firmware))


def decode_capabilities(body: bytes) -> tuple[int, DeviceCapabilities, float]:
    """``(device protocol version, capabilities, watchdog_s)`` from a HELLO ACK body."""
    _check_len(body, CAPS_FMT, "HELLO ACK body")
    ver, n_ch, mask, flags, max_amp, min_pw, max_pw, max_f, wd, name, fw = CAPS_FMT.unpack(body)
    waveforms = tuple(w for w, c in WAVEFORM_CODES.items() if mask & (1 << c))
    caps = DeviceCapabilities(n_channels=n_ch, waveforms=waveforms, max_amplitude_ua=max_amp,
                              min_pulse_width_us=min_pw, max_pulse_width_us=max_pw, max_frequency_hz=max_f,
                              scheduled_trigger=bool(flags & 1),
                              name=name.rstrip(b"\0").decode("utf-8", "replace"),
                              firmware=fw.rstrip(b"\0").decode("utf-8", "replace"),
                              extra={"watchdog_s": wd, "protocol_version": ver})
    return ver, caps, wd


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """STATUS ACK body: bit masks over channels 0..7 and device counters."""

    active_mask: int
    configured_mask: int
    pending_mask: int
    watchdog_trips: int
    rx_errors: int


def encode_status(st: DeviceStatus) -> bytes:
    return STATUS_FMT.pack(st.active_mask & _U8, st.configured_mask & _U8, st.pending_mask & _U8,
                           min(st.watchdog_trips, 0xFFFF), min(st.rx_errors, 0xFFFFFFFF))


def decode_status(body: bytes) -> DeviceStatus:
    _check_len(body, STATUS_FMT, "STATUS ACK body")
    return DeviceStatus(*STATUS_FMT.unpack(body))


# ---------------------------------------------------------------- device range

def check_params(params: StimParams, caps: DeviceCapabilities) -> tuple[ErrorCode, int, str] | None:
    """Check ``params`` against what the device can do.

    Returns ``None`` when the device accepts them, else ``(code, field index
    in CONFIGURE_FIELDS, message)``; the message names field, value and range.
    Shared by the emulator and the simulated stimulator so both refuse alike.
    """
    def bad(code: ErrorCode, fld: str, msg: str) -> tuple[ErrorCode, int, str]:
        return code, CONFIGURE_FIELDS.index(fld), msg

    p = params
    if not 0 <= p.channel < caps.n_channels:
        return bad(ErrorCode.BAD_CHANNEL, "channel",
                   f"channel {p.channel} out of range, expected 0..{caps.n_channels - 1}")
    if Waveform(p.waveform) not in caps.waveforms:
        return bad(ErrorCode.UNSUPPORTED_WAVEFORM, "waveform",
                   f"waveform {p.waveform} not supported, expected one of {[str(w) for w in caps.waveforms]}")
    floats = {"amplitude_ua": p.amplitude_ua, "pulse_width_us": p.pulse_width_us,
              "interphase_gap_us": p.interphase_gap_us, "frequency_hz": p.frequency_hz,
              "duration_s": p.duration_s, "ramp_s": p.ramp_s, "carrier_hz": p.carrier_hz}
    for name, v in floats.items():
        if not math.isfinite(v) or v < 0:
            return bad(ErrorCode.OUT_OF_RANGE, name, f"{name} {v} invalid, expected a finite value >= 0")
    oor = ErrorCode.OUT_OF_RANGE
    if p.amplitude_ua > caps.max_amplitude_ua:
        return bad(oor, "amplitude_ua", f"amplitude_ua {p.amplitude_ua} out of range, expected 0..{caps.max_amplitude_ua}")
    if p.is_pulsed:
        if not caps.min_pulse_width_us <= p.pulse_width_us <= caps.max_pulse_width_us:
            return bad(oor, "pulse_width_us", f"pulse_width_us {p.pulse_width_us} out of range, "
                       f"expected {caps.min_pulse_width_us}..{caps.max_pulse_width_us}")
        if not 0 < p.frequency_hz <= caps.max_frequency_hz:
            return bad(oor, "frequency_hz", f"frequency_hz {p.frequency_hz} out of range, "
                       f"expected > 0 and <= {caps.max_frequency_hz}")
        if p.n_pulses < 1:
            return bad(oor, "n_pulses", f"n_pulses {p.n_pulses} out of range, expected >= 1")
        # Both phases and the gap must fit in one period, or pulses overlap.
        period_us = 1e6 / p.frequency_hz
        span_us = 2 * p.pulse_width_us + p.interphase_gap_us
        if span_us > period_us:
            return bad(oor, "interphase_gap_us", f"pulse span {span_us} us (2 x pulse_width_us + interphase_gap_us) "
                       f"exceeds the period {period_us:.1f} us at frequency_hz {p.frequency_hz}")
    else:
        if not p.duration_s > 0:
            return bad(oor, "duration_s", f"duration_s {p.duration_s} out of range, expected > 0 for {p.waveform}")
        if 2 * p.ramp_s > p.duration_s:
            return bad(oor, "ramp_s", f"ramp_s {p.ramp_s} out of range, expected <= duration_s / 2 = {p.duration_s / 2}")
        if Waveform(p.waveform) is Waveform.SINE and not 0 < p.frequency_hz <= caps.max_frequency_hz:
            return bad(oor, "frequency_hz", f"frequency_hz {p.frequency_hz} out of range, "
                       f"expected > 0 and <= {caps.max_frequency_hz}")
        if Waveform(p.waveform) is Waveform.TI and not p.carrier_hz > 0:
            return bad(oor, "carrier_hz", f"carrier_hz {p.carrier_hz} out of range, expected > 0 for ti")
    return None
