"""SerialStimulator against the real emulator thread on a real pty pair."""
from __future__ import annotations

import json
import os
import re
import time

import pylsl
import pytest

from drivers import protocol as P
from drivers.base import DeviceTimeout, StimulatorError, TriggerTooLate
from drivers.params import StimParams, Waveform
from drivers.serial_stimulator import SerialStimulator
from hil_sim.emulator import StimulatorEmulator
from hil_sim.pty_pair import close_pty, open_pty_pair
from conftest import wait_until

pytestmark = pytest.mark.realtime

BURST = StimParams(channel=1, waveform=Waveform.BIPHASIC, amplitude_ua=1500.0, pulse_width_us=100.0,
                   frequency_hz=200.0, n_pulses=2)   # 10 ms burst


@pytest.fixture
def rig(tmp_path):
    master_fd, slave = open_pty_pair()
    delivered = []
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5, on_deliver=lambda t, p: delivered.append((t, p)),
                             log_path=tmp_path / "device_log.jsonl").start()
    stim = SerialStimulator(slave, timeout_s=0.05, retries=3)
    stim.open()
    yield stim, emu, delivered, master_fd, tmp_path / "device_log.jsonl"
    stim.close()
    emu.stop()
    close_pty(master_fd)


def test_handshake_reads_capabilities(rig):
    stim, emu, *_ = rig
    assert stim.device_version == 1
    assert stim.capabilities.n_channels == emu.capabilities.n_channels
    assert stim.capabilities.waveforms == emu.capabilities.waveforms
    assert stim.capabilities.name == "stimloop-emu"
    assert stim.device_watchdog_s == 0.5
    assert stim.low_latency is False   # a pty has no FTDI latency timer: guarded, not raised


def test_configure_trigger_round_trip_and_timestamps(rig):
    stim, emu, delivered, *_ = rig
    rc = stim.configure(BURST)
    rt = stim.trigger(1)
    assert rt.seq == (rc.seq + 1) % P.SEQ_MOD and rt.ok   # host seqs start at a random value
    assert rt.sent_t <= stim.last_receipt_device_t <= rt.acked_t
    assert rt.device_t == stim.last_receipt_device_t and rc.device_t <= rt.device_t   # the ACK's receipt time
    assert wait_until(lambda: len(delivered) == 1)
    t, params = delivered[0]
    assert params == BURST
    assert rt.sent_t <= t < rt.acked_t + 0.05
    rec = emu.deliveries()[0]
    assert rec["seq"] == rt.seq and rec["type"] == "TRIGGER" and rec["amplitude_ua"] == 1500.0
    assert rec["t_received"] == stim.last_receipt_device_t


def test_scheduled_trigger_delivered_at_requested_time(rig):
    stim, emu, delivered, *_ = rig
    stim.configure(BURST)
    at = pylsl.local_clock() + 0.08
    stim.trigger(1, at=at)
    assert emu.status().pending_mask == 0b10
    assert wait_until(lambda: len(delivered) == 1, 1.0)
    # Never early (the emulator spins to the deadline); how late is the machine's scheduling, which
    # bench ads measures (delay error), so here only "not left for later".
    assert at <= delivered[0][0] < at + 0.1
    assert emu.deliveries()[0]["at"] == at


def test_stop_cancels_scheduled_and_running_bursts(rig):
    stim, emu, delivered, *_ = rig
    long_burst = BURST.with_(channel=0, n_pulses=200, frequency_hz=100.0)   # 2 s
    stim.configure(long_burst)
    stim.configure(BURST)
    stim.trigger(0)
    stim.trigger(1, at=pylsl.local_clock() + 0.2)
    assert wait_until(lambda: emu.active_channels == [0])
    r = stim.stop()
    assert r is not None and r.ok
    assert emu.active_channels == []
    time.sleep(0.25)
    assert len(delivered) == 1   # the scheduled one never came
    cancelled = [x for x in emu.records if x["error"] == "cancelled: stopped"]
    assert len(cancelled) == 1 and cancelled[0]["channel"] == 1


def test_lost_replies_are_retried_with_same_seq_and_acted_once(rig):
    stim, emu, delivered, *_ = rig
    stim.configure(BURST)
    emu.drop_next_replies(2)
    r = stim.trigger(1)
    assert stim.retries_used == 2
    assert wait_until(lambda: len(delivered) >= 1)
    time.sleep(0.05)
    assert len(delivered) == 1
    assert emu.counters["duplicates"] == 2
    seqs = [x["seq"] for x in emu.records if x["type"] == "TRIGGER"]
    assert seqs == [r.seq] * 3   # one delivery record, two duplicate records
    # The receipt says when the device got the first copy (it started the burst then), not the last.
    first = next(x for x in emu.records if x["type"] == "TRIGGER" and x["t_delivered"] is not None)
    assert r.device_t == first["t_received"] < r.sent_t + stim.timeout_s < r.acked_t


