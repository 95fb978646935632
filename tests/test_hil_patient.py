"""SimulatedPatient: seizures, ground truth, stimulation response and artifacts."""
import json
import math

import numpy as np
import pytest
from scipy.signal import welch

from drivers.params import StimParams, Waveform
from hil_sim.cohort import patient_params
from hil_sim.patient import PatientParams, SimulatedPatient, termination_probability

FS = 256.0
QUIET = dict(interictal_spike_rate_per_min=0.0, seizure_rate_per_hour=0.0)
STRONG = StimParams(channel=0, amplitude_ua=3000.0, pulse_width_us=200.0, frequency_hz=150.0, n_pulses=30)


def _ll(x):
    return np.abs(np.diff(x, axis=0)).mean(axis=0)


def test_shape_dtype_time_and_names():
    pt = SimulatedPatient(fs_hz=FS, n_channels=5, seed=0)
    x = pt.step(100)
    assert x.shape == (100, 5) and x.dtype == np.float32
    assert pt.t == pytest.approx(100 / FS)
    assert pt.step(0).shape == (0, 5)
    assert pt.channel_names == ["E01", "E02", "E03", "E04", "E05"]


def test_same_seed_same_output_regardless_of_chunking_and_seed_matters():
    params = PatientParams(interictal_spike_rate_per_min=30.0)
    a = SimulatedPatient(FS, 4, seed=11, params=params)
    a.schedule_seizure(3.0)
    xa = a.step(int(12 * FS))
    b = SimulatedPatient(FS, 4, seed=11, params=params)
    b.schedule_seizure(3.0)
    xb = np.concatenate([b.step(n) for n in [1, 7, 100, 333, 1000, int(12 * FS) - 1441]])
    np.testing.assert_array_equal(xa, xb)
    assert a.ground_truth.to_dict() == b.ground_truth.to_dict()
    c = SimulatedPatient(FS, 4, seed=12, params=params)
    c.schedule_seizure(3.0)
    assert not np.allclose(xa, c.step(int(12 * FS)))


def test_alpha_rhythm_is_a_narrow_peak_added_to_every_channel_and_changes_nothing_else():
    """``alpha_uv`` adds band-passed noise at ``alpha_hz`` (its own generator): with the same seed,
    the rest of the signal is unchanged, and the added part is the same on every channel, at the
    requested rms, peaked at the requested frequency, and independent of chunking."""
    plain = SimulatedPatient(FS, 3, seed=4).step(int(60 * FS))
    params = PatientParams(alpha_uv=12.0, alpha_hz=9.5)
    a = SimulatedPatient(FS, 3, seed=4, params=params)
    x = np.concatenate([a.step(n) for n in (1, 255, 4000, int(60 * FS) - 4256)])
    np.testing.assert_allclose(x, SimulatedPatient(FS, 3, seed=4, params=params).step(int(60 * FS)), atol=1e-4)
    alpha = (x - plain).astype(np.float64)
    np.testing.assert_allclose(alpha[:, 1], alpha[:, 0], atol=1e-3)
    np.testing.assert_allclose(alpha[:, 2], alpha[:, 0], atol=1e-3)
    assert alpha[:, 0].std() == pytest.approx(12.0, rel=0.2)
    f, pxx = welch(alpha[:, 0], FS, nperseg=int(8 * FS))
    assert abs(f[pxx.argmax()] - 9.5) <= 0.5
    assert pxx[(f < 7) | (f > 12)].max() < 0.05 * pxx.max()   # narrowband: little power 2.5 Hz away


