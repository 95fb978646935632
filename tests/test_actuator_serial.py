"""Actuator over the real serial driver and the pty device emulator (real threads, real pty)."""
import time

import pylsl
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from drivers.params import StimParams
from drivers.serial_stimulator import SerialStimulator
from hil_sim.emulator import StimulatorEmulator
from hil_sim.pty_pair import close_pty, open_pty_pair
from conftest import wait_until

pytestmark = pytest.mark.realtime

BURST = StimParams(channel=1, amplitude_ua=1500.0, pulse_width_us=100.0, frequency_hz=200.0, n_pulses=2)


@pytest.fixture
def serial_rig():
    master_fd, slave = open_pty_pair()
    delivered = []
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5, on_deliver=lambda t, p: delivered.append((t, p))).start()
    drv = SerialStimulator(slave, timeout_s=0.05, retries=1)
    drv.open()  # HELLO: capabilities come from the device
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, pylsl.local_clock)
    yield act, emu, delivered
    act.close()
    emu.stop()
    close_pty(master_fd)


def test_submit_reaches_the_emulated_device(serial_rig):
    act, emu, delivered = serial_rig
    assert act.heartbeat() == []
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", BURST, meta={"window_end_t": 1.0}))
    assert ev[-1].kind is EventKind.COMMAND, ev
    cmd = ev[-1].data
    assert cmd["acked_t"] >= cmd["sent_t"] and cmd["window_end_t"] == 1.0
    assert wait_until(lambda: len(delivered) == 1)
    assert delivered[0][1] == BURST


def test_silent_device_leads_to_safe_state(serial_rig):
    act, emu, delivered = serial_rig
    act.heartbeat()
    emu.set_mute(True)
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", BURST))
    kinds = [e.kind for e in ev]
    i = kinds.index(EventKind.SAFE_STATE)
    assert kinds[i - 1] is EventKind.FAULT and "driver error" in ev[i - 1].data["reason"]
    # The safe state is the last word: the device's own watchdog trip (its failed stops outlast the
    # watchdog) is not heard over a dead link.
    assert kinds[i + 1:] == [] and ev[i].data["stop_ok"] is False
    assert act.governor.latched.startswith("driver error") and delivered == []


def test_warm_sends_nothing_and_uses_no_sequence_number(serial_rig):
    act, emu, delivered = serial_rig
    act.heartbeat()
    act.submit(StimRequest(pylsl.local_clock(), "test", BURST))
    assert wait_until(lambda: len(delivered) == 1)
    frames = emu.counters["frames"]
    act.warm_period_s = 0.0
    for _ in range(50):
        act.warm()
    time.sleep(0.05)
    assert emu.counters["frames"] == frames and len(delivered) == 1
    for _ in range(10):   # MACRO_RNS: bursts >= 1 s apart; heartbeats keep the device's watchdog quiet
        time.sleep(0.1)
        assert act.heartbeat() == []
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", BURST))
    assert ev[-1].kind is EventKind.COMMAND and wait_until(lambda: len(delivered) == 2)


def test_trigger_the_device_calls_too_late_is_refused_and_the_session_goes_on():
    """A scheduled TRIGGER that reaches the real emulator after its time: NACK TOO_LATE → refusal, not a fault."""
    master_fd, slave = open_pty_pair()
    delivered = []
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5, on_deliver=lambda t, p: delivered.append((t, p))).start()
    drv = SerialStimulator(slave, timeout_s=0.05, retries=1)
    try:
        drv.open()

        def host():   # the host's clock 50 ms behind the device's: its "soon" is the device's past
            return pylsl.local_clock() - 0.050

        act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, host)
        act.heartbeat()
        ev = act.submit(StimRequest(host(), "test", BURST, at=host() + 0.010))
        assert ev[-1].kind is EventKind.REFUSAL and ev[-1].data["rule"] == "too_late", ev
        assert "TOO_LATE" in ev[-1].data["reason"] and act.governor.latched is None
        assert emu.status().pending_mask == 0
        # The next burst, far enough ahead for the device too, is delivered.
        time.sleep(max(MACRO_RNS.min_interval_s, BURST.burst_duration_s) + 0.01)
        act.heartbeat()
        ev = act.submit(StimRequest(host(), "test", BURST, at=host() + 0.150))
        assert ev[-1].kind is EventKind.COMMAND, ev
        assert wait_until(lambda: len(delivered) == 1) and delivered[0][1] == BURST
        act.close()
    finally:
        emu.stop()
        close_pty(master_fd)


