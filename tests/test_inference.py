"""controller.inference: contract parsing from real ONNX files, mismatch errors, predictor, deadlines, stage."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from controller.features import SzV1Pipeline
from controller.inference import (CONTRACT_KEY, ContractError, DeadlineAccount, ModelContract, OnnxPredictor,
                                  SeizureDetectorStage, read_contract)


def _contract(**kw) -> ModelContract:
    base = dict(fs_hz=256.0, window_s=1.0, hop_s=0.25, n_channels=0, feature_pipeline="sz_v1",
                feature_names=SzV1Pipeline.feature_names, output="p_seizure", threshold=0.7, version="test_v0",
                input_name="features", warmup_s=30.0)
    base.update(kw)
    return ModelContract(**base)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A real (small) logistic-regression ONNX exported through models.seizure.export."""
    from models.seizure.export import export_onnx
    from models.seizure.train import make_estimator

    rng = np.random.default_rng(0)
    n_f = len(SzV1Pipeline.feature_names)
    X = rng.normal(size=(400, n_f)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    est = make_estimator("logreg").fit(X, y)
    path = tmp_path_factory.mktemp("models") / "toy.onnx"
    export_onnx(est, _contract(), path, check_X=X)
    return path, est, X


def test_contract_round_trip_from_real_onnx(toy_model):
    path, _, _ = toy_model
    c = read_contract(path)
    assert c == _contract()
    assert c.n_features == len(SzV1Pipeline.feature_names) and c.window_n == 256 and c.hop_n == 64
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta[CONTRACT_KEY])["feature_pipeline"] == "sz_v1"
    assert (path.parent / "toy.onnx.sha256").read_text().split()[0] == OnnxPredictor(path).sha256


def test_contract_errors_name_the_problem():
    with pytest.raises(ContractError, match="needs 4 channels, the stream has 2"):
        _contract(n_channels=4).check_stream(256.0, 2)
    _contract(n_channels=4).check_stream(256.0, 4)
    with pytest.raises(ContractError, match="pipeline 'sz_v9'.*known: \\['sz_v1', 'sz_v2'\\]"):
        _contract(feature_pipeline="sz_v9").check_stream(256.0, 1)
    with pytest.raises(ContractError, match="expects features"):
        _contract(feature_names=("a", "b")).check_stream(256.0, 1)
    with pytest.raises(ContractError, match="fs_hz must be a finite rate > 0 Hz, got -1"):
        _contract().check_stream(-1.0, 1)
    with pytest.raises(ContractError, match="rejects the contract.*fs_hz >= 160"):
        _contract(fs_hz=100.0).check_stream(100.0, 1)
    with pytest.raises(ContractError, match="threshold: Input should be less than or equal to 1"):
        ModelContract.from_json(json.dumps({**json.loads(_contract().to_json()), "threshold": 1.5}))
    with pytest.raises(ContractError, match="not valid JSON"):
        ModelContract.from_json("{nope")
    with pytest.raises(ContractError, match="feature_names"):
        ModelContract.from_json(json.dumps({**json.loads(_contract().to_json()), "feature_names": ["a", "a"]}))


def test_contract_check_refuses_at_start_up_what_would_fail_mid_session():
    # a window the pipeline cannot use (too short for the delta band): refused now, not at the first step
    with pytest.raises(ContractError, match="cannot use a 0.25 s window at 256 Hz.*delta"):
        _contract(window_s=0.25, hop_s=0.125).check_stream(256.0, 1)
    # a rate below what the model was trained on (its bands above the source's Nyquist) ...
    with pytest.raises(ContractError, match="stream rate 50 Hz is below the 100 Hz model test_v0 takes"):
        _contract().check_stream(50.0, 1)
    # ... and a rate no ratio reaches are ContractErrors like the others, naming both rates
    with pytest.raises(ContractError, match="stream rate 1e\\+06 Hz cannot be resampled to the model's 256 Hz"):
        _contract().check_stream(1e6, 1)