def test_scheduled_seizure_course_and_ground_truth():
    params = PatientParams(**QUIET)
    pt = SimulatedPatient(512.0, 16, seed=2, params=params)
    pt.schedule_seizure(20.0)
    bg = pt.step(int(19.5 * 512))
    assert not pt.in_seizure()
    mid = pt.step(int(1.0 * 512))
    assert pt.in_seizure()
    rest = pt.step(int(40 * 512))
    assert not pt.in_seizure()
    (onset, offset, by_stim), = pt.ground_truth.seizures
    assert onset == 20.0 and not by_stim
    lo, hi = params.seizure_duration_s
    assert lo <= offset - onset <= hi
    x = np.concatenate([bg, mid, rest])
    def seg(a, b):  # noqa: E306
        return x[int(a * 512): int(b * 512)]
    background = bg[2 * 512:]
    rhythmic = seg(onset + params.onset_duration_s + params.transition_s + 0.5, offset - params.termination_s)
    rms = background.std(axis=0)
    assert np.all((rms > 10) & (rms < 80)), rms           # ~20–60 µV background per channel
    focus = int(np.argmax(np.abs(np.asarray(pt._mix_uv[0]))))
    assert rhythmic[:, focus].std() > 5 * rms[focus]
    assert _ll(rhythmic)[focus] > 3 * _ll(background)[focus]
    f, p_sz = welch(rhythmic[:, focus], fs=512, nperseg=1024)
    band = (f >= 1) & (f <= 40)
    assert 3.0 <= f[band][np.argmax(p_sz[band])] <= 6.0    # §6 spike-wave 3–6 Hz
    # low-voltage fast onset (§6 B=5, G=25): quieter than background, with a larger share of
    # 10–20 Hz power; averaged over patients because 2 s of one channel is a noisy estimate.
    shares_fast, shares_bg = [], []
    for seed in (2, 3, 4):
        q = SimulatedPatient(512.0, 16, seed=seed, params=params)
        q.schedule_seizure(20.0)
        y = q.step(25 * 512)
        fast, quiet_bg = y[int(21 * 512):int(23 * 512), focus], y[2 * 512:19 * 512, focus]
        assert fast.std() < quiet_bg.std()
        f, p_fast = welch(fast, fs=512, nperseg=256)
        _, p_bg = welch(quiet_bg, fs=512, nperseg=256)
        share = lambda p: p[(f >= 10) & (f <= 20)].sum() / p[(f >= 2) & (f <= 40)].sum()  # noqa: E731
        shares_fast.append(share(p_fast))
        shares_bg.append(share(p_bg))
    assert np.mean(shares_fast) > 1.4 * np.mean(shares_bg), (shares_fast, shares_bg)


def test_spontaneous_seizure_rate_in_configured_range():
    params = PatientParams(seizure_rate_per_hour=30.0, min_interval_s=60.0, seizure_duration_s=(6.0, 10.0),
                           interictal_spike_rate_per_min=0.0, max_dt_s=2e-3)
    pt = SimulatedPatient(fs_hz=64.0, n_channels=2, seed=5, params=params)
    hours = 0.5
    for _ in range(int(hours * 3600 / 60)):
        pt.step(64 * 60)
    sz = pt.ground_truth.seizures
    expected = params.seizure_rate_per_hour * hours
    assert 0.6 * expected <= len(sz) <= 1.4 * expected
    onsets = np.array([s.onset_s for s in sz])
    assert np.all(np.diff(onsets) >= params.min_interval_s)
    durs = np.array([s.offset_s - s.onset_s for s in sz if s.offset_s is not None])
    assert np.all((durs >= 6.0) & (durs <= 10.0))


def test_interictal_spikes_recorded_and_visible():
    params = PatientParams(interictal_spike_rate_per_min=20.0, seizure_rate_per_hour=0.0)
    pt = SimulatedPatient(FS, 8, seed=4, params=params)
    x = pt.step(int(60 * FS))
    spikes = pt.ground_truth.interictal_spikes
    assert 8 <= len(spikes) <= 40
    focus = int(np.argmax(pt._mix_uv[0]))
    med = np.median(np.abs(x[:, focus]))
    hits = sum(np.abs(x[int(s * FS): int((s + 0.5) * FS), focus]).max() > 5 * med for s in spikes if s < 59)
    assert hits >= 0.8 * len([s for s in spikes if s < 59])


def _seizure_duration(seed, stim):
    pt = SimulatedPatient(FS, 4, seed=seed, params=PatientParams(**QUIET))
    pt.schedule_seizure(2.0)
    pt.step(int(3.0 * FS))
    if stim is not None:
        pt.stimulate(3.0, stim)
    pt.step(int(40 * FS))
    (onset, offset, by_stim), = pt.ground_truth.seizures
    return offset - onset, by_stim


def test_early_strong_stimulation_ends_seizures_sooner():
    seeds = range(6)
    without = np.array([_seizure_duration(s, None)[0] for s in seeds])
    with_stim = [_seizure_duration(s, STRONG) for s in seeds]
    d_stim = np.array([d for d, _ in with_stim])
    assert sum(by for _, by in with_stim) >= 5
    assert np.mean(d_stim) < 0.5 * np.mean(without)
    assert np.all(d_stim[[by for _, by in with_stim]] < 3.0)  # 1 s after onset + burst + 0.75 s ramp


