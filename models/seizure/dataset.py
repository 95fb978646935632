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
still holds ictal samples). ``label_windows(warmup_s=...)`` can also mark the
pipeline's warm-up -1, but the dataset builders keep those windows: ``sz_v2``
carries ``warmup_frac`` and absolute amplitudes so the model learns what an
unsettled baseline looks like (the Delhi segments, 5.12 s each, are warm-up
throughout). The controller does not act on them all the same
(``SeizureDetectorStage.is_warm``), nor does ``stimloop evaluate`` score them
(``evaluate.OnnxDetector``). The shipped operating point, however, was chosen
with them *scored*: ``train.train_model`` passes ``warmup_s=0.0`` to
``choose_operating_point``, so an out-of-fold detection in a recording's first
seconds counted although the loop could not have made it. Measured on the
shipped training's out-of-fold predictions (2026-12-07, MODEL_CARD.md "Audits"),
masking them (8 s, or the loop's 8.75 s) leaves the chosen point, 0.82 / 1.5 s,
and its figures as they are (182/189, median latency 5.29 s, 0 background false
alarms); it removes one or two background false alarms at 19 grid points with
threshold <= 0.78 and min_duration_s <= 0.5 s, each still >= 10 and inadmissible.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from controller.inference import ModelContract, SeizureDetectorStage

__all__ = ["SimSpec", "label_windows", "features_for_recording", "cohort_params", "simulate_patient", "default_specs",
           "cohort_specs", "build_dataset", "DEMO_STIM", "parse_id_range"]


def _demo_stim():
    from drivers.params import StimParams, Waveform

    # The default config's RNS-like burst (controller/defaults.toml, REFERENCE.md §3).
    return StimParams(channel=0, waveform=Waveform.BIPHASIC, amplitude_ua=3000.0, pulse_width_us=160.0,
                      frequency_hz=200.0, n_pulses=100)


DEMO_STIM = _demo_stim()


#: More patients than any cohort run here needs: a typo of a range ("1-100000000") is refused, not simulated.
MAX_PATIENT_IDS = 10_000


def parse_id_range(text: str) -> list[int]:
    """``"0-23"`` / ``"100-119,130"`` -> list of patient ids (inclusive ranges)."""
    ids: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if b < a:
                    raise ValueError
                if b - a + 1 + len(ids) > MAX_PATIENT_IDS:
                    raise OverflowError
                ids.extend(range(a, b + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(f"patient ids {text!r}: expected ranges like '0-23' or '100-119,130' "
                             f"(integers >= 0, start <= end)") from None
        except OverflowError:
            raise ValueError(f"patient ids {text!r}: more than {MAX_PATIENT_IDS} patients") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"patient ids {text!r}: expected at least one id >= 0")
    return ids


@dataclass(frozen=True)
class SimSpec:
    """One simulated recording: which cohort patient, how long, where seizures go."""

    patient_index: int
    seed: int
    duration_s: float
    fs_hz: float
    n_channels: int
    onsets_s: tuple[float, ...]
    # Stimulation bursts (the default demo burst, ``DEMO_STIM``) delivered at these
    # times, so the model sees stimulation artifacts in training.
    stim_times_s: tuple[float, ...] = ()
    spontaneous: bool = True


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
    """Patient ``i`` of the virtual cohort (``hil_sim.cohort.patient_params``)."""
    from hil_sim.cohort import patient_params

    return patient_params(i)


def simulate_patient(spec: SimSpec, block_s: float = 1.0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Simulate one recording with ``hil_sim`` (no stimulation); returns (x (n, ch) µV, seizures)."""
    import dataclasses

    from hil_sim.patient import SimulatedPatient

    params = cohort_params(spec.patient_index)
    if not spec.spontaneous:
        params = dataclasses.replace(params, seizure_rate_per_hour=0.0)
    patient = SimulatedPatient(fs_hz=spec.fs_hz, n_channels=spec.n_channels, seed=spec.seed, params=params)
    for onset in spec.onsets_s:
        patient.schedule_seizure(onset)
    n_total = int(round(spec.duration_s * spec.fs_hz))
    block = max(1, int(round(block_s * spec.fs_hz)))
    stim_n = sorted(int(round(t * spec.fs_hz)) for t in spec.stim_times_s)
    x = np.empty((n_total, spec.n_channels), dtype=np.float32)
    i = 0
    while i < n_total:
        while stim_n and stim_n[0] <= i:
            patient.stimulate(stim_n.pop(0) / spec.fs_hz, DEMO_STIM)
        stop = min(i + block, n_total, stim_n[0] if stim_n else n_total)
        x[i:stop] = patient.step(stop - i)
        i = stop
    return x, _seizure_intervals(patient, spec.duration_s)


def cohort_specs(patient_ids, duration_s: float, seed: int = 0,
                 fs_choices=(256.0, 512.0, 200.0, 173.61, 100.0), channel_choices=(1, 4, 16, 2),
                 early_seizure: bool = True, stim: bool = True) -> list[SimSpec]:
    """One recording per cohort patient (``hil_sim.cohort.patient_params``).

    Rates and channel counts rotate over ``fs_choices``/``channel_choices``.
    Scheduled seizures every 100–200 s (every second patient: the first one
    10–14 s after start, as in the default demo, so the model learns the
    start-up regime), plus the patient's spontaneous ones. With ``stim``,
    bursts of ``DEMO_STIM``: 1–2 s after some scheduled onsets (as the loop
    would) and at random background times (artifacts must not look ictal).
    """
    rng = np.random.default_rng([seed, 0x5E12])
    specs = []
    for k, pid in enumerate(patient_ids):
        t = (10.0 + rng.uniform(0, 4)) if (early_seizure and k % 2 == 0) else (30.0 + rng.uniform(0, 40))
        onsets = []
        while t < duration_s - 30:
            onsets.append(round(float(t), 2))
            t += rng.uniform(100, 200)
        stims = []
        if stim and k % 3 != 2:
            stims += [round(o + float(rng.uniform(1.0, 2.0)), 3) for o in onsets if rng.uniform() < 0.5]
            n_bg = int(duration_s / 120)
            for tb in rng.uniform(5.0, duration_s - 5.0, n_bg):
                if all(not (o - 5 < tb < o + 70) for o in onsets):
                    stims.append(round(float(tb), 3))
        specs.append(SimSpec(patient_index=int(pid), seed=int(rng.integers(1 << 31)), duration_s=float(duration_s),
                             fs_hz=float(fs_choices[k % len(fs_choices)]),
                             n_channels=int(channel_choices[(k // len(fs_choices) + k) % len(channel_choices)]),
                             onsets_s=tuple(onsets), stim_times_s=tuple(sorted(stims))))
    return specs


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


def build_dataset(specs: list[SimSpec], contract: ModelContract, progress=True) -> dict[str, np.ndarray]:
    """Simulate every spec and featurize it. Returns X, y (1/0/-1), groups (patient index), t_end, recording (index into specs) and
    seizures (per recording, list of (onset_s, offset_s))."""
    X, y, groups, t_end, rec, all_sz = [], [], [], [], [], []
    for k, spec in enumerate(specs):
        x, seizures = simulate_patient(spec)
        f, ends = features_for_recording(x, spec.fs_hz, contract)
        # Warm-up windows are labelled too: the loop acts from the first window, and
        # the model's warmup_frac feature lets it learn that regime.
        lab = label_windows(ends, seizures)
        X.append(f)
        y.append(lab)
        groups.append(np.full(len(lab), spec.patient_index, dtype=np.int32))
        t_end.append(ends)
        rec.append(np.full(len(lab), k, dtype=np.int32))
        all_sz.append(seizures)
        if callable(progress):
            progress(k + 1, len(specs), spec)
        elif progress:
            print(f"  patient {spec.patient_index}: {spec.duration_s:.0f} s at {spec.fs_hz:g} Hz x {spec.n_channels} ch, "
                  f"{len(seizures)} seizures, {len(lab)} windows ({int((lab == 1).sum())} ictal)",
                  file=sys.stderr, flush=True)
    return {"X": np.concatenate(X), "y": np.concatenate(y), "groups": np.concatenate(groups),
            "t_end": np.concatenate(t_end), "recording": np.concatenate(rec), "seizures": all_sz}


def delhi_dataset(contract: ModelContract, root=None, classes=("ictal", "interictal", "preictal"),
                  group_identical: bool = False) -> dict[str, np.ndarray]:
    """Delhi segments (200 Hz, 1 channel, 5.12 s) through a fresh stage each: every window labelled by its
    segment (ictal 1, interictal/preictal 0). Windows are *not* dropped for warm-up: a 5 s segment is all
    warm-up, which is exactly the regime these data teach. Group = segment (the patient of a segment is not
    given, so grouping by patient is impossible).

    The set holds four pairs of identical files (ictal 25/36 and 26/37, preictal 39/42 and 40/43): in
    different folds a copy is scored by a model trained on its twin. ``group_identical=True`` puts
    identical segments in one group (146 groups); the default (False) reproduces the shipped model's CV,
    and MODEL_CARD.md's audit gives what the grouping changes."""
    import hashlib

    from models.seizure.recordings import DELHI_FS_HZ, load_delhi

    X, y, groups, seg_class = [], [], [], []
    group_of: dict[str, int] = {}
    for k, (cls, _name, x) in enumerate(s for s in load_delhi(root) if s[0] in classes):
        f, _ends = features_for_recording(x, DELHI_FS_HZ, contract, chunk_n=256)
        X.append(f)
        y.append(np.full(len(f), 1 if cls == "ictal" else 0, dtype=np.int8))
        g = k
        if group_identical:
            digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()
            g = group_of.setdefault(digest, k)
        groups.append(np.full(len(f), g, dtype=np.int32))
        seg_class.append(cls)
    return {"X": np.concatenate(X), "y": np.concatenate(y), "groups": np.concatenate(groups),
            "segment_class": np.array(seg_class)}