@pytest.mark.parametrize("fs_in", [1000.0, 2000.0, 4000.0, 5000.0, 10000.0, 30000.0])
def test_amplifier_rates_reach_the_model_rate_exactly(fs_in):
    """Usual amplifier rates need large exact ratios (2000 -> 256 is 16/125): no rate error."""
    _contract().check_stream(fs_in, 2)
    st = SeizureDetectorStage(_contract(), fs_in, 2)
    assert st.resampler.rate_error == 0.0
    n = int(fs_in * 2)
    out = st.step(np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32) * 20, np.arange(n) / fs_in)
    assert len(out) >= 4 and all(np.isfinite(f).all() for _, f in out)


def test_predictor_refuses_a_two_column_output(tmp_path):
    """A classifier exporting (n, 2) class probabilities: its first column is P(no seizure)."""
    from onnx import TensorProto, helper, numpy_helper
    n_f = len(SzV1Pipeline.feature_names)
    w = numpy_helper.from_array(np.zeros((n_f, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "w"], ["p_seizure"])], "two",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, n_f])],
                              [helper.make_tensor_value_info("p_seizure", TensorProto.FLOAT, [None, 2])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    helper.set_model_props(m, {CONTRACT_KEY: _contract().to_json()})
    path = tmp_path / "two.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ContractError, match=r"output 'p_seizure' has shape \(1, 2\).*expected one value"):
        OnnxPredictor(path)


def _one_output_model(tmp_path, name: str, nodes, out_type, extra_init=()):
    """features (float32, n_f) -> a 1 x n_f weight vector -> ``nodes`` -> output ``p_seizure`` of ``out_type``."""
    from onnx import helper, numpy_helper
    n_f = len(SzV1Pipeline.feature_names)
    w = numpy_helper.from_array(np.full((n_f, 1), 0.01, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["features", "w"], ["z"]), *nodes], name,
                              [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, n_f])],
                              [helper.make_tensor_value_info("p_seizure", out_type, [None, 1])], [w, *extra_init])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    helper.set_model_props(m, {CONTRACT_KEY: _contract().to_json()})
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def test_predictor_refuses_an_output_that_is_not_a_probability(tmp_path):
    """A class label (ArgMax, int64) read as p is 0 or 1, and 1 passes any threshold; a logit compared with
    a probability threshold means nothing. Both are refused at start-up; float or double probabilities pass."""
    from onnx import TensorProto, helper, numpy_helper
    label = _one_output_model(tmp_path, "label", [helper.make_node("ArgMax", ["z"], ["p_seizure"], axis=1)],
                              TensorProto.INT64)
    with pytest.raises(ContractError, match=r"output 'p_seizure' is tensor\(int64\), expected tensor\(float\) "
                                            r"or tensor\(double\).*class label"):
        OnnxPredictor(label)
    bias = numpy_helper.from_array(np.array([-3.0], np.float32), "b")
    logit = _one_output_model(tmp_path, "logit", [helper.make_node("Add", ["z", "b"], ["p_seizure"])],
                              TensorProto.FLOAT, [bias])
    with pytest.raises(ContractError, match=r"is -3 for an all-zero feature vector, expected a probability in \[0, 1\]"):
        OnnxPredictor(logit)
    double = _one_output_model(tmp_path, "double", [helper.make_node("Sigmoid", ["z"], ["s"]),
                                                    helper.make_node("Cast", ["s"], ["p_seizure"], to=TensorProto.DOUBLE)],
                               TensorProto.DOUBLE)
    pred = OnnxPredictor(double)
    assert pred.predict(np.zeros(len(SzV1Pipeline.feature_names), np.float32)) == pytest.approx(0.5)


