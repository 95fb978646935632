"""SpikeDetector: recall/precision on known spikes, refractory and blanking across chunks, adaptive σ."""
import numpy as np
import pytest

from controller.spikes import MAD_TO_SIGMA, SpikeDetector, WindowBox, band_pass_waveform
from hil_sim.spiking import SpikingUnits, spike_template

FS = 30_000.0
# The detection logic (threshold, refractory, blanking, σ) is tested on streams that need no
# band-pass: synthetic impulses and white noise (the filter would reshape them), and SpikingUnits,
# whose noise is already band-passed 300–6000 Hz. The band-pass has tests of its own
# (test_spikes_bandpass.py).
RAW = {"band_hz": None}


def _run(det, x, ts, chunk):
    out_t, out_c = [], []
    for i in range(0, x.shape[0], chunk):
        s = det.step(x[i:i + chunk], ts[i:i + chunk])
        out_t.append(s.t)
        out_c.append(s.channel)
    return np.concatenate(out_t), np.concatenate(out_c)


def _score(true_t, true_c, det_t, det_c, tol=1e-3):
    tp = 0
    for c in np.unique(true_c):
        d = np.sort(det_t[det_c == c])
        for t in true_t[true_c == c]:
            j = np.searchsorted(d, t)
            near = [abs(d[i] - t) for i in (j - 1, j) if 0 <= i < d.size]
            tp += bool(near) and min(near) <= tol
    return tp / max(true_t.size, 1), tp / max(det_t.size, 1)


@pytest.fixture(scope="module")
def trace():
    units = SpikingUnits(fs_hz=FS, n_channels=4, trigger_channels=(0, 1, 2), target_channel=3,
                         stim_site_channel=3, rate_hz=8.0, seed=11)
    x = units.step(int(FS * 8))
    gt = units.ground_truth()["trigger_spikes"]
    return x, np.arange(x.shape[0]) / FS, gt["t_s"], gt["channel"]


@pytest.mark.parametrize("chunk", [30, 97, 1000])
def test_threshold_recall_precision_any_chunking(trace, chunk):
    x, ts, tt, tc = trace
    det = SpikeDetector(FS, 4, channels=(0, 1, 2), k=5.0, **RAW)
    dt, dc = _run(det, x, ts, chunk)
    recall, precision = _score(tt[tt > 0.02], tc[tt > 0.02], dt, dc)
    assert tt.size > 150
    assert recall >= 0.97 and precision >= 0.97, (recall, precision)


def test_template_and_window_modes_find_the_units(trace):
    x, ts, tt, tc = trace
    tpl, _ = spike_template(FS)
    # With the default band-pass: the template is compared with band-passed snippets, so a raw
    # waveform goes through band_pass_waveform (raw, recall fell to 0.73).
    for det in (SpikeDetector(FS, 4, channels=(0, 1, 2), k=4.5, mode="template",
                              template=band_pass_waveform(tpl * 100, FS)),
                SpikeDetector(FS, 4, channels=(0, 1, 2), k=4.5, mode="window",
                              boxes=[WindowBox(0.2, 0.7, 15.0, 200.0)])):
        dt, dc = _run(det, x, ts, 30)
        recall, precision = _score(tt[tt > 0.02], tc[tt > 0.02], dt, dc)
        assert recall >= 0.95 and precision >= 0.97, (det.mode, recall, precision)


def test_window_exclusion_box_rejects_matching_waveforms(trace):
    x, ts, _, _ = trace
    # Every unit has a positive hump 0.2-0.7 ms after the crossing: excluding it rejects them all.
    det = SpikeDetector(FS, 4, channels=(0, 1, 2), k=5.0, mode="window",
                        boxes=[WindowBox(0.2, 0.7, 15.0, 200.0, exclude=True)])
    dt, _ = _run(det, x, ts, 30)
    assert dt.size <= 3


def test_refractory_across_chunk_boundary():
    det = SpikeDetector(FS, 1, k=5.0, refractory_ms=1.0, initial_sigma_uv=10.0, **RAW)
    x = np.zeros((60, 1), np.float32)
    # Two negative crossings 0.5 ms apart (15 samples), split across the chunk boundary at 30.
    x[20] = -100.0
    x[35] = -100.0
    ts = np.arange(60) / FS
    s1 = det.step(x[:30], ts[:30])
    s2 = det.step(x[30:], ts[30:])
    assert s1.t.tolist() == [ts[20]]
    assert s2.t.size == 0
    # After the refractory period a new crossing counts again.
    y = np.zeros((30, 1), np.float32)
    y[5] = -100.0
    s3 = det.step(y, 60 / FS + np.arange(30) / FS)
    assert s3.t.size == 1


def test_refractory_within_one_chunk():
    det = SpikeDetector(FS, 1, k=5.0, refractory_ms=1.0, initial_sigma_uv=10.0, **RAW)
    x = np.zeros((200, 1), np.float32)
    x[[10, 20, 50, 100]] = -100.0       # 20 is 0.33 ms after 10: dropped; 50 is 1.33 ms after: kept
    s = det.step(x, np.arange(200) / FS)
    assert np.round(s.t * FS).astype(int).tolist() == [10, 50, 100]


