"""Scoring: detector events match the responsive policy; SzCORE rules; window metrics; intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from controller.policies.responsive import ResponsivePolicy
from drivers.params import StimParams
from models.seizure.scoring import (SZCORE, detector_events, merge_split, nan_runs, poisson_interval, score_events,
                                    wilson_interval, window_labels, window_scores)


def _policy_starts(t, p, thr, min_dur):
    pol = ResponsivePolicy(threshold_on=thr, threshold_off=0.8 * thr, min_duration_s=min_dur, refractory_s=0.0,
                           stim=StimParams(amplitude_ua=100.0, n_pulses=1), bursts_per_detection=1)
    starts = []
    for ti, pi in zip(t, p):
        _, events = pol.step(float(pi), float(ti))
        starts += [e.t for e in events if e.data.get("what") == "detection_start"]
    return starts


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_dur", [0.0, 0.5, 1.0])
def test_detector_events_start_where_the_policy_detects(seed, min_dur):
    rng = np.random.default_rng(seed)
    t = 1.0 + 0.25 * np.arange(4000)
    # smooth random probabilities with excursions, and a few NaN runs
    p = np.clip(np.convolve(rng.uniform(0, 1, t.size) ** 3, np.ones(6) / 6, mode="same") * 2.2, 0, 1)
    p[rng.integers(0, t.size, 20)] = np.nan
    ev = detector_events(t, p, 0.6, min_dur, refractory_s=0.0)
    assert len(ev) > 10
    assert [e[0] for e in ev] == pytest.approx(_policy_starts(t, p, 0.6, min_dur))
    for a, b, m in ev:
        assert b >= a and 0.6 <= m <= 1.0


def test_detector_events_min_duration_and_refractory():
    t = 0.25 * np.arange(1, 201)
    p = np.zeros(t.size)
    p[10:12] = 0.9            # 2 windows: 0.25 s above threshold, too short for 0.5 s
    p[40:50] = 0.9            # detection once 0.5 s held: at t[42]
    p[56:66] = 0.9            # starts 4 s after the previous start: folded in with refractory 5 s
    p[150:160] = 0.9          # far away: a new event
    ev = detector_events(t, p, 0.8, 0.5, refractory_s=5.0)
    assert [e[0] for e in ev] == [t[42], t[152]]
    assert ev[0][1] == t[66]  # the folded event lasts until the second run ended
    ev0 = detector_events(t, p, 0.8, 0.5, refractory_s=0.0)
    assert [e[0] for e in ev0] == [t[42], t[58], t[152]]
    with pytest.raises(ValueError, match="threshold=1.5"):
        detector_events(t, p, 1.5)
    with pytest.raises(ValueError, match="same length"):
        detector_events(t, p[:-1], 0.5)


def test_szcore_tolerances_merge_and_split():
    truth = [(1000.0, 1040.0)]
    # 25 s before onset counts (tolerance 30 s), 35 s before does not
    assert score_events(truth, [(975.0, 976.0)], 3600.0)["n_detected"] == 1
    s = score_events(truth, [(965.0, 966.0)], 3600.0)
    assert s["n_detected"] == 0 and s["false_alarms"] == 1
    # up to 60 s after offset counts
    assert score_events(truth, [(1099.0, 1100.0)], 3600.0)["false_alarms"] == 0
    assert score_events(truth, [(1101.0, 1102.0)], 3600.0)["false_alarms"] == 1
    # two false detections 50 s apart are merged into one false alarm; 24 h of data
    s = score_events(truth, [(1002.0, 1010.0), (3000.0, 3001.0), (3050.0, 3051.0)], 86400.0)
    assert s["n_detected"] == 1 and s["false_alarms"] == 1 and s["false_alarms_per_24h"] == pytest.approx(1.0)
    assert s["latency_s"] == [2.0] and s["precision"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert "30 s before onset" in s["rules"] and "90 s merged" in s["rules"]
    # a 700 s event is split into 300 + 300 + 100 s
    assert merge_split([(0.0, 700.0)], 90.0, 300.0) == [(0.0, 300.0), (300.0, 600.0), (600.0, 700.0)]
    # not-evaluated time does not count toward the false-alarm rate
    s = score_events([], [(10.0, 11.0)], 86400.0, not_evaluated=[[0.0, 43200.0]])
    assert s["false_alarms_per_24h"] == pytest.approx(2.0)


def test_szcore_without_annotations_is_null_not_zero():
    s = score_events(None, [(10.0, 11.0)], 100.0)
    assert s["sensitivity"] is None and s["false_alarms"] is None and s["false_alarms_per_24h"] is None
    assert "no seizure annotations" in s["note"] and s["n_detections"] == 1


def test_window_scores_and_labels():
    t = np.arange(1, 11, dtype=float)
    y = window_labels(t, [(3.0, 5.0)])
    assert y.tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
    p = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7, 0.1, np.nan, 0.0, 0.1])
    s = window_scores(p, y, 0.5)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (2, 1, 1, 5)
    assert s["n_windows"] == 9 and s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert 0.5 < s["auroc"] <= 1.0
    assert nan_runs(t, p, 0.25) == [[7.75, 8.0]]


def test_intervals():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(95, 100)
    assert lo == pytest.approx(0.888, abs=2e-3) and hi == pytest.approx(0.9785, abs=2e-3)
    assert wilson_interval(1, 0) is None
    lo, hi = poisson_interval(0, 2.0)
    assert lo == 0.0 and hi == pytest.approx(3.689 / 2, rel=1e-3)
    assert math.isclose(SZCORE.tol_before_s, 30.0) and SZCORE.min_gap_s == 90.0
