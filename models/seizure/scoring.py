"""Scoring of seizure detectors: detector events the way the loop acts, SzCORE event scoring, window metrics.

Functional core (no I/O, no clock). Three layers:

* ``detector_events``: window probabilities -> detection events, mirroring
  ``controller.policies.responsive.ResponsivePolicy`` (a detection starts once
  ``p >= threshold`` has held for ``min_duration_s``, ends when ``p <
  threshold_off``; a start within ``refractory_s`` of the previous start is
  folded into it, since it could not trigger new stimulation). A NaN ``p``
  (window not evaluated) cancels the onset timer, like the policy does.
* ``score_events``: SzCORE / timescoring rules (REFERENCE.md §3): reference
  and hypothesis events closer than 90 s are merged, events longer than 300 s
  are split, a reference seizure counts as detected when a hypothesis event
  overlaps ``[onset - 30 s, offset + 60 s]``, a hypothesis event overlapping
  no such extended seizure is a false alarm. Sensitivity, precision, F1, false
  alarms per 24 h of *evaluated* time, detection latency.
* ``window_scores``: precision, recall, F1, AUROC over windows.

``wilson_interval`` gives binomial confidence intervals for the model card.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SzcoreRules", "SZCORE", "detector_events", "merge_split", "score_events", "pool_scores", "window_scores",
           "wilson_interval", "poisson_interval", "window_labels", "nan_runs"]


@dataclass(frozen=True)
class SzcoreRules:
    """Event-scoring parameters; defaults are the SzCORE / timescoring ones (REFERENCE.md §3)."""

    tol_before_s: float = 30.0
    tol_after_s: float = 60.0
    max_event_s: float = 300.0
    min_gap_s: float = 90.0

    def describe(self) -> str:
        """One line stating the rules, to print next to every event-level figure."""
        return (f"SzCORE event scoring (REFERENCE.md §3): a detection from {self.tol_before_s:g} s before onset to "
                f"{self.tol_after_s:g} s after offset counts; events > {self.max_event_s:g} s split; events closer "
                f"than {self.min_gap_s:g} s merged; false alarms per 24 h of evaluated (non-NaN) time")


SZCORE = SzcoreRules()


def _check_times(t_s: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t_s, dtype=np.float64).reshape(-1)
    q = np.asarray(p, dtype=np.float64).reshape(-1)
    if t.shape != q.shape:
        raise ValueError(f"window times and probabilities must have the same length, got {t.size} and {q.size}")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("window end times must be strictly increasing")
    return t, q


def detector_events(t_s, p, threshold: float, min_duration_s: float = 0.5, refractory_s: float = 0.0,
                    threshold_off: float | None = None) -> list[tuple[float, float, float]]:
    """Detection events ``[(start_s, end_s, max_p)]`` from window end times ``t_s`` and outputs ``p``.

    ``start_s`` is the window end at which the detection was declared (the
    moment the loop would act), ``end_s`` the window end where ``p`` fell below
    ``threshold_off`` (default ``0.8 * threshold``, as ``SeizureLoop``) or the
    last window. Offline evaluation only: a loop over runs, not samples.
    """
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r} invalid, expected a probability in [0, 1]")
    if not (min_duration_s >= 0 and refractory_s >= 0):
        raise ValueError(f"min_duration_s={min_duration_s!r} and refractory_s={refractory_s!r} must be >= 0 s")
    thr_off = 0.8 * threshold if threshold_off is None else float(threshold_off)
    if thr_off > threshold:
        raise ValueError(f"threshold_off={thr_off} invalid, expected <= threshold={threshold}")
    t, q = _check_times(t_s, p)
    if t.size == 0:
        return []
    finite = np.isfinite(q)
    above = finite & (q >= threshold)
    # As in the policy, NaN restarts the onset timer but does not end a running detection.
    below_off = finite & (q < thr_off)
    # Start of each run of `above`; the onset timer restarts at every run start.
    run_start = np.flatnonzero(above & ~np.r_[False, above[:-1]])
    run_end = np.flatnonzero(above & ~np.r_[above[1:], False])  # inclusive
    events: list[tuple[float, float, float]] = []
    busy_until = -1  # index: no new detection while a detection is still on (hysteresis)
    next_off = np.flatnonzero(below_off)
    for a, b in zip(run_start, run_end):
        if a <= busy_until:
            continue
        # first window in the run at which the above-threshold time reached min_duration_s
        k = a + int(np.searchsorted(t[a:b + 1] - t[a], min_duration_s - 1e-9))
        if k > b:
            continue
        j = int(np.searchsorted(next_off, k))
        end_i = int(next_off[j]) if j < next_off.size else t.size - 1
        seg = q[k:end_i + 1]
        max_p = float(np.nanmax(seg)) if np.isfinite(seg).any() else float(q[k])
        if events and t[k] - events[-1][0] < refractory_s:
            s0, _, m0 = events[-1]
            events[-1] = (s0, float(t[end_i]), max(m0, max_p))
        else:
            events.append((float(t[k]), float(t[end_i]), max_p))
        busy_until = end_i
    return events


def merge_split(events, min_gap_s: float, max_event_s: float) -> list[tuple[float, float]]:
    """Merge events closer than ``min_gap_s``, then split those longer than ``max_event_s`` (SzCORE)."""
    ev = sorted((float(a), float(b)) for a, b in ((e[0], e[1]) for e in events))
    merged: list[list[float]] = []
    for a, b in ev:
        if b < a:
            raise ValueError(f"event ({a}, {b}) ends before it starts")
        if merged and a - merged[-1][1] < min_gap_s:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out = []
    for a, b in merged:
        while b - a > max_event_s:
            out.append((a, a + max_event_s))
            a += max_event_s
        out.append((a, b))
    return out


def _evaluated_s(duration_s: float, not_evaluated) -> float:
    lost = sum(max(0.0, b - a) for a, b in (not_evaluated or []))
    return max(0.0, duration_s - lost)


def score_events(truth, detections, duration_s: float, rules: SzcoreRules = SZCORE,
                 not_evaluated=None) -> dict:
    """SzCORE event scoring of ``detections`` against ``truth`` (lists of (onset_s, offset_s[, ...])).

    ``truth=None`` means the recording has no annotations: metrics that need
    them are None and ``note`` says so. ``duration_s`` minus the
    ``not_evaluated`` stretches is the time false alarms are counted over.
    Latency = first overlapping detection start - onset (negative: before onset).
    """
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s={duration_s!r} invalid, expected a finite number >= 0 s")
    hyp = merge_split(detections, rules.min_gap_s, rules.max_event_s)
    eval_s = _evaluated_s(duration_s, not_evaluated)
    out = {"rules": rules.describe(), "n_detections": len(hyp), "evaluated_h": eval_s / 3600.0}
    if truth is None:
        out.update(n_seizures=None, n_detected=None, sensitivity=None, precision=None, f1=None,
                   false_alarms=None, false_alarms_per_24h=None, latency_s=[], median_latency_s=None,
                   note="no seizure annotations: sensitivity, precision, F1, false alarms and latency need them")
        return out
    ref = merge_split(truth, rules.min_gap_s, rules.max_event_s)
    ext = [(a - rules.tol_before_s, b + rules.tol_after_s) for a, b in ref]
    # Detection starts (not the merged events) give latency: that is when the loop acted.
    starts = np.array(sorted(float(d[0]) for d in detections)) if len(detections) else np.zeros(0)
    detected, latencies = 0, []
    for (a, b), (ea, eb) in zip(ref, ext):
        if any(ha <= eb and hb >= ea for ha, hb in hyp):
            detected += 1
            s = starts[(starts >= ea) & (starts <= eb)]
            if s.size:
                latencies.append(float(s[0] - a))
    fp = sum(1 for ha, hb in hyp if not any(ha <= eb and hb >= ea for ea, eb in ext))
    n_ref, n_hyp = len(ref), len(hyp)
    sens = detected / n_ref if n_ref else None
    prec = (n_hyp - fp) / n_hyp if n_hyp else None
    f1 = (2 * sens * prec / (sens + prec) if (sens is not None and prec is not None and sens + prec > 0) else
          (0.0 if sens is not None and prec is not None else None))
    out.update(n_seizures=n_ref, n_detected=detected, sensitivity=sens, precision=prec, f1=f1, false_alarms=fp,
               false_alarms_per_24h=(fp / (eval_s / 86400.0)) if eval_s > 0 else None, latency_s=latencies,
               median_latency_s=float(np.median(latencies)) if latencies else None)
    return out


def pool_scores(scores) -> dict:
    """Pool :func:`score_events` results of several recordings into one set of event figures.

    Counts add up; latencies are concatenated. Returns ``n_seizures``, ``n_detected``,
    ``sensitivity``, ``n_detections``, ``false_alarms``, ``evaluated_h``,
    ``false_alarms_per_24h``, ``median_latency_s``, ``latency_s_p90`` and ``latency_s`` (the list).
    """
    scores = list(scores)
    n_sz = sum(s["n_seizures"] for s in scores)
    n_det = sum(s["n_detected"] for s in scores)
    fa = sum(s["false_alarms"] for s in scores)
    eval_h = float(sum(s["evaluated_h"] for s in scores))
    lat = [v for s in scores for v in s["latency_s"]]
    return {"n_seizures": n_sz, "n_detected": n_det, "sensitivity": n_det / n_sz if n_sz else None,
            "n_detections": sum(s["n_detections"] for s in scores), "false_alarms": fa, "evaluated_h": eval_h,
            "false_alarms_per_24h": fa / (eval_h / 24.0) if eval_h > 0 else None,
            "median_latency_s": float(np.median(lat)) if lat else None,
            "latency_s_p90": float(np.percentile(lat, 90)) if lat else None, "latency_s": lat}


def window_labels(t_s, truth) -> np.ndarray:
    """1.0 where a window end lies inside a seizure, 0.0 elsewhere (``truth``: list of (onset_s, offset_s))."""
    t = np.asarray(t_s, dtype=np.float64)
    y = np.zeros(t.shape, dtype=np.float64)
    for ev in truth:
        y[(t >= ev[0]) & (t <= ev[1])] = 1.0
    return y


def window_scores(p, y, threshold: float) -> dict:
    """Window-level precision, recall (sensitivity), specificity, F1 and AUROC; NaN windows are left out."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"probabilities and labels must have the same length, got {p.size} and {y.size}")
    m = np.isfinite(p) & np.isfinite(y)
    p, yb = p[m], y[m] > 0.5
    hit = p >= threshold
    tp, fp = int(np.sum(hit & yb)), int(np.sum(hit & ~yb))
    fn, tn = int(np.sum(~hit & yb)), int(np.sum(~hit & ~yb))
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    f1 = 2 * prec * rec / (prec + rec) if (prec is not None and rec is not None and prec + rec > 0) else None
    auroc = None
    if yb.any() and (~yb).any():
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(yb, p))
    return {"n_windows": int(m.sum()), "n_ictal": int(yb.sum()), "threshold": float(threshold), "precision": prec,
            "recall": rec, "specificity": spec, "f1": f1, "auroc": auroc, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval for a proportion k/n (95 % by default); None when n = 0."""
    if n <= 0:
        return None
    ph = k / n
    den = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / den
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def poisson_interval(k: int, exposure: float, conf: float = 0.95) -> tuple[float, float] | None:
    """Exact (Garwood) interval for a rate of ``k`` events over ``exposure`` units; None when exposure <= 0."""
    if exposure <= 0:
        return None
    from scipy.stats import chi2

    a = 1 - conf
    lo = 0.0 if k == 0 else chi2.ppf(a / 2, 2 * k) / 2
    hi = chi2.ppf(1 - a / 2, 2 * k + 2) / 2
    return (float(lo / exposure), float(hi / exposure))


def nan_runs(t_s, p, hop_s: float) -> list[list[float]]:
    """``[[start_s, end_s], ...]`` stretches whose windows were not evaluated (p is NaN)."""
    t, q = _check_times(t_s, p)
    bad = ~np.isfinite(q)
    if not bad.any():
        return []
    starts = np.flatnonzero(bad & ~np.r_[False, bad[:-1]])
    ends = np.flatnonzero(bad & ~np.r_[bad[1:], False])
    return [[float(t[a] - hop_s), float(t[b])] for a, b in zip(starts, ends)]
