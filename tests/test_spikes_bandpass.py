"""SpikeDetector's causal band-pass: DC offset and LFP no longer blind the detector (Quiroga's σ
assumes a spike-band signal, REFERENCE.md §2), detection times
shifted by far less than the ±1 ms matching tolerance, artifacts still blanked."""
import numpy as np
import pytest

from controller.policies.ads import blanking_window
from controller.spikes import SpikeDetector
from drivers.params import StimParams
from hil_sim.spiking import SpikingUnits

FS = 30_000.0


def _run(det, x, ts, chunk=30):
    out_t, out_c = [], []
    for i in range(0, x.shape[0], chunk):
        s = det.step(x[i:i + chunk], ts[i:i + chunk])
        out_t.append(s.t)
        out_c.append(s.channel)
    return np.concatenate(out_t), np.concatenate(out_c)


def _matched(tt, tc, dt, dc, tol=1e-3):
    """Per true spike: detected − true time (s) of the nearest detection on its channel, NaN if none within tol."""
    out = np.full(tt.size, np.nan)
    for i, (t, c) in enumerate(zip(tt, tc)):
        d = dt[dc == c] - t
        if d.size and np.abs(d).min() <= tol:
            out[i] = d[np.argmin(np.abs(d))]
    return out


@pytest.fixture(scope="module")
def units_trace():
    u = SpikingUnits(fs_hz=FS, n_channels=4, trigger_channels=(0, 1), target_channel=2, stim_site_channel=3,
                     rate_hz=5.0, seed=1)
    x = u.step(int(FS * 6)).astype(np.float64)
    gt = u.ground_truth()["trigger_spikes"]
    tt, tc = np.asarray(gt["t_s"]), np.asarray(gt["channel"])
    keep = tt > 0.3   # after the first noise estimates
    return x, np.arange(x.shape[0]) / FS, tt[keep], tc[keep]


@pytest.mark.parametrize("what", ["dc+40", "dc-40", "lfp8hz", "lfp1hz_big"])
def test_dc_offset_and_lfp_do_not_change_sigma_or_detections(units_trace, what):
    x, ts, tt, tc = units_trace
    extra = {"dc+40": np.full_like(ts, 40.0), "dc-40": np.full_like(ts, -40.0),
             "lfp8hz": 100.0 * np.sin(2 * np.pi * 8 * ts),
             "lfp1hz_big": 1000.0 * np.sin(2 * np.pi * 1 * ts + 0.3)}[what][:, None]
    clean = SpikeDetector(FS, 4, channels=(0, 1), k=5.0)
    dt0, dc0 = _run(clean, x.astype(np.float32), ts)
    det = SpikeDetector(FS, 4, channels=(0, 1), k=5.0)
    dt, dc = _run(det, (x + extra).astype(np.float32), ts)
    # Before the band-pass: σ 10 → 59–102 µV and no detections at all.
    np.testing.assert_allclose(det.sigma_uv, clean.sigma_uv, rtol=0.05)
    hit = _matched(tt, tc, dt, dc)
    assert np.isfinite(hit).mean() >= 0.95, np.isfinite(hit).mean()
    assert abs(dt.size - dt0.size) <= 2


def test_band_none_is_raw_and_blinded_by_an_offset(units_trace):
    """``band_hz=None`` is for a stream the amplifier already band-passed: the old behaviour."""
    x, ts, _, _ = units_trace
    det = SpikeDetector(FS, 4, channels=(0, 1), k=5.0, band_hz=None)
    _run(det, (x[:int(FS)] + 40.0).astype(np.float32), ts[:int(FS)])
    assert np.all(det.sigma_uv > 50.0)


def test_detection_times_shift_little(units_trace):
    """The filter's delay moves detections later by a few samples, far inside the ±1 ms matching
    tolerance (docs/ads.md, "Detector", gives the measured figures)."""
    x, ts, tt, tc = units_trace
    raw = _matched(tt, tc, *_run(SpikeDetector(FS, 4, channels=(0, 1), k=5.0, band_hz=None), x.astype(np.float32), ts))
    bp = _matched(tt, tc, *_run(SpikeDetector(FS, 4, channels=(0, 1), k=5.0), x.astype(np.float32), ts))
    assert np.isfinite(bp).mean() >= 0.97
    d_raw, d_bp = np.nanmedian(raw) * 1e3, np.nanmedian(bp) * 1e3
    assert -0.15 <= d_raw <= -0.05        # raw: the crossing ~3 samples before the trough
    assert 0.0 < d_bp - d_raw <= 0.15     # band-passed: a little later
    assert np.nanmax(np.abs(bp)) <= 0.2e-3


def test_detections_do_not_depend_on_chunking(units_trace):
    x, ts, _, _ = units_trace
    xs = (x[:int(2 * FS)] + 40.0).astype(np.float32)
    runs = [_run(SpikeDetector(FS, 4, channels=(0, 1), k=5.0), xs, ts[:xs.shape[0]], chunk) for chunk in (30, 97, 1000)]
    for dt, dc in runs[1:]:
        np.testing.assert_array_equal(dt, runs[0][0])
        np.testing.assert_array_equal(dc, runs[0][1])


def test_blanked_stimulation_artifacts_still_cause_no_detection():
    """Blanked samples go through the filter: its ringing after a 5 mV artifact is over long before
    the 28 ms blanking ends (REFERENCE.md §2), so nothing but true spikes is detected."""
    u = SpikingUnits(fs_hz=FS, n_channels=8, trigger_channels=(0, 1), target_channel=4, stim_site_channel=0,
                     rate_hz=5.0, seed=4)
    stim = StimParams(channel=0, amplitude_ua=50.0, pulse_width_us=200.0, frequency_hz=333.0, n_pulses=1)
    det = SpikeDetector(FS, 8, channels=(0, 1), k=5.0)
    chunk = 30
    pulses = np.arange(0.3, 3.0, 0.1)
    dt, dc = [], []
    for i in range(int(3.0 * FS) // chunk):
        t0 = i * chunk / FS
        for p in pulses[(pulses >= t0) & (pulses < t0 + chunk / FS)]:
            u.stimulate(float(p), stim)
            det.blank(*blanking_window(float(p), 28.0))
        s = det.step(u.step(chunk), t0 + np.arange(chunk) / FS)
        dt += s.t.tolist()
        dc += s.channel.tolist()
    dt, dc = np.asarray(dt), np.asarray(dc)
    gt = u.ground_truth()["trigger_spikes"]
    tt, tc = np.asarray(gt["t_s"]), np.asarray(gt["channel"])
    unmatched = [t for t, c in zip(dt, dc) if not np.any((tc == c) & (np.abs(tt - t) <= 1e-3))]
    assert u.ground_truth()["pulses"] and len(u.ground_truth()["pulses"]) == pulses.size
    assert dt.size >= 5 and unmatched == []


@pytest.mark.parametrize("band", [(300.0, 20_000.0), (0.0, 3000.0), (3000.0, 300.0), (300.0,), "x"])
def test_bad_band_is_refused_with_the_way_out(band):
    with pytest.raises(ValueError, match="band_hz=.*None for a stream already band-passed"):
        SpikeDetector(FS, 2, band_hz=band)
