"""Protocol v1 codec: CRC, payload round trips, the resynchronizing frame decoder."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from drivers import protocol as P
from drivers.params import DeviceCapabilities, StimParams, Waveform


def test_crc_is_ccitt_false_check_value():
    # The catalogue check value of CRC-16/CCITT-FALSE over "123456789".
    assert P.crc16_ccitt_false(b"123456789") == 0x29B1


def test_hello_frame_bytes_match_protocol_md_example():
    assert P.encode_frame(P.MsgType.HELLO, 1, P.encode_hello()).hex(" ") == "a5 5a 01 01 01 00 01 00 01 4f 81"


def test_encode_frame_layout_and_crc_position():
    f = P.encode_frame(P.MsgType.TRIGGER, 0x1234, P.encode_trigger(2, 1.5))
    sync, ver, typ, seq, n = struct.unpack_from("<2sBBHH", f)
    assert (sync, ver, typ, seq, n) == (b"\xa5\x5a", 1, 0x03, 0x1234, P.TRIGGER_FMT.size)
    assert len(f) == P.OVERHEAD + n
    assert struct.unpack_from("<H", f, len(f) - 2)[0] == P.crc16_ccitt_false(f[2:-2])


@pytest.mark.parametrize("bad, match", [
    (dict(seq=70000), "seq 70000"),
    (dict(payload=b"x" * (P.MAX_PAYLOAD + 1)), "payload of 193 bytes"),
])
def test_encode_frame_rejects_bad_values(bad, match):
    kw = dict(msg_type=P.MsgType.STOP, seq=1, payload=b"") | bad
    with pytest.raises(P.ProtocolError, match=match):
        P.encode_frame(**kw)


def test_configure_round_trip_is_exact():
    p = StimParams(channel=3, waveform=Waveform.TI, amplitude_ua=1234.567, pulse_width_us=90.5,
                   interphase_gap_us=12.25, frequency_hz=10.1, n_pulses=70000, duration_s=12.5,
                   ramp_s=0.3, carrier_hz=2000.0)
    assert P.decode_configure(P.encode_configure(p)) == p


def test_decode_configure_rejects_unknown_waveform_and_bad_length():
    raw = bytearray(P.encode_configure(StimParams()))
    raw[1] = 9
    with pytest.raises(P.ProtocolError, match="waveform code 9"):
        P.decode_configure(bytes(raw))
    with pytest.raises(P.ProtocolError, match="CONFIGURE payload is 5 bytes, expected 62"):
        P.decode_configure(b"12345")


def test_trigger_at_encoding_and_validation():
    assert P.decode_trigger(P.encode_trigger(1, None)) == (1, 0.0)
    assert P.decode_trigger(P.encode_trigger(1, 123.456789)) == (1, 123.456789)
    with pytest.raises(P.ProtocolError, match="deliver-at time"):
        P.encode_trigger(1, float("nan"))
    with pytest.raises(P.ProtocolError, match="channel 300"):
        P.encode_trigger(300)


def test_ack_nack_event_capabilities_status_round_trip():
    assert P.decode_ack(P.encode_ack(7, 1.25, b"xy")) == (7, 1.25, b"xy")
    assert P.decode_nack(P.encode_nack(7, P.ErrorCode.BUSY, 2.5, detail=3)) == (7, 7, 3, 2.5)
    assert P.decode_event(P.encode_event(P.EventCode.WATCHDOG, 3.0)) == (1, 3.0)
    caps = DeviceCapabilities(n_channels=2, waveforms=(Waveform.BIPHASIC, Waveform.DC), max_amplitude_ua=4000.0,
                              min_pulse_width_us=20.0, max_pulse_width_us=500.0, max_frequency_hz=200.0,
                              scheduled_trigger=False, name="box", firmware="fw-2")
    ver, got, wd = P.decode_capabilities(P.encode_capabilities(caps, 0.25))
    assert (ver, wd) == (1, 0.25)
    assert got.waveforms == caps.waveforms and got.n_channels == 2 and not got.scheduled_trigger
    assert (got.name, got.firmware, got.max_amplitude_ua, got.max_pulse_width_us) == ("box", "fw-2", 4000.0, 500.0)
    s = P.DeviceStatus(active_mask=1, configured_mask=3, pending_mask=2, watchdog_trips=4, rx_errors=5)
    assert P.decode_status(P.encode_status(s)) == s
    assert P.error_name(4) == "OUT_OF_RANGE" and P.error_name(200) == "UNKNOWN_ERROR_200"


def _frames(n: int) -> list[bytes]:
    return [P.encode_frame(P.MsgType.TRIGGER, i, P.encode_trigger(i % 4, i * 0.5)) for i in range(n)]


def test_decoder_split_at_every_byte_boundary():
    data = b"".join(_frames(3))
    for cut in range(len(data) + 1):
        d = P.FrameDecoder()
        got = d.feed(data[:cut]) + d.feed(data[cut:])
        assert [f.seq for f in got] == [0, 1, 2]
        assert d.errors == {"crc": 0, "oversized": 0, "truncated": 0, "garbage_bytes": 0}


def test_decoder_counts_bad_crc_and_recovers_next_frame():
    a, b = _frames(2)
    bad = bytearray(a)
    bad[10] ^= 0xFF
    d = P.FrameDecoder()
    got = d.feed(bytes(bad) + b)
    assert [f.seq for f in got] == [1]
    assert d.errors["crc"] == 1


def test_decoder_rejects_oversized_length():
    d = P.FrameDecoder()
    oversized = b"\xa5\x5a\x01\x03\x00\x00" + struct.pack("<H", P.MAX_PAYLOAD + 1)
    got = d.feed(oversized + _frames(1)[0])
    assert [f.seq for f in got] == [0]
    assert d.errors["oversized"] == 1


def test_truncated_frame_followed_by_valid_frame():
    a, b = _frames(2)
    d = P.FrameDecoder()
    got = d.feed(a[:7] + b)   # a cut inside its header: its length field swallows b
    # The false length (b's first byte and more) is over the maximum: rejected at once, b found by the
    # rescan without waiting for a flush (PROTOCOL.md §2, step 2).
    assert [f.seq for f in got] == [1] and d.errors["oversized"] == 1
    assert d.flush() == [] and d.errors["crc"] == d.errors["truncated"] == 0


def test_false_header_in_garbage_hides_frame_until_flush():
    frame = _frames(1)[0]
    false_header = b"\xa5\x5a\x01\x01\x00\x00" + struct.pack("<H", 150)
    d = P.FrameDecoder()
    assert d.feed(false_header + frame) == []   # waiting for 150 payload bytes that never come
    got = d.flush()
    assert [f.seq for f in got] == [0]
    assert d.errors["truncated"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=10))
def test_any_byte_soup_never_crashes(soup, cuts):
    d = P.FrameDecoder()
    pos = 0
    for c in cuts:
        for f in d.feed(soup[pos:pos + c]):
            assert len(f.payload) <= P.MAX_PAYLOAD
        pos += c
    d.feed(soup[pos:])
    d.flush()
    assert d.pending <= 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=80), st.integers(0, 0xFFFF), st.binary(max_size=40)),
                min_size=1, max_size=6),
       st.binary(max_size=80), st.integers(1, 64))
def test_valid_frames_embedded_in_garbage_are_recovered(parts, tail, chunk):
    stream = b""
    sent = []
    for garbage, seq, payload in parts:
        stream += garbage + P.encode_frame(P.MsgType.HEARTBEAT, seq, payload)
        sent.append((seq, payload))
    stream += tail
    d = P.FrameDecoder()
    got = []
    for i in range(0, len(stream), chunk):
        got += d.feed(stream[i:i + chunk])
    got += d.flush()
    got_pairs = [(f.seq, f.payload) for f in got if f.msg_type == P.MsgType.HEARTBEAT]
    # Every sent frame comes out, in order; garbage could only add (CRC-valid by chance) extras.
    it = iter(got_pairs)
    assert all(any(g == s for g in it) for s in sent), (sent, got_pairs)


def test_check_params_names_field_value_and_range():
    caps = DeviceCapabilities(n_channels=2, waveforms=(Waveform.BIPHASIC,), max_amplitude_ua=3000.0,
                              min_pulse_width_us=40.0, max_pulse_width_us=500.0, max_frequency_hz=200.0)
    ok = StimParams(channel=1, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=5)
    assert P.check_params(ok, caps) is None
    cases = [
        (ok.with_(channel=2), P.ErrorCode.BAD_CHANNEL, "channel", "channel 2 out of range, expected 0..1"),
        (ok.with_(waveform=Waveform.SINE), P.ErrorCode.UNSUPPORTED_WAVEFORM, "waveform", "waveform sine"),
        (ok.with_(amplitude_ua=3001.0), P.ErrorCode.OUT_OF_RANGE, "amplitude_ua", "amplitude_ua 3001.0 out of range, expected 0..3000.0"),
        (ok.with_(pulse_width_us=10.0), P.ErrorCode.OUT_OF_RANGE, "pulse_width_us", "expected 40.0..500.0"),
        (ok.with_(frequency_hz=250.0), P.ErrorCode.OUT_OF_RANGE, "frequency_hz", "frequency_hz 250.0"),
        (ok.with_(n_pulses=0), P.ErrorCode.OUT_OF_RANGE, "n_pulses", "n_pulses 0"),
        (ok.with_(amplitude_ua=float("nan")), P.ErrorCode.OUT_OF_RANGE, "amplitude_ua", "finite"),
        (ok.with_(pulse_width_us=500.0, frequency_hz=200.0, interphase_gap_us=4100.0), P.ErrorCode.OUT_OF_RANGE,
         "interphase_gap_us", "exceeds the period"),
    ]
    for params, code, fld, text in cases:
        got = P.check_params(params, caps)
        assert got is not None, params
        assert got[0] is code and P.CONFIGURE_FIELDS[got[1]] == fld and text in got[2], got
    dc_caps = DeviceCapabilities(waveforms=(Waveform.DC,))
    dc = StimParams(waveform=Waveform.DC, amplitude_ua=1000.0, duration_s=10.0, ramp_s=6.0)
    assert "ramp_s 6.0" in P.check_params(dc, dc_caps)[2]
    assert P.check_params(dc.with_(ramp_s=2.0), dc_caps) is None


def test_protocol_md_hex_examples_decode():
    from pathlib import Path
    text = (Path(P.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")
    block = text.split("## 8. Examples")[1].split("```")[1]
    hex_lines = [ln for ln in block.splitlines() if ln.startswith("a5 5a")]
    assert len(hex_lines) == 11
    d = P.FrameDecoder()
    frames = d.feed(b"".join(bytes.fromhex(ln) for ln in hex_lines))
    assert len(frames) == 11 and d.errors["crc"] == 0
    by_type = {}
    for f in frames:
        by_type.setdefault(P.MsgType(f.msg_type), []).append(f)
    assert P.decode_configure(by_type[P.MsgType.CONFIGURE][0].payload) == StimParams(
        channel=1, amplitude_ua=1500.0, pulse_width_us=100.0, frequency_hz=200.0, n_pulses=2)
    assert [P.decode_trigger(f.payload) for f in by_type[P.MsgType.TRIGGER]] == [(1, 0.0), (1, 1000.25)]
    assert P.decode_nack(by_type[P.MsgType.NACK][0].payload) == (3, P.ErrorCode.NOT_CONFIGURED, 0, 1000.0)
    _, t, body = P.decode_ack(by_type[P.MsgType.ACK][0].payload)
    assert t == 1234.5 and P.decode_capabilities(body)[1].name == "stimloop-emu"
