"""SpikingUnits: determinism, waveforms and noise, artifacts, evoked spikes, STDP (ADS vs random)."""
import numpy as np
import pytest

from controller.spikes import SpikeDetector
from drivers.params import StimParams
from hil_sim.ads_sim import run_simulated
from hil_sim.spiking import SpikingUnits, spike_template
from models.plasticity.stdp import STDPRule

FS = 30_000.0
STIM = StimParams(channel=0, amplitude_ua=50.0, pulse_width_us=200.0, frequency_hz=333.0, n_pulses=1)


def _units(**kw):
    base = dict(fs_hz=FS, n_channels=8, trigger_channels=(0, 1), target_channel=4, stim_site_channel=6,
                rate_hz=5.0, seed=5)
    base.update(kw)
    return SpikingUnits(**base)


def test_deterministic_from_seed_and_block_size_independent_noise_and_spikes():
    a, b, c = _units(), _units(), _units(seed=6)
    xa = np.concatenate([a.step(30) for _ in range(1000)])
    xb = b.step(30_000)
    xc = c.step(30_000)
    assert xa.dtype == np.float32 and xa.shape == (30_000, 8)
    np.testing.assert_allclose(xa, xb, atol=1e-3)
    assert not np.allclose(xa, xc)
    np.testing.assert_array_equal(a.ground_truth()["trigger_spikes"]["t_s"], b.ground_truth()["trigger_spikes"]["t_s"])


def test_noise_level_and_spike_waveforms_at_true_times():
    u = _units(noise_uv_rms=10.0, rate_hz=10.0)
    x = u.step(int(FS * 5))
    quiet = x[:, 7]
    assert np.median(np.abs(quiet)) / 0.6745 == pytest.approx(10.0, rel=0.1)
    gt = u.ground_truth()["trigger_spikes"]
    idx = np.round(gt["t_s"] * FS).astype(int)
    troughs = x[idx, gt["channel"]]
    # Each true time is the trough of a -60..-120 µV waveform (plus 10 µV noise).
    assert np.all(troughs < -30) and np.median(troughs) < -60
    assert np.all((u.unit_amplitude_uv >= 60) & (u.unit_amplitude_uv <= 120))
    tpl, pre = spike_template(FS)
    assert tpl[pre] == pytest.approx(-1.0) and 40 <= tpl.size <= 60   # ~1.6 ms at 30 kHz


def test_bursty_firing_has_short_intervals():
    u = _units(firing="bursty", rate_hz=5.0)
    u.step(int(FS * 10))
    isi = np.diff(np.sort(u.ground_truth()["trigger_spikes"]["t_s"][u.ground_truth()["trigger_spikes"]["unit"] == 0]))
    assert np.mean(isi < 0.006) > 0.3 and isi.min() >= 0.002 - 1e-9


def test_artifacts_appear_everywhere_decay_and_would_trigger_a_detector():
    u = _units()
    x0 = u.step(3000)
    u.stimulate(0.15, STIM)
    x = u.step(3000)
    i0 = int(0.15 * FS) - 3000
    peak = np.abs(x[i0:i0 + 30]).max(axis=0)
    assert np.all(peak > 500)                       # every channel, far larger than any spike
    assert peak[6] == peak.max()                    # biggest at the stimulation site
    dur = u.artifact_duration_s(STIM)
    assert 0.003 < dur < 0.028                      # ends inside the 28 ms blanking (REFERENCE.md §2)
    tail = x[i0 + int(dur * FS) + 30:]
    assert np.abs(tail[:, 7]).max() < 60            # back to noise (+ spikes) afterwards
    # Without blanking, a threshold detector fires on it.
    det = SpikeDetector(FS, 8, channels=(0, 1), k=5.0, initial_sigma_uv=10.0)
    ts = np.arange(6000) / FS
    det.step(x0, ts[:3000])
    s = det.step(x, ts[3000:])
    assert np.any(np.abs(s.t - 0.15) < 0.001)
    # Longer, stronger pulses leave longer artifacts.
    assert u.artifact_duration_s(STIM.with_(pulse_width_us=400.0, amplitude_ua=100.0)) > dur
    gt = u.ground_truth()
    assert gt["pulses"][0]["t_s"] == pytest.approx(0.15) and gt["pulses"][0]["artifact_s"] == pytest.approx(dur)


def test_stimulation_evokes_target_spikes_with_latency():
    u = _units(evoked_prob=1.0, target_rate_hz=0.0, syn_prob_max=0.0)
    times = np.arange(0.1, 5.0, 0.1)
    for t in times:
        u.step(int(round(t * FS)) - u.n_samples)
        u.stimulate(t, STIM)
    u.step(3000)
    post = u.ground_truth()["target_spikes"]
    assert set(post["cause"]) == {"evoked"} and len(post["t_s"]) == times.size
    lat = np.asarray(post["t_s"]) - times
    assert np.all((lat > 0.001) & (lat < 0.005))


