"""A prediction that is not acted upon says why: the model's warm-up, stimulation, missing samples, bad samples."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import closed_loop_rig

from controller.events import EventKind

FS, N_CH, CHUNK = 256.0, 4, 32


def test_predictions_say_why_they_are_not_acted_on():
    step, _, _, clock = closed_loop_rig(FS, N_CH)
    loop = step.loop
    rng = np.random.default_rng(0)
    k = [0]

    def feed(seconds: float, skip: int = 0, nan: bool = False) -> list[dict]:
        preds = []
        k[0] += skip   # samples that never arrived: a timestamp gap
        for _ in range(int(seconds * FS / CHUNK)):
            x = rng.normal(0, 20, (CHUNK, N_CH)).astype(np.float32)
            if nan:
                x[3, 0] = np.nan
            ts = (k[0] + np.arange(CHUNK)) / FS
            k[0] += CHUNK
            clock.advance_to(float(ts[-1]))
            preds += [e.data for e in step.step(x, ts) if e.kind is EventKind.PREDICTION]
            step.housekeeping()
        return preds

    warm = loop.stage.contract.warmup_s
    first = feed(warm + loop.window_s + 2.0)
    assert first[0]["valid"] is False and first[0]["invalid"] == "model warm-up"
    assert first[-1]["valid"] is True and "invalid" not in first[-1]

    after_gap = feed(1.0, skip=64)
    assert after_gap[0]["invalid"] == "samples missing (timestamp gap)"

    feed(loop.window_s + 1.0)                        # clean again
    bad = feed(0.5, nan=True)
    assert bad and all(p["invalid"] == "bad samples" for p in bad)

    feed(loop.window_s + 2.0)
    t_now = k[0] / FS
    loop.quality.blank(t_now, t_now + 0.1)           # a burst delivered now: its artifact is never acted on
    after_stim = feed(0.5)
    assert after_stim and after_stim[0]["invalid"] == "stimulation (blanking)"
    assert feed(loop.window_s + 1.0)[-1]["valid"] is True


# -- the policy hears of every window it may not act on (docs/policies.md, "Windows not acted upon") --------

_MODELS: dict[float, object] = {}
_MODEL_DIR = tempfile.TemporaryDirectory(prefix="stimloop-p-")   # removed when the test run ends


def _model_saying(p: float, contract):
    """A real ONNX model with the shipped model's contract whose output is ``p`` for any features
    (features × 0 + p): the test decides each window's probability, onnxruntime computes it."""
    if p not in _MODELS:
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from controller.inference import CONTRACT_KEY, OnnxPredictor
        n_f = contract.n_features
        w = numpy_helper.from_array(np.zeros((n_f, 1), np.float32), "w")
        b = numpy_helper.from_array(np.array([p], np.float32), "b")
        graph = helper.make_graph(
            [helper.make_node("MatMul", [contract.input_name, "w"], ["z"]),
             helper.make_node("Add", ["z", "b"], [contract.output])], "constant",
            [helper.make_tensor_value_info(contract.input_name, TensorProto.FLOAT, [None, n_f])],
            [helper.make_tensor_value_info(contract.output, TensorProto.FLOAT, [None, 1])], [w, b])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        m.ir_version = 8
        helper.set_model_props(m, {CONTRACT_KEY: contract.to_json()})
        path = Path(_MODEL_DIR.name) / f"p{p}.onnx"
        onnx.save(m, str(path))
        _MODELS[p] = OnnxPredictor(path)
    return _MODELS[p]


def _rig_with_p(**policy):
    """The session's chunk path (simulated time), its model one whose probability the test sets per stretch
    of signal (``_model_saying``)."""
    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.config import load_config
    from controller.loop import make_actuator
    from controller.runners.simulated import VirtualClock
    from drivers.simulated import SimulatedStimulator

    cfg = load_config(None, {"policy": policy} if policy else None)
    clock = VirtualClock()
    act = make_actuator(cfg, SimulatedStimulator(clock=clock), clock)
    act.heartbeat()
    loop = SeizureLoop.from_config(cfg, FS, N_CH)
    step = ChunkStep(loop, act, clock, modeled_latency_s=0.002, source="t", blanking_s=cfg.policy.blanking_s)
    rng = np.random.default_rng(0)
    log = []

    def feed(t0: float, t1: float, p: float, nan: bool = False, ahead_s: float = 0.0) -> None:
        """Chunks of 16 samples, each read when its last sample is stamped (``ahead_s`` before it)."""
        loop.predictor = _model_saying(p, loop.stage.contract)
        for a in range(int(t0 * FS), int(t1 * FS), 16):
            b = min(a + 16, int(t1 * FS))
            x = rng.normal(0, 20, (b - a, N_CH)).astype(np.float32)
            if nan:
                x[:] = np.nan
            clock.advance_to((b - 1) / FS - ahead_s)
            log.extend(step.housekeeping())
            log.extend(step.step(x, np.arange(a, b) / FS))

    return step, feed, log