def test_blanking_hides_samples_across_chunks_and_from_noise_estimate():
    rng = np.random.default_rng(0)
    det = SpikeDetector(FS, 2, k=5.0, initial_sigma_uv=10.0, block_ms=10.0, noise_window_s=0.5, **RAW)
    n = 6000
    x = (rng.standard_normal((n, 2)) * 10).astype(np.float32)
    ts = np.arange(n) / FS
    b0, b1 = ts[1010], ts[1010] + 0.028           # 28 ms: 840 samples, spans many 30-sample chunks
    x[1010:1850] = np.where(np.arange(840) % 7 == 0, -3000.0, 2000.0)[:, None]  # artifact
    det.blank(b0, b1)
    dt, _ = _run(det, x, ts, 30)
    assert not np.any((dt >= b0) & (dt < b1))
    # The artifact never entered the noise estimate: σ is still that of the 10 µV noise.
    assert np.all(np.abs(det.sigma_uv - 10.0) < 1.5)
    # Without blanking the same artifact is detected (and inflates σ).
    det2 = SpikeDetector(FS, 2, k=5.0, initial_sigma_uv=10.0, block_ms=10.0, noise_window_s=0.5, **RAW)
    dt2, _ = _run(det2, x, ts, 30)
    assert np.any((dt2 >= b0) & (dt2 < b1))


def test_blank_until_covers_everything_before():
    det = SpikeDetector(FS, 1, k=5.0, initial_sigma_uv=10.0, **RAW)
    x = np.zeros((300, 1), np.float32)
    x[[50, 250]] = -100.0
    ts = np.arange(300) / FS
    det.blank_until(ts[200])
    s = det.step(x, ts)
    assert np.round(s.t * FS).astype(int).tolist() == [250]


def test_adaptive_threshold_tracks_noise_level():
    rng = np.random.default_rng(1)
    det = SpikeDetector(FS, 1, k=4.5, noise_window_s=0.5, **RAW)
    x1 = (rng.standard_normal((int(FS), 1)) * 10).astype(np.float32)
    x2 = (rng.standard_normal((int(FS), 1)) * 40).astype(np.float32)
    _run(det, x1, np.arange(x1.shape[0]) / FS, 300)
    assert det.sigma_uv[0] == pytest.approx(10.0, rel=0.1)
    assert det.threshold_uv[0] == pytest.approx(-45.0, rel=0.1)
    _run(det, x2, 1.0 + np.arange(x2.shape[0]) / FS, 300)
    assert det.sigma_uv[0] == pytest.approx(40.0, rel=0.1)
    # The estimate is MAD-based: median(|x|)/0.6745 of Gaussian noise is its σ.
    assert MAD_TO_SIGMA == 0.6745


def test_no_detection_before_first_noise_block_without_initial_sigma():
    det = SpikeDetector(FS, 1, k=5.0, block_ms=10.0, **RAW)
    x = np.zeros((30, 1), np.float32)
    x[10] = -500
    assert det.step(x, np.arange(30) / FS).t.size == 0
    assert np.isnan(det.sigma_uv[0])


@pytest.mark.parametrize("kwargs, needle", [
    ({"k": 1.0}, "k=1.0"), ({"channels": (0, 9)}, "channels="), ({"mode": "fancy"}, "mode='fancy'"),
    ({"mode": "window"}, "WindowBox"), ({"mode": "template"}, "template"), ({"refractory_ms": -1}, "refractory_ms"),
])
def test_bad_arguments_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        SpikeDetector(FS, 4, **kwargs)


def test_bad_chunk_shape_is_refused():
    det = SpikeDetector(FS, 4)
    with pytest.raises(ValueError, match=r"chunk shape \(10, 3\)"):
        det.step(np.zeros((10, 3), np.float32), np.zeros(10))
    with pytest.raises(ValueError, match="timestamps shape"):
        det.step(np.zeros((10, 4), np.float32), np.zeros(9))


def test_crossings_at_chunk_edges_after_quiet_chunks():
    """Quiet chunks take a short path that only carries the last sample: a crossing on the first
    sample of the next chunk is found, and a spike that straddles two chunks counts once."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3000, 2)) * 5).astype(np.float32)
    x[600:604, 0] = -200.0   # starts exactly on a chunk's first sample (chunk 30)
    x[1198:1203, 1] = -200.0  # starts on the last two samples of a chunk, continues into the next
    ts = 10.0 + np.arange(x.shape[0]) / FS
    det = SpikeDetector(FS, 2, k=5.0, initial_sigma_uv=5.0, **RAW)
    dt, dc = _run(det, x, ts, 30)
    np.testing.assert_allclose(dt, [ts[600], ts[1198]])
    np.testing.assert_array_equal(dc, [0, 1])
    # Same answer in one call: the chunking does not change the detections.
    one = SpikeDetector(FS, 2, k=5.0, initial_sigma_uv=5.0, **RAW).step(x, ts)
    np.testing.assert_allclose(one.t, dt)