def test_corrupted_replies_are_rejected_and_retried(rig):
    stim, emu, *_ = rig
    before = stim.decoder_errors["crc"]
    emu.corrupt_next(1)
    r = stim.heartbeat()
    assert r.ok and stim.retries_used == 1
    assert stim.decoder_errors["crc"] == before + 1


def test_garbage_on_both_directions_is_skipped(rig):
    stim, emu, delivered, master_fd, _ = rig
    garbage = bytes(range(256)) + b"\xa5\x5a\xa5" + os.urandom(100)
    os.write(master_fd, garbage)          # device -> host line noise
    stim._ser.write(garbage)              # host -> device line noise
    stim.configure(BURST)
    stim.trigger(1)
    assert wait_until(lambda: len(delivered) == 1)
    assert emu.decoder.errors["garbage_bytes"] > 0
    assert stim.decoder_errors["garbage_bytes"] > 0


def test_truncated_command_then_valid_command(rig):
    stim, emu, delivered, *_ = rig
    full = P.encode_frame(P.MsgType.CONFIGURE, 999, P.encode_configure(BURST))
    stim._ser.write(full[:20])            # cut mid-payload
    stim.configure(BURST)
    stim.trigger(1)
    assert wait_until(lambda: len(delivered) == 1)
    # a CRC error, or "truncated" when the line went quiet for 10 ms between the two writes (PROTOCOL.md §2)
    assert emu.decoder.errors["crc"] + emu.decoder.errors["truncated"] >= 1


def test_nack_becomes_stimulator_error_with_code_name(rig):
    stim, *_ = rig
    with pytest.raises(StimulatorError, match="NOT_CONFIGURED"):
        stim.trigger(2)
    with pytest.raises(StimulatorError, match="OUT_OF_RANGE.*field amplitude_ua"):
        stim.configure(BURST.with_(amplitude_ua=20_000.0))
    stim.configure(BURST)
    with pytest.raises(TriggerTooLate, match="TOO_LATE"):   # its own type: a missed deadline, not a fault
        stim.trigger(1, at=pylsl.local_clock() - 1.0)
    stim.trigger(1)
    with pytest.raises(StimulatorError, match="BUSY"):
        stim.trigger(1)


def test_muted_device_times_out_and_stop_returns_quickly(rig):
    stim, emu, *_ = rig
    emu.set_mute(True)
    # How long that takes is (1 + retries) × timeout_s (PROTOCOL.md §4): the attempts are what is checked
    # here, the time only against a hang.
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match=r"HEARTBEAT seq \d+: no reply .* after 4 attempts"):
        stim.heartbeat()
    r = stim.stop()
    assert r is not None and not r.ok and "no reply" in r.error, r
    assert re.search(r"after \d+ attempts", r.error) and int(re.search(r"after (\d+)", r.error)[1]) >= 4, r.error
    assert time.monotonic() - t0 < 10
    emu.set_mute(False)
    assert stim.heartbeat().ok


def test_watchdog_stops_stimulation_when_heartbeats_stop(rig):
    stim, emu, delivered, *_ = rig
    stim.configure(BURST.with_(channel=0, n_pulses=300, frequency_hz=100.0))   # 3 s burst
    for _ in range(4):   # heartbeats keep it alive past one watchdog period
        time.sleep(0.15)
        stim.heartbeat()
    assert emu.counters["watchdog_trips"] == 0
    stim.trigger(0)
    assert wait_until(lambda: emu.active_channels == [0])
    assert wait_until(lambda: emu.counters["watchdog_trips"] == 1, 1.5)
    assert emu.active_channels == []
    wd = [r for r in emu.records if r["type"] == "WATCHDOG"]
    assert wd and wd[0]["stopped_channels"] == [0] and wd[0]["silence_s"] >= 0.5
    # The device reports the trip; the driver reads it with the next reply.
    stim.heartbeat()
    assert [c for c, _ in stim.device_events] == [P.EventCode.WATCHDOG]
    assert stim.status().watchdog_trips == 1


def test_device_log_is_append_only_jsonl(rig):
    stim, emu, delivered, _, log_path = rig
    stim.configure(BURST)
    r = stim.trigger(1)
    assert wait_until(lambda: len(delivered) == 1)
    emu.stop()   # flushes
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [x["type"] for x in lines] == ["HELLO", "CONFIGURE", "TRIGGER"]
    assert lines[2]["seq"] == r.seq and lines[2]["t_delivered"] is not None and lines[2]["ok"] is True


def test_missing_port_raises_clear_error():
    stim = SerialStimulator("/dev/does-not-exist-xyz")
    with pytest.raises(StimulatorError, match="serial port /dev/does-not-exist-xyz not found"):
        stim.open()
    assert stim.stop() is None   # safe on a never-opened driver: it cannot have started anything


