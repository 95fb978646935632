"""Benchmark: cost of one governor decision and one actuator submit (simulated device). Writes JSON.

    python -m controller.safety.bench [--n 20000] [--out bench_safety.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from controller.actuator import Actuator
from controller.safety import MACRO_RNS, SafetyGovernor, StimRequest
from drivers.params import StimParams
from drivers.simulated import SimulatedStimulator

BURST = StimParams(channel=0, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)


def _stats_us(ns: np.ndarray) -> dict:
    us = ns / 1e3
    return {"n": int(us.size), "p50_us": float(np.percentile(us, 50)), "p95_us": float(np.percentile(us, 95)),
            "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max())}


def run(n: int) -> dict:
    # Virtual time advances 1 s per request so every request is allowed (rate limits
    # and dose ceilings are lifted on a copy of the profile: we time the full rule path).
    profile = MACRO_RNS.model_copy(update={"max_bursts_per_min": 10_000, "max_session_charge_uc": 1e12,
                                           "max_session_stim_s": 1e9, "heartbeat_timeout_s": None})
    clock_t = [0.0]
    drv = SimulatedStimulator(clock=lambda: clock_t[0])
    gov = SafetyGovernor(profile, drv.capabilities)
    allowed = np.empty(n, np.int64)
    clamped = np.empty(n, np.int64)
    refused = np.empty(n, np.int64)
    big = BURST.with_(amplitude_ua=12_000.0, pulse_width_us=500.0)
    bad = BURST.with_(frequency_hz=1000.0)
    pc = time.perf_counter_ns
    for i in range(n):
        now = float(i)
        t0 = pc(); gov.step(StimRequest(now, "bench", BURST), now); allowed[i] = pc() - t0
        t0 = pc(); gov.step(StimRequest(now, "bench", bad), now); refused[i] = pc() - t0
    gov2 = SafetyGovernor(profile, drv.capabilities)
    for i in range(n):
        now = float(i)
        t0 = pc(); gov2.step(StimRequest(now, "bench", big), now); clamped[i] = pc() - t0
    act = Actuator(SafetyGovernor(profile, drv.capabilities), drv, lambda: clock_t[0])
    act.open()
    submit = np.empty(n, np.int64)
    for i in range(n):
        clock_t[0] = float(i)
        t0 = pc(); act.submit(StimRequest(clock_t[0], "bench", BURST)); submit[i] = pc() - t0
    return {"benchmark": "safety_governor", "python": sys.version.split()[0], "machine": platform.machine(),
            "governor_step_allowed": _stats_us(allowed), "governor_step_clamped": _stats_us(clamped),
            "governor_step_refused": _stats_us(refused), "actuator_submit_simulated": _stats_us(submit),
            "delivered": len(drv.delivered)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--out", default="-", help="JSON file ('-' = stdout)")
    a = ap.parse_args(argv)
    res = run(a.n)
    text = json.dumps(res, indent=2)
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
