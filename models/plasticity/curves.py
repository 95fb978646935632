"""Evaluation, sensitivity analysis, curves (PNG) and the model card of the surrogate."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from models.plasticity.protocols import Protocol, expected_delta_w
from models.plasticity.stdp import STDPRule, stdp_window
from models.plasticity.surrogate import (DEFAULT_MODEL_PATH, FEATURE_NAMES, RAW_INPUTS, RAW_NAMES,
                                         PlasticityPredictor)

__all__ = ["latency_us", "evaluate", "sensitivity", "curve_data", "plot_curves", "model_card"]


def latency_us(predictor: PlasticityPredictor, protocols: list[Protocol], n_calls: int = 5000) -> dict:
    """Per-call latency of ``predictor.predict`` (µs percentiles over ``n_calls`` calls)."""
    for p in protocols[:200]:  # warm-up
        predictor.predict(p)
    t = np.empty(n_calls, dtype=np.int64)
    m = len(protocols)
    for i in range(n_calls):
        p = protocols[i % m]
        t0 = time.perf_counter_ns()
        predictor.predict(p)
        t[i] = time.perf_counter_ns() - t0
    us = t / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "max_us": float(us.max()), "n_calls": n_calls}


def _protocols_from_raw(raw: np.ndarray) -> list[Protocol]:
    wf = ("pulsed", "sine", "ti")
    out = []
    for f, w, pw, dt, n, w0, r, d, a in raw:
        out.append(Protocol(frequency_hz=float(f), waveform=wf[int(w)], pulse_width_us=float(pw), timing_ms=float(dt),
                            n_pulses=int(n), baseline_w=float(w0), reward=float(r),
                            reward_delay_s=float(d) if r != 0 else None, amplitude_ua=float(a)))
    return out


def evaluate(path: str | Path = DEFAULT_MODEL_PATH, raw: np.ndarray | None = None, y: np.ndarray | None = None,
             n_heldout: int = 1000, n_trials: int = 16) -> dict:
    """Held-out R², MSE and per-call latency of the ONNX surrogate.

    Without ``raw``/``y`` a fresh held-out set is sampled and simulated with the
    training script's held-out seed (protocols never used for fitting).
    """
    from models.plasticity.train import HELDOUT_SEED, dataset, r2_mse

    if raw is None or y is None:
        raw, y = dataset(n_heldout, HELDOUT_SEED, n_trials)
    pred = PlasticityPredictor(path)
    yhat = pred.predict_many(raw)
    r2, mse = r2_mse(y, yhat)
    protos = _protocols_from_raw(raw[:500])
    single = np.array([pred.predict(p) for p in protos[:50]])
    if not np.allclose(single, yhat[:50], atol=1e-5):
        raise RuntimeError("predict() and predict_many() disagree: the IO-bound buffers are broken")
    lat = latency_us(pred, protos)
    return {"r2": r2, "mse": mse, "n_heldout": int(len(y)), "p99_us": lat["p99_us"], "p50_us": lat["p50_us"],
            "max_us": lat["max_us"]}


def _base_points(n: int, seed: int) -> np.ndarray:
    from models.plasticity.train import sample_raw

    return sample_raw(n, np.random.default_rng(seed))


def sensitivity(path: str | Path = DEFAULT_MODEL_PATH, n_base: int = 400, n_grid: int = 9, seed: int = 5,
                simulator: bool = False, n_trials: int = 8) -> list[dict]:
    """One-at-a-time sensitivity of Δw to each raw input.

    For ``n_base`` random protocols, sweep one parameter over its range (others
    fixed) and record max − min of Δw; report the mean and the 90th percentile
    of that span, by the surrogate or (``simulator=True``) by the simulator.
    """
    base = _base_points(n_base, seed)
    pred = None if simulator else PlasticityPredictor(path)
    rows = []
    for j, (name, unit, lo, hi) in enumerate(RAW_INPUTS):
        if name == "waveform":
            grid = np.array([0.0, 1.0, 2.0])
        elif name in ("frequency_hz", "pulse_width_us", "n_pulses", "amplitude_ua"):
            grid = np.geomspace(lo, hi, n_grid)
        else:
            grid = np.linspace(lo, hi, n_grid)
        x = np.repeat(base, len(grid), axis=0)
        x[:, j] = np.tile(grid, n_base)
        if name == "n_pulses":
            x[:, j] = np.round(x[:, j])
        if name == "reward_delay_s":
            x[:, RAW_NAMES.index("reward_um")] = np.maximum(x[:, RAW_NAMES.index("reward_um")], 0.5)
        if simulator:
            from models.plasticity.train import simulate_raw

            dw = simulate_raw(x, n_trials=n_trials, seed=seed)
        else:
            dw = pred.predict_many(x)
        span = np.ptp(dw.reshape(n_base, len(grid)), axis=1)
        rows.append({"parameter": name, "unit": unit, "mean_span": float(span.mean()),
                     "p90_span": float(np.percentile(span, 90))})
    return rows


def curve_data(path: str | Path = DEFAULT_MODEL_PATH, n_trials: int = 16) -> dict:
    """Data of the curves figure: STDP window and Δw vs frequency, simulator and surrogate."""
    dt_ms = np.linspace(-50, 50, 41)
    pair_window = stdp_window(dt_ms * 1e-3, STDPRule.song2000())
    pred = PlasticityPredictor(path)
    timing_protos = [Protocol(frequency_hz=1.0, timing_ms=float(d), n_pulses=60, pulse_width_us=500,
                              amplitude_ua=2000, baseline_w=0.5) for d in dt_ms]
    freq = np.geomspace(1, 100, 20)
    out = {"dt_ms": dt_ms, "pair_window": pair_window, "freq_hz": freq,
           "timing_sim": expected_delta_w(timing_protos, n_trials=n_trials, seed=1),
           "timing_sur": pred.predict_protocols(timing_protos)}
    for label, dt in (("plus10", 10.0), ("minus10", -10.0)):
        ps = [Protocol(frequency_hz=float(f), timing_ms=dt, n_pulses=60, pulse_width_us=500, amplitude_ua=2000,
                       baseline_w=0.5) for f in freq]
        out[f"freq_sim_{label}"] = expected_delta_w(ps, n_trials=n_trials, seed=2)
        out[f"freq_sur_{label}"] = pred.predict_protocols(ps)
    for wf in ("sine", "ti"):
        ps = [Protocol(frequency_hz=float(f), waveform=wf, timing_ms=10.0, n_pulses=60, amplitude_ua=2000,
                       baseline_w=0.5) for f in freq]
        out[f"freq_sim_{wf}"] = expected_delta_w(ps, n_trials=n_trials, seed=3)
        out[f"freq_sur_{wf}"] = pred.predict_protocols(ps)
    return out


def plot_curves(out_png: str | Path, path: str | Path = DEFAULT_MODEL_PATH) -> Path:
    """Write the curves PNG (simulator solid/markers, surrogate dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = curve_data(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot(d["dt_ms"], d["pair_window"] / np.abs(d["pair_window"]).max() * np.abs(d["timing_sim"]).max(),
            color="0.6", label="pair STDP window (Song 2000), scaled")
    ax.plot(d["dt_ms"], d["timing_sim"], "o-", ms=3, label="triplet sim: 60 pairings @ 1 Hz")
    ax.plot(d["dt_ms"], d["timing_sur"], "--", label="ONNX surrogate")
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("Δt = t_post − t_pre (ms)")
    ax.set_ylabel("Δw (fraction of w_max)")
    ax.set_title("STDP window")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label, color in (("plus10", "pulsed Δt=+10 ms", "C0"), ("minus10", "pulsed Δt=−10 ms", "C1"),
                              ("sine", "sine Δt=+10 ms", "C2"), ("ti", "TI envelope Δt=+10 ms", "C3")):
        ax.semilogx(d["freq_hz"], d[f"freq_sim_{key}"], "o-", ms=3, color=color, label=f"sim {label}")
        ax.semilogx(d["freq_hz"], d[f"freq_sur_{key}"], "--", color=color, label="surrogate")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("stimulation frequency (Hz)")
    ax.set_title("Δw vs frequency (60 events, baseline 0.5)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":   # savefig would add ".png" itself, and the caller report the wrong name
        out_png = out_png.with_name(out_png.name + ".png")
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def model_card(ev: dict, sens: list[dict], *, n_train: int, n_heldout: int, trials: int, elapsed_s: float) -> str:
    """Markdown model card from evaluation and sensitivity results."""
    sens_rows = "\n".join(f"| {r['parameter']} | {r['unit']} | {r['mean_span']:.4f} | {r['p90_span']:.4f} |"
                          for r in sorted(sens, key=lambda r: -r["mean_span"]))
    inputs = "\n".join(f"| {n} | {u} | {lo:g} – {hi:g} |" for n, u, lo, hi in RAW_INPUTS)
    return f"""# plasticity_v1.onnx — surrogate of the stimloop plasticity simulator

Predicts the expected weight change **Δw** (fraction of w_max; w_end − baseline_w)
of one synapse under a stimulation protocol. It is a fast stand-in for
`models.plasticity.protocols.expected_delta_w` so a policy can rank candidate
protocols in microseconds. It knows only what the simulator knows: a toy model
(assumptions in `protocols.py`), not a prediction of tissue responses.

## Simulator (labels)
- Triplet STDP, Pfister & Gerstner 2006, visual-cortex all-to-all minimal
  parameters (τ+ 16.8 ms, τ− 33.7 ms, τy 125 ms, A2+ 5e-10, A3+ 6.2e-3,
  A2− 7e-3), soft weight bounds [0, 1].
- Reward: Izhikevich 2007 eligibility c (τc = 1 s) × dopamine d (τd = 0.2 s),
  REFERENCE.md §7; reward delivered `reward_delay_s` after the last spike. A
  hybrid: STDP also changes w directly (Izhikevich's rule has only the c·d path;
  `models/plasticity/stdp.py`).
- Protocol → spikes: each event recruits a pre/post pair with probability p
  (pulsed: Hill of charge amplitude × pulse width, Q50 = 100 nC; sine:
  phase-locked at peaks, membrane low-pass τm = 10 ms; TI: follows the beat
  envelope, carrier 2 kHz), 1 ms jitter. Δw label = mean of {trials} seeded
  Monte Carlo runs (seed-to-seed R² of labels ≈ 0.999).

## Data
- {n_train} training and {n_heldout} held-out protocols, independent seeds
  (train 20240601, held-out 777), sampled uniformly / log-uniformly over:

| input | unit | range |
|---|---|---|
{inputs}

- No reward for half of the protocols (reward_um = 0, delay 0).
- Features (ONNX input, float32, in order): {", ".join(FEATURE_NAMES)}
  (formulas in the `stimloop.contract` metadata). Scaling (StandardScaler) is
  inside the ONNX graph.

## Model
StandardScaler → MLPRegressor (128, 128, ReLU, Adam, early stopping), skl2onnx, opset 17.

## Held-out results
| metric | value |
|---|---|
| R² | {ev['r2']:.4f} |
| MSE | {ev['mse']:.3g} |
| n held-out | {ev['n_heldout']} |
| `predict()` p50 latency | {ev['p50_us']:.1f} µs |
| `predict()` p99 latency | {ev['p99_us']:.1f} µs |

Latency: `PlasticityPredictor.predict` (encode + range check + onnxruntime,
1 thread, IO binding), 5000 calls on this 2-core machine shared with other
jobs; measure again with `python -m models.plasticity.cli evaluate --json F`.

## Sensitivity of Δw (surrogate, one at a time)
Span = max − min of Δw when one input sweeps its range with the others fixed,
over 400 random protocols.

| parameter | unit | mean span | p90 span |
|---|---|---|---|
{sens_rows}

## Limits
- Outside the input ranges the predictor raises instead of extrapolating.
- Low-frequency LTD of plain trains (Dudek & Bear 1992, REFERENCE.md §7) appears
  only with Δt < 0 in this model: with Δt > 0 and rare pairings the minimal
  triplet rule gives ≈ 0.
- Recruitment, jitter and dopamine gain constants are model choices, unverified.
- TI carrier frequency is not an input: it was trained with a 2 kHz carrier, and the
  predictor refuses TI with any other in `predict`, `predict_protocols` and
  `best_protocol` alike (before 2026-12-07 only `predict` did; raw rows for
  `predict_many` have no carrier column and stand for 2 kHz). The simulator's Δw
  does depend on the carrier (its low-passed remnant adds drive): at a 100 Hz beat,
  1000 µA, 300 pulses, Δw 0.152 / 0.059 / 0.037 / 0.031 for carriers of
  150 / 500 / 2000 / 20 000 Hz.
- A `Protocol` with a non-zero `reward` and no `reward_delay_s` is refused (it was
  silently predicted as unrewarded).

Trained by `stimloop train plasticity --n-train {n_train} --n-heldout {n_heldout} --trials {trials}` in {elapsed_s:.0f} s.
"""
