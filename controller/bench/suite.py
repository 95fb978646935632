"""``stimloop bench``: run the scenarios and the peers, gather one JSON document.

Scenarios: ``spike_triggered`` (30 kHz × 32 ch, ADS fast path of
``controller.bench_ads``), ``seizure_loop`` (512 Hz × 16 ch, shipped ONNX,
see :mod:`controller.bench.seizure_loop`), ``throughput`` (30 kHz channel
sweep, :mod:`controller.bench.throughput`); peers: :mod:`controller.bench.peers`.
Every figure is measured on ``pylsl.local_clock``; nothing here asserts a
latency: the suite measures, the docs compare.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time
import traceback

from controller.bench.common import CpuMeter, check_duration, machine_info, stats_ms

SCENARIOS = ("spike_triggered", "spike_triggered_busy_poll", "seizure_loop", "throughput")
# The spike path per command: LSL push → pull, detector + ADS policy, governor + framing, write → device receipt.
SPIKE_STAGES = ("lsl_push_to_pull", "detect_policy", "governor_and_framing", "write_to_device_receipt")


def run_spike_triggered(duration_s: float = 10.0, busy_poll: bool = False) -> dict:
    """ADS spike-triggered loop (30 kHz × 32 ch) via ``controller.bench_ads.run``, re-summarized.

    ``busy_poll``: the loop polls the inlet without sleeping (scenario
    ``spike_triggered_busy_poll``; one CPU core spent on it).

    End to end (chunk holding the spike pushed → TRIGGER received by the
    device, bench_ads' ``spike_to_command``) is recomputed from its ground
    truth; the stages are bench_ads' per-command breakdown (``SPIKE_STAGES``)
    plus every 1 ms block's push → done.
    """
    import numpy as np

    from controller import bench_ads
    check_duration("duration_s", duration_s, 1.0)
    with tempfile.TemporaryDirectory(prefix="stimloop_bench_ads_") as keep:
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = CpuMeter({"controller": os.getpid()}).start()
        t0 = time.monotonic()
        res = bench_ads.run(duration_s, n_channels=32, keep_dir=keep, return_samples=True, busy_poll=busy_poll)
        wall = time.monotonic() - t0
        cpu_pct = cpu.stop()
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_pct["hil_sim (ads_sim)"] = round(100 * ((ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)) / wall, 1)
        with open(os.path.join(keep, "ground_truth_ads.json"), encoding="utf-8") as f:
            gt = json.load(f)
    e2e = (bench_ads.spike_to_command_samples_ms(gt, res["delay_ms"] * 1e-3) * 1e-3).tolist()
    raw = {k: (np.asarray(res["samples_ms"][k]) * 1e-3).tolist() for k in SPIKE_STAGES}
    # Every 1 ms block, not only the ~5/s with a spike: push → the loop done with it.
    raw["push_to_decision_every_chunk"] = (np.asarray(res["samples_ms"]["chunk_to_decision"]) * 1e-3).tolist()
    return {"fs_hz": res["fs_hz"], "n_channels": res["channels"], "chunk_samples": res["chunk_samples"],
            "busy_poll": busy_poll, "duration_s": res["duration_s"], "commands": len(e2e),
            "end_to_end_ms": stats_ms(e2e),
            "end_to_end_definition": "LSL push of the chunk holding the spike -> TRIGGER received by the device",
            "stages_ms": {k: stats_ms(v) for k, v in raw.items()},
            "delay_error_ms": res["delay_error_ms"],
            "dropped_samples": int(res["dropped_samples"]),
            "dropped_samples_definition": "samples missing between consecutive LSL timestamps (gaps > 1.5 sample periods)",
            "deadline_misses": int(res["dropped_too_late"]) + int(res["refusal_rules"].get("too_late", 0)),
            "deadline_definition": "spikes whose imposed 7.5 ms delay had already passed when processed, "
                                   "or when their command reached the device (refused there: TOO_LATE)",
            "missed_spikes": res["missed_spikes"], "artifact_triggers": res["artifact_triggers"],
            "cpu_percent": cpu_pct, "_raw_s": {"end_to_end": e2e, **raw}}


def run_suite(duration_s: float = 10.0, scenarios=SCENARIOS, peers: bool = True, quick: bool = False,
              peer_names=None, console=None) -> dict:
    """All requested scenarios (+ peers); errors in one scenario are recorded, the others still run.

    ``quick``: a few seconds per scenario, a short throughput sweep (16, 64 ch) and the
    cheap peers only (stimloop in both modes, pylsl floor) — for tests.
    """
    from controller.bench import seizure_loop, throughput
    from controller.bench.peers import PEERS, run_peers
    scenarios = list(scenarios)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"scenario(s) {bad} unknown, expected some of {list(SCENARIOS)}")
    if quick:
        duration_s = min(duration_s, 2.5)
    check_duration("duration_s", duration_s, 1.0)
    out: dict = {"machine": machine_info(), "settings": {"duration_s": duration_s, "quick": quick},
                 "scenarios": {}, "peers": {}, "throughput": {}}

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg)

    for name in scenarios:
        say(f"[bold]{name}[/] ({duration_s:g} s) …")
        t0 = time.monotonic()
        try:
            if name in ("spike_triggered", "spike_triggered_busy_poll"):
                out["scenarios"][name] = run_spike_triggered(duration_s, busy_poll=name.endswith("busy_poll"))
            elif name == "seizure_loop":
                out["scenarios"][name] = seizure_loop.run(duration_s)
            else:
                chans = (16, 64) if quick else throughput.DEFAULT_CHANNELS
                sweep = throughput.run_sweep(chans, duration_s=min(duration_s, 1.5) if quick else duration_s)
                pts = sweep["points"]
                ref = next((p for p in pts if p["n_channels"] == throughput.TARGET_CHANNELS), pts[-1])
                out["scenarios"][name] = {
                    "n_channels": ref["n_channels"], "fs_hz": ref["fs_hz"],
                    "end_to_end_ms": ref["stages_ms"]["ring_visible"], "stages_ms": ref["stages_ms"],
                    "end_to_end_definition": "LSL timestamp of the newest sample -> visible to a ring reader",
                    "dropped_samples": ref["dropped_samples"], "deadline_misses": 0,
                    "cpu_percent": ref["cpu_percent"], "_raw_s": ref.get("_raw_s", {}),
                    "sweep": [{k: v for k, v in p.items() if k != "_raw_s"} for p in pts]}
                out["throughput"] = {k: v for k, v in sweep.items() if k != "points"}
        except Exception as exc:   # one broken scenario must not hide the others' figures
            out["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc(limit=5)}
        out["scenarios"][name]["wall_s"] = round(time.monotonic() - t0, 1)
    if "throughput" not in scenarios:
        out["throughput"] = {"max_channels_at_30khz": None, "note": "throughput scenario not run"}
    if peers:
        names = peer_names or (("stimloop", "stimloop_busy_poll", "pylsl_floor") if quick else PEERS)
        say(f"[bold]peers[/] {', '.join(names)} ({duration_s:g} s each) …")
        try:
            pr = run_peers(duration_s, names)   # rounds_for(duration_s): ~5 s rounds, at least 3
            out["peers"] = pr["peers"]
            out["peer_stream"] = pr["stream"]
            out["peer_ratios"] = pr["ratios"]
            out["peer_ratio_ci95"] = pr["ratio_ci95"]
        except Exception as exc:
            out["peers"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def strip_raw(doc: dict) -> dict:
    """A copy of the suite document without the raw ``_raw_s``/``_rounds_s`` arrays (histograms, intervals)."""
    if isinstance(doc, dict):
        return {k: strip_raw(v) for k, v in doc.items() if k not in ("_raw_s", "_rounds_s")}
    if isinstance(doc, list):
        return [strip_raw(v) for v in doc]
    return doc
