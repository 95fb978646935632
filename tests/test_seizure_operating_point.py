"""Operating-point choice on out-of-fold detector events: background false alarms and the joint grid rule."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models.seizure.train import HOP_S, choose_operating_point, oof_event_metrics

DUR_S = 600.0
SEIZURE = (100.0, 120.0)


def _recording(blip_s: float, blip_len_s: float, blip_p: float = 0.7):
    """One recording on the model's hop: p ramps 0.5 -> 1 over a seizure's first 4 s; one background blip."""
    t = np.arange(1.0, DUR_S + 1e-9, HOP_S)
    p = np.full(t.size, 0.05)
    on, off = SEIZURE
    ictal = (t >= on) & (t <= off)
    p[ictal] = np.minimum(1.0, 0.5 + 0.125 * (t[ictal] - on))
    p[(t >= blip_s) & (t < blip_s + blip_len_s)] = blip_p
    return p, t, np.zeros(t.size, dtype=np.int64), [[SEIZURE]], [DUR_S]


def test_background_false_alarm_is_counted_where_szcore_merging_hides_it():
    # A blip at 200 s: outside [onset - 30, offset + 60] = [70, 180], but within 90 s of the true detection,
    # so SzCORE merges it into the seizure's event and reports no false alarm.
    p, t, rec, sz, dur = _recording(200.0, 2.0)
    m = oof_event_metrics(p, t, rec, sz, dur, threshold=0.6, min_duration_s=0.5)
    assert m["n_detected"] == 1 and m["false_alarms"] == 0
    assert m["background_false_alarms"] == 1
    # background = evaluated windows outside the tolerance window, on the hop grid
    n_bg = np.count_nonzero((t < 70.0) | (t > 180.0))
    assert m["background_h"] == pytest.approx(n_bg * HOP_S / 3600)
    assert m["background_false_alarms_per_24h"] == pytest.approx(24 / m["background_h"])
    assert m["background_false_alarms_per_24h_ci95"][0] > 0
    # above the blip's level it is gone; a blip inside the tolerance window never counts
    assert oof_event_metrics(p, t, rec, sz, dur, 0.8, 0.5)["background_false_alarms"] == 0
    p2, *_ = _recording(150.0, 2.0)
    assert oof_event_metrics(p2, t, rec, sz, dur, 0.6, 0.5)["background_false_alarms"] == 0


def test_blip_inside_stimulation_refractory_is_not_acted_upon():
    p, t, rec, sz, dur = _recording(300.0, 2.0)
    assert oof_event_metrics(p, t, rec, sz, dur, 0.6, 0.5)["background_false_alarms"] == 1
    m = oof_event_metrics(p, t, rec, sz, dur, 0.6, 0.5, refractory_s=5.0, stim_times=[[299.0]])
    assert m["background_false_alarms"] == 0


def test_joint_choice_prefers_zero_background_fa_then_latency():
    # Blip at p 0.7 for 0.6 s: a 0.75 s min_duration or a threshold above 0.7 suppresses it.
    p, t, rec, sz, dur = _recording(300.0, 0.6)
    kw = dict(thresholds=[0.6, 0.7, 0.8], min_durations_s=[0.25, 0.75], max_bg_fa_per_24h=0.0, max_latency_s=3.0)
    chosen, rule, grid = choose_operating_point(p, t, rec, sz, dur, **kw)
    assert len(grid) == 6 and json.dumps(grid)  # recorded whole, JSON-ready
    by = {(g["threshold"], g["min_duration_s"]): g for g in grid}
    assert not by[(0.6, 0.25)]["admissible"] and by[(0.6, 0.25)]["background_false_alarms"] == 1
    assert not by[(0.7, 0.25)]["admissible"]
    assert not by[(0.8, 0.75)]["latency_ok"]  # crosses 0.8 at 2.4 s, + 0.75 s > 3 s
    # all admissible points detect the seizure; the earliest is 0.6 held for 0.75 s (~1.55 s after onset)
    assert (chosen["threshold"], chosen["min_duration_s"]) == (0.6, 0.75)
    assert chosen["median_latency_s"] == pytest.approx(1.55, abs=0.26)
    assert "admissible" in rule and not rule.startswith("NO")

    # the window condition (the Delhi targets) removes a threshold
    chosen, rule, _ = choose_operating_point(p, t, rec, sz, dur, window_ok=lambda thr: thr >= 0.7, **kw)
    assert (chosen["threshold"], chosen["min_duration_s"]) == (0.7, 0.75)
    assert "Delhi" in rule

    # nothing admissible: said so, and the fallback still has no background false alarm
    chosen, rule, grid = choose_operating_point(p, t, rec, sz, dur, window_ok=lambda thr: False, **kw)
    assert rule.startswith("NO admissible") and not any(g["admissible"] for g in grid)
    assert chosen["background_false_alarms"] == 0


@pytest.mark.parametrize("kw,name", [({"thresholds": [0.5, 1.5]}, "thresholds"), ({"min_durations_s": []}, "min_durations_s"),
                                     ({"max_bg_fa_per_24h": -1.0}, "max_bg_fa_per_24h")])
def test_choose_operating_point_bad_input(kw, name):
    p, t, rec, sz, dur = _recording(300.0, 0.6)
    with pytest.raises(ValueError, match=name):
        choose_operating_point(p, t, rec, sz, dur, **kw)


def test_attach_heldout_refuses_another_models_run(tmp_path):
    """A card never pairs one model's CV figures with another model's held-out run."""
    from pathlib import Path

    from models.seizure.model_card import attach_heldout

    shipped = Path(__file__).resolve().parent.parent / "models" / "seizure" / "seizure_v1.onnx"
    metrics = tmp_path / "m.metrics.json"
    metrics.write_text(json.dumps({"sha256": "0" * 64}))
    run = tmp_path / "heldout.json"
    run.write_text(json.dumps({"model": str(shipped), "summary": {"hours": 1.0}}))
    with pytest.raises(ValueError, match="sha256"):
        attach_heldout(metrics, run, "stimloop evaluate ...")


def test_seizure_with_a_response_burst_is_not_scored():
    """The schedule's post-onset burst must not decide which min_duration_s detects the seizure."""
    p, t, rec, sz, dur = _recording(300.0, 0.6)
    sz2 = [[SEIZURE, (400.0, 420.0)]]
    p[(t >= 400.0) & (t <= 420.0)] = 0.95
    m = oof_event_metrics(p, t, rec, sz2, dur, 0.6, 1.5, refractory_s=5.0, stim_times=[[401.0]])
    assert m["n_seizures"] == 1 and m["n_stimulated_not_scored"] == 1 and m["n_detected"] == 1
    assert m["false_alarms"] == 0 and m["background_false_alarms"] == 0
    # its tolerance window is not evaluated time either
    assert m["evaluated_h"] < oof_event_metrics(p, t, rec, sz2, dur, 0.6, 1.5)["evaluated_h"] - 100 / 3600


