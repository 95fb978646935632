"""Evaluate seizure detectors on recordings and simulated cohorts, window- and event-level.

A *detector* is anything with the ``Detector`` interface: ``predict(x_uv (n, ch),
fs_hz) -> (t_end_s, p)`` (window end times from the first sample and one
probability per window, NaN where it could not evaluate) plus the
post-processing it is acted upon with (``threshold``, ``min_duration_s``,
``refractory_s``). ``OnnxDetector`` runs any stimloop ONNX model exactly as the
loop does (``SeizureDetectorStage`` -> ``OnnxPredictor``), ``mayo.MayoDetector``
the published Mayo model.

``evaluate_recording`` gives the per-recording JSON record
(``{"path", "fs", "duration_s", "events", "windows", "truth", "not_evaluated",
"metrics", "notes"}``) and ``summarize`` pools records (window metrics over
all windows, event metrics over all seizures and all evaluated hours).
``evaluate_segments`` scores class-labelled segments (Delhi, Bonn: no
annotations, a class per file) window by window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from models.seizure.recordings import Recording
from models.seizure.scoring import (SZCORE, SzcoreRules, detector_events, nan_runs, poisson_interval, pool_scores,
                                    score_events, wilson_interval, window_labels, window_scores)

__all__ = ["Detector", "OnnxDetector", "EvaluationError", "evaluate_recording", "summarize", "simulate_cohort",
           "default_model_path", "sweep", "permutation_importance", "evaluate_segments", "SEGMENT_RULE"]


class EvaluationError(ValueError):
    """A recording cannot be evaluated by a detector; the message says which and why."""


def default_model_path() -> Path:
    """The shipped model, ``models/seizure/seizure_v1.onnx``."""
    return Path(__file__).resolve().parent / "seizure_v1.onnx"


class Detector(Protocol):
    """What ``evaluate_recording`` needs from a detector."""

    name: str
    threshold: float
    min_duration_s: float
    refractory_s: float
    hop_s: float

    def predict(self, x_uv: np.ndarray, fs_hz: float) -> tuple[np.ndarray, np.ndarray]: ...


def _with_missing_windows(t_end: np.ndarray, F: np.ndarray, valid: np.ndarray, hop_s: float,
                          duration_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows on the hop grid where none came out (their samples were left out as bad) added as
    not valid, so a stretch of bad data is reported as not evaluated rather than skipped over."""
    if not t_end.size:
        return t_end, F, valid
    grid_t, grid_F, grid_v = [t_end[:1]], [F[:1]], [valid[:1]]
    nexts = np.r_[t_end[1:], duration_s + hop_s]
    for i in range(t_end.size):
        missing = int(np.floor((nexts[i] - t_end[i]) / hop_s + 1e-6)) - 1
        if missing > 0:
            fill_t = t_end[i] + hop_s * np.arange(1, missing + 1)
            fill_t = fill_t[fill_t <= duration_s + 1e-9]
            grid_t.append(fill_t)
            grid_F.append(np.zeros((fill_t.size, F.shape[1]), F.dtype))
            grid_v.append(np.zeros(fill_t.size, bool))
        if i + 1 < t_end.size:
            grid_t.append(t_end[i + 1:i + 2])
            grid_F.append(F[i + 1:i + 2])
            grid_v.append(valid[i + 1:i + 2])
    return np.concatenate(grid_t), np.concatenate(grid_F), np.concatenate(grid_v)


