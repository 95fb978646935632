"""Faults on the serial line: real pty pairs, the real emulator, and a hand-written device for
replies the emulator never sends (right seq and CRC, malformed payload)."""
from __future__ import annotations

import os
import select
import struct
import threading
import time
import tty

import pylsl
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from drivers import protocol as P
from drivers.base import StimulatorError
from drivers.params import StimParams
from drivers.serial_stimulator import SerialStimulator
from drivers.simulated import SimulatedStimulator
from hil_sim.emulator import DEFAULT_CAPABILITIES, StimulatorEmulator
from hil_sim.pty_pair import close_pty, open_pty_pair
from conftest import wait_until

pytestmark = pytest.mark.realtime

SMALL = StimParams(channel=0, amplitude_ua=500.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=1)
BIG = StimParams(channel=0, amplitude_ua=9000.0, pulse_width_us=400.0, frequency_hz=100.0, n_pulses=50)


class RawHost:
    """A host that writes frames itself, so a test can pick every seq."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.dec = P.FrameDecoder()

    def request(self, msg_type: int, seq: int, payload: bytes = b"") -> tuple[str, str]:
        """("ACK", "") or ("NACK", error name), with the NACK's detail after a colon."""
        os.write(self.fd, P.encode_frame(msg_type, seq, payload))
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            if select.select([self.fd], [], [], 0.02)[0]:
                for f in self.dec.feed(os.read(self.fd, 4096)):
                    if f.seq == seq and f.msg_type == P.MsgType.ACK:
                        return "ACK", ""
                    if f.seq == seq and f.msg_type == P.MsgType.NACK:
                        _, code, detail, _ = P.decode_nack(f.payload)
                        return "NACK", f"{P.error_name(code)}:{detail}"
        raise AssertionError(f"no reply for seq {seq}")

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def emu_pty():
    master_fd, slave = open_pty_pair()
    delivered = []
    emu = StimulatorEmulator(master_fd, watchdog_s=5.0, on_deliver=lambda t, p: delivered.append(p)).start()
    yield emu, slave, delivered
    emu.stop()
    close_pty(master_fd)


# ---------------------------------------------------------------- HELLO starts a new host session

def test_a_restarted_host_reusing_seqs_never_fires_the_previous_sessions_configuration(emu_pty):
    """t8: the old host's HELLO seq 1 was still in the device's dedup memory."""
    emu, slave, delivered = emu_pty
    old = RawHost(slave)
    assert old.request(P.MsgType.HELLO, 1, P.encode_hello()) == ("ACK", "")
    assert old.request(P.MsgType.CONFIGURE, 2, P.encode_configure(SMALL)) == ("ACK", "")
    assert old.request(P.MsgType.HEARTBEAT, 3, P.encode_heartbeat(0.0)) == ("ACK", "")
    assert old.request(P.MsgType.CONFIGURE, 4, P.encode_configure(BIG)) == ("ACK", "")
    old.close()
    new = RawHost(slave)   # same seqs again: a host that starts counting where the old one did
    assert new.request(P.MsgType.HELLO, 1, P.encode_hello()) == ("ACK", "")
    assert new.request(P.MsgType.TRIGGER, 5, P.encode_trigger(0, None)) == ("NACK", "NOT_CONFIGURED:0")
    assert new.request(P.MsgType.CONFIGURE, 2, P.encode_configure(SMALL)) == ("ACK", "")
    assert new.request(P.MsgType.TRIGGER, 3, P.encode_trigger(0, None)) == ("ACK", "")
    assert wait_until(lambda: len(delivered) == 1)
    assert delivered == [SMALL] and emu.counters["duplicates"] == 0
    new.close()


def test_hello_cancels_what_the_previous_host_scheduled(emu_pty):
    emu, slave, delivered = emu_pty
    old = RawHost(slave)
    old.request(P.MsgType.HELLO, 7, P.encode_hello())
    old.request(P.MsgType.CONFIGURE, 8, P.encode_configure(BIG))
    assert old.request(P.MsgType.TRIGGER, 9, P.encode_trigger(0, pylsl.local_clock() + 0.3)) == ("ACK", "")
    assert emu.status().pending_mask == 1
    old.close()
    new = RawHost(slave)
    assert new.request(P.MsgType.HELLO, 100, P.encode_hello()) == ("ACK", "")
    st = emu.status()
    assert st.pending_mask == 0 and st.configured_mask == 0
    time.sleep(0.4)
    assert delivered == []
    new.close()


def test_a_retried_hello_is_executed_again_not_answered_from_memory(emu_pty):
    emu, slave, _ = emu_pty
    host = RawHost(slave)
    host.request(P.MsgType.HELLO, 1, P.encode_hello())
    host.request(P.MsgType.CONFIGURE, 2, P.encode_configure(SMALL))
    assert host.request(P.MsgType.HELLO, 1, P.encode_hello()) == ("ACK", "")
    assert emu.counters["duplicates"] == 0 and emu.status().configured_mask == 0
    host.close()