def test_stop_on_a_port_closed_after_open_reports_that_no_stop_was_sent(rig):
    """A failed reconnect (or a capabilities change) leaves the port closed while the device may still
    hold a burst: stop() returned None there, which the actuator took for a confirmed stop."""
    stim, emu, delivered, *_ = rig
    stim.close()
    r = stim.stop()
    assert r is not None and r.ok is False and "port not open: STOP not sent" in r.error
    emu.set_mute(True)                       # the reconnect's HELLO goes unanswered: the port stays closed
    stim.connect_timeout_s, stim.timeout_s, stim.retries = 0.0, 0.02, 0
    with pytest.raises(DeviceTimeout):
        stim.open()
    assert not stim.is_open
    r = stim.stop()
    assert r.ok is False and "port not open: STOP not sent" in r.error


def test_no_device_on_port_times_out_on_hello():
    master_fd, slave = open_pty_pair()
    try:
        stim = SerialStimulator(slave, timeout_s=0.02, retries=1, connect_timeout_s=0.2)
        t0 = pylsl.local_clock()
        with pytest.raises(DeviceTimeout, match=r"HELLO: no reply .* within 0.2 s of opening it \((\d+) attempts") as e:
            stim.open()
        assert pylsl.local_clock() - t0 >= 0.2   # kept asking for the whole window ...
        assert int(e.value.args[0].split("(")[1].split()[0]) >= 4   # ... with new HELLOs, not one command
        assert "connect_timeout_s" in str(e.value) and not stim.is_open
        # 0: one command of 1 + retries attempts, as any other.
        stim = SerialStimulator(slave, timeout_s=0.02, retries=1, connect_timeout_s=0.0)
        with pytest.raises(DeviceTimeout, match=r"\(2 attempts"):
            stim.open()
    finally:
        close_pty(master_fd)


def test_a_port_that_answers_in_garbage_is_told_apart_from_a_silent_one():
    """Something on the port answers every HELLO with bytes that are no frames (another protocol, a
    wrong baud rate): the error says so and names the baud rate, instead of "no reply"."""
    import threading

    master_fd, slave = open_pty_pair()
    stop = threading.Event()

    def babble():   # answers whatever it reads with text, as a device with a shell on its port would
        while not stop.is_set():
            try:
                if os.read(master_fd, 256):
                    os.write(master_fd, b"ERR unknown command\r\n> ")
            except (BlockingIOError, OSError):
                time.sleep(0.005)

    t = threading.Thread(target=babble, daemon=True)
    t.start()
    try:
        stim = SerialStimulator(slave, timeout_s=0.02, retries=1, connect_timeout_s=0.2)
        with pytest.raises(DeviceTimeout, match=r"HELLO: no valid reply .* only bytes that are no protocol frames "
                                                r"\((\d+) skipped") as e:
            stim.open()
        assert int(e.value.args[0].split("frames (")[1].split()[0]) > 0
        assert "device.baudrate = 1000000" in str(e.value) and not stim.is_open
    finally:
        stop.set()
        t.join(1.0)
        close_pty(master_fd)


def test_device_that_answers_late_is_found_within_connect_timeout(tmp_path):
    """A device still starting when the port opens (silent, then answering) is connected, not refused."""
    import threading
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5, log_path=tmp_path / "device_log.jsonl").start()
    emu.set_mute(True)
    wake = threading.Timer(0.3, emu.set_mute, args=(False,))
    try:
        stim = SerialStimulator(slave, timeout_s=0.02, retries=1, connect_timeout_s=5.0)
        t0 = pylsl.local_clock()
        wake.start()
        stim.open()
        assert stim.is_open and stim.device_version == P.PROTOCOL_VERSION
        assert pylsl.local_clock() - t0 >= 0.3   # answered only once the device woke: many HELLOs
        assert stim.heartbeat().ok
        stim.close()
    finally:
        wake.cancel()
        emu.stop()
        close_pty(master_fd)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="timeout_s 0"):
        SerialStimulator("/dev/null", timeout_s=0)
    with pytest.raises(ValueError, match="retries -1"):
        SerialStimulator("/dev/null", retries=-1)
    with pytest.raises(ValueError, match="connect_timeout_s -1"):
        SerialStimulator("/dev/null", connect_timeout_s=-1)


def test_write_all_sends_every_byte_however_late_it_returns_and_times_out_on_a_full_port():
    """The frame writer (not pyserial's write, which raises on a slow call that sent everything: pyserial #281)."""
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5).start()
    stim = SerialStimulator(slave, timeout_s=0.05, retries=0, connect_timeout_s=0.0)
    try:
        stim.open()
        emu.stop()   # nobody reads the device side from here on
        ticks = iter(range(1000))
        stim.clock = lambda: 10.0 * next(ticks)   # 10 s pass between any two looks at the clock
        frame = P.encode_frame(P.MsgType.HEARTBEAT, 7, b"")
        stim._write_all(frame, "HEARTBEAT seq 7")   # all written: no clock question asked, no error
        assert os.read(master_fd, 4096) == frame
        stim.clock = pylsl.local_clock
        with pytest.raises(StimulatorError, match=r"TEST: write to .* timed out: \d+ of 1000000 bytes not taken "
                                                  r"within 0.05 s \(is the device reading\?\)"):
            stim._write_all(b"\x00" * 1_000_000, "TEST")   # more than the pty holds, nobody reading
    finally:
        stim.close()
        close_pty(master_fd)
