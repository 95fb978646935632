"""The shipped ONNX plasticity surrogate, its predictor, training script and CLI."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from controller.cli import app as cli_app
from models.plasticity.cli import app
from models.plasticity.protocols import Protocol, expected_delta_w
from models.plasticity.surrogate import (CONTRACT_KEY, DEFAULT_MODEL_PATH, FEATURE_NAMES, RAW_NAMES,
                                         PlasticityPredictor, encode, raw_from_protocols)
from models.plasticity.train import dataset, r2_mse, train


def test_shipped_surrogate_is_present():
    # plasticity_v1.onnx is committed (git ls-files): a rename or deletion must fail, not skip this file's tests.
    assert DEFAULT_MODEL_PATH.is_file(), (f"shipped plasticity surrogate {DEFAULT_MODEL_PATH} is missing "
                                          "(it is tracked in git: restore it, or retrain with `stimloop train plasticity`)")


@pytest.fixture(scope="module")
def predictor() -> PlasticityPredictor:
    return PlasticityPredictor(DEFAULT_MODEL_PATH)


def test_contract_in_metadata_props():
    m = onnx.load(str(DEFAULT_MODEL_PATH))
    meta = {p.key: p.value for p in m.metadata_props}
    c = json.loads(meta[CONTRACT_KEY])
    assert c["output"] == "delta_w" and c["version"] == "1"
    assert [i["name"] for i in c["inputs"]] == list(RAW_NAMES)
    assert all(i["unit"] and len(i["range"]) == 2 and i["range"][0] < i["range"][1] for i in c["inputs"])
    assert [f["name"] for f in c["features"]] == list(FEATURE_NAMES)
    assert c["metrics"]["r2_heldout"] >= 0.95
    # Input scaling is inside the graph, not left to the caller.
    assert "Scaler" in {n.op_type for n in m.graph.node}


def test_surrogate_tracks_simulator_on_fresh_protocols(predictor):
    raw, y = dataset(200, seed=4242, n_trials=16)  # seed used neither for training nor held-out
    r2, _ = r2_mse(y, predictor.predict_many(raw))
    assert r2 >= 0.9


def test_predict_equals_predict_many(predictor):
    protos = [Protocol(frequency_hz=f, waveform=w, pulse_width_us=pw, timing_ms=dt, n_pulses=n, baseline_w=w0,
                       reward=0.6 if d is not None else 0.0, reward_delay_s=d, amplitude_ua=a)
              for f, w, pw, dt, n, w0, d, a in [(5, "pulsed", 90, -12, 200, 0.3, 1.0, 800),
                                                (40, "sine", 400, 8, 60, 0.7, None, 2500),
                                                (12, "ti", 1000, 0, 900, 0.5, 4.5, 300)]]
    single = np.array([predictor.predict(p) for p in protos])
    np.testing.assert_allclose(single, predictor.predict_protocols(protos), atol=1e-6)
    assert len(set(np.round(single, 6))) == 3  # the bound buffers really carry each new input


def test_out_of_range_input_is_refused_with_name(predictor):
    with pytest.raises(ValueError, match=r"frequency_hz = 200.0.*\[1.0, 100.0\]"):
        predictor.predict(Protocol(frequency_hz=200.0))
    with pytest.raises(ValueError, match="pulse_width_us"):
        predictor.predict_many(np.array([[10, 0, 5000, 0, 60, 0.5, 0, 0, 1000]]))
    with pytest.raises(ValueError, match="columns"):
        encode(np.zeros((2, 3)))


def test_best_protocol_chooses_frequency_like_the_simulator(predictor):
    cands = [dict(frequency_hz=f, pulse_width_us=pw, timing_ms=-10.0, n_pulses=60, amplitude_ua=2000)
             for f in (1.0, 5.0, 50.0) for pw in (100.0, 500.0)]
    best, dw = predictor.best_protocol(cands)
    sim = expected_delta_w([Protocol(**c) for c in cands], n_trials=8, seed=9)
    assert best == cands[int(np.argmax(sim))] or abs(dw - sim.max()) < 0.05
    assert best["frequency_hz"] == 50.0  # Δt = −10 ms: LTP only at high frequency (REFERENCE.md §7)
    worst, dw_min = predictor.best_protocol(cands, maximize=False)
    assert dw_min < 0 < dw and worst["frequency_hz"] in (1.0, 5.0)
    with pytest.raises(ValueError, match="unknown"):
        predictor.best_protocol([dict(frequency_hz=10.0, amplitude_ma=1.0)])


def test_missing_file_and_foreign_onnx_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PlasticityPredictor(tmp_path / "nope.onnx")
    m = onnx.load(str(DEFAULT_MODEL_PATH))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    with pytest.raises(ValueError, match=CONTRACT_KEY):
        PlasticityPredictor(bare)


def test_training_pipeline_end_to_end_small(tmp_path):
    out, card = tmp_path / "p.onnx", tmp_path / "card.md"
    stale = tmp_path / "p.below-target.card.md"   # left by an earlier run under the target
    stale.write_text("old")
    # 400 protocols reach R² ≈ 0.47: a target of 0 lets this small run take the path of a model that meets it.
    r = train(out=out, card=card, n_train=400, n_heldout=100, trials=2, r2_target=0.0)
    assert r.met_target and r.path == out and r.card == card and not (tmp_path / "p.below-target.onnx").exists()
    assert not stale.exists()
    p = PlasticityPredictor(out)
    assert p.contract["metrics"]["n_train"] == 400
    assert p.contract["metrics"]["r2_heldout"] == pytest.approx(r.evaluation["r2"], abs=1e-3)
    text = card.read_text()
    assert "R²" in text and "p99" in text and "sensitivity" in text.lower()
    assert "stimloop train plasticity --n-train 400 --n-heldout 100 --trials 2" in text
    assert np.isfinite(p.predict(Protocol(frequency_hz=10.0)))


def test_a_model_under_the_target_does_not_replace_the_one_in_place(tmp_path):
    out = tmp_path / "plasticity_v1.onnx"
    shutil.copyfile(DEFAULT_MODEL_PATH, out)
    before = out.read_bytes()
    res = CliRunner().invoke(cli_app, ["train", "plasticity", "--n-train", "400", "--n-heldout", "100",
                                       "--trials", "2", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "under the 0.95 target" in res.output and "was left as it was" in res.output
    assert out.read_bytes() == before
    # Beside it, for inspection: the model and its card, not MODEL_CARD.md (that is the shipped model's).
    below = tmp_path / "plasticity_v1.below-target.onnx"
    assert PlasticityPredictor(below).contract["metrics"]["r2_heldout"] < 0.95
    assert (tmp_path / "plasticity_v1.below-target.card.md").is_file() and not (tmp_path / "MODEL_CARD.md").exists()


def test_cli_evaluate_sensitivity_curves(tmp_path):
    runner = CliRunner()
    j = tmp_path / "ev.json"
    res = runner.invoke(app, ["evaluate", "--json", str(j), "--n-heldout", "60"])
    assert res.exit_code == 0, res.output
    ev = json.loads(j.read_text())
    assert set(ev) == {"r2", "mse", "n_heldout", "p99_us"} and ev["n_heldout"] == 60 and ev["p99_us"] > 0
    res = runner.invoke(app, ["sensitivity", "--n-base", "20"])
    assert res.exit_code == 0 and "timing_ms" in res.output and "frequency_hz" in res.output
    png = tmp_path / "c.png"
    res = runner.invoke(app, ["curves", "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["curves", "--out", str(tmp_path / "bare")])   # no suffix: the name printed is the file's
    assert res.exit_code == 0 and (tmp_path / "bare.png").is_file() and "bare.png" in res.output
    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "missing.onnx")])
    assert res.exit_code == 2 and "not found" in " ".join(res.output.split())


def test_raw_from_protocols_maps_no_reward_to_zero():
    raw = raw_from_protocols([Protocol(frequency_hz=10.0, reward_delay_s=None)])
    assert raw[0, RAW_NAMES.index("reward_um")] == 0.0 and raw[0, RAW_NAMES.index("reward_delay_s")] == 0.0


@pytest.mark.parametrize("reward", [0.8, -0.3])
def test_a_reward_without_its_delay_is_refused_not_dropped(reward):
    """It used to be mapped to "no reward" silently: Δw predicted for another protocol than asked."""
    with pytest.raises(ValueError, match=r"Protocol.reward = .* without reward_delay_s"):
        Protocol(frequency_hz=10.0, reward=reward)
    with pytest.raises(ValueError, match="without reward_delay_s"):
        PlasticityPredictor().best_protocol([{"frequency_hz": 10.0, "reward": reward}])
    assert Protocol(frequency_hz=10.0, reward=reward, reward_delay_s=1.0).reward == reward


def test_ti_with_another_carrier_than_the_training_one_is_refused():
    """The carrier is not an input; the simulator's Δw depends on it (its remnant adds drive)."""
    pred = PlasticityPredictor()
    ok = Protocol(frequency_hz=100.0, waveform="ti", amplitude_ua=1000.0, n_pulses=300)
    assert math.isfinite(pred.predict(ok))
    bad = dict(frequency_hz=100.0, waveform="ti", amplitude_ua=1000.0, n_pulses=300, carrier_hz=500.0)
    with pytest.raises(ValueError, match="carrier_hz=500.*2000 Hz carrier only"):
        pred.predict(Protocol(**bad))
    # Every entry point that takes protocols: best_protocol used to return a Δw for it.
    with pytest.raises(ValueError, match="carrier_hz=500.*2000 Hz carrier only"):
        pred.predict_protocols([ok, Protocol(**bad)])
    with pytest.raises(ValueError, match="carrier_hz=500.*2000 Hz carrier only"):
        pred.best_protocol([ok.to_dict(), bad])
    assert math.isfinite(pred.predict_protocols([ok])[0]) and pred.best_protocol([ok.to_dict()])[0] == ok.to_dict()
    lo = expected_delta_w([Protocol(frequency_hz=100.0, waveform="ti", amplitude_ua=1000.0, n_pulses=300,
                                    carrier_hz=c) for c in (150.0, 2000.0)])
    assert lo[0] > 2 * lo[1]