def test_contract_errors_stay_short_and_say_what_the_file_is():
    """A missing field quoted pydantic's whole input (the contract) once per field: pointing model.path at
    the plasticity surrogate gave a 16 kB message."""
    from models.plasticity.surrogate import DEFAULT_MODEL_PATH
    with pytest.raises(ContractError) as e:
        read_contract(DEFAULT_MODEL_PATH)
    msg = str(e.value)
    assert "is the plasticity surrogate" in msg and "not a seizure model" in msg and "seizure_v1.onnx" in msg
    assert len(msg) < 400
    # missing fields: named, without the input
    with pytest.raises(ContractError) as e:
        ModelContract.from_json(json.dumps({"kind": "sleep_stager", "blob": "x" * 10_000}))
    msg = str(e.value)
    assert "fs_hz: missing" in msg and "version: missing" in msg and "got" not in msg and len(msg) < 400
    assert "its kind is 'sleep_stager'" in msg


def test_a_file_that_is_no_onnx_model_is_named_as_such(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"garbage, not a protobuf")
    with pytest.raises(ContractError, match=r"model.onnx is not a readable ONNX model \(DecodeError"):
        read_contract(bad)
    with pytest.raises(FileNotFoundError):
        read_contract(tmp_path / "missing.onnx")
    # a wrong value is still quoted, shortened
    with pytest.raises(ContractError, match=r"window_s: .*\(got 'yyyy.*…\)") as e:
        ModelContract.from_json(json.dumps({**json.loads(_contract().to_json()), "window_s": "y" * 5000}))
    assert len(str(e.value)) < 400


def test_predictor_rejects_model_without_contract_or_with_missing_output(toy_model, tmp_path):
    path, _, _ = toy_model
    m = onnx.load(str(path))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    with pytest.raises(ContractError, match="no 'stimloop.contract'"):
        OnnxPredictor(bare)
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == CONTRACT_KEY:
            p.value = _contract(output="p_sleep").to_json()
    wrong = tmp_path / "wrong.onnx"
    onnx.save(m, str(wrong))
    with pytest.raises(ContractError, match="output 'p_sleep' not in model outputs \\['p_seizure'\\]"):
        OnnxPredictor(wrong)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxPredictor(tmp_path / "missing.onnx")


@pytest.mark.parametrize("iobinding", [True, False])
def test_predictor_matches_sklearn(toy_model, iobinding):
    path, est, X = toy_model
    pred = OnnxPredictor(path, use_iobinding=iobinding)
    ref = est.predict_proba(X[:50])[:, 1]
    got = np.array([pred.predict(x) for x in X[:50]])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(pred.predict_batch(X[:50]), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"features must have shape \(52,\)"):
        pred.predict(np.zeros(3, dtype=np.float32))


def test_deadline_account():
    d = DeadlineAccount(0.05)
    assert d.check(10.0, 10.01) is True
    assert d.check(10.0, 10.2) is False          # late: never acted upon
    assert d.check(10.0, 9.99) is False          # result before its data: clocks inconsistent
    assert d.check(10.0, float("nan")) is False
    d.skip(10.25)
    assert (d.n_checked, d.n_on_time, d.n_late, d.n_skipped, d.n_missed) == (4, 1, 3, 1, 4)
    assert d.max_latency_s == pytest.approx(0.2)
    assert d.summary()["n_missed"] == 4
    with pytest.raises(ValueError, match="deadline_s must be a finite number > 0 s, got 0"):
        DeadlineAccount(0)


@pytest.mark.parametrize("fs_in,n_ch", [(256.0, 1), (173.61, 4), (512.0, 16)])
def test_stage_windows_hops_and_timestamps(fs_in, n_ch):
    c = _contract()
    st = SeizureDetectorStage(c, fs_in, n_ch)
    rng = np.random.default_rng(5)
    n = int(fs_in * 6)
    x = (rng.normal(size=(n, n_ch)) * 20).astype(np.float32)
    t0 = 1000.0
    ts = t0 + np.arange(n) / fs_in
    out = []
    for i in range(0, n, 29):
        out += st.step(x[i:i + 29], ts[i:i + 29])
    ends = np.array([o[0] for o in out])
    # first window after ~1 s, then one per 0.25 s hop (within one source sample)
    assert ends[0] == pytest.approx(t0 + 1.0, abs=2 / fs_in)
    np.testing.assert_allclose(np.diff(ends), 0.25, atol=1.5 / fs_in)
    assert len(out) == pytest.approx((6.0 - 1.0) / 0.25 + 1, abs=1)
    assert all(f.shape == (c.n_features,) and f.dtype == np.float32 and np.all(np.isfinite(f)) for _, f in out)
    assert out[0][1] is not out[1][1]  # independent copies
    assert set(ends) <= set(ts)  # window end = a real source timestamp
    assert not st.warm


