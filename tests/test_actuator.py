"""Actuator: governor → driver, COMMAND events, and the safe state on every driver failure."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.actuator import Actuator
from controller.events import EventKind
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from drivers.base import CommandReceipt, DeviceTimeout, Stimulator, StimulatorError
from drivers.params import DeviceCapabilities, StimParams
from drivers.simulated import SimulatedStimulator

BURST = StimParams(channel=1, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)  # 0.1 s


class Clock:
    """Virtual session clock the test advances by hand."""

    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


class RecordingStimulator(Stimulator):
    """A complete Stimulator that records every call and fails on demand (not a mock: it implements the ABC)."""

    def __init__(self, clock, fail_on=(), stop_fails=False, bad_receipt_on=()):
        self.capabilities = DeviceCapabilities()
        self.clock, self.fail_on, self.stop_fails, self.bad_receipt_on = clock, set(fail_on), stop_fails, set(bad_receipt_on)
        self.calls: list[tuple] = []
        self.seq = 0

    def _do(self, name, *args):
        self.calls.append((name, *args))
        self.seq += 1
        if name in self.fail_on:
            raise StimulatorError(f"{name} failed on purpose")
        return CommandReceipt(self.seq, self.clock(), self.clock(), ok=name not in self.bad_receipt_on,
                              error="" if name not in self.bad_receipt_on else "device said no")

    def open(self):
        self.calls.append(("open",))

    def close(self):
        self.calls.append(("close",))

    def configure(self, params):
        return self._do("configure", params)

    def trigger(self, channel, at=None):
        return self._do("trigger", channel, at)

    def stop(self):
        self.calls.append(("stop",))
        if self.stop_fails:
            raise StimulatorError("stop failed too")
        return None

    def heartbeat(self):
        return self._do("heartbeat")

    def names(self):
        return [c[0] for c in self.calls]


def rig(driver_factory=None):
    clock = Clock()
    drv = driver_factory(clock) if driver_factory else SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.open()
    act.heartbeat()
    return act, drv, clock


def test_allowed_request_is_configured_triggered_and_commanded():
    act, drv, clock = rig()
    ev = act.submit(StimRequest(0.0, "policy", BURST, meta={"window_end_t": -0.004}))
    assert [e.kind for e in ev] == [EventKind.DECISION, EventKind.COMMAND]
    cmd = ev[-1].data
    assert cmd["window_end_t"] == -0.004 and cmd["channel"] == 1 and cmd["configure_seq"] is not None
    assert cmd["op"] == "trigger"
    assert cmd["seq"] != cmd["configure_seq"] and cmd["sent_t"] == 0.0
    assert drv.delivered == [(0.0, BURST)]
    # same params again: trigger only, no reconfigure
    clock.t = 1.0
    act.heartbeat()
    ev = act.submit(StimRequest(1.0, "policy", BURST))
    assert ev[-1].kind is EventKind.COMMAND and ev[-1].data["configure_seq"] is None
    assert len(drv.delivered) == 2


def test_clamped_params_are_what_reaches_the_device():
    act, drv, clock = rig()
    ev = act.submit(StimRequest(0.0, "policy", BURST.with_(amplitude_ua=12_000.0, pulse_width_us=500.0)))
    assert EventKind.CLAMP in [e.kind for e in ev] and ev[-1].kind is EventKind.COMMAND
    (_, delivered), = drv.delivered
    assert delivered.charge_per_phase_uc / MACRO_RNS.electrode_area_cm2 <= 25.0


def test_refused_request_never_reaches_the_driver():
    act, drv, clock = rig(RecordingStimulator)
    before = drv.names()
    ev = act.submit(StimRequest(0.0, "policy", BURST.with_(frequency_hz=1000.0)))
    assert [e.kind for e in ev] == [EventKind.REFUSAL]
    assert drv.names() == before


def test_scheduled_burst_is_passed_through_and_past_times_mean_now():
    act, drv, clock = rig()
    ev = act.submit(StimRequest(0.0, "policy", BURST, at=0.5))
    assert ev[-1].data["at"] == 0.5 and drv.pending == [(0.5, 1)]
    clock.t = 0.5
    assert act.poll() == [(0.5, BURST)]
    clock.t = 2.0
    act.heartbeat()
    ev = act.submit(StimRequest(2.0, "policy", BURST, at=1.9))   # late: deliver now, not a device error
    assert ev[-1].kind is EventKind.COMMAND and ev[-1].data["at"] is None


@pytest.mark.parametrize("failing", ["configure", "trigger"])
def test_driver_exception_stops_device_latches_and_reports(failing):
    act, drv, clock = rig(lambda c: RecordingStimulator(c, fail_on={failing}))
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    kinds = [e.kind for e in ev]
    assert kinds[0] is EventKind.DECISION and kinds[-2:] == [EventKind.FAULT, EventKind.SAFE_STATE]
    assert "failed on purpose" in ev[-2].data["reason"] and ev[-1].data["stop_ok"] is True
    assert drv.names()[-1] == "stop"
    assert act.governor.latched is not None
    # dose was booked when allowed, even though the driver failed (never undercount)
    assert act.dose.bursts == 1
    # nothing passes until reset; after reset, params are configured again (device state unknown)
    clock.t = 1.0
    act.heartbeat()
    n = len(drv.calls)
    assert act.submit(StimRequest(1.0, "policy", BURST))[0].data["rule"] == "safe_state"
    assert len(drv.calls) == n
    drv.fail_on.clear()
    act.reset()
    ev = act.submit(StimRequest(1.0, "policy", BURST))
    assert ev[-1].kind is EventKind.COMMAND and drv.names()[-2:] == ["configure", "trigger"]


def test_trigger_refused_as_too_late_is_a_refusal_not_a_fault():
    """The command reached the device after its deliver-at time: nothing delivered, the session goes on."""
    host = Clock()
    drv = SimulatedStimulator(clock=lambda: host.t + 0.010)   # the device sees 10 ms later than the host
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, host)
    act.open()
    act.heartbeat()
    ev = act.submit(StimRequest(0.0, "policy", BURST, at=0.005))   # future for the host, past for the device
    assert ev[-1].kind is EventKind.REFUSAL and ev[-1].data["rule"] == "too_late"
    assert "TOO_LATE" in ev[-1].data["reason"] and ev[-1].data["at"] == 0.005
    assert not [e for e in ev if e.kind in (EventKind.FAULT, EventKind.SAFE_STATE)]
    assert act.governor.latched is None and drv.pending == [] and drv.delivered == []
    assert act.dose.bursts == 1   # booked when allowed: never undercount
    # Not latched: the next request on time is commanded and delivered (params still configured).
    host.t = 1.0
    act.heartbeat()
    ev = act.submit(StimRequest(1.0, "policy", BURST, at=1.05))
    assert ev[-1].kind is EventKind.COMMAND and ev[-1].data["configure_seq"] is None
    host.t = 1.045   # the device sees 1.055: due
    assert act.poll() == [(1.05, BURST)] and drv.delivered == [(1.05, BURST)]


def test_not_ok_receipt_is_a_fault_and_stop_failure_is_reported():
    act, drv, clock = rig(lambda c: RecordingStimulator(c, bad_receipt_on={"trigger"}, stop_fails=True))
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    assert ev[-1].kind is EventKind.SAFE_STATE and ev[-1].data["stop_ok"] is False
    assert "device said no" in ev[-2].data["reason"]
    assert drv.names().count("stop") == 2   # retried once


def test_muted_simulated_device_times_out_into_safe_state():
    act, drv, clock = rig()
    drv.set_mute(True)
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    assert [e.kind for e in ev][-2:] == [EventKind.FAULT, EventKind.SAFE_STATE]
    assert "DeviceTimeout" in ev[-2].data["reason"]
    assert drv.delivered == [] and drv.state == "off"


def test_heartbeat_failure_is_a_fault_and_missing_heartbeat_refuses():
    act, drv, clock = rig(lambda c: RecordingStimulator(c))
    clock.t = 3.0   # > heartbeat_timeout_s since the last heartbeat
    assert act.submit(StimRequest(3.0, "policy", BURST))[0].data["rule"] == "heartbeat"
    drv.fail_on.add("heartbeat")
    ev = act.heartbeat()
    assert [e.kind for e in ev] == [EventKind.FAULT, EventKind.SAFE_STATE]


def test_impedance_out_of_window_stops_device_and_refuses():
    act, drv, clock = rig(lambda c: RecordingStimulator(c))
    ev = act.set_impedance(10_000.0)
    assert [e.kind for e in ev] == [EventKind.FAULT, EventKind.SAFE_STATE] and drv.names()[-1] == "stop"
    assert act.submit(StimRequest(0.0, "policy", BURST))[0].data["rule"] == "impedance"
    assert [e.kind for e in act.set_impedance(1000.0)] == [EventKind.STATUS]
    assert act.submit(StimRequest(0.0, "policy", BURST))[-1].kind is EventKind.COMMAND


def test_safe_state_fault_and_close():
    act, drv, clock = rig(lambda c: RecordingStimulator(c))
    ev = act.safe_state("operator pressed stop")
    assert ev[-1].kind is EventKind.SAFE_STATE and "emergency_stop" in act.governor.latched
    act.reset()
    ev = act.fault("deadline miss x3")
    assert [e.kind for e in ev] == [EventKind.FAULT, EventKind.SAFE_STATE]
    act.reset()
    ev = act.close()
    assert drv.names()[-2:] == ["stop", "close"] and act.closed
    assert act.close() == []
    assert act.submit(StimRequest(0.0, "policy", BURST))[0].kind is EventKind.REFUSAL
    with pytest.raises(RuntimeError, match="closed"):
        act.reset()


def test_capability_mismatch_is_refused():
    clock = Clock()
    drv = SimulatedStimulator(clock=clock)
    with pytest.raises(ValueError, match="capabilities"):
        Actuator(SafetyGovernor(MACRO_RNS, DeviceCapabilities(max_amplitude_ua=500.0)), drv, clock)
    with pytest.raises(TypeError, match="Stimulator"):
        Actuator(SafetyGovernor(MACRO_RNS, DeviceCapabilities()), object(), clock)


def test_no_public_path_to_the_driver():
    act, drv, clock = rig()
    for name in dir(act):
        if name.startswith("_"):
            continue
        attr = getattr(act, name)
        assert not isinstance(attr, Stimulator), f"Actuator.{name} exposes the driver"
    # the driver sits only in the name-mangled slot
    held = [n for n in Actuator.__slots__ if isinstance(getattr(act, n if not n.startswith("__") else "_Actuator" + n, None), Stimulator)]
    assert held == ["__driver"]
    assert not hasattr(act, "__dict__"), "slots only: no ad-hoc attribute can hold a driver"
    # the governor never holds the driver
    assert all(not isinstance(v, Stimulator) for v in vars(act.governor).values())
    with pytest.raises(AttributeError):
        act.driver = drv  # cannot attach one either


def test_nan_clock_from_shell_is_refused_not_sent():
    clock = Clock()
    drv = RecordingStimulator(clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.heartbeat()
    clock.t = math.nan
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    assert ev[0].data["rule"] == "invalid_time" and "trigger" not in drv.names()


def _replay(requests, warm_between, params_for_warm=None):
    """Submit ``requests`` [(t, params)] in order, warming (every period) between them when asked."""
    clock = Clock()
    drv = RecordingStimulator(clock)
    act = Actuator(SafetyGovernor(MACRO_RNS, drv.capabilities), drv, clock)
    act.warm_period_s = 0.0
    out = []
    for t, params in requests:
        if warm_between:
            for k in range(3):
                clock.t = t - 0.01 * (3 - k)
                act.warm(params_for_warm)
        clock.t = t
        act.heartbeat()
        out.append([(e.kind, e.data.get("reason"), e.data.get("rule")) for e in act.submit(StimRequest(t, "policy", params))])
    return out, drv.calls, act.dose


@given(gaps=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=12),
       amps=st.lists(st.sampled_from([500.0, 1500.0, 2500.0, 9000.0, math.nan]), min_size=1, max_size=12),
       warm_with=st.sampled_from([None, BURST, StimParams(channel=0, amplitude_ua=1e6)]))
@settings(max_examples=150, deadline=None)
def test_warm_is_invisible_to_decisions_device_and_dose(gaps, amps, warm_with):
    """Rehearsing the command path changes nothing: same decisions, same driver calls, same dose."""
    t, reqs = 1.0, []
    for gap, amp in zip(gaps, amps):
        t += gap
        reqs.append((t, StimParams(channel=1, amplitude_ua=amp, pulse_width_us=160.0, frequency_hz=200.0,
                                   n_pulses=20)))
    assert _replay(reqs, True, warm_with) == _replay(reqs, False)


def test_warm_rehearses_the_last_params_at_most_once_per_period():
    act, drv, clock = rig(RecordingStimulator)
    act.warm()                                    # nothing sent yet: nothing to rehearse
    assert act._warm_gov is None
    act.submit(StimRequest(0.0, "policy", BURST))
    act.warm_period_s = 0.01
    clock.t = 0.02
    act.warm()
    scratch = act._warm_gov
    assert scratch is not None and scratch is not act.governor and scratch.dose.bursts == 1
    act.warm()                                    # within the period: skipped
    assert scratch.dose.bursts == 1
    clock.t = 0.04
    act.warm()
    assert scratch.dose.bursts == 2
    assert act.dose.bursts == 1 and drv.names().count("trigger") == 1
    act.close()
    clock.t = 1.0
    act.warm()                                    # closed: nothing more
    assert scratch.dose.bursts == 2


class Interrupted(RecordingStimulator):
    """Ctrl-C while a command waits for its ACK (the device may have acted on it)."""

    def __init__(self, clock, interrupt_on):
        super().__init__(clock)
        self.interrupt_on = interrupt_on

    def _do(self, name, *args):
        if name == self.interrupt_on:
            self.calls.append((name, *args))
            raise KeyboardInterrupt
        return super()._do(name, *args)


@pytest.mark.parametrize("interrupt_on", ["configure", "trigger"])
def test_keyboard_interrupt_in_submit_stops_and_its_events_come_with_the_next_call(interrupt_on):
    """KeyboardInterrupt passes through submit (after the stop), and the DECISION, FAULT and SAFE_STATE
    built on the way out were dropped with it: now the runner's close() in its finally reports them."""
    act, drv, clock = rig(lambda c: Interrupted(c, interrupt_on))
    with pytest.raises(KeyboardInterrupt):
        act.submit(StimRequest(0.0, "policy", BURST))
    assert drv.names()[-1] == "stop" and act.dose.bursts == 1
    ev = act.close()
    kinds = [e.kind for e in ev]
    assert kinds[:3] == [EventKind.DECISION, EventKind.FAULT, EventKind.SAFE_STATE], kinds
    assert "KeyboardInterrupt" in ev[1].data["reason"] and ev[2].data["stop_ok"] is True
    assert ev[-1].kind is EventKind.SAFE_STATE and ev[-1].data["reason"] == "actuator closed"


