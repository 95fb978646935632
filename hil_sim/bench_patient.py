"""Benchmark: how fast the simulated patient generates signal.

    python -m hil_sim.bench_patient --seconds 600 --out bench_patient.json

Writes JSON with samples/s and the projected seconds per simulated hour at the
given fs × channels (default 512 Hz × 16 ch, one scheduled seizure per minute
so seizure paths are included).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

from hil_sim.patient import PatientParams, SimulatedPatient


def run(seconds: float, fs_hz: float, n_channels: int, chunk_s: float) -> dict:
    """Generate ``seconds`` of signal in chunks of ``chunk_s``; return timing figures."""
    pt = SimulatedPatient(fs_hz, n_channels, seed=0, params=PatientParams())
    for k in range(int(seconds // 60)):
        pt.schedule_seizure(30.0 + 60.0 * k)
    chunk = max(1, int(round(chunk_s * fs_hz)))
    n_total = int(seconds * fs_hz)
    t = time.perf_counter()
    done = 0
    while done < n_total:
        done += pt.step(min(chunk, n_total - done)).shape[0]
    el = time.perf_counter() - t
    return {"bench": "hil_sim.patient", "fs_hz": fs_hz, "n_channels": n_channels, "chunk_s": chunk_s,
            "simulated_s": seconds, "wall_s": el, "samples_per_s": done / el,
            "wall_s_per_simulated_hour": el * 3600.0 / seconds, "realtime_factor": seconds / el,
            "n_seizures": len(pt.ground_truth.seizures), "python": platform.python_version(),
            "machine": platform.machine()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--fs-hz", type=float, default=512.0)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--chunk-s", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = run(a.seconds, a.fs_hz, a.channels, a.chunk_s)
    text = json.dumps(res, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
