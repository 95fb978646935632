"""AdsPolicy and RandomStimPolicy: one pulse per spike, delay in `at`, blanking, rate limits, matched rate."""
import numpy as np
import pytest

from controller.policies.ads import (BLANK_GUARD_S, GUGGENMOS_BLANKING_MS, GUGGENMOS_DELAY_MS, AdsPolicy,
                                     RandomStimPolicy, blanking_window)
from controller.safety import MICRO, SafetyGovernor, StimRequest
from drivers.params import DeviceCapabilities, StimParams, Waveform

STIM = StimParams(channel=0, waveform=Waveform.BIPHASIC, amplitude_ua=50.0, pulse_width_us=200.0,
                  frequency_hz=333.0, n_pulses=1)


def test_guggenmos_numbers():
    assert GUGGENMOS_DELAY_MS == 7.5 and GUGGENMOS_BLANKING_MS == 28.0


def test_one_pulse_per_spike_with_delay_in_at():
    pol = AdsPolicy([0, 1], STIM)
    spikes = np.array([1.000, 1.100, 1.200])
    reqs = pol.step(spikes, np.array([0, 1, 0]), now=1.201)
    assert [type(r) for r in reqs] == [StimRequest] * 3
    assert [r.at for r in reqs] == pytest.approx((spikes + 0.0075).tolist())
    assert all(r.params == STIM and r.t == 1.201 and r.source == "ads" for r in reqs)
    assert [r.meta["spike_t"] for r in reqs] == spikes.tolist()


def test_non_trigger_channels_are_ignored():
    pol = AdsPolicy([2], STIM)
    assert pol.step(np.array([1.0, 1.1]), np.array([0, 1]), 1.2) == []
    assert len(pol.step(np.array([1.3]), np.array([2]), 1.3)) == 1


def test_no_trigger_inside_blanking_window():
    pol = AdsPolicy([0], STIM)
    (r,) = pol.step(np.array([1.0]), np.array([0]), 1.0)
    # Spikes during the delay and inside [at, at + 28 ms) ask for nothing, across calls.
    inside = r.at + np.array([0.0, 0.010, 0.0279])
    assert pol.step(np.array([1.003]), np.array([0]), 1.004) == []
    assert pol.step(inside, np.zeros(3, int), r.at + 0.03) == []
    assert pol.n_blanked == 3 and pol.n_rate_limited == 1
    after = pol.step(np.array([r.at + 0.0281]), np.array([0]), r.at + 0.03)
    assert len(after) == 1
    b0, b1 = pol.blanking_window(r.at)
    assert b0 == pytest.approx(r.at - BLANK_GUARD_S) and b1 == pytest.approx(r.at + 0.028)
    assert blanking_window(r.at) == pytest.approx((b0, b1))


def test_max_rate_over_window():
    pol = AdsPolicy([0], STIM, max_rate_hz=5.0, rate_window_s=1.0)
    spikes = np.arange(0.0, 2.0, 0.05)         # 20 Hz of spikes, 50 ms apart (outside blanking)
    reqs = pol.step(spikes, np.zeros(spikes.size, int), 2.0)
    at = np.array([r.at for r in reqs])
    for t in np.arange(0, 2.0, 0.01):
        assert np.sum((at > t) & (at <= t + 1.0)) <= 5
    assert len(reqs) >= 9 and pol.n_rate_limited == spikes.size - len(reqs)


def test_ads_requests_pass_the_micro_governor():
    caps = DeviceCapabilities(n_channels=4, min_pulse_width_us=40.0)
    gov = SafetyGovernor(MICRO, caps)
    pol = AdsPolicy([0], STIM)
    rng = np.random.default_rng(0)
    spikes = np.cumsum(rng.exponential(0.2, size=200)) + 1.0
    allowed = 0
    for t in spikes:
        gov.heartbeat_ok(t)
        for r in pol.step(np.array([t]), np.array([0]), t + 0.001):
            allowed += gov.step(r, t + 0.001).allowed
    assert allowed == pol.n_requests > 150


def test_random_policy_rate_matches_and_respects_dead_time():
    pol = RandomStimPolicy(5.0, STIM, seed=3, min_interval_s=0.028)
    reqs = []
    for now in np.arange(0.0, 400.0, 0.001):
        reqs += pol.step(float(now))
    at = np.array([r.at for r in reqs])
    rate = at.size / 400.0
    assert rate == pytest.approx(5.0, rel=0.06)
    assert np.diff(at).min() >= 0.028 - 1e-9
    # Requests are made lead_s (7.5 ms) ahead of their pulse, like ADS.
    assert all(r.at - r.t <= 0.0075 + 1e-9 and r.at >= r.t for r in reqs)
    assert pol.n_skipped == 0
    # A caller that stalls skips the pulses it missed instead of bunching them.
    late = RandomStimPolicy(5.0, STIM, seed=3, min_interval_s=0.028)
    late.step(0.0)
    burst = late.step(10.0)
    assert all(r.at >= 10.0 for r in burst) and late.n_skipped > 30
    # Same seed → same pulse times.
    pol2 = RandomStimPolicy(5.0, STIM, seed=3, min_interval_s=0.028)
    at2 = [r.at for now in np.arange(0.0, 10.0, 0.001) for r in pol2.step(float(now))]
    assert at2 == pytest.approx(at[:len(at2)].tolist())


@pytest.mark.parametrize("make, needle", [
    (lambda: AdsPolicy([], STIM), "trigger_channels"),
    (lambda: AdsPolicy([0], STIM, delay_ms=-1), "delay_ms=-1"),
    (lambda: AdsPolicy([0], STIM, max_rate_hz=0), "max_rate_hz=0"),
    (lambda: AdsPolicy([0], STIM.with_(waveform=Waveform.DC, duration_s=1.0)), "pulsed"),
    (lambda: RandomStimPolicy(0.0, STIM), "rate_hz=0.0"),
    (lambda: RandomStimPolicy(50.0, STIM, min_interval_s=0.028), "min_interval_s=0.028"),
])
def test_bad_arguments_name_the_value(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()
