"""Mayo adapter (brainmaze-eeg-models, real ONNX weights from the wheel) and ``evaluate --compare-mayo``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.seizure.evaluate import EvaluationError, default_model_path
from models.seizure.mayo import mayo_available

OK, INFO = mayo_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"optional extra 'mayo' not installed: {INFO}")


@pytest.fixture(scope="module")
def rec330():
    from models.seizure.dataset import SimSpec, simulate_patient

    x, sz = simulate_patient(SimSpec(108, 3, 330.0, 256.0, 2, (120.0,), spontaneous=False))
    return x, sz


def test_mayo_detects_simulated_seizure_and_marks_gaps(rec330):
    from models.seizure.mayo import MayoDetector

    x, sz = rec330
    x = x.copy()
    x[int(200 * 256):int(205 * 256), :] = np.nan  # a 5 s gap on every channel
    d = MayoDetector()
    t, p = d.predict(x, 256.0)
    assert np.allclose(np.diff(t), 0.5) and t[0] == 0.5 and np.isnan(p[0])  # segment ends; the first is not evaluated
    onset, offset = sz[0]
    assert np.nanmax(p[(t > onset) & (t < offset)]) > 0.5
    assert np.nanmax(p[(t > 20) & (t < onset - 5)]) < 0.5
    gap = (t > 201) & (t < 205)
    assert np.isnan(p[gap]).all()  # not evaluated, never "no seizure"


def test_mayo_refuses_short_signal_and_resamples_odd_rates(rec330):
    from models.seizure.mayo import MayoDetector

    x, _ = rec330
    d = MayoDetector()
    with pytest.raises(EvaluationError, match=">= 300 s of signal.*got 100.0 s"):
        d.predict(x[:int(100 * 256)], 256.0)
    from scipy.signal import resample_poly
    y = resample_poly(x, 59, 87, axis=0)  # 256 -> ~173.6 Hz: not an even integer rate
    t, p = d.predict(y, 256.0 * 59 / 87)
    assert np.isfinite(p).mean() > 0.95 and t[-1] > 320


def test_evaluate_compare_mayo_prints_one_table(tmp_path, rec330):
    from typer.testing import CliRunner

    import typer

    from models.seizure.cli import evaluate

    x, sz = rec330
    path = tmp_path / "r.npz"
    np.savez(path, data=x.T, fs=256.0, onsets=[sz[0][0]], offsets=[sz[0][1]])
    app = typer.Typer()
    app.command()(evaluate)
    out = tmp_path / "res.json"
    res = CliRunner().invoke(app, [str(path), "--compare-mayo", "--json", str(out), "--no-windows"])
    assert res.exit_code == 0, res.output
    assert "comparison on the same recordings" in res.output and "mayo-modelA" in res.output
    assert "SzCORE" in res.output
    doc = json.loads(out.read_text())
    assert set(doc["compare"]) == {json.loads(out.read_text())["recordings"][0]["detector"],
                                   next(k for k in doc["compare"] if k.startswith("mayo"))}
    for name, v in doc["compare"].items():
        assert v["summary"]["event"]["n_detected"] == 1, name
    assert default_model_path().name in doc["model"]