def _what(log, what):
    return [e for e in log if e.data.get("what") == what]


def _preds(log):
    return [e.data for e in log if e.kind is EventKind.PREDICTION]


def test_a_fault_restarts_an_onset_not_yet_confirmed_as_the_offline_scorer_does():
    """One valid window above threshold before a 2.7 s NaN fault and the ones after it: the above-threshold
    time restarts after the fault, so the detection comes min_duration_s after the first valid window
    after it (the skipped windows used to carry the timer across, and the burst came at that first window)."""
    from models.seizure.scoring import detector_events

    step, feed, log = _rig_with_p()
    pol = step.loop.policy
    feed(0.0, 9.0, 0.1)
    feed(9.0, 9.3, 0.9)                 # one valid window above threshold
    feed(9.3, 12.0, 0.1, nan=True)      # bad samples: fault, its windows invalid
    feed(12.0, 17.0, 0.9)
    preds = _preds(log)
    first_after = min(p["window_end_t"] for p in preds if p["valid"] and p["window_end_t"] > 12.0)
    starts = _what(log, "detection_start")
    assert [s.data["onset_t"] for s in starts] == [first_after]
    assert starts[0].t == pytest.approx(first_after + pol.min_duration_s)
    restarted = _what(log, "onset_restarted")
    assert len(restarted) == 1 and restarted[0].data["reason"] == "bad samples"
    # the offline scorer the operating point was chosen with, on the same windows, agrees
    t = np.array([p["window_end_t"] for p in preds])
    p = np.array([p["p"] if p["valid"] else np.nan for p in preds])
    scored = detector_events(t, p, pol.threshold_on, pol.min_duration_s, pol.refractory_s, pol.threshold_off)
    assert [s[0] for s in scored][:1] == [starts[0].t]


def test_blanking_after_our_own_burst_neither_ends_nor_restarts_the_detection():
    """Two bursts per detection: the first burst blanks the windows after it (burst + blanking_s + a window),
    longer than burst_interval_s. The detection goes on through them and the second burst comes at the first
    valid window after its due time; no restart, no new detection, no FAULT."""
    step, feed, log = _rig_with_p(bursts_per_detection=2)
    pol = step.loop.policy
    feed(0.0, 10.0, 0.1)
    feed(10.0, 16.0, 0.9)
    feed(16.0, 17.0, 0.1)
    cmds = [e for e in log if e.kind is EventKind.COMMAND and e.data.get("op") == "trigger"]
    reqs = _what(log, "stim_request")
    assert len(cmds) == 2 and [r.data["detection_id"] for r in reqs] == [1, 1]
    first, second = (r.data["window_end_t"] for r in reqs)
    blanked = [p["window_end_t"] for p in _preds(log) if p.get("invalid") == "stimulation (blanking)"]
    assert blanked and first < min(blanked) and max(blanked) > first + pol.burst_interval_s
    valid_after = [p["window_end_t"] for p in _preds(log) if p["valid"] and p["window_end_t"] >= first + pol.burst_interval_s]
    assert second == valid_after[0]
    assert len(_what(log, "detection_start")) == 1 and len(_what(log, "detection_end")) == 1
    assert _what(log, "onset_restarted") == [] and not any(e.kind is EventKind.FAULT for e in log)


def test_a_late_window_restarts_an_onset_not_yet_confirmed():
    """A window whose result missed the deadline is never acted upon: it is a hole in the evidence, so an
    onset timer does not run across it."""
    step, feed, log = _rig_with_p()
    pol = step.loop.policy
    feed(0.0, 9.0, 0.1)
    feed(9.0, 10.0, 0.9)
    step.modeled_latency_s = 2 * step.loop.deadline.deadline_s     # the next windows come too late
    feed(10.0, 10.3, 0.9)
    step.modeled_latency_s = 0.002
    feed(10.3, 13.0, 0.9)
    late = [e.data["window_end_t"] for e in log if e.kind is EventKind.DEADLINE_MISS]
    assert late
    starts = _what(log, "detection_start")
    assert starts[0].data["onset_t"] > max(late)
    assert starts[0].t >= max(late) + pol.min_duration_s
    assert [e.data["reason"] for e in _what(log, "onset_restarted")] == ["deadline missed"]


