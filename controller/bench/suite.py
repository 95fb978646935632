"""``stimloop bench``: run the scenarios and the peers, gather one JSON document.

Scenarios: ``spike_triggered`` (30 kHz × 32 ch, ADS fast path of
``controller.bench_ads``), ``spike_triggered_session`` (the same stream through an ADS
session's processes, :mod:`controller.bench.spike_session`), ``seizure_loop`` (512 Hz × 16 ch, shipped ONNX,
see :mod:`controller.bench.seizure_loop`), ``throughput`` (30 kHz channel
sweep, :mod:`controller.bench.throughput`); peers: :mod:`controller.bench.peers`.
Every figure is measured on ``pylsl.local_clock``; nothing here asserts a
latency: the suite measures, the docs compare.
"""
from __future__ import annotations

import time
import traceback

from controller.bench.common import SPIKE_P99_TARGET_MS, check_duration, machine_info, share_over, stats_ms
from controller.low_latency import DEFAULT_NICE

SCENARIOS = ("spike_triggered", "spike_triggered_busy_poll", "spike_triggered_session", "seizure_loop", "throughput")
# The spike path per command: LSL push → pull, detector + ADS policy, governor + framing, write → device receipt.
SPIKE_STAGES = ("lsl_push_to_pull", "detect_policy", "governor_and_framing", "write_to_device_receipt")
#: keys every scenario entry carries, whatever happened to it (None where there is no value)
SCENARIO_KEYS = ("end_to_end_ms", "stages_ms", "dropped_samples", "deadline_misses")


def scenario_stages(name: str) -> tuple[str, ...]:
    """The stage names scenario ``name`` reports (so a failed one reports the same keys, empty)."""
    if name in ("spike_triggered", "spike_triggered_busy_poll"):
        return (*SPIKE_STAGES, "push_to_decision_every_chunk")
    if name == "spike_triggered_session":
        from controller.bench.spike_session import STAGES as SESSION_STAGES
        return tuple(SESSION_STAGES)
    if name == "seizure_loop":
        from controller.bench.seizure_loop import STAGES
        return STAGES
    if name == "throughput":
        return ("ring_visible",)
    raise ValueError(f"scenario {name!r} unknown, expected one of {SCENARIOS}")


def with_required_keys(name: str, entry: dict) -> dict:
    """``entry`` with every key of ``SCENARIO_KEYS``: a skipped or failed scenario gets empty
    statistics (``stats_ms([])``: every figure None, n = 0) and None counts; no key is overwritten."""
    out = dict(entry)
    out.setdefault("end_to_end_ms", stats_ms([]))
    stages = dict(out.get("stages_ms") or {})
    for stage in scenario_stages(name):
        stages.setdefault(stage, stats_ms([]))
    out["stages_ms"] = stages
    out.setdefault("dropped_samples", None)
    out.setdefault("deadline_misses", None)
    # The docs promise a failed entry every key a good one has: readers index them without checks.
    for key in scenario_extra_keys(name):
        out.setdefault(key, None)
    return out


def scenario_extra_keys(name: str) -> tuple[str, ...]:
    """Keys besides ``SCENARIO_KEYS`` that scenario ``name`` reports (None in a failed or skipped entry)."""
    keys: tuple[str, ...] = ("cpu_percent", "host_steal_ms")
    if name in ("spike_triggered", "spike_triggered_busy_poll"):
        keys += ("end_to_end_over_target", "slowest_blocks", "pids")
    elif name == "spike_triggered_session":
        keys += ("end_to_end_over_target", "slowest_blocks", "pids")
    elif name == "seizure_loop":
        keys += ("end_to_end_over_target",)
    return keys


def failed_peer(message: str) -> dict:
    """A peer entry for a peer that failed: its required key with no figures, and the error."""
    return {"end_to_end_ms": stats_ms([]), "host_steal_ms": None, "stream_push_late_ms": stats_ms([]), "error": message}


def failures(doc: dict) -> list[str]:
    """``"scenario X: error"`` / ``"peer Y: error"`` for every failed part of a suite document (pure)."""
    out = [f"scenario {name}: {sc['error']}" for name, sc in (doc.get("scenarios") or {}).items()
           if isinstance(sc, dict) and sc.get("error")]
    out += [f"peer {name}: {r['error']}" for name, r in (doc.get("peers") or {}).items()
            if isinstance(r, dict) and r.get("error")]
    return out


