"""The shipped seizure model: contract, integrity, and separation on freshly simulated held-out patients."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.features import SzV2Pipeline
from controller.inference import OnnxPredictor, SeizureDetectorStage, read_contract

MODEL = Path(__file__).resolve().parent.parent / "models" / "seizure" / "seizure_v1.onnx"


def test_shipped_model_file_is_tracked_and_present():
    # The ONNX file is committed (git ls-files): a rename or deletion must fail here, not skip every test below.
    assert MODEL.is_file(), f"shipped seizure model {MODEL} is missing (it is tracked in git: restore it)"


def test_shipped_model_contract_and_sha256():
    c = read_contract(MODEL)
    assert c.version.startswith("seizure_v1") and c.feature_pipeline == "sz_v2" and c.output == "p_seizure"
    assert tuple(c.feature_names) == SzV2Pipeline.feature_names
    # the operating point chosen out of fold travels in the contract, untouched after training
    metrics = json.loads(MODEL.with_name("seizure_v1.metrics.json").read_text())
    assert c.threshold == metrics["threshold"] == metrics["cv"]["simulated_event"]["threshold"]
    assert c.model_extra["min_duration_s"] == metrics["min_duration_s"] == metrics["cv"]["simulated_event"]["min_duration_s"]
    assert c.model_extra["refractory_s"] == 5.0
    assert metrics["sha256"] == OnnxPredictor(MODEL).sha256
    assert c.warmup_s <= 10.0  # the default demo's first seizure is at 10 s
    assert c.n_channels == 0 and 0.3 <= c.threshold < 1.0
    pred = OnnxPredictor(MODEL)
    assert (MODEL.parent / (MODEL.name + ".sha256")).read_text().split()[0] == pred.sha256
    for fs, ch in [(173.61, 1), (200.0, 4), (512.0, 16)]:
        c.check_stream(fs, ch)


@pytest.mark.parametrize("fs_hz,n_channels,patient_index,seed", [(512.0, 16, 101, 7), (200.0, 1, 102, 8)])
def test_shipped_model_separates_seizures_on_held_out_patient(fs_hz, n_channels, patient_index, seed):
    """A patient never seen in training (cohort index > training range, new seed)."""
    from sklearn.metrics import roc_auc_score

    from models.seizure.dataset import SimSpec, label_windows, simulate_patient

    pred = OnnxPredictor(MODEL)
    c = pred.contract
    spec = SimSpec(patient_index=patient_index, seed=seed, duration_s=200.0, fs_hz=fs_hz, n_channels=n_channels,
                   onsets_s=(50.0, 130.0))
    x, seizures = simulate_patient(spec)
    stage = SeizureDetectorStage(c, fs_hz, n_channels)
    ts = np.arange(x.shape[0]) / fs_hz
    t_end, p, warm = [], [], []
    for i in range(0, x.shape[0], 32):  # the loop's chunked path, window by window
        for t, f in stage.step(x[i:i + 32], ts[i:i + 32]):
            t_end.append(t)
            p.append(pred.predict(f))
            warm.append(stage.is_warm(t))
    t_end, p, warm = np.array(t_end), np.array(p), np.array(warm)
    assert warm[-1] and not warm[0]
    y = label_windows(t_end, seizures)
    m = y >= 0
    assert roc_auc_score(y[m], p[m]) > 0.95
    # window level, before post-processing: p crosses the threshold within 3 s of every onset (as events,
    # with the contract's min_duration_s 1.5 s, test_seizure_rates.py and the model card's latencies)
    for onset, _ in seizures[:2]:
        w = (t_end >= onset) & (t_end <= onset + 3.0)
        assert (p[w] > c.threshold).any(), f"seizure at {onset} s not detected within 3 s: max p {p[w].max():.2f}"
    # and warm background far from seizures stays mostly below threshold
    bg = (y == 0)
    for onset, offset in seizures:
        bg &= ~((t_end > onset - 5) & (t_end < offset + 15))
    assert bg.sum() > 100
    assert np.mean(p[bg] > c.threshold) < 0.01


def test_identical_delhi_segments_can_share_a_cv_group():
    """Four pairs of Delhi files are byte-identical; --group-identical-delhi keeps each pair in one fold
    (the audit in MODEL_CARD.md), the default reproduces the shipped model's 150 groups."""
    from models.seizure.dataset import delhi_dataset
    from models.seizure.train import base_contract
    c = base_contract()
    per_segment = delhi_dataset(c)
    grouped = delhi_dataset(c, group_identical=True)
    assert len(np.unique(per_segment["groups"])) == 150 and len(np.unique(grouped["groups"])) == 146
    np.testing.assert_array_equal(per_segment["X"], grouped["X"])
    # each merged group holds exactly two segments with the same features, window by window
    for g in np.unique(grouped["groups"]):
        segs = np.unique(per_segment["groups"][grouped["groups"] == g])
        if len(segs) > 1:
            a, b = (per_segment["X"][per_segment["groups"] == s] for s in segs)
            assert len(segs) == 2 and np.array_equal(a, b)
    metrics = json.loads(MODEL.with_name("seizure_v1.metrics.json").read_text())
    assert "--group-identical-delhi" in metrics["audits"][0]["command"]
