"""``stimloop train seizure`` end to end on a tiny cohort + a user .npz recording (real ONNX out)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from models.seizure.cli import train_app
from models.seizure.train import _folds


def test_folds_spread_every_source_over_all_folds():
    groups = np.r_[np.repeat(np.arange(24), 5), 1_000_000 + np.repeat(np.arange(150), 2), 2_000_000 + np.arange(3)]
    f = _folds(groups, 5)
    assert set(f[groups >= 1_000_000][:300]) == set(range(5))
    assert np.bincount(f[(groups >= 1_000_000) & (groups < 2_000_000)]).tolist() == [60] * 5
    # one group never spans two folds
    for g in np.unique(groups):
        assert len(set(f[groups == g])) == 1


@pytest.fixture
def user_npz(tmp_path):
    from models.seizure.dataset import SimSpec, simulate_patient

    x, sz = simulate_patient(SimSpec(patient_index=50, seed=5, duration_s=120.0, fs_hz=256.0, n_channels=2,
                                     onsets_s=(40.0,), spontaneous=False))
    path = tmp_path / "mine.npz"
    np.savez(path, data=x.T, fs=256.0, onsets=[s[0] for s in sz], offsets=[s[1] for s in sz])
    return path


def test_train_seizure_cli_writes_model_contract_metrics_and_card(tmp_path, user_npz):
    from controller.inference import OnnxPredictor

    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(train_app, ["seizure", "--out", str(out), "--sim-patients", "0-2", "--sim-duration", "150",
                                         "--no-delhi", "--recording", str(user_npz)])
    assert res.exit_code == 0, res.output
    assert "fold 1/4 done" in res.output and "threshold" in res.output
    pred = OnnxPredictor(out)
    c = pred.contract
    m = json.loads((tmp_path / "m.metrics.json").read_text())
    # the jointly chosen operating point is what the contract carries; the whole grid is recorded
    assert c.feature_pipeline == "sz_v2" and c.model_extra["min_duration_s"] == m["min_duration_s"]
    assert c.threshold == m["threshold"]
    grid = m["cv"]["operating_point_grid"]
    assert len(grid) == 25 * 6 and {g["min_duration_s"] for g in grid} == {0.25, 0.5, 0.75, 1.0, 1.25, 1.5}
    assert "background false alarms" in m["operating_point_rule"]
    assert (tmp_path / "m.onnx.sha256").read_text().split()[0] == pred.sha256
    assert m["data"]["simulated"]["patients"] == [0, 1, 2]
    assert m["data"]["recordings"][0]["seizures"] == 1 and "delhi" not in m["data"]
    e = m["cv"]["simulated_event"]  # seizures with a response burst are not scored (train.oof_event_metrics)
    assert e["n_seizures"] >= 1 and e["n_seizures"] + e["n_stimulated_not_scored"] >= 3
    card = (tmp_path / "m.card.md").read_text()
    assert "Known limits" in card and "SzCORE" in card and "95 % CI" in card
    assert "## Operating point" in card and f"threshold **{c.threshold:.2f}**" in card


def test_train_seizure_cli_bad_input(tmp_path):
    r = CliRunner().invoke(train_app, ["seizure", "--out", str(tmp_path / "x.onnx"), "--sim-patients", "5-2"])
    assert r.exit_code == 2 and "expected ranges like '0-23'" in " ".join(r.output.split())
    r = CliRunner().invoke(train_app, ["seizure", "--out", str(tmp_path / "x.onnx"), "--recording",
                                       str(tmp_path / "nope.edf")])
    assert r.exit_code == 2 and "nope.edf does not exist" in " ".join(r.output.split())


def test_train_seizure_cli_rejects_bad_min_durations(tmp_path):
    r = CliRunner().invoke(train_app, ["seizure", "--out", str(tmp_path / "x.onnx"), "--min-durations", "0.5,abc"])
    assert r.exit_code == 2 and "--min-durations" in r.output and "0.5,abc" in r.output
    r = CliRunner().invoke(train_app, ["seizure", "--out", str(tmp_path / "x.onnx"), "--min-durations", "-1"])
    assert r.exit_code == 2 and "[0, 60]" in " ".join(r.output.split())
