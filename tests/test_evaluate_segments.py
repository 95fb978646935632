"""stimloop evaluate --segments: class-labelled segment folders (Delhi .mat, Bonn .txt, .npy), real Delhi data."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.io import loadmat, savemat

from models.seizure.evaluate import OnnxDetector, evaluate_segments
from models.seizure.recordings import RecordingError, load_delhi, load_segments, read_segment
from shared_data import DELHI

ENV = {**os.environ, "COLUMNS": "200"}


def _delhi(cls: str, k: int) -> np.ndarray:
    return np.asarray(loadmat(DELHI / cls / f"{cls}{k}.mat")[cls], dtype=np.float64).ravel()


def test_segment_files_in_each_format_read_as_samples_by_channels(tmp_path):
    x = _delhi("ictal", 3)
    savemat(tmp_path / "named.mat", {"ictal": x[:, None], "other": np.zeros(3)})
    savemat(tmp_path / "only.mat", {"sig": x[None, :]})                 # a row vector: samples along columns
    savemat(tmp_path / "two.mat", {"a": x, "b": x})
    np.savetxt(tmp_path / "bonn.txt", x, fmt="%.6f")                      # Bonn: one sample per line
    np.save(tmp_path / "chans.npy", np.stack([x, -x]))                    # channels x samples
    assert np.allclose(read_segment(tmp_path / "named.mat", "ictal")[:, 0], x)
    assert read_segment(tmp_path / "only.mat", "ictal").shape == (x.size, 1)
    assert np.allclose(read_segment(tmp_path / "bonn.txt")[:, 0], x, atol=1e-5)
    two_ch = read_segment(tmp_path / "chans.npy")
    assert two_ch.shape == (x.size, 2) and np.allclose(two_ch[:, 1], -x)
    with pytest.raises(RecordingError, match=r"two.mat: 2 variables \['a', 'b'\] and none named 'ictal'"):
        read_segment(tmp_path / "two.mat", "ictal")
    (tmp_path / "junk.txt").write_text("1.0\nnot a number\n")
    with pytest.raises(RecordingError, match="junk.txt: cannot be read"):
        read_segment(tmp_path / "junk.txt")
    (tmp_path / "bad.mat").write_bytes(b"garbage")
    with pytest.raises(RecordingError, match="bad.mat: cannot be read"):
        read_segment(tmp_path / "bad.mat")
    (tmp_path / "bad.npy").write_text("garbage")
    with pytest.raises(RecordingError, match="bad.npy: not a .npy file") as err:
        read_segment(tmp_path / "bad.npy")
    assert "pickle" not in str(err.value)


def test_delhi_loads_through_the_segment_reader_unchanged():
    segs = load_delhi(DELHI)
    assert [c for c, _, _ in segs].count("ictal") == 50 and len(segs) == 150
    cls, name, x = segs[0]
    assert (cls, name, x.shape, x.dtype) == ("ictal", "ictal1.mat", (1024, 1), np.float32)
    assert np.array_equal(x[:, 0], _delhi("ictal", 1).astype(np.float32))


@pytest.fixture
def segment_tree(tmp_path):
    """Bonn-like layout from real Delhi segments: S (seizure, .txt) and Z (background, .mat and .npy), plus
    a segment shorter than a window and one with NaN samples, which cannot be evaluated."""
    root = tmp_path / "segs"
    (root / "S").mkdir(parents=True)
    (root / "Z").mkdir()
    for k in (1, 2, 3, 4):
        np.savetxt(root / "S" / f"s{k}.txt", _delhi("ictal", k), fmt="%.5f")
        savemat(root / "Z" / f"z{k}.mat", {"Z": _delhi("interictal", k)})
    np.save(root / "Z" / "z5.npy", _delhi("interictal", 5))
    np.savetxt(root / "S" / "short.txt", _delhi("ictal", 5)[:100])
    bad = _delhi("ictal", 6)
    bad[500:520] = np.nan
    np.savetxt(root / "S" / "nan.txt", bad)
    (root / "README.md").write_text("not a class folder, not a segment")
    (root / ".ipynb_checkpoints").mkdir()                                 # a hidden folder is no class
    np.save(root / ".ipynb_checkpoints" / "x.npy", _delhi("ictal", 7))
    return root


def test_segments_are_scored_window_by_window(segment_tree):
    segs = load_segments(segment_tree)
    assert sorted({c for c, _, _ in segs}) == ["S", "Z"] and len(segs) == 11
    r = evaluate_segments(OnnxDetector(), segs, 200.0, positive=("S",))
    assert r["n_segments"] == 9 and {s["file"] for s in r["skipped"]} == {"short.txt", "nan.txt"}
    assert any("shorter than one 1 s window" in s["reason"] for s in r["skipped"])
    s, z = r["by_class"]["S"], r["by_class"]["Z"]
    assert s["positive"] and not z["positive"] and (s["segments"], z["segments"]) == (4, 5)
    assert s["windows"] == 4 * 17 and z["windows"] == 5 * 17     # 5.12 s at 1 s windows, 0.25 s hop
    w = r["window"]
    assert (w["tp"] + w["fn"], w["tn"] + w["fp"]) == (s["windows"], z["windows"])
    assert w["tp"] == s["windows_above"] and w["fp"] == z["windows_above"]
    lo, hi = w["recall_ci95"]
    assert lo <= w["recall"] <= hi
    # The shipped model separates these real ictal and interictal segments (it was trained on them: a
    # behaviour check, not an evaluation).
    assert w["auroc"] > 0.95 and s["segments_above"] >= 3 and z["segments_above"] <= 1


def test_cli_scores_segments_and_refuses_what_it_cannot(segment_tree, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "controller.cli", "evaluate", *args], capture_output=True,
                              text=True, env=ENV, timeout=300)

    out = tmp_path / "seg.json"
    r = cli("--segments", str(segment_tree), "--segments-fs", "200", "--positive", "S", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "S (seizure)" in r.stderr and "window sensitivity" in r.stderr and "short.txt not evaluated" in r.stderr
    doc = json.loads(out.read_text())
    assert doc["segments"]["by_class"]["Z"]["windows"] == 85 and len(doc["segments"]["segments"]) == 9
    r = cli("--segments", str(segment_tree))
    assert r.returncode == 2 and "--segments needs --segments-fs" in r.stderr
    r = cli("--segments", str(segment_tree), "--segments-fs", "200")        # default positive: ictal
    assert r.returncode == 2 and "no such class" in r.stderr and "S, Z" in r.stderr
    r = cli("--segments", str(tmp_path / "nowhere"), "--segments-fs", "200")
    assert r.returncode == 2 and "does not exist" in r.stderr