class OnnxDetector:
    """A stimloop ONNX model run as the loop runs it: per chunk through ``SeizureDetectorStage``.

    Each chunk passes the loop's own data-quality check first
    (``controller.data_quality.DataQuality``): non-finite samples and channels
    stuck at one value (a rail, a detached electrode's flat zero) are left out of
    what the filters see, and windows within ``window_s`` of them get ``p = NaN``,
    as a session would not act on them. So do windows before the contract's
    ``warmup_s`` (``SeizureDetectorStage.is_warm``, the loop's own rule): the loop
    records them but never acts on them, so a detection there is one the loop
    could not make. A recording shorter than the warm-up has no evaluated window.
    ``min_duration_s``/``refractory_s`` default to the contract's extra fields
    when present, else the responsive policy defaults (0.5 s, 5 s).
    """

    def __init__(self, path: str | Path | None = None, threshold: float | None = None,
                 min_duration_s: float | None = None, refractory_s: float | None = None, chunk_s: float = 0.25):
        from controller.inference import DEFAULT_MIN_DURATION_S, OnnxPredictor

        self.path = Path(path) if path else default_model_path()
        self.predictor = OnnxPredictor(self.path)
        c = self.contract = self.predictor.contract
        extra = c.model_extra or {}
        self.name = c.version
        self.threshold = float(c.threshold if threshold is None else threshold)
        self.min_duration_s = float(extra.get("min_duration_s", DEFAULT_MIN_DURATION_S) if min_duration_s is None else min_duration_s)
        self.refractory_s = float(extra.get("refractory_s", 5.0) if refractory_s is None else refractory_s)
        self.hop_s = c.hop_s
        self.chunk_s = chunk_s
        self.last_features: np.ndarray | None = None  # kept for the sensitivity analysis

    def check(self, fs_hz: float, n_channels: int, n_samples: int) -> None:
        """Raise ``EvaluationError`` if a recording of this shape cannot be evaluated."""
        from controller.inference import ContractError

        try:
            self.contract.check_stream(fs_hz, n_channels)
        except ContractError as e:
            raise EvaluationError(str(e)) from None
        need = int(math.ceil(self.contract.window_s * fs_hz))
        if n_samples < need:
            raise EvaluationError(f"{n_samples} samples at {fs_hz:g} Hz is shorter than one {self.contract.window_s:g} s "
                                  f"window ({need} samples) of model {self.name}")

    def features(self, x_uv: np.ndarray, fs_hz: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t_end_s, features (w, f), valid (w,))`` for a whole recording; ``valid`` is False where the
        loop would not act: model warm-up, within ``window_s`` of bad samples (class docstring), or no
        signal on any channel."""
        from controller.data_quality import DataQuality
        from controller.inference import SeizureDetectorStage

        x = np.asarray(x_uv, dtype=np.float32)
        if x.ndim == 1:
            x = x[:, None]
        self.check(fs_hz, x.shape[1], x.shape[0])
        stage = SeizureDetectorStage(self.contract, fs_hz, x.shape[1])
        # The loop's own data-quality check (NaN, stuck or flat channels): bad rows are left out of
        # what the filters see and windows within window_s of them are not acted on, as in a session.
        quality = DataQuality(fs_hz, x.shape[1], self.contract.window_s)
        t = np.arange(x.shape[0]) / fs_hz
        step = max(1, int(round(self.chunk_s * fs_hz)))
        ends, feats, valid = [], [], []
        for i in range(0, x.shape[0], step):
            xc, tc = quality.check(x[i:i + step], t[i:i + step], [])
            if not tc.size:
                continue
            for t_end, f in stage.step(xc, tc):
                ends.append(t_end)
                feats.append(f)
                # ... nor on a window with no signal on any channel (closed_loop.FLAT_REASON)
                valid.append(stage.is_warm(t_end) and t_end > quality.invalid_until_t
                             and t_end not in stage.flat_window_t)
        t_end = np.asarray(ends, dtype=np.float64)
        F = np.asarray(feats, dtype=np.float32).reshape(-1, self.contract.n_features)
        return _with_missing_windows(t_end, F, np.asarray(valid, dtype=bool), self.hop_s, x.shape[0] / fs_hz)

    def predict(self, x_uv: np.ndarray, fs_hz: float) -> tuple[np.ndarray, np.ndarray]:
        """Window end times (s from the first sample) and ``p`` per window, NaN where not evaluated."""
        t_end, F, valid = self.features(x_uv, fs_hz)
        self.last_features = F
        p = self.predictor.predict_batch(F) if F.shape[0] else np.zeros(0)
        p = np.where(valid, p, np.nan)
        return t_end, p


def _round_list(a, nd: int = 4) -> list:
    return [None if not np.isfinite(v) else round(float(v), nd) for v in np.asarray(a, dtype=np.float64)]


def evaluate_recording(detector: Detector, rec: Recording, rules: SzcoreRules = SZCORE,
                       keep_windows: bool = True) -> dict:
    """One recording through ``detector``; the JSON record (module docstring)."""
    notes = list(rec.notes)
    x = rec.data_uv
    finite = np.isfinite(x)
    if not finite.all():
        bad = ~finite.all(axis=1)
        runs = int(np.sum(bad & ~np.r_[False, bad[:-1]]))
        notes.append(f"{int(bad.sum())} samples ({bad.sum() / rec.fs_hz:.2f} s) in {runs} runs are NaN/inf: "
                     "windows touching them are not evaluated (not scored as 'no seizure')")
    t_end, p = detector.predict(x, rec.fs_hz)
    not_eval = nan_runs(t_end, p, detector.hop_s)
    events = detector_events(t_end, p, detector.threshold, detector.min_duration_s, detector.refractory_s)
    truth = rec.seizures
    metrics: dict = {"post_processing": {"threshold": detector.threshold, "min_duration_s": detector.min_duration_s,
                                         "refractory_s": detector.refractory_s}}
    if truth is None:
        notes.append("no seizure annotations: window and event metrics that need them are null")
        metrics["window"] = None
    else:
        metrics["window"] = window_scores(p, window_labels(t_end, truth), detector.threshold)
    metrics["event"] = score_events(truth, events, rec.duration_s, rules, not_eval)
    out = {"path": rec.path, "fs": rec.fs_hz, "n_channels": rec.n_channels, "duration_s": rec.duration_s,
           "detector": detector.name,
           "events": [{"onset_s": a, "offset_s": b, "max_prob": round(m, 4)} for a, b, m in events],
           "truth": None if truth is None else [[a, b] for a, b in truth],
           "not_evaluated": not_eval, "metrics": metrics, "notes": notes}
    if keep_windows:
        out["windows"] = {"t_s": _round_list(t_end, 3), "p": _round_list(p)}
    out["_t"], out["_p"] = t_end, p  # for pooling; dropped by the CLI before JSON
    return out


def summarize(records: list[dict], rules: SzcoreRules = SZCORE) -> dict:
    """Pool records: window metrics over all windows, event counts over all recordings, with 95 % intervals."""
    annotated = [r for r in records if r["truth"] is not None]
    out: dict = {"n_recordings": len(records), "n_annotated": len(annotated), "rules": rules.describe(),
                 "hours": sum(r["duration_s"] for r in records) / 3600.0}
    if not annotated:
        out["note"] = "no annotated recording: only detections are reported"
        out["n_detections"] = sum(len(r["events"]) for r in records)
        return out
    thr = annotated[0]["metrics"]["post_processing"]["threshold"]
    p = np.concatenate([r["_p"] for r in annotated])
    y = np.concatenate([window_labels(r["_t"], r["truth"]) for r in annotated])
    out["window"] = window_scores(p, y, thr)
    pooled = pool_scores(r["metrics"]["event"] for r in annotated)
    n_sz, n_det, n_hyp = pooled["n_seizures"], pooled["n_detected"], pooled["n_detections"]
    fa, eval_h, lat = pooled["false_alarms"], pooled["evaluated_h"], pooled["latency_s"]
    sens = pooled["sensitivity"]
    prec = (n_hyp - fa) / n_hyp if n_hyp else None
    out["event"] = {
        "n_seizures": n_sz, "n_detected": n_det, "sensitivity": sens, "sensitivity_ci95": wilson_interval(n_det, n_sz),
        "n_detections": n_hyp, "precision": prec,
        "f1": (2 * sens * prec / (sens + prec)) if sens and prec else (0.0 if sens is not None and prec is not None else None),
        "false_alarms": fa, "evaluated_h": eval_h,
        "false_alarms_per_24h": fa / (eval_h / 24.0) if eval_h > 0 else None,
        "false_alarms_per_24h_ci95": poisson_interval(fa, eval_h / 24.0),
        "median_latency_s": float(np.median(lat)) if lat else None,
        "latency_s_p90": float(np.percentile(lat, 90)) if lat else None,
        "frac_latency_le_3s": float(np.mean(np.asarray(lat) <= 3.0)) if lat else None,
    }
    return out


SEGMENT_RULE = ("every window of a segment labelled by the segment's class, warm-up included (a 5 s segment is "
                "all warm-up), each segment through a fresh feature stage: as MODEL_CARD.md's Delhi figures")


def evaluate_segments(detector: OnnxDetector, segments: list[tuple[str, str, np.ndarray]], fs_hz: float,
                      positive: tuple[str, ...] = ("ictal",)) -> dict:
    """Window-level scores on class-labelled segments (``recordings.load_segments``): windows of a
    ``positive`` class are seizure, all others not (SEGMENT_RULE). Segments the model cannot take
    (too short, non-finite samples, a channel count its contract refuses) are listed under
    ``skipped`` with the reason. The JSON record: ``window`` (``window_scores`` with Wilson 95 %
    intervals), ``by_class`` (windows at or above the threshold, and segments with at least one),
    ``segments`` (per file: class, windows, max and mean p), ``skipped``."""
    from models.seizure.dataset import features_for_recording

    thr = detector.threshold
    ps, ys, rows, skipped = [], [], [], []
    by_class: dict[str, dict] = {}
    for cls, name, x in segments:
        try:
            detector.check(fs_hz, x.shape[1], x.shape[0])
            if not np.isfinite(x).all():
                raise EvaluationError("non-finite samples (NaN/inf)")
        except EvaluationError as e:
            skipped.append({"class": cls, "file": name, "reason": str(e)})
            continue
        F, _t_end = features_for_recording(x, fs_hz, detector.contract, chunk_n=256)
        p = detector.predictor.predict_batch(F) if F.shape[0] else np.zeros(0)
        ps.append(p)
        ys.append(np.full(p.size, 1.0 if cls in positive else 0.0))
        rows.append({"class": cls, "file": name, "n_windows": int(p.size),
                     "max_p": round(float(p.max()), 4) if p.size else None,
                     "mean_p": round(float(p.mean()), 4) if p.size else None})
        c = by_class.setdefault(cls, {"positive": cls in positive, "segments": 0, "windows": 0,
                                      "windows_above": 0, "segments_above": 0})
        c["segments"] += 1
        c["windows"] += int(p.size)
        c["windows_above"] += int((p >= thr).sum())
        c["segments_above"] += int(bool((p >= thr).any()))
    for c in by_class.values():
        c["frac_windows_above"] = c["windows_above"] / c["windows"] if c["windows"] else None
        c["frac_windows_above_ci95"] = wilson_interval(c["windows_above"], c["windows"])
    out = {"fs_hz": fs_hz, "positive": list(positive), "threshold": thr, "rule": SEGMENT_RULE,
           "n_segments": len(rows), "by_class": by_class, "segments": rows, "skipped": skipped, "window": None}
    if ps:
        w = window_scores(np.concatenate(ps), np.concatenate(ys), thr)
        w["recall_ci95"] = wilson_interval(w["tp"], w["tp"] + w["fn"])
        w["specificity_ci95"] = wilson_interval(w["tn"], w["tn"] + w["fp"])
        out["window"] = w
    return out


@dataclass(frozen=True)
class CohortSpec:
    """A held-out simulated cohort: patient ids, hours in total, rate and channels."""

    patient_ids: tuple[int, ...]
    hours: float
    fs_hz: float = 256.0
    n_channels: int = 4
    seed: int = 1
    seizure_every_s: tuple[float, float] = (600.0, 1200.0)  # mostly background: FA/24 h needs it


def simulate_cohort(spec: CohortSpec, progress: Callable[[int, int, str], None] | None = None) -> list[Recording]:
    """Simulate ``spec.hours`` (split evenly over the patients) in simulated time: scheduled seizures every
    ``seizure_every_s`` plus each patient's spontaneous ones, no stimulation."""
    from models.seizure.dataset import SimSpec, simulate_patient

    if not spec.patient_ids:
        raise ValueError("simulate_cohort: patient_ids is empty, expected at least one cohort id")
    if not (spec.hours > 0):
        raise ValueError(f"simulate_cohort: hours={spec.hours!r} invalid, expected > 0")
    per_s = spec.hours * 3600.0 / len(spec.patient_ids)
    rng = np.random.default_rng([spec.seed, 0xE7A1])
    recs = []
    for k, pid in enumerate(spec.patient_ids):
        onsets, t = [], float(rng.uniform(10.0, 60.0))
        while t < per_s - 30.0:
            onsets.append(round(t, 2))
            t += float(rng.uniform(*spec.seizure_every_s))
        s = SimSpec(patient_index=int(pid), seed=int(rng.integers(1 << 31)), duration_s=per_s, fs_hz=spec.fs_hz,
                    n_channels=spec.n_channels, onsets_s=tuple(onsets))
        x, seizures = simulate_patient(s)
        recs.append(Recording(f"sim:patient{pid}", x, spec.fs_hz, seizures, [f"ch{i}" for i in range(spec.n_channels)],
                              [f"simulated cohort patient {pid}, seed {s.seed}, {per_s:.0f} s at {spec.fs_hz:g} Hz x "
                               f"{spec.n_channels} ch"]))
        if progress:
            progress(k + 1, len(spec.patient_ids), f"patient {pid}")
    return recs


