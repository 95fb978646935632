"""The shipped model at any source rate, and the default closed-loop demo from the start of a session."""
from __future__ import annotations

import pytest

from models.seizure.evaluate import OnnxDetector, default_model_path
from models.seizure.scoring import detector_events, score_events

MODEL = default_model_path()


def test_shipped_model_is_present():
    # Tracked in git: a missing file is a failure, never a reason to skip the rate tests.
    assert MODEL.is_file(), f"shipped seizure model {MODEL} is missing (it is tracked in git: restore it)"


@pytest.mark.parametrize("fs_hz,n_channels,patient", [(100.0, 4, 103), (173.61, 4, 104), (200.0, 4, 105),
                                                      (256.0, 4, 106), (512.0, 4, 107)])
def test_shipped_model_detects_held_out_seizures_at_any_rate(fs_hz, n_channels, patient):
    """Held-out cohort patients (ids >= 100, never trained on) simulated at the source rate; the stage resamples."""
    from models.seizure.dataset import SimSpec, simulate_patient

    spec = SimSpec(patient_index=patient, seed=patient, duration_s=260.0, fs_hz=fs_hz, n_channels=n_channels,
                   onsets_s=(25.0, 150.0), spontaneous=False)
    x, seizures = simulate_patient(spec)
    det = OnnxDetector(MODEL)
    t, p = det.predict(x, fs_hz)
    assert t.size == pytest.approx((260.0 - 1.0) / 0.25 + 1, abs=2)  # windows on the model's hop, whatever the rate
    ev = detector_events(t, p, det.threshold, det.min_duration_s, det.refractory_s)
    s = score_events(seizures, ev, 260.0)
    assert s["n_detected"] == 2 and s["false_alarms"] == 0, (s, ev)
    # Acted on within seconds of onset, not just within SzCORE's tolerance (at the contract's operating
    # point; patient 107's detection waits for the spike-wave phase). With one channel far from the focus
    # it is later still or missed — MODEL_CARD.md.
    assert max(s["latency_s"]) <= 8.0


@pytest.mark.parametrize("seed,patient", [(0, 0), (1, 101), (2, 115)])
def test_default_demo_detects_3_of_3_from_the_start(tmp_path, seed, patient):
    """``stimloop sim --duration 60`` (seizures at 10, 30, 50 s; closed loop with stimulation) on a held-out
    patient too: every seizure detected, no false detection — including the one 10 s after start."""
    from controller.config import load_config
    from controller.runners.simulated import run_simulated

    cfg = load_config(None, {"session": {"duration_s": 60.0, "seed": seed, "out_dir": str(tmp_path)},
                             "simulator": {"patient": patient}})
    session = run_simulated(cfg, session_dir=tmp_path / "s", write_report=False)
    from controller.metrics import compute_metrics

    det = compute_metrics(session)["detection"]
    assert det["onsets"] == 3 and det["detected"] == 3 and det["false_detections"] == 0, det
    # Latency is a per-patient matter (montage, onset pattern): the ≤ 3 s target is the held-out cohort's
    # median (2.3 s, MODEL_CARD.md); its 90th percentile is 6.8 s at the shipped min_duration_s 1.5 s.
    assert det["latency_s_median"] <= 8.0