def test_keyboard_interrupt_in_heartbeat_keeps_the_events_it_was_to_return():
    act, drv, clock = rig(lambda c: Interrupted(c, "trigger"))
    with pytest.raises(KeyboardInterrupt):
        act.submit(StimRequest(0.0, "policy", BURST))   # its events wait for the next call,
    drv.interrupt_on = "heartbeat"
    with pytest.raises(KeyboardInterrupt):
        act.heartbeat()                                 # which is interrupted too: still kept
    drv.interrupt_on = None
    ev = act.close()
    kinds = [e.kind for e in ev]
    assert kinds[:3] == [EventKind.DECISION, EventKind.FAULT, EventKind.SAFE_STATE], kinds
    assert kinds.count(EventKind.DECISION) == 1         # once, not once per interrupted call


class SlowLink(RecordingStimulator):
    """Commands that take ``delay_s`` of session time each (a lost reply and its retry), with the
    device's receipt time of each in the ACK (``device_t``), as the serial driver reports it."""

    def __init__(self, clock, delay_s=None, device_t=lambda sent_t, acked_t: acked_t, trigger_fails=False):
        super().__init__(clock)
        self.delay_s = delay_s or {}
        self.device_t = device_t
        self.trigger_fails = trigger_fails

    def _do(self, name, *args):
        self.calls.append((name, *args))
        self.seq += 1
        sent_t = self.clock()
        self.clock.t += self.delay_s.get(name, 0.0)
        if name == "trigger" and self.trigger_fails:
            raise DeviceTimeout("trigger: no reply after 4 attempts")
        return CommandReceipt(self.seq, sent_t, self.clock(), device_t=self.device_t(sent_t, self.clock()))


