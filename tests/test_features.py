"""controller.features and controller.resample: oracles, state continuity, real EEG."""
from __future__ import annotations


import numpy as np
import pytest
from scipy import signal

from controller.features import (PIPELINES, SZ_V1_BANDS_HZ, SzV1Pipeline, SzV2Pipeline, band_powers, line_length,
                                 make_pipeline)
from controller.resample import StreamResampler, rational_ratio

from shared_data import DELHI  # noqa: E402


def test_line_length_oracle():
    x = np.array([[0.0, 1.0], [3.0, 1.0], [1.0, -1.0], [1.0, 2.0]])
    np.testing.assert_allclose(line_length(x), [3 + 2 + 0, 0 + 2 + 3])
    t = np.arange(257) / 256  # 4 whole periods, peaks on samples
    # line length of a sine over whole periods = 4 * amplitude * periods
    np.testing.assert_allclose(line_length(10 * np.sin(2 * np.pi * 4 * t)), 4 * 10 * 4, rtol=1e-9)
    with pytest.raises(ValueError, match="at least 2 samples"):
        line_length(np.zeros((1, 2)))


@pytest.mark.parametrize("f_hz,band", [(2.5, 0), (6.0, 1), (10.0, 2), (20.0, 3), (50.0, 4)])
def test_band_power_of_sine_lands_in_its_band(f_hz, band):
    fs = 256.0
    t = np.arange(512) / fs
    x = np.stack([30 * np.sin(2 * np.pi * f_hz * t), 5 * np.sin(2 * np.pi * f_hz * t + 1)], axis=1)
    bands = ((1, 4), (4, 8), (8, 13), (13, 30), (30, 80))
    bp = band_powers(x, fs, bands)
    assert bp.shape == (5, 2)
    assert np.all(np.argmax(bp, axis=0) == band)
    assert bp[band, 0] > 100 * np.delete(bp[:, 0], band).max()
    # amplitude ratio 6 -> power ratio 36
    np.testing.assert_allclose(bp[band, 0] / bp[band, 1], 36.0, rtol=1e-6)


def test_band_powers_rejects_band_above_nyquist():
    with pytest.raises(ValueError, match="exceeds Nyquist 50.0 Hz"):
        band_powers(np.zeros((200, 1)), 100.0, ((30, 80),))


def test_pipeline_is_channel_count_agnostic_and_preallocated():
    rng = np.random.default_rng(2)
    x1 = rng.normal(size=(256, 1)) * 20
    p1 = make_pipeline("sz_v1", 256.0, 1)
    p16 = make_pipeline("sz_v1", 256.0, 16)
    f1 = p1.step(x1).copy()
    f16 = p16.step(np.repeat(x1, 16, axis=1))
    assert f1.shape == f16.shape == (len(SzV1Pipeline.feature_names),)
    assert f1.dtype == np.float32
    np.testing.assert_allclose(f1, f16, rtol=1e-5, atol=1e-6)  # identical channels aggregate to the same vector
    out = p16.step(rng.normal(size=(256, 16)))
    assert out is p16.step(rng.normal(size=(256, 16)))  # the preallocated output is reused
    assert set(PIPELINES) >= {"sz_v1"}
    with pytest.raises(KeyError, match="unknown feature pipeline 'nope'"):
        make_pipeline("nope", 256.0, 1)


def test_pipeline_is_amplitude_invariant_after_baseline_and_flags_a_burst():
    """Log features against the running baseline: a patient 3x larger gives the same features."""
    rng = np.random.default_rng(3)
    bg = rng.normal(size=(200, 256, 4)) * 20
    a, b = make_pipeline("sz_v1", 256.0, 4), make_pipeline("sz_v1", 256.0, 4)
    for w in bg:
        fa, fb = a.step(w).copy(), b.step(3 * w).copy()
    np.testing.assert_allclose(fa, fb, atol=1e-4)
    ll = SzV1Pipeline.feature_names.index("max_ll_z")
    assert abs(fa[ll]) < 0.5
    t = np.arange(256) / 256
    burst = rng.normal(size=(256, 4)) * 20
    burst[:, 0] += 200 * np.sin(2 * np.pi * 15 * t)  # focal fast activity on one channel
    f = a.step(burst)
    names = SzV1Pipeline.feature_names
    assert f[names.index("max_pow_z")] > 2.0  # max over channels sees the focal burst (×50 power)
    assert abs(f[names.index("med_pow_z")]) < 0.5  # the median stays on background
    assert f[ll] > 0.6