def _paired_stdp_run(offset_s: float, duration_s: float = 10.0, block_n: int = 150):
    """Pair every trigger (pre) spike with a stimulation-evoked target (post) spike: the pulse at
    pre + ``offset_s``, delivered before the block holding it is produced (as run_simulated does).
    A post spike ahead of its pre spike needs the pre spike's time in advance: a twin with the same
    seed and blocks, run first, gives it (the trigger trains do not depend on stimulation)."""
    kw = dict(rate_hz=2.0, target_rate_hz=0.0, syn_prob_max=0.0, evoked_prob=1.0, evoked_jitter_ms=0.0,
              evoked_latency_ms=1.0, stdp=STDPRule.song2000())
    n_blocks = int(duration_s * FS) // block_n
    twin = _units(**kw)
    for _ in range(n_blocks):
        twin.step(block_n)
    pre = twin.ground_truth()["trigger_spikes"]["t_s"]
    pending = sorted(t + offset_s for t in pre if 0.0 <= t + offset_s < duration_s - 0.01)
    u = _units(**kw)
    w_init = u.w
    for _ in range(n_blocks):
        t_end = u.t + block_n / FS
        while pending and pending[0] < t_end:
            u.stimulate(pending.pop(0), STIM)
        u.step(block_n)
    gt = u.ground_truth()
    np.testing.assert_array_equal(gt["trigger_spikes"]["t_s"], pre)      # the twin's train was this one's
    return u.w - w_init, pre, gt


def test_pair_stdp_pre_before_post_potentiates_and_post_before_pre_depresses():
    # Song 2000 (REFERENCE.md §7): Δw = A+·exp(−Δt/τ+) for post after pre, −A−·exp(Δt/τ−) before;
    # τ± = 20 ms, A+ = 0.005, A− = 1.05·A+. Every pre spike gets one post spike 5 ms after (pulse 4 ms
    # after it + 1 ms evoked latency) or 5 ms before it (pulse 6 ms before).
    a_plus, a_minus, tau, lat = 0.005, 1.05 * 0.005, 0.020, 0.001
    results = {}
    for offset in (0.004, -0.006):
        dw, pre, gt = _paired_stdp_run(offset)
        pulses = np.array([p["t_s"] for p in gt["pulses"]])
        post = np.asarray(gt["target_spikes"]["t_s"])
        assert set(gt["target_spikes"]["cause"]) == {"evoked"} and post.size == pulses.size == pre.size >= 30
        np.testing.assert_allclose(pulses, pre + offset, atol=0.6 / FS)  # on the sample grid
        np.testing.assert_allclose(post - pre, offset + lat, atol=1.1 / FS)
        # All-to-all pair rule over every (pre, post) pair of the true spike times, as §7 writes it.
        d = post[None, :] - pre[:, None]
        expected = (a_plus * np.exp(-d[d > 0] / tau).sum() - a_minus * np.exp(d[d < 0] / tau).sum())
        assert dw == pytest.approx(expected, rel=1e-6, abs=1e-9)
        results[offset] = (dw, pre.size)
    (ltp, n), (ltd, n2) = results[0.004], results[-0.006]
    assert n == n2                                   # the same pairings, only their order differs
    one_pair = a_plus * np.exp(-0.005 / tau)         # |Δt| = 5 ms; the other pairs are far apart
    assert ltp > 0 and ltp == pytest.approx(n * one_pair, rel=0.1)
    assert ltd < 0 and ltd == pytest.approx(-1.05 * n * one_pair, rel=0.1)


def test_ads_potentiates_versus_random_stimulation_at_matched_rate():
    ads = run_simulated("ads", 15.0, seed=2)
    rnd = run_simulated("random", 15.0, seed=2, rate_hz=ads["rate_hz"])
    assert ads["n_pulses"] > 40
    assert rnd["rate_hz"] == pytest.approx(ads["rate_hz"], rel=0.35)
    assert ads["w_final"] - ads["w_init"] > 0.1
    assert (ads["w_final"] - ads["w_init"]) > (rnd["w_final"] - rnd["w_init"]) + 0.08


def test_triplet_and_reward_modulated_synapse_run():
    u = _units(stdp=STDPRule.pfister2006_visual_minimal(), rate_hz=10.0)
    w0 = u.w
    u.step(int(FS * 2))
    assert abs(u.w - w0) > 1e-4 and 0.0 < u.w < 1.0     # the triplet rule acted, inside its bounds
    from models.plasticity.stdp import RewardParams
    r = _units(reward=RewardParams(), evoked_prob=1.0)
    w0 = r.w
    for t in np.arange(0.1, 2.0, 0.2):
        r.step(int(round(t * FS)) - r.n_samples)
        r.stimulate(t, STIM)
    assert r.w == w0                                  # without dopamine, eligibility only
    r.reward(r.t + 0.01, 1.0)
    r.step(int(FS))
    assert r.w != w0
    with pytest.raises(RuntimeError, match="not reward-modulated"):
        _units().reward(0.1, 1.0)


@pytest.mark.parametrize("kw, needle", [
    ({"fs_hz": 1000.0}, "fs_hz=1000.0"), ({"trigger_channels": (0, 9)}, "trigger_channels"),
    ({"target_channel": 0}, "target_channel=0"), ({"rate_hz": 0.0}, "rate_hz=0.0"),
    ({"firing": "chaotic"}, "firing='chaotic'"),
])
def test_bad_arguments_name_the_value(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _units(**kw)
    with pytest.raises(ValueError, match="n=0"):
        _units().step(0)