def test_the_governor_books_the_start_the_device_reports_and_the_command_says_so():
    """A retried CONFIGURE delays the TRIGGER by 50 ms: the device starts the burst at 0.05, not at the
    decision (0.0). The next request is judged against 0.05: refused by min_interval on another channel
    (two bursts would overlap on the device), then device_busy until the device's end + guard, never a
    BUSY fault; the session goes on."""
    act, drv, clock = rig(lambda c: SlowLink(c, delay_s={"configure": 0.05}))
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    cmd = ev[-1].data
    assert ev[-1].kind is EventKind.COMMAND and ev[0].data["start_t"] == 0.0        # DECISION: booked at 0
    assert (cmd["booked_start_t"], cmd["start_t"], cmd["device_t"]) == (0.0, 0.05, 0.05)
    assert cmd["start_moved_s"] == pytest.approx(0.05)
    dose = act.dose
    other = BURST.with_(channel=2)
    for t, rule in ((0.12, "min_interval"), (0.152, "device_busy")):
        clock.t = t
        act.heartbeat()
        ev = act.submit(StimRequest(t, "policy", other))
        assert [e.kind for e in ev] == [EventKind.REFUSAL] and ev[0].data["rule"] == rule, (t, ev)
    assert act.dose == dose and act.governor.latched is None
    clock.t = 0.156
    act.heartbeat()
    assert act.submit(StimRequest(0.156, "policy", other))[-1].kind is EventKind.COMMAND


