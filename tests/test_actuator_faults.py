"""The actuator's fault reporting: faults that had no way to report themselves."""
import pytest

from controller.actuator import Actuator
from controller.events import EventKind
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from drivers.params import StimParams
from drivers.simulated import SimulatedStimulator

BURST = StimParams(amplitude_ua=100.0)


def _rig(on_deliver=None, governor_cls=SafetyGovernor):
    t = [0.0]
    drv = SimulatedStimulator(clock=lambda: t[0], on_deliver=on_deliver)
    drv.open()
    act = Actuator(governor_cls(MACRO_RNS, drv.capabilities), drv, lambda: t[0])
    act.heartbeat()
    return act, drv, t


def _blow_up(t, params):
    raise RuntimeError("patient model blew up")


@pytest.mark.parametrize("next_call", ["close", "heartbeat", "submit"])
def test_a_fault_in_poll_is_reported_by_the_next_call_that_returns_events(next_call):
    act, drv, t = _rig()
    assert act.submit(StimRequest(0.0, "t", BURST, at=0.5))[-1].kind is EventKind.COMMAND
    drv.on_deliver = _blow_up
    t[0] = 0.6
    with pytest.raises(RuntimeError, match="blew up"):
        act.poll()   # the runner's loop ends on it; its finally closes the actuator
    assert act.governor.latched.startswith("driver error during poll")
    t[0] = 0.7
    ev = {"close": act.close, "heartbeat": act.heartbeat,
          "submit": lambda: act.submit(StimRequest(0.7, "t", BURST))}[next_call]()
    poll_fault = [e for e in ev if e.kind in (EventKind.FAULT, EventKind.SAFE_STATE)
                  and "during poll" in str(e.data.get("reason"))]
    assert [e.kind for e in poll_fault] == [EventKind.FAULT, EventKind.SAFE_STATE]
    assert poll_fault[1].data["stop_ok"] is True
    # Returned once.
    again = act.close() if next_call != "close" else []
    assert not [e for e in again if e.kind is EventKind.FAULT and "during poll" in str(e.data.get("reason"))]


class RaisingGovernor(SafetyGovernor):
    """The real governor, with a defect: its step raises (what step() no longer does by itself)."""

    def step(self, request, now):
        raise OverflowError("int too large to convert to float")


def test_an_exception_from_the_governor_ends_in_the_safe_state_and_is_reported():
    act, drv, t = _rig(governor_cls=RaisingGovernor)
    ev = act.submit(StimRequest(0.0, "t", BURST))
    assert [e.kind for e in ev] == [EventKind.FAULT, EventKind.SAFE_STATE]
    assert "governor error" in ev[0].data["reason"] and "OverflowError" in ev[0].data["reason"]
    assert act.governor.latched is not None and drv.delivered == []


def test_a_huge_int_through_the_actuator_is_a_refusal_and_nothing_is_sent():
    """t1: the real governor now refuses it; nothing escapes submit()."""
    act, drv, t = _rig()
    ev = act.submit(StimRequest(0.0, "t", BURST.with_(n_pulses=10 ** 400)))
    assert [e.kind for e in ev] == [EventKind.REFUSAL] and ev[0].data["rule"] == "invalid_request"
    assert drv.delivered == [] and act.governor.latched is None


class InterruptedGovernor(SafetyGovernor):
    def step(self, request, now):
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_the_governor_is_reported_by_the_next_call():
    act, drv, t = _rig(governor_cls=InterruptedGovernor)
    with pytest.raises(KeyboardInterrupt):
        act.submit(StimRequest(0.0, "t", BURST))
    ev = act.close()
    assert [e.kind for e in ev][:2] == [EventKind.FAULT, EventKind.SAFE_STATE]
    assert "governor error" in ev[0].data["reason"] and "KeyboardInterrupt" in ev[0].data["reason"]
    assert drv.delivered == []