def test_each_host_session_starts_at_another_seq(emu_pty):
    emu, slave, _ = emu_pty
    first = []
    for _ in range(5):
        s = SerialStimulator(slave, connect_timeout_s=1.0)
        s.open()
        first.append(s.heartbeat().seq)
        s.close()
    # Counting from 0 every time made these all equal (5 sessions: equal by chance ~ 65536**-4).
    assert len(set(first)) > 1, first


def test_restarted_serial_host_triggers_only_what_it_configured(emu_pty):
    """t8 end to end with the driver: whatever seqs the two sessions use, the device fires SMALL."""
    emu, slave, delivered = emu_pty
    s1 = SerialStimulator(slave)
    s1.open()
    s1.configure(SMALL)
    s1.heartbeat()
    s1.configure(BIG)
    s1.close()
    s2 = SerialStimulator(slave)
    s2.open()
    with pytest.raises(StimulatorError, match="NOT_CONFIGURED"):
        s2.trigger(0)
    s2.configure(SMALL)
    s2.trigger(0)
    assert wait_until(lambda: len(delivered) == 1) and delivered == [SMALL]
    s2.stop()
    s2.close()


# ---------------------------------------------------------------- deliver-at NaN or negative

@pytest.mark.parametrize("at", [float("nan"), -1.0, float("-inf")])
def test_trigger_at_nan_or_negative_is_refused_and_the_channel_stays_free(emu_pty, at):
    emu, slave, delivered = emu_pty
    host = RawHost(slave)
    host.request(P.MsgType.HELLO, 1, P.encode_hello())
    host.request(P.MsgType.CONFIGURE, 2, P.encode_configure(SMALL))
    assert host.request(P.MsgType.TRIGGER, 3, struct.pack("<Bd", 0, at)) == ("NACK", "OUT_OF_RANGE:1")
    assert emu.status().pending_mask == 0
    assert host.request(P.MsgType.TRIGGER, 4, P.encode_trigger(0, None)) == ("ACK", "")
    assert wait_until(lambda: len(delivered) == 1)
    host.close()


# ---------------------------------------------------------------- malformed replies

class BadReplyDevice:
    """A device on the master end that answers HELLO properly and everything else with
    ``replies[type]``: a frame with the right seq and CRC whose payload does not decode."""

    def __init__(self, master_fd: int, replies: dict[int, tuple[int, bytes]]):
        self.fd, self.replies = master_fd, replies
        self.stop_evt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = P.FrameDecoder()
        while not self.stop_evt.is_set():
            if not select.select([self.fd], [], [], 0.02)[0]:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                time.sleep(0.01)
                continue
            for f in dec.feed(data):
                if f.msg_type == P.MsgType.HELLO:
                    body = P.encode_capabilities(DEFAULT_CAPABILITIES, 0.5)
                    os.write(self.fd, P.encode_frame(P.MsgType.ACK, f.seq, P.encode_ack(f.seq, 1.0, body)))
                else:
                    mtype, payload, *version = self.replies[f.msg_type]
                    if callable(payload):   # built from the request's seq
                        payload = payload(f.seq)
                    os.write(self.fd, P.encode_frame(mtype, f.seq, payload, version=version[0] if version else 1))

    def close(self) -> None:
        self.stop_evt.set()
        self.thread.join(1.0)


@pytest.mark.parametrize("reply", [(P.MsgType.ACK, b"\x01"), (P.MsgType.NACK, b"\x01\x02")])
def test_malformed_replies_are_stimulator_errors_and_stop_never_raises(reply):
    master_fd, slave = open_pty_pair()
    status_ack = (P.MsgType.ACK, P.encode_ack(0, 1.0, b"\x00"))   # a valid ACK, a STATUS body too short
    dev = BadReplyDevice(master_fd, {t: reply for t in (P.MsgType.STOP, P.MsgType.CONFIGURE, P.MsgType.TRIGGER,
                                                         P.MsgType.HEARTBEAT)} | {P.MsgType.STATUS: status_ack})
    s = SerialStimulator(slave, timeout_s=0.05, retries=0, connect_timeout_s=1.0)
    try:
        s.open()
        r = s.stop()
        assert r is not None and r.ok is False and "malformed" in r.error
        with pytest.raises(StimulatorError, match="malformed"):
            s.configure(SMALL)
        with pytest.raises(StimulatorError, match="malformed"):
            s.heartbeat()
        with pytest.raises(StimulatorError, match="malformed"):
            s.status()
    finally:
        s.close()
        dev.close()
        close_pty(master_fd)