@pytest.mark.parametrize("device_t, start_t", [
    (lambda s, a: None, 0.03),          # no receipt time from the driver: the ACK's arrival, the latest
    (lambda s, a: a + 5.0, 0.03),       # a device clock ahead: no later than the ACK's arrival
    (lambda s, a: s - 5.0, 0.01),       # a device clock behind: no earlier than the first copy was sent
    (lambda s, a: math.nan, 0.03),
])
def test_the_device_start_is_held_between_sending_the_trigger_and_reading_its_ack(device_t, start_t):
    act, drv, clock = rig(lambda c: SlowLink(c, delay_s={"configure": 0.01, "trigger": 0.02}, device_t=device_t))
    cmd = act.submit(StimRequest(0.0, "policy", BURST))[-1].data
    assert cmd["booked_start_t"] == 0.0 and cmd["start_t"] == pytest.approx(start_t)


def test_a_trigger_that_failed_may_have_started_the_burst_as_late_as_the_failure():
    """The device may have acted on a TRIGGER whose ACKs were all lost: after the safe state and a
    reset, the next burst keeps its distance from the failure time, not from the decision."""
    act, drv, clock = rig(lambda c: SlowLink(c, delay_s={"trigger": 0.2}, trigger_fails=True))
    ev = act.submit(StimRequest(0.0, "policy", BURST))
    assert ev[-1].kind is EventKind.SAFE_STATE
    assert (ev[-1].data["booked_start_t"], ev[-1].data["start_t"]) == (0.0, 0.2)
    drv.trigger_fails = False
    clock.t = 0.25
    act.reset()
    act.heartbeat()
    ev = act.submit(StimRequest(0.25, "policy", BURST))
    assert [e.kind for e in ev] == [EventKind.REFUSAL] and ev[0].data["rule"] == "min_interval"


def test_make_actuator_refuses_a_heartbeat_slower_than_a_third_of_the_devices_watchdog():
    """The device's watchdog is known once it is open (a serial device's HELLO): a config heartbeat
    slower than a third of it would let the device stop between two heartbeats, a latched fault."""
    from controller.config import parse_config
    from controller.loop import make_actuator
    cfg = parse_config({"device": {"kind": "serial", "port": "/dev/null", "heartbeat_s": 0.3}})
    clock = Clock()
    drv = SimulatedStimulator(clock=clock, watchdog_s=0.6)
    with pytest.raises(ValueError, match=r"device.heartbeat_s = 0.3 s is more than a third of the device's "
                                         r"watchdog \(0.6 s, reported at its HELLO\).*heartbeat_s <= 0.2"):
        make_actuator(cfg, drv, clock)
    assert not drv._open                                   # closed again, nothing sent
    act = make_actuator(cfg, SimulatedStimulator(clock=clock, watchdog_s=0.9), clock)   # exactly a third
    act.close()
    make_actuator(cfg, SimulatedStimulator(clock=clock), clock).close()                 # no watchdog at all