def run_spike_triggered(duration_s: float = 10.0, busy_poll: bool = False, nice: int | None = DEFAULT_NICE) -> dict:
    """ADS spike-triggered loop (30 kHz × 32 ch) via ``controller.bench_ads.run``, re-summarized.

    ``busy_poll``: the loop polls the inlet without sleeping (scenario
    ``spike_triggered_busy_poll``; one CPU core spent on it).

    End to end (chunk holding the spike pushed → TRIGGER received by the
    device, bench_ads' ``spike_to_command``: every delivered trigger after the
    warm-up, those delivered late included, except the one that configured the
    device); the stages are bench_ads' per-command breakdown of the same
    commands (``SPIKE_STAGES``) plus every 1 ms block's push → done. CPU is
    bench_ads' own measure over the streaming run, per process (controller and
    simulator).

    The run's faults (commands the driver or device failed) and the governor's
    refusals are carried over; any fault makes the entry an ``error``: the
    actuator latches on a fault, so the figures would cover only the commands
    before it.
    """
    import numpy as np

    from controller import bench_ads
    check_duration("duration_s", duration_s, 1.0)
    res = bench_ads.run(duration_s, n_channels=32, return_samples=True, busy_poll=busy_poll, nice=nice)
    e2e = (np.asarray(res["samples_ms"]["spike_to_command"]) * 1e-3).tolist()
    raw = {k: (np.asarray(res["samples_ms"][k]) * 1e-3).tolist() for k in SPIKE_STAGES}
    # Every 1 ms block, not only the ~5/s with a spike: push → the loop done with it.
    raw["push_to_decision_every_chunk"] = (np.asarray(res["samples_ms"]["chunk_to_decision"]) * 1e-3).tolist()
    return spike_entry(res, busy_poll, e2e, raw)


def spike_entry(res: dict, busy_poll: bool, e2e: list, raw: dict) -> dict:
    """The spike scenario's entry from a ``bench_ads.run`` result and its samples (s) (pure)."""
    import numpy as np
    faults = list(res.get("faults") or [])
    fault_error = ({"error": f"{len(faults)} command(s) faulted, the first: {faults[0]}; the actuator latches on a "
                             f"fault, so the figures cover only the commands before it"} if faults else {})
    return {"fs_hz": res["fs_hz"], "n_channels": res["channels"], "chunk_samples": res["chunk_samples"],
            "busy_poll": busy_poll, "nice": res["nice"], "duration_s": res["duration_s"], "commands": len(e2e),
            "end_to_end_ms": stats_ms(e2e),
            "end_to_end_over_target": share_over(e2e, SPIKE_P99_TARGET_MS),
            "end_to_end_definition": "LSL push of the chunk holding the spike -> TRIGGER received by the device",
            "stages_ms": {k: stats_ms(v) for k, v in raw.items()},
            "delay_error_ms": res["delay_error_ms"],
            "dropped_samples": int(res["dropped_samples"]),
            "dropped_samples_definition": "samples missing between consecutive LSL timestamps (gaps > 1.5 sample periods)",
            "deadline_misses": int(res["deadline_misses"]),
            "deadline_miss_breakdown": res["deadline_miss_breakdown"],
            "deadline_definition": "spikes whose imposed 7.5 ms delay had passed when the loop came to submit "
                                   "them (dropped), whose TRIGGER the device refused as too late, or whose "
                                   "TRIGGER reached the device after its time and was delivered at once (late)",
            "missed_spikes": res["missed_spikes"], "artifact_triggers": res["artifact_triggers"],
            "driver_retries": res["driver_retries"],
            "refused": res["refused"], "refusal_rules": res["refusal_rules"], "faults": faults,
            "configure_commands": res.get("configure_commands"),
            # When the slowest 1 ms block came (s after the warm-up; one block per ms): a stall at the
            # same moment run after run points at something periodic, a random one at the machine.
            "slowest_block_at_s": (round(int(np.argmax(raw["push_to_decision_every_chunk"])) * 1e-3, 3)
                                   if raw["push_to_decision_every_chunk"] else None),
            "slowest_blocks": res["slowest_blocks"], "pids": res["pids"],   # for `stimloop bench blame`
            "cpu_percent": res["cpu_percent"], "host_steal_ms": res["host_steal_ms"],
            "_raw_s": {"end_to_end": e2e, **raw}, **fault_error}


def throughput_entry(sweep: dict, target_channels: int) -> dict:
    """The throughput scenario's entry from a sweep (pure): the target point's figures and the sweep."""
    pts = sweep["points"]
    ref = next((p for p in pts if p["n_channels"] == target_channels), pts[-1])
    return {"n_channels": ref["n_channels"], "fs_hz": ref["fs_hz"], "passed": ref["passed"],
            "end_to_end_ms": ref["stages_ms"]["ring_visible"], "stages_ms": ref["stages_ms"],
            "end_to_end_definition": "LSL timestamp of the newest sample -> visible to a ring reader",
            "dropped_samples": ref["dropped_samples"],
            "dropped_samples_definition": "samples missing up to the newest one in the ring or lost in timestamp "
                                          "gaps, plus samples the reader lost to ring overruns",
            # A data path has no deadline of its own: ring_visible is its latency, and whether the
            # stream kept up is the point's pass rule (throughput.point_verdict), not a deadline.
            "deadline_misses": None,
            "deadline_definition": "none: the throughput scenario has no deadline (see passed / pass_rule)",
            "cpu_percent": ref["cpu_percent"], "host_steal_ms": ref.get("host_steal_ms"), "_raw_s": ref.get("_raw_s", {}),
            "sweep": [{k: v for k, v in p.items() if k != "_raw_s"} for p in pts]}