def test_flat_windows_leave_the_running_baseline_alone():
    """A detached electrode (flat zero) for 30 s must not pull the baseline down: the next
    normal windows look normal, as if the gap had not been there."""
    rng = np.random.default_rng(4)
    bg = rng.normal(size=(400, 256, 4)) * 20
    with_gap, clean = make_pipeline("sz_v2", 256.0, 4), make_pipeline("sz_v2", 256.0, 4)
    names = with_gap.feature_names
    for w in bg[:200]:
        with_gap.step(w), clean.step(w)
    for _ in range(120):                     # 30 s of hops, all channels flat
        with_gap.step(np.zeros((256, 4)))
    flat_one = make_pipeline("sz_v2", 256.0, 4)
    for w in bg[:200]:
        flat_one.step(w)
    for w in bg[200:320]:                    # 30 s with channel 0 flat, the others live
        w = w.copy()
        w[:, 0] = 0.0
        flat_one.step(w)
    for w in bg[320:330]:
        fg, fc, f1 = with_gap.step(w).copy(), clean.step(w).copy(), flat_one.step(w).copy()
    for name in ("med_pow_z", "max_pow_z", "max_ll_z"):
        i = names.index(name)
        assert abs(fg[i]) < 0.5 and abs(f1[i]) < 0.5, (name, fg[i], f1[i])
        assert abs(fg[i] - fc[i]) < 0.3 and abs(f1[i] - fc[i]) < 0.3, (name, fg[i], f1[i], fc[i])
    # and a channel flat from the start gets its baseline from its first live window
    late = make_pipeline("sz_v2", 256.0, 1)
    late.step(np.zeros((256, 1)))
    for w in bg[:40, :, :1]:
        f = late.step(w)
    assert abs(f[names.index("max_pow_z")]) < 0.5


def test_pipeline_rejects_low_rate():
    with pytest.raises(ValueError, match="fs_hz >= 160"):
        SzV1Pipeline(100.0, 1)


def test_rational_ratio():
    assert rational_ratio(200, 256) == (32, 25)
    assert rational_ratio(512, 256) == (1, 2)
    up, down = rational_ratio(173.61, 256)
    assert max(up, down) <= 64 and abs(173.61 * up / down / 256 - 1) < 1e-3


@pytest.mark.parametrize("fs_in", [100.0, 173.61, 200.0, 256.0, 512.0])
def test_resampler_rate_and_chunk_invariance(fs_in):
    fs_out = 256.0
    rng = np.random.default_rng(4)
    x = rng.normal(size=(int(fs_in * 4), 2))
    r1, r2 = StreamResampler(fs_in, fs_out, 2), StreamResampler(fs_in, fs_out, 2)
    y1, i1 = r1.process(x)
    parts = [r2.process(c) for c in np.array_split(x, [3, 4, 50, 51, 300])]
    y2 = np.concatenate([p[0] for p in parts])
    np.testing.assert_allclose(y2, y1, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), i1)
    # output count follows the (approximated) rate; src index is causal and in range
    assert abs(y1.shape[0] - x.shape[0] * fs_out / fs_in) <= 1 + abs(r1.rate_error) * y1.shape[0]
    assert i1.min() >= 0 and i1.max() <= x.shape[0] - 1 and np.all(np.diff(i1) >= 0)
    assert i1.max() >= x.shape[0] - int(np.ceil(r1.down / r1.up))  # nothing computable is held back


def test_resampler_preserves_sine_frequency_173_to_256():
    fs_in, f0 = 173.61, 11.3
    t = np.arange(int(fs_in * 20)) / fs_in
    x = np.sin(2 * np.pi * f0 * t)[:, None]
    r = StreamResampler(fs_in, 256.0, 1)
    y = np.concatenate([r.process(c)[0] for c in np.array_split(x, 37)])[:, 0]
    y = y[int(256 * 1):]  # skip the filter's start-up
    freqs, psd = signal.periodogram(y, fs=r.fs_out_actual_hz, window="hann")
    peak = freqs[np.argmax(psd)]
    assert abs(peak - f0) < 0.1
    assert abs(np.sqrt(2) * y.std() - 1.0) < 0.02  # pass-band gain ~1


def test_resampler_errors():
    with pytest.raises(ValueError, match="sample rates must be > 0"):
        StreamResampler(0, 256, 1)
    with pytest.raises(ValueError, match=r"chunk must be \(n, 2\)"):
        StreamResampler(200, 256, 2).process(np.zeros((5, 3)))