def test_a_burst_back_to_back_with_a_running_one_is_refused_not_a_device_fault(serial_rig):
    """The device answers BUSY to a command while it holds a burst, and the actuator takes BUSY as a
    fault (stimulation off for the session). A burst scheduled right at the end of a running one is
    no overlap, so it passed the governor and latched the session: now the governor refuses it
    (device_busy) and the next burst, once the device is free, goes through."""
    from controller.safety.governor import DEVICE_BUSY_GUARD_S
    act, emu, delivered = serial_rig
    long_burst = BURST.with_(n_pulses=20)                                     # 0.1 s at 200 Hz
    act.heartbeat()
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", long_burst))
    assert ev[-1].kind is EventKind.COMMAND, ev
    # The device's start (its receipt of the TRIGGER), which the governor books once acknowledged.
    start = ev[-1].data["start_t"]
    assert start >= next(e.data["start_t"] for e in ev if e.kind is EventKind.DECISION and e.data.get("allowed"))
    # right at its end (1 µs later: start + duration can round below it, a min_interval refusal)
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", long_burst, at=start + long_burst.burst_duration_s + 1e-6))
    assert ev[-1].kind is EventKind.REFUSAL and ev[-1].data["rule"] == "device_busy", ev
    assert not [e for e in ev if e.kind in (EventKind.FAULT, EventKind.SAFE_STATE)]
    time.sleep(long_burst.burst_duration_s + DEVICE_BUSY_GUARD_S + 0.01)
    act.heartbeat()
    ev = act.submit(StimRequest(pylsl.local_clock(), "test", long_burst))
    assert ev[-1].kind is EventKind.COMMAND, ev
    assert wait_until(lambda: len(delivered) == 2)
    assert emu.counters["nacks"] == 0


def test_safe_state_after_a_failed_reconnect_says_no_stop_was_sent():
    """After a failed reconnect the port is closed: the operator's stop and close() must not claim
    stimulation was stopped (stop_ok True), since no STOP left the host."""
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5).start()
    drv = SerialStimulator(slave, timeout_s=0.02, retries=1, connect_timeout_s=0.1)
    try:
        drv.open()
        act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, pylsl.local_clock)
        act.heartbeat()
        emu.set_mute(True)                                   # the device stops answering
        assert EventKind.SAFE_STATE in [e.kind for e in act.heartbeat()]
        assert act.reconnect() == [] and not drv.is_open     # still silent: the port stays closed
        for ev in (act.safe_state("operator"), act.close()):
            safe = [e for e in ev if e.kind is EventKind.SAFE_STATE]
            assert safe and safe[-1].data["stop_ok"] is False, ev
            assert all("port not open: STOP not sent" in x for x in safe[-1].data["stop_errors"])
    finally:
        emu.stop()
        close_pty(master_fd)


