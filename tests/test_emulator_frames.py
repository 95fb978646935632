"""The emulator as a device: raw frames written on the pty, replies decoded by hand."""
from __future__ import annotations

import os
import select
import time

import pytest

from drivers import protocol as P
from drivers.params import DeviceCapabilities, StimParams, Waveform
from hil_sim.emulator import StimulatorEmulator
from hil_sim.pty_pair import close_pty, open_pty_pair

pytestmark = pytest.mark.realtime


class RawHost:
    """The host end of the line, speaking frames byte by byte (no driver in between)."""

    def __init__(self, path: str):
        import tty
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.dec = P.FrameDecoder()

    def send(self, raw: bytes) -> None:
        os.write(self.fd, raw)

    def request(self, msg_type: int, seq: int, payload: bytes = b"", version: int = 1) -> P.Frame:
        self.send(P.encode_frame(msg_type, seq, payload, version=version))
        return self.read_reply(seq)

    def read_reply(self, seq: int, timeout_s: float = 0.5) -> P.Frame:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            r, _, _ = select.select([self.fd], [], [], 0.02)
            if r:
                for f in self.dec.feed(os.read(self.fd, 4096)):
                    if f.seq == seq and f.msg_type in (P.MsgType.ACK, P.MsgType.NACK):
                        return f
        raise AssertionError(f"no reply for seq {seq}")

    def nack_code(self, frame: P.Frame) -> str:
        assert frame.msg_type == P.MsgType.NACK, frame
        return P.error_name(P.decode_nack(frame.payload)[1])

    def close(self):
        os.close(self.fd)


@pytest.fixture
def dev():
    master_fd, slave = open_pty_pair()
    caps = DeviceCapabilities(n_channels=2, waveforms=(Waveform.BIPHASIC,), max_amplitude_ua=5000.0,
                              min_pulse_width_us=40.0, max_pulse_width_us=500.0, max_frequency_hz=200.0,
                              scheduled_trigger=True, name="t")
    emu = StimulatorEmulator(master_fd, capabilities=caps, watchdog_s=5.0).start()
    host = RawHost(slave)
    yield host, emu
    host.close()
    emu.stop()
    close_pty(master_fd)


def test_commands_before_hello_are_refused_but_stop_is_obeyed(dev):
    host, _ = dev
    assert host.nack_code(host.request(P.MsgType.HEARTBEAT, 1, P.encode_heartbeat(0.0))) == "NO_HANDSHAKE"
    assert host.request(P.MsgType.STOP, 2).msg_type == P.MsgType.ACK


def test_version_mismatch_in_header_and_in_hello(dev):
    host, _ = dev
    f = host.request(P.MsgType.HELLO, 1, P.encode_hello(), version=2)
    assert host.nack_code(f) == "VERSION_MISMATCH" and P.decode_nack(f.payload)[2] == 1
    assert host.nack_code(host.request(P.MsgType.HELLO, 2, P.encode_hello(7))) == "VERSION_MISMATCH"


def test_every_field_and_length_is_validated(dev):
    host, emu = dev
    assert host.request(P.MsgType.HELLO, 1, P.encode_hello()).msg_type == P.MsgType.ACK
    assert host.nack_code(host.request(0x42, 2)) == "UNKNOWN_TYPE"
    assert host.nack_code(host.request(P.MsgType.TRIGGER, 3, b"\x00")) == "BAD_LENGTH"
    assert host.nack_code(host.request(P.MsgType.STOP, 4, b"\x00")) == "BAD_LENGTH"
    assert host.nack_code(host.request(P.MsgType.HEARTBEAT, 5, b"")) == "BAD_LENGTH"
    ok = StimParams(channel=0, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=1)
    bad_wave = bytearray(P.encode_configure(ok))
    bad_wave[1] = 200
    assert host.nack_code(host.request(P.MsgType.CONFIGURE, 6, bytes(bad_wave))) == "UNSUPPORTED_WAVEFORM"
    f = host.request(P.MsgType.CONFIGURE, 7, P.encode_configure(ok.with_(pulse_width_us=600.0)))
    _, code, detail, _ = P.decode_nack(f.payload)
    assert (P.error_name(code), P.CONFIGURE_FIELDS[detail]) == ("OUT_OF_RANGE", "pulse_width_us")
    assert host.nack_code(host.request(P.MsgType.CONFIGURE, 8, P.encode_configure(ok.with_(channel=2)))) == "BAD_CHANNEL"
    assert host.nack_code(host.request(P.MsgType.CONFIGURE, 9, P.encode_configure(
        ok.with_(waveform=Waveform.SINE, duration_s=1.0)))) == "UNSUPPORTED_WAVEFORM"
    assert host.nack_code(host.request(P.MsgType.TRIGGER, 10, P.encode_trigger(5))) == "BAD_CHANNEL"
    assert host.request(P.MsgType.CONFIGURE, 11, P.encode_configure(ok)).msg_type == P.MsgType.ACK
    assert host.nack_code(host.request(P.MsgType.TRIGGER, 12, P.encode_trigger(0, time.monotonic() + 3600))) \
        == "OUT_OF_RANGE"
    # The reply goes out before the record is appended: wait (bounded) for the emulator's bookkeeping.
    deadline = time.monotonic() + 2.0
    while len([r for r in emu.records if not r["ok"]]) < 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    refused = [r for r in emu.records if not r["ok"]]
    assert len(refused) == 10 and all(r["error"] for r in refused)


