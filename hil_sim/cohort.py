"""A cohort of simulated patients: ``patient_params(patient_id)``.

Each patient's parameters are drawn from the distributions below with a
generator seeded by the id only, so patient 7 is the same patient on every
machine and in every run; train detectors on ids 0..N and test on others.
The distributions are choices made for this simulator (not fitted to data):

| field | distribution |
|---|---|
| n_sources | 3 or 4, equally likely |
| focus position | U(0.1, 0.9) along the electrode line; other sources U(0, 1) |
| spatial_spread | U(0.08, 0.25) |
| gain_uv_per_mv | lognormal, median 140, σ_log 0.25; gain_cv U(0.1, 0.3) |
| onset B, G | U(3, 7), U(22, 30) → low-voltage fast onset ~13–20 Hz (REFERENCE.md §6 B=5, G=25) |
| ictal B | U(22, 28) (§6 B=25: spike-wave 3–6 Hz) |
| onset_duration_s | U(2, 5) |
| seizure_rate_per_hour | lognormal, median 1.5, σ_log 0.6, clipped to [0.2, 10] |
| seizure_duration_s | min U(8, 20), max = min + U(5, 40) |
| min_interval_s | max(120, 2 × max duration) |
| interictal_spike_rate_per_min | lognormal, median 3, σ_log 0.7, clipped to [0, 30] |
| pink / sensor / line noise (µV) | U(6, 14) / U(0.5, 2) / U(0.5, 5); mains 50 or 60 Hz |
| stim_sensitivity | lognormal, median 1, σ_log 0.5 |
| stim_timing_scale_s | U(5, 20) |
| stim sites | focus + (0, 0.05, −0.05, 0.1), clipped to [0, 1] |
"""
from __future__ import annotations

import numpy as np

from hil_sim.patient import PatientParams

__all__ = ["patient_params"]

_COHORT_KEY = 0xC0407  # separates cohort draws from any other use of the same integer as a seed


def patient_params(patient_id: int) -> PatientParams:
    """Parameters of cohort patient ``patient_id`` (deterministic in the id)."""
    if not isinstance(patient_id, (int, np.integer)) or isinstance(patient_id, bool) or patient_id < 0:
        raise ValueError(f"patient_params patient_id={patient_id!r}: expected an int >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(patient_id), _COHORT_KEY]))
    n_sources = int(rng.choice([3, 4]))
    focus = float(rng.uniform(0.1, 0.9))
    others = tuple(float(x) for x in np.sort(rng.uniform(0.0, 1.0, n_sources - 1)))
    onset_duration = float(rng.uniform(2.0, 5.0))
    d_min = float(rng.uniform(8.0, 20.0))
    d_max = d_min + float(rng.uniform(5.0, 40.0))
    rate = float(np.clip(1.5 * rng.lognormal(0.0, 0.6), 0.2, 10.0))
    sites = tuple(float(np.clip(focus + d, 0.0, 1.0)) for d in (0.0, 0.05, -0.05, 0.1))
    return PatientParams(
        n_sources=n_sources,
        source_positions=(focus, *others),
        spatial_spread=float(rng.uniform(0.08, 0.25)),
        gain_uv_per_mv=float(140.0 * rng.lognormal(0.0, 0.25)),
        gain_cv=float(rng.uniform(0.1, 0.3)),
        anatomy_seed=int(patient_id),
        onset_b=float(rng.uniform(3.0, 7.0)),
        onset_g=float(rng.uniform(22.0, 30.0)),
        ictal_b=float(rng.uniform(22.0, 28.0)),
        onset_duration_s=onset_duration,
        seizure_rate_per_hour=rate,
        min_interval_s=max(120.0, 2.0 * d_max),
        seizure_duration_s=(d_min, d_max),
        interictal_spike_rate_per_min=float(np.clip(3.0 * rng.lognormal(0.0, 0.7), 0.0, 30.0)),
        pink_noise_uv=float(rng.uniform(6.0, 14.0)),
        sensor_noise_uv=float(rng.uniform(0.5, 2.0)),
        line_freq_hz=float(rng.choice([50.0, 60.0])),
        line_noise_uv=float(rng.uniform(0.5, 5.0)),
        stim_sensitivity=float(rng.lognormal(0.0, 0.5)),
        stim_timing_scale_s=float(rng.uniform(5.0, 20.0)),
        stim_site_positions=sites,
    )
