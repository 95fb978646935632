"""Wendling 2002 neural-mass bank against the regimes of REFERENCE.md §6."""
import numpy as np
import pytest
from scipy.signal import welch

from hil_sim.brain import DEFAULT_CONSTANTS, WendlingBank, sigmoid

DT = 1 / 1024


def _run(B, G, n_pop=6, seconds=12.0, seed=3):
    bank = WendlingBank(n_pop, DT, np.random.default_rng(seed), B=B, G=G)
    y = bank.run(int(seconds / DT))
    return y[int(2 / DT):]  # drop the first 2 s


def _peak_hz(y, lo=1.0, hi=40.0):
    f, pxx = welch(y, fs=1 / DT, nperseg=1024, axis=0)
    mean = pxx.mean(axis=1)  # average over the independent populations
    band = (f >= lo) & (f <= hi)
    return f[band][np.argmax(mean[band])]


def test_sigmoid_constants_section6():
    # §6: S(v0) = e0, maximum 2 e0
    assert sigmoid(DEFAULT_CONSTANTS.v0_mv) == pytest.approx(DEFAULT_CONSTANTS.e0_per_s)
    assert sigmoid(1e3) == pytest.approx(2 * DEFAULT_CONSTANTS.e0_per_s)
    assert sigmoid(-1e3) == pytest.approx(0.0, abs=1e-12)


def test_background_vs_spike_wave_vs_fast_onset():
    bg = _run(50, 15)
    fast = _run(5, 25)
    sw = _run(25, 15)
    # §6 B=25: spike-wave at 3–6 Hz, large; B=5, G=25: low-voltage fast activity 10–20 Hz
    assert 3.0 <= _peak_hz(sw) <= 6.0
    assert 10.0 <= _peak_hz(fast) <= 20.0
    assert sw.std(axis=0).min() > 10 * bg.std(axis=0).max()
    assert fast.std(axis=0).mean() < bg.std(axis=0).mean()   # "low-voltage": below background (0.77× here)
    ll = lambda y: np.abs(np.diff(y, axis=0)).mean()  # noqa: E731
    assert ll(sw) > 5 * ll(bg)
    # The fast onset carries more 10–20 Hz power than background does.
    f, p_bg = welch(bg, fs=1 / DT, nperseg=1024, axis=0)
    _, p_fast = welch(fast, fs=1 / DT, nperseg=1024, axis=0)
    band = (f >= 10) & (f <= 20)
    frac = lambda p: p[band].sum() / p[(f >= 1) & (f <= 40)].sum()  # noqa: E731
    assert frac(p_fast.mean(1)) > 1.5 * frac(p_bg.mean(1))


def test_gains_change_regime_without_reset():
    bank = WendlingBank(2, DT, np.random.default_rng(0), B=50, G=15)
    quiet = bank.run(4096)
    bank.set_gains(B=np.array([25.0, 50.0]))
    loud = bank.run(8192)[2048:]
    assert loud[:, 0].std() > 10 * quiet[:, 0].std()
    assert loud[:, 1].std() < 3 * quiet[:, 1].std()   # the other population is untouched


def test_deterministic_given_rng_and_chunking_invariant():
    a = WendlingBank(3, DT, np.random.default_rng(7)).run(3000)
    b_bank = WendlingBank(3, DT, np.random.default_rng(7))
    b = np.concatenate([b_bank.run(1000), b_bank.run(1500), b_bank.run(500)])
    c = WendlingBank(3, DT, np.random.default_rng(8)).run(3000)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_internal_step_does_not_change_statistics_much():
    # p_sd refers to 1 ms steps, so the noise intensity does not depend on dt.
    y1 = WendlingBank(8, 1 / 1024, np.random.default_rng(1), B=50).run(10 * 1024)[2048:]
    y2 = WendlingBank(8, 1 / 2048, np.random.default_rng(1), B=50).run(20 * 2048)[4096:]
    assert y1.std() == pytest.approx(y2.std(), rel=0.25)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_pop=0, dt_s=1e-3), "n_pop"),
    (dict(n_pop=1, dt_s=0.01), "dt_s"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WendlingBank(rng=np.random.default_rng(0), **kwargs)


def test_bad_gain():
    bank = WendlingBank(2, DT, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"B=.*\[0, 200\]"):
        bank.set_gains(B=-1.0)