def run_suite(duration_s: float = 10.0, scenarios=SCENARIOS, peers: bool = True, quick: bool = False,
              peer_names=None, console=None, nice: int | None = DEFAULT_NICE) -> dict:
    """All requested scenarios (+ peers); errors in one scenario or peer are recorded, the others still run.

    Every scenario entry has ``SCENARIO_KEYS`` (None / empty statistics when it
    failed or was skipped, plus ``error`` or ``skipped``); ``throughput`` always has
    ``max_channels_at_30khz``; every peer has ``end_to_end_ms``. ``failures(doc)``
    lists what failed.

    ``quick``: a few seconds per scenario, a short throughput sweep (16, 64 ch) and the
    cheap peers only (stimloop in both modes, pylsl floor) — for tests.

    ``nice``: the controller's processes (and the stimloop peers) run at that nice value, as a
    session's do (``session.nice``); simulators and the other peers keep the default. ``None``:
    nobody's priority is touched.
    """
    from controller.bench import seizure_loop, throughput
    from controller.bench.peers import PEERS, run_peers
    from controller.bench.spike_session import run_spike_session
    scenarios = list(scenarios)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise ValueError(f"scenario(s) {bad} unknown, expected some of {list(SCENARIOS)}")
    names = list(peer_names or (("stimloop", "stimloop_busy_poll", "pylsl_floor") if quick else PEERS))
    unknown = [p for p in names if p not in PEERS]
    if peers and unknown:   # before minutes of scenarios, not after
        raise ValueError(f"peer(s) {unknown} unknown, expected some of {list(PEERS)}")
    if quick:
        duration_s = min(duration_s, 2.5)
    check_duration("duration_s", duration_s, 1.0)
    out: dict = {"machine": machine_info(), "settings": {"duration_s": duration_s, "quick": quick, "nice": nice},
                 "scenarios": {}, "peers": {}, "throughput": {}}

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg)

    for name in scenarios:
        say(f"[bold]{name}[/] ({duration_s:g} s) …")
        t0 = time.monotonic()
        try:
            if name in ("spike_triggered", "spike_triggered_busy_poll"):
                entry = run_spike_triggered(duration_s, busy_poll=name.endswith("busy_poll"), nice=nice)
            elif name == "spike_triggered_session":
                entry = run_spike_session(duration_s, nice=nice)
            elif name == "seizure_loop":
                entry = seizure_loop.run(duration_s, nice=nice)
            else:
                chans = (16, 64) if quick else throughput.DEFAULT_CHANNELS
                sweep = throughput.run_sweep(chans, duration_s=min(duration_s, 1.5) if quick else duration_s, nice=nice,
                                             extend=not quick, progress=say)
                entry = throughput_entry(sweep, throughput.TARGET_CHANNELS)
                out["throughput"] = {k: v for k, v in sweep.items() if k != "points"}
        except Exception as exc:   # one broken scenario must not hide the others' figures
            entry = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
            if name == "throughput":
                out["throughput"] = {"max_channels_at_30khz": None, "error": entry["error"]}
        entry = with_required_keys(name, entry)
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        out["scenarios"][name] = entry
    if "throughput" not in scenarios:
        out["throughput"] = {"max_channels_at_30khz": None, "note": "throughput scenario not run"}
    if peers:
        say(f"[bold]peers[/] {', '.join(names)} ({duration_s:g} s each) …")
        try:
            pr = run_peers(duration_s, names, nice=nice)   # rounds_for(duration_s): ~5 s rounds, at least 3
            out["peers"] = pr["peers"]
            out["peer_stream"] = pr["stream"]
            out["peer_ratios"] = pr["ratios"]
            out["peer_ratio_ci95"] = pr["ratio_ci95"]
        except Exception as exc:   # the shared stream itself failed: every peer says so, by name
            out["peers"] = {n: failed_peer(f"{type(exc).__name__}: {exc}") for n in names}
            out["peer_ratios"] = out["peer_ratio_ci95"] = None
    return out


def strip_raw(doc: dict) -> dict:
    """A copy of the suite document without the raw ``_raw_s``/``_rounds_s`` arrays (histograms, intervals)."""
    if isinstance(doc, dict):
        return {k: strip_raw(v) for k, v in doc.items() if k not in ("_raw_s", "_rounds_s")}
    if isinstance(doc, list):
        return [strip_raw(v) for v in doc]
    return doc
