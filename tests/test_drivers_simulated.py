"""SimulatedStimulator on a virtual clock: same semantics as the device."""
from __future__ import annotations

import math

import pytest

from drivers.base import DeviceTimeout, StimulatorError, TriggerTooLate
from drivers.params import StimParams, Waveform
from drivers.simulated import SimulatedStimulator


class VirtualClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


P1 = StimParams(channel=1, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=100.0, n_pulses=10)  # 0.1 s


@pytest.fixture
def sim():
    clock = VirtualClock()
    got = []
    s = SimulatedStimulator(clock, on_deliver=lambda t, p: got.append((t, p)))
    s.open()
    return s, clock, got


def test_immediate_trigger_delivers_and_state_follows_burst(sim):
    s, clock, got = sim
    s.configure(P1)
    r = s.trigger(1)
    assert r.ok and r.sent_t == r.acked_t == r.device_t == 100.0 and s.last_receipt_device_t == 100.0
    assert s.delivered == [(100.0, P1)] and got == [(100.0, P1)]
    assert s.state == "active" and s.active_channels == [1]
    clock.t = 100.05
    with pytest.raises(StimulatorError, match="BUSY"):
        s.trigger(1)
    clock.t = 100.11
    assert s.state == "off"
    s.trigger(1)
    assert len(s.delivered) == 2


def test_scheduled_trigger_is_delivered_exactly_at_time_by_poll(sim):
    s, clock, got = sim
    s.configure(P1)
    s.trigger(1, at=100.5)
    assert s.pending == [(100.5, 1)]
    clock.t = 100.4
    assert s.poll() == [] and got == []
    clock.t = 100.7
    assert s.poll() == [(100.5, P1)]
    assert got == [(100.5, P1)] and s.pending == []
    with pytest.raises(TriggerTooLate, match="TOO_LATE"):
        s.trigger(1, at=100.6)


def test_stop_cancels_everything_and_is_always_safe(sim):
    s, clock, got = sim
    s.configure(P1)
    s.configure(P1.with_(channel=0))
    s.trigger(0)
    s.trigger(1, at=101.0)
    assert s.stop().ok
    assert s.state == "off" and s.pending == []
    clock.t = 102.0
    s.poll()
    assert len(got) == 1
    s.close()
    assert s.stop().ok   # closed: still stops
    assert SimulatedStimulator(VirtualClock()).stop() is not None


def test_refuses_like_the_device(sim):
    s, clock, _ = sim
    with pytest.raises(StimulatorError, match="NOT_CONFIGURED"):
        s.trigger(1)
    with pytest.raises(StimulatorError, match="BAD_CHANNEL.*channel 7 out of range, expected 0..3"):
        s.trigger(7)
    with pytest.raises(StimulatorError, match="OUT_OF_RANGE.*field amplitude_ua: amplitude_ua 13000.0"):
        s.configure(P1.with_(amplitude_ua=13_000.0))
    s.configure(P1)
    with pytest.raises(StimulatorError, match="finite clock time"):
        s.trigger(1, at=math.inf)
    with pytest.raises(StimulatorError, match="not open"):
        SimulatedStimulator(clock).heartbeat()


def test_continuous_waveform_burst_lasts_duration(sim):
    s, clock, _ = sim
    s.configure(StimParams(channel=2, waveform=Waveform.SINE, amplitude_ua=500.0, frequency_hz=10.0,
                           duration_s=2.0, ramp_s=0.5))
    s.trigger(2)
    clock.t = 101.9
    assert s.state == "active"
    clock.t = 102.01
    assert s.state == "off"


def test_watchdog_stops_when_commands_stop():
    clock = VirtualClock(0.0)
    s = SimulatedStimulator(clock, watchdog_s=0.5)
    s.open()
    s.configure(P1.with_(n_pulses=1000))   # 10 s burst
    s.trigger(1)
    clock.t = 0.4
    s.heartbeat()
    clock.t = 0.8
    s.poll()
    assert s.watchdog_trips == [] and s.state == "active"
    clock.t = 1.0
    s.poll()
    assert s.watchdog_trips == [0.9] and s.state == "off"
    clock.t = 3.0
    s.poll()
    assert s.watchdog_trips == [0.9]   # once per silence


def test_muted_raises_timeout_but_stop_still_stops(sim):
    s, clock, _ = sim
    s.configure(P1)
    s.trigger(1)
    s.set_mute(True)
    with pytest.raises(DeviceTimeout, match="muted"):
        s.heartbeat()
    r = s.stop()
    assert not r.ok and s.state == "off"