@pytest.mark.parametrize("reply, why", [
    ((P.MsgType.ACK, lambda seq: P.encode_ack(seq, 1.0), 2), "answers in protocol version 2, expected 1"),
    ((P.MsgType.ACK, lambda seq: P.encode_ack((seq + 1) % P.SEQ_MOD, 1.0)), "its payload acknowledges seq"),
    ((P.MsgType.NACK, lambda seq: P.encode_nack((seq + 7) % P.SEQ_MOD, P.ErrorCode.BUSY, 1.0)),
     "its payload acknowledges seq"),
])
def test_a_reply_in_another_version_or_acknowledging_another_seq_is_not_taken(reply, why):
    """Both were read as the awaited reply: a version-2 payload in the version-1 layout, and an ACK whose payload
    names another command (PROTOCOL.md §3: the seq in the header and in the payload)."""
    master_fd, slave = open_pty_pair()
    dev = BadReplyDevice(master_fd, {t: reply for t in (P.MsgType.STOP, P.MsgType.HEARTBEAT)})
    s = SerialStimulator(slave, timeout_s=0.05, retries=0, connect_timeout_s=1.0)
    try:
        s.open()
        with pytest.raises(StimulatorError, match=why):
            s.heartbeat()
        r = s.stop()
        assert r is not None and r.ok is False and why.split(",")[0] in r.error
    finally:
        s.close()
        dev.close()
        close_pty(master_fd)


# ---------------------------------------------------------------- device watchdog trips

def test_a_device_watchdog_trip_is_reported_and_latches_the_actuator():
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.2).start()
    drv = SerialStimulator(slave, timeout_s=0.05, retries=1)
    try:
        drv.open()
        act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, pylsl.local_clock)
        assert act.heartbeat() == []
        burst = StimParams(amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=200)  # 2 s
        ev = act.submit(StimRequest(pylsl.local_clock(), "t", burst))
        assert ev[-1].kind is EventKind.COMMAND
        assert wait_until(lambda: emu.counters["watchdog_trips"] == 1, 1.0)   # the host stalls; the device stops
        ev = act.heartbeat()
        wd = [e for e in ev if e.data.get("what") == "device_watchdog"]
        assert len(wd) == 1 and wd[0].kind is EventKind.FAULT and wd[0].data["device_t"] > 0
        assert [e.kind for e in ev][-1] is EventKind.SAFE_STATE
        assert act.governor.latched.startswith("device_watchdog")
        # Reported once; the session stays off until someone resets it.
        assert act.heartbeat() == []
        time.sleep(MACRO_RNS.min_interval_s + 0.05)
        ev = act.submit(StimRequest(pylsl.local_clock(), "t", SMALL))
        assert [e.data.get("rule") for e in ev] == ["safe_state"]
        assert drv.drain_device_events() == [] and len(drv.device_events) == 1
        act.close()
    finally:
        emu.stop()
        close_pty(master_fd)


def test_a_simulated_device_watchdog_trip_is_reported_too():
    t = [0.0]
    drv = SimulatedStimulator(clock=lambda: t[0], watchdog_s=0.5)
    drv.open()
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, lambda: t[0])
    act.heartbeat()
    t[0] = 1.0
    act.poll()   # simulated time: the device notices the silence here
    ev = act.heartbeat()
    wd = [e for e in ev if e.data.get("what") == "device_watchdog"]
    assert len(wd) == 1 and wd[0].data["device_t"] == 0.5
    assert act.governor.latched is not None and ev[-1].kind is EventKind.SAFE_STATE


def test_a_trip_left_over_from_the_previous_host_is_not_this_sessions_fault():
    # A device left powered between sessions trips its watchdog once the previous host has gone
    # quiet; the next host must start clean, not latched by an event that predates its HELLO.
    master_fd, slave = open_pty_pair()
    keep = os.open(slave, os.O_RDWR | os.O_NOCTTY)   # the line stays up between the two hosts
    emu = StimulatorEmulator(master_fd, watchdog_s=0.2).start()
    try:
        first = SerialStimulator(slave, timeout_s=0.05, retries=1)
        first.open()
        first.heartbeat()
        first.close()
        assert wait_until(lambda: emu.counters["watchdog_trips"] == 1, 1.0)
        drv = SerialStimulator(slave, timeout_s=0.05, retries=1)
        drv.open()
        act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, pylsl.local_clock)
        assert act.heartbeat() == []
        ev = act.submit(StimRequest(pylsl.local_clock(), "t", SMALL))
        assert ev[-1].kind is EventKind.COMMAND and act.governor.latched is None
        act.close()
    finally:
        emu.stop()
        os.close(keep)
        close_pty(master_fd)