def test_a_burst_during_the_seizures_own_wind_down_neither_lengthens_it_nor_takes_the_credit():
    quiet = PatientParams(interictal_spike_rate_per_min=0.0, seizure_rate_per_hour=0.0)
    strong = StimParams(channel=0, amplitude_ua=6000.0, pulse_width_us=500.0, frequency_hz=150.0, n_pulses=30)

    def run(stim_at=None):
        pt = SimulatedPatient(128.0, 2, seed=3, params=quiet)
        pt.schedule_seizure(2.0)
        if stim_at is not None:
            pt.step(int(stim_at * 128))
            pt.stimulate(stim_at, strong)
        pt.step(int(60 * 128) - pt.n_samples)
        return pt.ground_truth.seizures[0], pt.ground_truth.stim_effects

    natural, _ = run()
    stim_at = natural.offset_s - 0.3 - strong.burst_duration_s      # its effect lands 0.3 s before the end
    sz, effects = run(stim_at)
    assert effects[0]["p_terminate"] > 0.9 and effects[0]["ending_anyway"]
    assert not effects[0]["terminated"] and not sz.terminated_by_stim
    assert sz.offset_s == pytest.approx(natural.offset_s)
    # the same burst early in the seizure still ends it sooner, and is credited
    early, eff = run(10.0)
    assert eff[0]["terminated"] and early.terminated_by_stim and early.offset_s < natural.offset_s