def sweep(records: list[dict], min_durations_s=(0.0, 0.25, 0.5, 1.0, 2.0), thresholds=None,
          refractory_s: float = 5.0, rules: SzcoreRules = SZCORE) -> list[dict]:
    """Event metrics vs threshold and min_duration on already computed probabilities."""
    thresholds = np.round(np.arange(0.5, 1.0, 0.05), 2) if thresholds is None else thresholds
    annotated = [r for r in records if r["truth"] is not None]
    rows = []
    for md in min_durations_s:
        for thr in thresholds:
            pooled = pool_scores(
                score_events(r["truth"], detector_events(r["_t"], r["_p"], float(thr), float(md), refractory_s),
                             r["duration_s"], rules, r["not_evaluated"]) for r in annotated)
            rows.append({"threshold": float(thr), "min_duration_s": float(md),
                         **{k: pooled[k] for k in ("sensitivity", "false_alarms_per_24h", "median_latency_s")}})
    return rows


def permutation_importance(detector: OnnxDetector, recs: list[Recording], n_repeats: int = 3, seed: int = 0) -> list[dict]:
    """Per-feature permutation importance: drop in window AUROC when one feature column is shuffled."""
    from sklearn.metrics import roc_auc_score

    Fs, ys = [], []
    for rec in recs:
        if rec.seizures is None:
            continue
        t_end, F, valid = detector.features(rec.data_uv, rec.fs_hz)
        Fs.append(F[valid])
        ys.append(window_labels(t_end[valid], rec.seizures))
    if not Fs:
        raise EvaluationError("permutation importance needs at least one annotated recording")
    F, y = np.concatenate(Fs), np.concatenate(ys)
    if not (y.any() and (~(y > 0)).any()):
        raise EvaluationError("permutation importance needs ictal and non-ictal windows")
    base = roc_auc_score(y, detector.predictor.predict_batch(F))
    rng = np.random.default_rng(seed)
    rows = []
    for j, name in enumerate(detector.contract.feature_names):
        drops = []
        for _ in range(n_repeats):
            G = F.copy()
            G[:, j] = G[rng.permutation(G.shape[0]), j]
            drops.append(base - roc_auc_score(y, detector.predictor.predict_batch(G)))
        rows.append({"feature": name, "auroc_drop": float(np.mean(drops))})
    return sorted(rows, key=lambda r: -r["auroc_drop"])
