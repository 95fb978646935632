"""Benchmark the shipped seizure model and the per-chunk front end.

    python -m controller.bench_inference --json bench_inference.json

Measures, per call, with ``perf_counter_ns``: ``OnnxPredictor.predict`` with
and without IOBinding, and ``SeizureDetectorStage.step`` on 32-sample chunks
(16 channels at 512 Hz, the simulator's default; one hop in two calls emits a
window). Reports p50/p99/max in µs and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from controller.inference import OnnxPredictor, SeizureDetectorStage

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "seizure" / "seizure_v1.onnx"


def _stats_us(ns: np.ndarray) -> dict:
    us = ns / 1000.0
    return {"n": int(us.size), "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "mean_us": float(us.mean())}


def _time_calls(fn, inputs: list, n_calls: int, n_warmup: int = 200) -> dict:
    """Per-call latency of ``fn(x)``, cycling through ``inputs`` (length a power of two), after a warm-up."""
    mask = len(inputs) - 1
    for i in range(n_warmup):  # first calls allocate inside onnxruntime
        fn(inputs[i & mask])
    ns = np.empty(n_calls, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n_calls):
        x = inputs[i & mask]
        t0 = clock()
        fn(x)
        ns[i] = clock() - t0
    return _stats_us(ns)


def bench_predictor(path: Path, use_iobinding: bool, n_calls: int, rng) -> dict:
    pred = OnnxPredictor(path, use_iobinding=use_iobinding)
    feats = rng.normal(size=(256, pred.contract.n_features)).astype(np.float32)
    return _time_calls(pred.predict, list(feats), n_calls)


def bench_stage(path: Path, n_calls: int, rng, fs_hz: float = 512.0, n_channels: int = 16, chunk_n: int = 32) -> dict:
    contract = OnnxPredictor(path).contract
    stage = SeizureDetectorStage(contract, fs_hz, n_channels)
    x = (rng.normal(size=(chunk_n * 64, n_channels)) * 20).astype(np.float32)
    ns = np.empty(n_calls, dtype=np.int64)
    clock = time.perf_counter_ns
    t = 0.0
    for i in range(n_calls):
        k = (i % 64) * chunk_n
        ts = t + np.arange(chunk_n) / fs_hz
        t0 = clock()
        stage.step(x[k:k + chunk_n], ts)
        ns[i] = clock() - t0
        t += chunk_n / fs_hz
    out = _stats_us(ns)
    out.update({"fs_hz": fs_hz, "n_channels": n_channels, "chunk_n": chunk_n})
    return out


def bench_plasticity(n_calls: int, rng) -> dict:
    """The plasticity surrogate: ``predict`` of one protocol per call (what a policy does)."""
    from models.plasticity.protocols import Protocol
    from models.plasticity.surrogate import PlasticityPredictor

    pred = PlasticityPredictor()
    protos = [Protocol(frequency_hz=float(f), waveform="pulsed", pulse_width_us=200.0, timing_ms=10.0, n_pulses=60)
              for f in rng.uniform(1, 100, 64)]
    return _time_calls(pred.predict, protos, n_calls)


def bench_shipped_models(n_calls: int = 20000, seed: int = 0) -> dict:
    """Per-call latency of every shipped model: ``{"<model>": {"p50_us", "p99_us", "max_us", "calls"}}``."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, res in (("seizure_v1", bench_predictor(DEFAULT_MODEL, True, n_calls, rng)),
                      ("plasticity_v1", bench_plasticity(n_calls, rng))):
        out[name] = {"p50_us": round(res["p50_us"], 3), "p99_us": round(res["p99_us"], 3),
                     "max_us": round(res["max_us"], 3), "calls": res["n"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", type=Path, default=None, help="write results here (also printed)")
    ap.add_argument("--n-calls", type=int, default=20000)
    args = ap.parse_args(argv)
    if args.n_calls < 100:
        raise SystemExit(f"--n-calls must be >= 100, got {args.n_calls}")
    rng = np.random.default_rng(0)
    pred = OnnxPredictor(args.model)
    res = {"model": str(args.model), "sha256": pred.sha256, "contract_version": pred.contract.version,
           "python": sys.version.split()[0], "machine": platform.machine(),
           "predict_iobinding": bench_predictor(args.model, True, args.n_calls, rng),
           "predict_plain_run": bench_predictor(args.model, False, args.n_calls, rng),
           "stage_step": bench_stage(args.model, max(100, args.n_calls // 4), rng)}
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