@pytest.mark.skipif(not DELHI.is_dir(), reason="real EEG folder missing")
def test_real_eeg_200hz_ictal_has_higher_line_length():
    """Real scalp EEG (200 Hz, 1 channel) through resampling to 256 Hz and the shipped pipeline
    (sz_v2): finite features, and the pipeline's own absolute log line length is larger for ictal
    segments than interictal ones (Esteller 2001), as the raw signal's is."""
    from scipy.io import loadmat

    from controller.features import SzV2Pipeline
    from controller.inference import ModelContract, SeizureDetectorStage

    contract = ModelContract(fs_hz=256.0, window_s=1.0, hop_s=0.25, n_channels=0, feature_pipeline="sz_v2",
                             feature_names=SzV2Pipeline.feature_names, threshold=0.5, version="test")
    i_ll = SzV2Pipeline.feature_names.index("med_ll_abs")
    ll_raw, ll_feat = {}, {}
    for kind in ("ictal", "interictal"):
        files = sorted((DELHI / kind).glob("*.mat"))[:20]
        assert files, f"no files in {DELHI / kind}"
        raw, feat = [], []
        for fpath in files:
            x = loadmat(fpath)[kind].ravel().astype(np.float32)[:, None]
            st = SeizureDetectorStage(contract, 200.0, 1)
            out = st.step(x, np.arange(x.shape[0]) / 200.0)
            assert len(out) >= 14  # 5.12 s -> windows every 0.25 s after the first 1 s
            assert all(np.all(np.isfinite(f)) for _, f in out)
            raw.append(line_length(x) / x.shape[0])
            feat.append(np.median([f[i_ll] for _, f in out]))
        ll_raw[kind], ll_feat[kind] = np.median(raw), np.median(feat)
    assert ll_raw["ictal"] > 2 * ll_raw["interictal"]
    assert ll_feat["ictal"] > ll_feat["interictal"] + np.log(2)   # log units: the same factor of 2


class _ReferencePipeline(SzV2Pipeline):
    """``sz_v2`` with its per-channel features computed the plain way: sample-major, a loop over the
    bands and over the channels' spectral edges. The oracle of the pipeline's vectorized form."""

    def _channel_features(self, x, pc):
        x = np.asarray(x, dtype=np.float64)
        n, eps = x.shape[0], 1e-6
        xc = x - x.mean(axis=0)
        pc[0] = np.log(line_length(xc) / (n - 1) + eps)
        pc[1] = np.log(np.var(x, axis=0) + eps)
        hann = np.hanning(n)[:, None]
        # one-sided, not doubled: |rfft|² / (fs Σw²), µV²/Hz
        psd = np.abs(np.fft.rfft(xc * hann, axis=0)) ** 2 / (self.fs_hz * np.sum(hann ** 2))
        freqs = np.fft.rfftfreq(n, 1.0 / self.fs_hz)
        tot = np.zeros((len(SZ_V1_BANDS_HZ), x.shape[1]))
        for j, (lo, hi) in enumerate(SZ_V1_BANDS_HZ):
            m = (freqs >= lo) & (freqs < hi)
            pc[2 + j] = np.log(psd[m].mean(axis=0) + eps)
            tot[j] = psd[m].sum(axis=0)
        nb = len(SZ_V1_BANDS_HZ)
        pc[2 + nb:2 + 2 * nb] = tot / (tot.sum(axis=0) + eps)
        in_range = (freqs >= SZ_V1_BANDS_HZ[0][0]) & (freqs < SZ_V1_BANDS_HZ[-1][1])
        for c in range(x.shape[1]):
            cum = np.cumsum(psd[:, c] * in_range)
            edge = int(np.argmax(cum >= 0.8 * cum[-1])) if cum[-1] > 0 else 0
            pc[2 + 2 * nb, c] = freqs[edge] / SZ_V1_BANDS_HZ[-1][1]


def test_pipeline_matches_its_plain_reference_on_simulated_ieeg():
    """Window by window over a simulated patient with a seizure, a flat (detached) channel, a DC
    offset and a zero-filled gap: the pipeline's vectorized per-channel features (and its in-place
    channel medians) give the plain computation's feature vectors."""
    from models.seizure.dataset import SimSpec, simulate_patient
    fs = 256.0
    x, _ = simulate_patient(SimSpec(patient_index=3, seed=11, duration_s=60.0, fs_hz=fs, n_channels=8,
                                    onsets_s=(30.0,)))
    x = x.astype(np.float32)
    x[:, 2] = 0.0                       # a detached electrode
    x[:, 5] += 300.0                    # a DC offset
    x[int(20 * fs):int(21.5 * fs)] = 0  # a zero-filled gap on every channel
    fast, ref = SzV2Pipeline(fs, 8), _ReferencePipeline(fs, 8)
    win, hop = int(fs), int(0.25 * fs)
    n_windows = 0
    for end in range(win, x.shape[0] + 1, hop):
        a = fast.step(x[end - win:end]).copy()
        b = ref.step(x[end - win:end])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"window ending at sample {end}")
        n_windows += 1
    assert n_windows == 237
    assert np.isfinite(a).all()