def test_stimulation_outside_seizure_changes_nothing_but_artifacts_and_records():
    """Against the same patient (same seed) left alone: a burst between seizures changes the signal
    only where its artifact is, and nothing of what the patient does (interictal spikes, the next
    seizure and its course)."""
    params = PatientParams(interictal_spike_rate_per_min=60.0, seizure_duration_s=(5.0, 8.0))
    t_stim, chunk_n = 1.0, 16

    def run(stimulate):
        pt = SimulatedPatient(FS, 4, seed=1, params=params)
        pt.schedule_seizure(2.0)                   # after the burst: its course must not change either
        if stimulate:
            pt.stimulate(t_stim, STRONG)
        return np.concatenate([pt.step(chunk_n) for _ in range(int(12 * FS) // chunk_n)]), pt

    x0, alone = run(False)
    x1, pt = run(True)
    t = np.arange(x0.shape[0]) / FS
    last_pulse = t_stim + (STRONG.n_pulses - 1) / STRONG.frequency_hz
    tau = params.artifact_tau_base_s + params.artifact_tau_per_pulse_width * STRONG.pulse_width_us * 1e-6
    # The artifact span: from the burst until its tail has decayed by e^-20 (and the chunk holding that).
    outside = (t < t_stim) | (t >= last_pulse + 20 * tau + chunk_n / FS)
    np.testing.assert_array_equal(x1[outside], x0[outside])
    burst = (t >= t_stim) & (t <= last_pulse)      # every sample of the burst, on every channel
    assert burst.sum() > 40 and np.all(x1[burst] != x0[burst])
    sz = pt.ground_truth.seizures
    assert len(sz) == 1 and sz[0].onset_s == 2.0 and sz[0].offset_s is not None   # over, on its own
    gt, gt0 = pt.ground_truth.to_dict(), alone.ground_truth.to_dict()
    assert {k: v for k, v in gt.items() if k not in ("stim", "stim_effects")} == \
        {k: v for k, v in gt0.items() if k not in ("stim", "stim_effects")}
    assert gt0["stim"] == gt0["stim_effects"] == []
    # ... and the burst is recorded, as delivered outside a seizure and ending none.
    assert pt.ground_truth.stim[0].t == t_stim and pt.ground_truth.stim[0].params == STRONG.to_dict()
    eff = pt.ground_truth.stim_effects[0]
    assert eff["in_seizure"] is False and eff["terminated"] is False
    assert json.loads(json.dumps(gt))["stim"][0]["params"] == STRONG.to_dict()


def test_termination_probability_dose_timing_frequency():
    p = PatientParams()
    base = StimParams(amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=150.0, n_pulses=20)
    charges = [termination_probability(p, base.with_(amplitude_ua=a), 1.0) for a in (250, 500, 1000, 2000, 4000)]
    assert all(b > a for a, b in zip(charges, charges[1:]))
    assert termination_probability(p, base, 1.0) > termination_probability(p, base, 20.0)
    in_band = termination_probability(p, base, 1.0)
    assert termination_probability(p, base.with_(frequency_hz=20.0, n_pulses=20), 1.0) < 0.5 * in_band
    assert termination_probability(p, base.with_(waveform=Waveform.DC, duration_s=1.0), 1.0) == 0.0
    assert termination_probability(p.__class__(stim_sensitivity=2.0), base, 1.0) > in_band


def _artifact(amplitude_ua, pulse_width_us=100.0, n_pulses=1, t=2.0):
    params = PatientParams(**QUIET)
    ref = SimulatedPatient(FS, 8, seed=3, params=params).step(int(4 * FS))
    pt = SimulatedPatient(FS, 8, seed=3, params=params)
    pt.stimulate(t, StimParams(channel=0, amplitude_ua=amplitude_ua, pulse_width_us=pulse_width_us,
                               frequency_hz=100.0, n_pulses=n_pulses))
    return pt.step(int(4 * FS)).astype(float) - ref, pt


def test_artifact_at_stimulated_time_proportional_and_decaying():
    d1, pt = _artifact(1000.0)
    d2, _ = _artifact(2000.0)
    i0 = math.ceil(2.0 * FS)
    assert np.all(d1[:i0] == 0)                              # nothing before the pulse
    site = int(np.argmax(np.abs(d1[i0])))
    assert abs(pt._ch_pos[site] - pt.params.stim_site_positions[0]) <= 1 / 8
    assert abs(d1[i0, site]) > 1000                          # far above the ~30 µV background
    assert d1[i0, site] < 0 < d1[i0 + 1, site]               # biphasic
    np.testing.assert_allclose(d2[i0:i0 + 20], 2 * d1[i0:i0 + 20], rtol=1e-3, atol=0.05)
    far = int(np.argmin(np.abs(d1[i0])))
    assert abs(d1[i0, far]) < 0.2 * abs(d1[i0, site])        # confined near the site
    assert abs(d1[i0 + 20, site]) < 0.05 * abs(d1[i0 + 1, site])
    # longer pulses → slower decay → more samples to blank
    dl, _ = _artifact(1000.0, pulse_width_us=500.0)
    assert abs(dl[i0 + 3, site]) > 1.5 * abs(d1[i0 + 3, site])


def test_burst_artifact_has_one_spike_per_pulse():
    d, pt = _artifact(1000.0, n_pulses=10)      # 100 Hz, 10 pulses from t = 2 s
    site = int(np.argmax(np.abs(d[math.ceil(2.0 * FS)])))
    for k in range(10):
        i = math.ceil((2.0 + k / 100.0) * FS - 1e-9)
        assert d[i, site] < -500


@pytest.mark.parametrize("kwargs, match", [
    (dict(fs_hz=10.0), "fs_hz"),
    (dict(n_channels=0), "n_channels"),
    (dict(params=PatientParams(seizure_duration_s=(30.0, 10.0))), "seizure_duration_s"),
    (dict(params=PatientParams(seizure_rate_per_hour=100.0)), "seizure_rate_per_hour"),
    (dict(params=PatientParams(n_sources=2)), "source_positions"),
    (dict(params=PatientParams(mixing=((1.0,),))), "mixing"),
    (dict(params=PatientParams(alpha_uv=-1.0)), "alpha_uv"),
    (dict(params=PatientParams(alpha_uv=10.0, alpha_hz=0.5)), "alpha_hz"),
    (dict(fs_hz=64.0, params=PatientParams(alpha_uv=10.0, alpha_hz=28.5)), "alpha_hz=28.5: its band reaches 29"),
])
def test_bad_construction_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimulatedPatient(**kwargs)


def test_bad_calls():
    pt = SimulatedPatient(FS, 2)
    pt.step(10)
    with pytest.raises(ValueError, match="onset_s"):
        pt.schedule_seizure(0.0)
    with pytest.raises(ValueError, match="channel"):
        pt.stimulate(1.0, StimParams(channel=9, amplitude_ua=100))
    with pytest.raises(TypeError, match="StimParams"):
        pt.stimulate(1.0, {"amplitude_ua": 100})
    with pytest.raises(ValueError, match="step n"):
        pt.step(-1)


def test_cohort_patients_differ_are_valid_and_reproducible():
    a, b = patient_params(0), patient_params(1)
    assert a == patient_params(0) and a != b
    for pid in range(20):
        patient_params(pid).validate()
    x = SimulatedPatient(FS, 4, seed=0, params=patient_params(3)).step(int(2 * FS))
    assert np.isfinite(x).all()
    with pytest.raises(ValueError, match="patient_id"):
        patient_params(-1)


def test_the_highest_configurable_seizure_rate_fits_every_cohort_patient():
    """config allows up to 120 seizures/h: onsets may then come every 15 s, so each patient's longer
    seizures are shortened to fit instead of the simulator refusing a key the user never set."""
    from hil_sim.process import make_patient, patient_params_for
    for pid in range(20):
        spec = {"patient": pid, "spontaneous_seizures": True, "seizure_rate_per_hour": 120.0, "fs_hz": 128.0,
                "n_channels": 1, "seed": 0}
        params = patient_params_for(spec)
        assert params.min_interval_s == 15.0 and params.seizure_duration_s[1] <= 13.5
        make_patient(spec)   # validates the parameters
    # the cohort's own rate and durations are left alone when no rate is given
    own = patient_params_for({"patient": 3, "spontaneous_seizures": True, "seizure_rate_per_hour": None})
    assert own == patient_params(3)
