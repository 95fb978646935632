"""Cohort comparisons in simulated time (``stimloop sim compare``).

For each virtual patient, three arms on the same patient and seed (so the
spontaneous seizures start at the same times until stimulation changes them):

- ``none``: no stimulation;
- ``responsive``: the closed loop (detector + responsive policy);
- ``periodic``: open-loop periodic bursts delivering the same total charge as
  that patient's responsive arm (``matched_periodic``).

Reported per arm: seizure time, number of seizures, charge delivered. Patients
run in parallel worker processes (one per core).
"""
from __future__ import annotations

import json
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from controller.config import Config

ARMS = ("none", "responsive", "periodic")


def _seizure_stats(session: Path, end_t: float) -> dict:
    truth = json.loads((session / "ground_truth.json").read_text())
    total, n, by_stim = 0.0, 0, 0
    for s in truth["seizures"]:
        off = s["offset_t"] if s["offset_t"] is not None else end_t
        total += max(0.0, min(off, end_t) - s["onset_t"])
        n += 1
        by_stim += bool(s["terminated_by_stim"])
    return {"seizure_s": total, "seizures": n, "terminated_by_stim": by_stim}


def _charge_uc(session: Path) -> float:
    from controller.recorder import read_jsonl
    return float(sum(e.get("burst_charge_uc", 0.0) for e in read_jsonl(session / "events.jsonl")
                     if e["kind"] == "command" and e.get("op") == "trigger"))


def run_patient(cfg_json: str, patient: int, out_dir: str) -> dict:
    """The three arms for one patient; plain data out (runs in a worker process)."""
    from controller.policies.open_loop import matched_periodic
    from controller.policy_drive import stim_params
    from controller.runners.simulated import run_simulated

    base = Config.model_validate_json(cfg_json)
    results = {}
    charge_closed = 0.0
    for arm in ARMS:
        cfg = base.model_copy(deep=True)
        cfg.simulator.patient = patient
        cfg.session.seed = patient
        if arm == "none":
            cfg.policy.kind = "none"
        elif arm == "responsive":
            cfg.policy.kind = "responsive"
        else:
            cfg.policy.kind = "periodic"
            if charge_closed <= 0:  # the closed loop never stimulated: nothing to match
                cfg.policy.kind = "none"
            else:
                cfg.policy.open_loop.period_s = matched_periodic(charge_closed, cfg.session.duration_s,
                                                                 stim_params(cfg.policy.stim))
                cfg.policy.open_loop.start_s = cfg.policy.open_loop.period_s / 2
        session = run_simulated(cfg, session_dir=Path(out_dir) / f"p{patient:03d}-{arm}", write_report=False)
        stats = _seizure_stats(session, cfg.session.duration_s)
        stats["charge_uc"] = _charge_uc(session)
        if arm == "responsive":
            charge_closed = stats["charge_uc"]
        results[arm] = stats
    return {"patient": patient, "arms": results}


def compare_cohort(cfg: Config, patients: list[int], out_dir: Path | None = None, workers: int = 2,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="stimloop-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cfg_json = cfg.model_dump_json()
    for p in patients:  # folders must exist before workers write into them
        for arm in ARMS:
            (out / f"p{p:03d}-{arm}" / "raw").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_patient, cfg_json, p, str(out)) for p in patients]
        for i, f in enumerate(futures):
            rows.append(f.result())
            if progress:
                progress(i + 1, len(patients))
    summary = {}
    for arm in ARMS:
        sz = np.array([r["arms"][arm]["seizure_s"] for r in rows])
        n = np.array([r["arms"][arm]["seizures"] for r in rows])
        q = np.array([r["arms"][arm]["charge_uc"] for r in rows])
        summary[arm] = {"seizure_s_total": float(sz.sum()), "seizure_s_mean": float(sz.mean()),
                        "seizures_total": int(n.sum()), "charge_uc_total": float(q.sum()),
                        "terminated_by_stim": int(sum(r["arms"][arm]["terminated_by_stim"] for r in rows))}
    none_s = summary["none"]["seizure_s_total"]
    for arm in ARMS:
        summary[arm]["seizure_time_vs_none"] = (summary[arm]["seizure_s_total"] / none_s) if none_s else None
    result = {"patients": patients, "duration_s": cfg.session.duration_s, "out_dir": str(out),
              "seizure_rate_per_hour": cfg.simulator.seizure_rate_per_hour, "summary": summary, "rows": rows}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    return result
