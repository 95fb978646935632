"""Each cause of the safe state is released on its own: clean data again must not clear an operator's
emergency stop or a device fault that came while the data were bad (one latch slot used to hold
only the first reason, and releasing it cleared everything)."""
import numpy as np
from conftest import closed_loop_rig

from controller.closed_loop import BAD_DATA_REASON
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from controller.session_control import ESTOP_REASON
from drivers.params import StimParams
from drivers.simulated import SimulatedStimulator

FS, N_CH = 256.0, 4


def _rig():
    step, act, drv, clock = closed_loop_rig(FS, N_CH)
    rng = np.random.default_rng(0)
    k = [0]

    def feed(seconds: float, nan: bool = False) -> None:
        for _ in range(int(seconds * 8)):
            x = rng.normal(0, 20, (32, N_CH)).astype(np.float32)
            if nan:
                x[5, 1] = np.nan
            ts = (k[0] + np.arange(32)) / FS
            k[0] += 32
            clock.advance_to(float(ts[-1]))
            step.step(x, ts)
            step.housekeeping()

    return act, drv, feed


def test_clean_data_does_not_clear_an_emergency_stop_pressed_meanwhile():
    act, _, feed = _rig()
    feed(2.0)
    feed(0.5, nan=True)
    assert act.governor.latch_reasons == (BAD_DATA_REASON,)
    act.safe_state(f"{ESTOP_REASON} (test)")
    feed(3.0)                                    # clean for longer than a window: bad data released
    reasons = act.governor.latch_reasons
    assert BAD_DATA_REASON not in reasons and len(reasons) == 1 and ESTOP_REASON in reasons[0]


def test_clean_data_does_not_clear_a_device_fault_that_came_while_data_were_bad():
    act, drv, feed = _rig()
    feed(2.0)
    feed(0.5, nan=True)
    drv.set_mute(True)                           # the device stops answering: heartbeat fails
    feed(0.5, nan=True)
    assert any(r.startswith("driver error") for r in act.governor.latch_reasons)
    feed(3.0)
    assert BAD_DATA_REASON not in act.governor.latch_reasons
    assert any(r.startswith("driver error") for r in act.governor.latch_reasons)


def test_governor_releases_one_reason_or_all():
    g = SafetyGovernor(MACRO_RNS, SimulatedStimulator(clock=lambda: 0.0).capabilities)
    g.fault("a", 0.0)
    g.fault("b", 0.0)
    g.fault("a", 0.0)                            # the same cause twice is one latch
    assert g.latch_reasons == ("a", "b") and g.latched == "a"
    ev = g.reset(1.0, "a")
    assert ev[0].data["cleared"] == "a" and ev[0].data["still_latched"] == ["b"]
    d = g.step(StimRequest(1.0, "t", StimParams(amplitude_ua=100.0)), 1.0)
    assert d.params is None and "latched safe state (b)" in d.reason
    assert g.reset(1.0, "nope")[0].data["cleared"] is None and g.latch_reasons == ("b",)
    assert g.reset(2.0)[0].data["cleared_all"] == ["b"] and g.latched is None