def test_warm_up_is_decided_per_window_as_the_pipeline_counts_it():
    """sz_v2 counts its warm-up from its first window: the first actionable window is the one
    whose warmup_frac feature reaches 1, also when one chunk carries the whole start-up."""
    from controller.features import SzV2Pipeline
    c = _contract(feature_pipeline="sz_v2", feature_names=SzV2Pipeline.feature_names, warmup_s=8.0)
    st = SeizureDetectorStage(c, 256.0, 2)
    n = 256 * 12
    x = (np.random.default_rng(7).normal(size=(n, 2)) * 20).astype(np.float32)
    out = st.step(x, np.arange(n) / 256.0)           # one 12 s chunk
    frac = np.array([f[c.feature_names.index("warmup_frac")] for _, f in out])
    warm = np.array([st.is_warm(t) for t, _ in out])
    first = int(np.argmax(warm))
    assert warm[first:].all() and not warm[:first].any()
    assert frac[first] == 1.0 and frac[first - 1] < 1.0
    assert out[first][0] == pytest.approx(1.0 + 8.0 - 0.25, abs=1 / 256)   # 8 s of hops after the first window
    assert st.warm and st.warm_from_t == out[first][0]


def test_stage_chunking_does_not_change_features():
    c = _contract()
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(2000, 2)) * 20).astype(np.float32)
    ts = np.arange(2000) / 200.0
    a, b = SeizureDetectorStage(c, 200.0, 2), SeizureDetectorStage(c, 200.0, 2)
    oa = a.step(x, ts)
    ob = [r for i in range(0, 2000, 7) for r in b.step(x[i:i + 7], ts[i:i + 7])]
    assert len(oa) == len(ob) > 0
    for (ta, fa), (tb, fb) in zip(oa, ob):
        assert ta == tb
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)


def test_stage_rejects_bad_input():
    st = SeizureDetectorStage(_contract(), 256.0, 2)
    with pytest.raises(ValueError, match=r"chunk must be \(n, 2\)"):
        st.step(np.zeros((4, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"timestamps must have shape \(4,\)"):
        st.step(np.zeros((4, 2)), np.zeros(5))
    with pytest.raises(ContractError, match="needs 4 channels"):
        SeizureDetectorStage(_contract(n_channels=4), 256.0, 2)
    bad = np.zeros((4, 2))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf samples: leave them out first"):
        st.step(bad, np.arange(4) / 256.0)


def test_a_model_without_min_duration_builds_the_session_loop_with_the_default(toy_model):
    # min_duration_s is an optional extra contract key: a third-party model need not carry it.
    from controller.closed_loop import SeizureLoop
    from controller.config import load_config
    from controller.inference import DEFAULT_MIN_DURATION_S, contract_min_duration_s
    path, _, _ = toy_model
    c = read_contract(path)
    assert "min_duration_s" not in (c.model_extra or {})
    assert contract_min_duration_s(c) == DEFAULT_MIN_DURATION_S
    assert contract_min_duration_s(_contract(min_duration_s=2.0)) == 2.0
    cfg = load_config(overrides={"model": {"path": str(path)}, "policy": {"kind": "responsive"}})
    loop = SeizureLoop.from_config(cfg, fs_hz=256.0, n_channels=4)
    assert loop.policy is not None
