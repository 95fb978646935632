"""controller.filters.SosFilterState: chunking does not change the output, priming, both kernels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

import controller.filters as filters_mod
from controller.filters import SosFilterState


@pytest.fixture(params=["in-place kernel", "public sosfilt"])
def kernel(request, monkeypatch):
    """Run a test with scipy's private in-place kernel and again with the public fallback."""
    if request.param == "public sosfilt":
        monkeypatch.setattr(filters_mod, "_sosfilt_inplace", None)
    elif filters_mod._sosfilt_inplace is None:
        pytest.skip("this scipy has no private in-place SOS kernel")
    return request.param


def test_chunked_equals_whole_signal(kernel):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 3)) * 50 + 100.0  # DC offset exercises priming
    whole = SosFilterState.butter(4, (1.0, 40.0), "bandpass", 256.0, 3).process(x)
    f = SosFilterState.butter(4, (1.0, 40.0), "bandpass", 256.0, 3)
    cuts = [0, 1, 17, 18, 18, 500, 1333, 2000]   # a one-sample chunk and an empty one
    chunked = np.concatenate([f.process(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-9)
    # priming: a constant input gives no start-up transient through a high-pass
    hp = SosFilterState.butter(2, 0.5, "highpass", 256.0, 1)
    assert np.max(np.abs(hp.process(np.full((100, 1), 1000.0)))) < 1e-6


def test_matches_scipy_from_the_primed_state_in_place(kernel):
    fs = 30_000.0
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3000, 3)) * 10 + [50.0, -20.0, 0.0]).astype(np.float32)
    sos = signal.butter(2, (300.0, 3000.0), btype="bandpass", fs=fs, output="sos")
    zi = signal.sosfilt_zi(sos)[:, :, None] * x[0].astype(np.float64)[None, None, :]   # primed on sample 0
    ref, _ = signal.sosfilt(sos, x.astype(np.float64), axis=0, zi=zi)
    for chunk in (30, 97, 3000):
        f = SosFilterState(sos, 3)
        y = x.copy()
        for i in range(0, y.shape[0], chunk):
            f.process_in_place(y[i:i + chunk])
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, ref, atol=1e-3)
        assert np.abs(y[:30]).max() < 60        # primed: no start-up transient from the offset
    # reset forgets the history: the same input filters to the same output again
    y2 = x.copy()
    f.reset()
    f.process_in_place(y2)
    np.testing.assert_array_equal(y2, y)


def test_errors():
    f = SosFilterState.butter(2, 10.0, "lowpass", 100.0, 2)
    with pytest.raises(ValueError, match="3 channels.*built for 2"):
        f.process(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="n_sections, 6"):
        SosFilterState(np.zeros((2, 5)), 1)
    with pytest.raises(ValueError, match="n_channels must be >= 1"):
        SosFilterState(np.zeros((1, 6)), 0)
    with pytest.raises(ValueError, match="fs_hz must be > 0"):
        SosFilterState.butter(2, 10.0, "lowpass", 0.0, 1)