def test_a_stream_stamped_ahead_of_the_clock_is_a_fault_until_its_stamps_are_behind_us_again():
    """A sender that stamps samples 25 ms after we read them: reported once per episode (FAULT
    timestamps_ahead) and latched, stimulation off; every window ends in the future and is refused by
    the deadline. Once chunks are stamped in the past again, the latch is released and the loop acts."""
    from controller.closed_loop import AHEAD_TOLERANCE_S

    step, feed, log = _rig_with_p()
    feed(0.0, 9.0, 0.1)
    step.modeled_latency_s = -0.025                                  # results, as reads, 25 ms before the stamps
    feed(9.0, 12.0, 0.9, ahead_s=0.025)
    ahead = [e for e in log if e.kind is EventKind.FAULT and e.data.get("what") == "timestamps_ahead"]
    assert len(ahead) == 1 and ahead[0].data["ahead_ms"] == pytest.approx(25.0)
    assert "25.00 ms ahead of this machine's clock" in ahead[0].data["reason"]
    safe = [e for e in log if e.kind is EventKind.SAFE_STATE]
    assert [e.data["reason"] for e in safe] == ["stream timestamps ahead of this clock"]   # stimulation off
    assert not _what(log, "detection_start")                         # p = 0.9 for 3 s, none acted upon
    assert all(e.data["latency_s"] < 0 for e in log if e.kind is EventKind.DEADLINE_MISS)
    step.modeled_latency_s = 0.002
    feed(12.0, 15.0, 0.9)
    assert _what(log, "timestamps_consistent") and not step.actuator.governor.latch_reasons
    assert _what(log, "detection_start") and _what(log, "detection_start")[0].t > safe[0].t
    feed(15.0, 16.0, 0.1, ahead_s=AHEAD_TOLERANCE_S / 2)             # within the tolerance: nothing
    feed(16.0, 17.0, 0.1, ahead_s=0.010)
    ahead = [e for e in log if e.kind is EventKind.FAULT and e.data.get("what") == "timestamps_ahead"]
    assert [round(e.data["ahead_ms"]) for e in ahead] == [25, 10]


def test_no_signal_on_any_channel_is_a_fault_until_the_signal_is_back():
    """A stream in V read as µV (30 µV noise arriving as 3e-5): far below any amplifier's noise floor
    on every channel. The real model gave such windows p = 0.78, just under its 0.82 threshold; now
    they are refused as "no signal", reported once (FAULT flat_signal) and stimulation stays off until
    windows carry signal again."""
    from controller.closed_loop import FLAT_REASON

    step, _, _, clock = closed_loop_rig(FS, N_CH)
    rng = np.random.default_rng(1)
    k = [0]
    log = []

    def feed(seconds: float, uv: float) -> list[dict]:
        preds = []
        for _ in range(int(seconds * FS / CHUNK)):
            x = rng.normal(0, uv, (CHUNK, N_CH)).astype(np.float32)
            ts = (k[0] + np.arange(CHUNK)) / FS
            k[0] += CHUNK
            clock.advance_to(float(ts[-1]))
            events = step.step(x, ts)
            log.extend(events)
            log.extend(step.housekeeping() or [])
            preds += [e.data for e in events if e.kind is EventKind.PREDICTION]
        return preds

    loop = step.loop
    first = feed(loop.stage.contract.warmup_s + loop.window_s + 2.0, 20.0)
    assert first[-1]["valid"] and not loop.bad_data
    flat = feed(loop.window_s + 5.0, 20e-6)              # the prefilter rings down within a second
    late = flat[-int(2.0 / loop.stage.contract.hop_s):]             # windows wholly inside the flat stretch
    assert late and all(p["invalid"] == FLAT_REASON and not p["valid"] for p in late)
    faults = [e for e in log if e.kind is EventKind.FAULT and e.data.get("what") == "flat_signal"]
    assert len(faults) == 1 and "every channel below 0.01 µV rms" in faults[0].data["reason"]
    assert loop.bad_data and [e.data["reason"] for e in log if e.kind is EventKind.SAFE_STATE] == \
        ["bad samples in the stream"]                                # stimulation off
    back = feed(loop.window_s + 2.0, 20.0)
    assert back[-1]["valid"] and not loop.bad_data and not step.actuator.governor.latch_reasons
    assert [e.data["what"] for e in log if e.data.get("what") in ("flat_signal", "signal_back")] == \
        ["flat_signal", "signal_back"]