def test_repeated_seq_with_other_content_is_a_new_command(dev):
    host, emu = dev
    host.request(P.MsgType.HELLO, 1, P.encode_hello())
    a = host.request(P.MsgType.HEARTBEAT, 5, P.encode_heartbeat(1.0))
    b = host.request(P.MsgType.HEARTBEAT, 5, P.encode_heartbeat(1.0))
    assert a.payload == b.payload          # re-ACK carries the original receipt time
    assert emu.counters["duplicates"] == 1
    host.request(P.MsgType.HEARTBEAT, 5, P.encode_heartbeat(2.0))
    assert emu.counters["duplicates"] == 1


def test_a_refused_hello_keeps_the_memory_that_stops_a_retried_trigger_firing_twice(dev):
    """A HELLO of another version (or length) is refused and changes nothing: it used to clear the dedup
    memory, so the host's retry of a TRIGGER that had already fired fired again (PROTOCOL.md §4)."""
    host, emu = dev
    host.request(P.MsgType.HELLO, 1, P.encode_hello())
    ok = StimParams(channel=0, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=1)
    assert host.request(P.MsgType.CONFIGURE, 2, P.encode_configure(ok)).msg_type == P.MsgType.ACK
    first = host.request(P.MsgType.TRIGGER, 3, P.encode_trigger(0))
    assert first.msg_type == P.MsgType.ACK
    assert host.nack_code(host.request(P.MsgType.HELLO, 4, P.encode_hello(2))) == "VERSION_MISMATCH"
    assert host.nack_code(host.request(P.MsgType.HELLO, 5, b"\x01\x00")) == "BAD_LENGTH"
    again = host.request(P.MsgType.TRIGGER, 3, P.encode_trigger(0))      # the retry
    assert again.payload == first.payload and emu.counters["duplicates"] == 1
    # A retry's bytes under another version byte are that version's frame, not a retry.
    assert host.nack_code(host.request(P.MsgType.TRIGGER, 3, P.encode_trigger(0), version=2)) == "VERSION_MISMATCH"
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not [r for r in emu.records if r.get("t_delivered") is not None]:
        time.sleep(0.005)
    time.sleep(0.05)
    assert len([r for r in emu.records if r["type"] == "TRIGGER" and r.get("t_delivered") is not None]) == 1


def test_status_reports_configured_active_and_error_counters(dev):
    host, emu = dev
    host.request(P.MsgType.HELLO, 1, P.encode_hello())
    p = StimParams(channel=1, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=10.0, n_pulses=10)  # 1 s
    host.request(P.MsgType.CONFIGURE, 2, P.encode_configure(p))
    host.request(P.MsgType.TRIGGER, 3, P.encode_trigger(1))
    bad = bytearray(P.encode_frame(P.MsgType.HEARTBEAT, 4, P.encode_heartbeat(0.0)))
    bad[-1] ^= 0xFF
    host.send(bytes(bad))
    f = host.request(P.MsgType.STATUS, 5)
    st = P.decode_status(P.decode_ack(f.payload)[2])
    assert (st.configured_mask, st.active_mask, st.pending_mask) == (0b10, 0b10, 0)
    assert st.rx_errors == 1 and emu.decoder.errors["crc"] == 1


def test_emulator_rejects_bad_construction():
    with pytest.raises(ValueError, match="watchdog_s 0"):
        StimulatorEmulator(0, watchdog_s=0)
    with pytest.raises(ValueError, match="n_channels 9 out of range, expected 1..8"):
        StimulatorEmulator(0, capabilities=DeviceCapabilities(n_channels=9))


def test_log_is_flushed_within_a_second_while_running(tmp_path):
    import json
    master_fd, slave = open_pty_pair()
    log = tmp_path / "device_log.jsonl"
    emu = StimulatorEmulator(master_fd, watchdog_s=5.0, log_path=log).start()
    host = RawHost(slave)
    try:
        host.request(P.MsgType.HELLO, 1, P.encode_hello())
        host.request(P.MsgType.STOP, 2)
        end = time.monotonic() + 1.5
        lines = []
        while time.monotonic() < end and len(lines) < 2:
            time.sleep(0.05)
            lines = log.read_text().splitlines()
        assert [json.loads(x)["type"] for x in lines] == ["HELLO", "STOP"]
    finally:
        host.close()
        emu.stop()
        close_pty(master_fd)