@pytest.mark.parametrize("second_channel", [1, 0], ids=["same channel", "other channel"])
def test_a_burst_delayed_by_a_retry_is_booked_where_the_device_started_it(second_channel):
    """A CONFIGURE whose reply is lost is resent after timeout_s (50 ms), so the device starts the
    burst ~50 ms after the governor booked it. A request just after the booked end + guard then got
    NACK BUSY on the same channel (a fault: stimulation off for the session), and on another channel
    started a second burst 66 ms after the first, overlapping it, against a 100 ms min interval. With
    the device's start booked, both are refusals and the session goes on. (A 100 ms reply timeout
    here: the request must come before the device's burst ends, ~90 ms to spare on a loaded machine.)"""
    from controller.safety.governor import DEVICE_BUSY_GUARD_S
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5).start()
    drv = SerialStimulator(slave, timeout_s=0.1, retries=3)
    try:
        drv.open()
        act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, pylsl.local_clock)
        act.heartbeat()
        burst = BURST.with_(n_pulses=20)                                  # 0.1 s at 200 Hz
        emu.drop_next_replies(1)                                          # the CONFIGURE's: resent once
        ev = act.submit(StimRequest(pylsl.local_clock(), "test", burst))
        cmd = ev[-1].data
        assert ev[-1].kind is EventKind.COMMAND and drv.retries_used == 1, ev
        assert wait_until(lambda: len(emu.deliveries()) == 1)   # recorded after the ACK is on the wire
        first = emu.deliveries()[0]
        assert cmd["device_t"] == first["t_received"] and cmd["start_t"] == cmd["device_t"]
        assert cmd["start_t"] - cmd["booked_start_t"] >= drv.timeout_s                 # the retry's delay
        t = cmd["booked_start_t"] + burst.burst_duration_s + DEVICE_BUSY_GUARD_S + 0.01
        while pylsl.local_clock() < t:
            time.sleep(0.001)
        act.heartbeat()
        ev = act.submit(StimRequest(pylsl.local_clock(), "test", burst.with_(channel=second_channel)))
        assert [e.kind for e in ev] == [EventKind.REFUSAL], ev
        assert ev[0].data["rule"] in ("min_interval", "device_busy")
        assert act.governor.latched is None and emu.counters["nacks"] == 0 and len(emu.deliveries()) == 1
        # Once the device's burst is over, the next one goes, far enough from the first on the device.
        t = cmd["start_t"] + max(MACRO_RNS.min_interval_s, burst.burst_duration_s) + DEVICE_BUSY_GUARD_S + 0.01
        while pylsl.local_clock() < t:
            time.sleep(0.001)
        act.heartbeat()
        ev = act.submit(StimRequest(pylsl.local_clock(), "test", burst.with_(channel=second_channel)))
        assert ev[-1].kind is EventKind.COMMAND, ev
        assert wait_until(lambda: len(emu.deliveries()) == 2)
        a, b = emu.deliveries()
        assert b["t_delivered"] - a["t_delivered"] >= MACRO_RNS.min_interval_s
        assert emu.counters["nacks"] == 0
        act.close()
    finally:
        emu.stop()
        close_pty(master_fd)


def test_a_session_does_not_start_when_its_heartbeat_is_too_slow_for_the_devices_watchdog():
    """The emulator reports a 0.5 s watchdog at HELLO; device.heartbeat_s = 0.3 passes the config (a serial
    device's watchdog is not in it) and used to latch a device_watchdog fault between two heartbeats."""
    from controller.config import parse_config
    from controller.loop import make_actuator
    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.5).start()
    try:
        cfg = parse_config({"device": {"kind": "serial", "port": slave, "heartbeat_s": 0.3}})
        drv = SerialStimulator(slave, timeout_s=0.05, retries=1)
        with pytest.raises(ValueError, match=r"device.heartbeat_s = 0.3 s is more than a third of the device's "
                                             r"watchdog \(0.5 s, reported at its HELLO\)"):
            make_actuator(cfg, drv, pylsl.local_clock)
        assert not drv.is_open and emu.counters["deliveries"] == 0
        ok = parse_config({"device": {"kind": "serial", "port": slave, "heartbeat_s": 0.15}})
        make_actuator(ok, SerialStimulator(slave, timeout_s=0.05, retries=1), pylsl.local_clock).close()
    finally:
        emu.stop()
        close_pty(master_fd)