def test_attach_heldout_keeps_the_runs_note_on_the_card(tmp_path):
    """A re-run says on the card when and where it ran and what changed (the held-out figures' provenance)."""
    from pathlib import Path

    from models.seizure.model_card import attach_heldout, render_model_card

    here = Path(__file__).resolve().parent.parent / "models" / "seizure"
    metrics = tmp_path / "m.metrics.json"
    metrics.write_text((here / "seizure_v1.metrics.json").read_text())
    run = tmp_path / "heldout.json"
    shipped = json.loads(metrics.read_text())["heldout_simulated"]["summary"]
    run.write_text(json.dumps({"model": str(here / "seizure_v1.onnx"), "summary": shipped}))
    m = attach_heldout(metrics, run, "stimloop evaluate --sim-patients 1-2", note="Re-run on a test machine.")
    card = render_model_card(m)
    assert "    stimloop evaluate --sim-patients 1-2\n\nRe-run on a test machine." in card
    assert json.loads(metrics.read_text())["heldout_simulated"]["note"] == "Re-run on a test machine."


def test_shipped_card_is_rendered_from_the_shipped_metrics():
    """MODEL_CARD.md is generated (models/seizure/model_card.py): a hand edit or a stale card fails here."""
    from pathlib import Path

    from models.seizure.model_card import render_model_card

    here = Path(__file__).resolve().parent.parent / "models" / "seizure"
    metrics = json.loads((here / "seizure_v1.metrics.json").read_text())
    assert (here / "MODEL_CARD.md").read_text() == render_model_card(metrics)
