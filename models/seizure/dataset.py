"""Seizure training data: simulated patients -> causal windows -> sz_v1 features -> labels.

Features go through ``controller.inference.SeizureDetectorStage`` — the very
object the controller runs per chunk — fed in small chunks, so training sees
exactly what the closed loop will see (causal prefilter, resampling, running
baseline and all).

Labels per window (``label_windows``): 1 if the window's end lies inside a
seizure, 0 if it lies in background, -1 (dropped from training and scoring)
in the ambiguous edges: the first ``onset_guard_s`` after onset (the window is
still mostly background), and from ``offset_guard_s`` before offset to
``postictal_s`` after it (seizure end is gradual in the model and the window
still holds ictal samples). Windows in the pipeline's warm-up (the first
``contract.warmup_s``, while the running baseline settles) are -1 too: the
controller must not act on them either.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from controller.inference import ModelContract, SeizureDetectorStage

__all__ = ["SimSpec", "label_windows", "features_for_recording", "cohort_params", "simulate_patient", "default_specs",
           "build_dataset"]


@dataclass(frozen=True)
class SimSpec:
    """One simulated recording: which cohort patient, how long, where seizures go."""

    patient_index: int
    seed: int
    duration_s: float
    fs_hz: float
    n_channels: int
    onsets_s: tuple[float, ...]


def label_windows(t_end_s: np.ndarray, seizures: list[tuple[float, float]], onset_guard_s: float = 0.5,
                  offset_guard_s: float = 1.0, postictal_s: float = 3.0, warmup_s: float = 0.0) -> np.ndarray:
    """Label window end times: 1 ictal, 0 background, -1 ambiguous or in warm-up (see module docstring)."""
    t = np.asarray(t_end_s, dtype=np.float64)
    y = np.zeros(t.shape, dtype=np.int8)
    for onset, offset in seizures:
        if not offset > onset:
            raise ValueError(f"seizure offset must be after onset, got ({onset}, {offset})")
        y[(t >= onset) & (t <= offset)] = 1
    for onset, offset in seizures:
        y[(t >= onset) & (t < onset + onset_guard_s)] = -1
        y[(t > offset - offset_guard_s) & (t <= offset + postictal_s)] = -1
    y[t < warmup_s] = -1
    return y


def features_for_recording(x_uv: np.ndarray, fs_hz: float, contract: ModelContract,
                           chunk_n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Run a recording (n, ch) through a fresh ``SeizureDetectorStage`` in ``chunk_n`` chunks.

    Returns ``(features (w, n_features) float32, window_end_t (w,) s from the first sample)``.
    """
    x = np.asarray(x_uv, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    stage = SeizureDetectorStage(contract, fs_hz, x.shape[1])
    t = np.arange(x.shape[0]) / fs_hz
    feats, ends = [], []
    for i in range(0, x.shape[0], chunk_n):
        for t_end, f in stage.step(x[i:i + chunk_n], t[i:i + chunk_n]):
            ends.append(t_end)
            feats.append(f)
    return np.asarray(feats, dtype=np.float32).reshape(-1, contract.n_features), np.asarray(ends)


def _seizure_intervals(patient, end_s: float) -> list[tuple[float, float]]:
    """Scheduled and spontaneous seizures; one still running at the end is cut there."""
    out = []
    for s in patient.ground_truth.seizures:
        onset, offset = (s.onset_s, s.offset_s) if hasattr(s, "onset_s") else (s[0], s[1])
        if onset < end_s:
            out.append((float(onset), float(end_s if offset is None else offset)))
    return out


def cohort_params(i: int):
    """Patient ``i`` of the simulated cohort: ``hil_sim.cohort.patient_params(i)`` when that
    module exists, else a documented local variation of ``PatientParams`` (anatomy,
    amplitude, source geometry, noise levels drawn from ``i``)."""
    try:
        from hil_sim.cohort import patient_params
    except ImportError:
        patient_params = None
    if patient_params is not None:
        return patient_params(i)
    from hil_sim.patient import PatientParams

    rng = np.random.default_rng([i, 0xC0407])
    focus = float(rng.uniform(0.1, 0.9))
    others = tuple(float(v) for v in rng.uniform(0.0, 1.0, 2))
    return PatientParams(source_positions=(focus,) + others, anatomy_seed=i,
                         spatial_spread=float(rng.uniform(0.1, 0.3)),
                         gain_uv_per_mv=float(rng.uniform(50.0, 200.0)),
                         pink_noise_uv=float(rng.uniform(5.0, 25.0)),
                         line_noise_uv=float(rng.uniform(0.0, 10.0)),
                         neighbour_involvement=float(rng.uniform(0.1, 0.5)),
                         interictal_spike_rate_per_min=float(rng.uniform(0.0, 10.0)))


def simulate_patient(spec: SimSpec, block_s: float = 1.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Simulate one recording with ``hil_sim`` (no stimulation); returns (x (n, ch) µV, seizures)."""
    from hil_sim.patient import SimulatedPatient

    patient = SimulatedPatient(fs_hz=spec.fs_hz, n_channels=spec.n_channels, seed=spec.seed,
                               params=cohort_params(spec.patient_index))
    for onset in spec.onsets_s:
        patient.schedule_seizure(onset)
    n_total = int(round(spec.duration_s * spec.fs_hz))
    block = max(1, int(round(block_s * spec.fs_hz)))
    x = np.empty((n_total, spec.n_channels), dtype=np.float32)
    for i in range(0, n_total, block):
        m = min(block, n_total - i)
        x[i:i + m] = patient.step(m)
    return x, _seizure_intervals(patient, spec.duration_s)


def default_specs(n_patients: int, duration_s: float, seed: int = 0, fs_choices=(256.0, 512.0, 200.0),
                  channel_choices=(1, 4, 16)) -> list[SimSpec]:
    """A cohort of recordings: varied rates and channel counts, seizures every ~60–90 s after a 40 s warm-up."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n_patients):
        onsets, t = [], 40.0 + rng.uniform(0, 20)
        while t < duration_s - 30:
            onsets.append(round(float(t), 2))
            t += rng.uniform(60, 90)
        specs.append(SimSpec(patient_index=i, seed=int(rng.integers(1 << 31)), duration_s=duration_s,
                             fs_hz=float(fs_choices[i % len(fs_choices)]),
                             n_channels=int(channel_choices[i % len(channel_choices)]), onsets_s=tuple(onsets)))
    return specs


def build_dataset(specs: list[SimSpec], contract: ModelContract, progress: bool = True) -> dict[str, np.ndarray]:
    """Simulate every spec and featurize it. Returns X, y (1/0/-1), groups (patient index), t_end, recording (index into specs) and
    seizures (per recording, list of (onset_s, offset_s))."""
    X, y, groups, t_end, rec, all_sz = [], [], [], [], [], []
    for k, spec in enumerate(specs):
        x, seizures = simulate_patient(spec)
        f, ends = features_for_recording(x, spec.fs_hz, contract)
        lab = label_windows(ends, seizures, warmup_s=contract.warmup_s)
        X.append(f)
        y.append(lab)
        groups.append(np.full(len(lab), spec.patient_index, dtype=np.int32))
        t_end.append(ends)
        rec.append(np.full(len(lab), k, dtype=np.int32))
        all_sz.append(seizures)
        if progress:
            print(f"  patient {spec.patient_index}: {spec.duration_s:.0f} s at {spec.fs_hz:g} Hz x {spec.n_channels} ch, "
                  f"{len(seizures)} seizures, {len(lab)} windows ({int((lab == 1).sum())} ictal)",
                  file=sys.stderr, flush=True)
    return {"X": np.concatenate(X), "y": np.concatenate(y), "groups": np.concatenate(groups),
            "t_end": np.concatenate(t_end), "recording": np.concatenate(rec), "seizures": all_sz}
