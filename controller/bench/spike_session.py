"""Spike-triggered stimulation as a session runs it: scenario ``spike_triggered_session``.

The ``spike_triggered`` scenario times the in-process fast path of
``controller.bench_ads`` (one thread: pylsl inlet → detector → ADS policy →
governor → driver). A session runs its own version of that path, in processes
(docs/architecture.md, "Process layout"): with a spike policy the loop process
pulls the stream into the shared ring and decides on each chunk itself (the fast
path), while the acquisition process records the ring, and the event log,
telemetry and the control socket run beside them. This scenario
runs that session itself (``controller.runners.realtime.run_session``) on the
spiking simulator at the suite's 30 kHz × 32 channels, with the ADS settings of
``examples/ads.toml``, and times every command from the session folder
(``controller.metrics.chunk_command_times``), against the simulator's record of
when each chunk left (its ``push_t.f64``).

End to end = the spike's chunk pushed → TRIGGER received by the device, as in
``spike_triggered``; stages, consecutive, adding up to it command by command:

    pushed_to_loop   chunk pushed → read by the loop (LSL, the loop's pull, ring)
    chunk_checks     read → the chunk's data-quality check done
    detect_policy    → the ADS request made (spike detector + policy)
    governor         → the safety governor passed it
    port_write       → the frame's write began (a CONFIGURE round trip first when
                     the parameters changed: only the first command, left out below)
    device_receive   → the device's receipt stamp

As in ``spike_triggered``, the command that first configured the device is left
out (``configure_commands`` counts it), and so are the commands of the first
``WARMUP_S`` of the session (the spike detector's noise estimate settling).
``slowest_blocks`` (here: the slowest commands, push → device receipt) and
``pids`` feed ``stimloop bench blame``, as the other spike scenarios' do; each
also says how long the loop computed on it (``loop_ms``: read → decided) and how
much of that the loop thread was off the CPU (``loop_off_cpu_ms``).
``cpu_split_ms["read_to_decided"]`` splits that span of every command the same
way (``controller.bench.common.cpu_split_ms``).
"""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path

from controller.bench.common import SPIKE_P99_TARGET_MS, check_duration, cpu_split_ms, share_over, stats_ms
from controller.low_latency import DEFAULT_NICE

#: the stages, in order: each is the difference of two consecutive moments of ``chunk_command_times``
STAGES = {"pushed_to_loop": ("pushed", "read"), "chunk_checks": ("read", "checked"),
          "detect_policy": ("checked", "decided"), "governor": ("decided", "governed"),
          "port_write": ("governed", "sent"), "device_receive": ("sent", "received")}
#: commands whose spike came this soon after the loop's first read are left out (as bench_ads' warm-up)
WARMUP_S = 0.3
#: how many of the slowest commands are kept for ``stimloop bench blame``
SLOWEST_N = 20
N_CHANNELS = 32
#: ``examples/ads.toml`` at the suite's 32 channels (tests/test_bench_spike_session.py holds them equal)
ADS_SESSION = {
    "simulator": {"model": "spiking", "fs_hz": 30000.0, "n_channels": N_CHANNELS, "chunk_s": 0.001},
    "ring": {"capacity_s": 5.0},
    "policy": {"kind": "ads",
               "ads": {"trigger_channels": [0, 1], "delay_ms": 7.5, "blanking_ms": 28.0, "max_rate_hz": 10.0,
                       "k": 5.0, "refractory_ms": 1.0},
               "stim": {"channel": 0, "waveform": "biphasic", "amplitude_ua": 50.0, "pulse_width_us": 200.0,
                        "frequency_hz": 333.0, "n_pulses": 1}},
    "safety": {"profile": "micro"},
}


def session_config(duration_s: float, out_dir: Path, busy_poll: bool = False, nice: int | None = DEFAULT_NICE):
    """The scenario's session config: ``ADS_SESSION`` for ``duration_s``, its folder under ``out_dir``,
    a stream name of its own (a stray stream of the default name cannot be picked up), and
    telemetry and control on free ports (a running session keeps the default ones)."""
    from controller.config import load_config
    # None: the priority this process has (bench's --nice default is the session's own).
    session = {"duration_s": duration_s, "out_dir": str(out_dir), "nice": os.nice(0) if nice is None else nice}
    return load_config(None, {**ADS_SESSION, "session": session,
                              "source": {"stream": f"stimloop-bench-ads-{uuid.uuid4().hex[:8]}", "busy_poll": busy_poll},
                              "telemetry": {"address": "tcp://127.0.0.1:*"},
                              "control": {"address": "tcp://127.0.0.1:*"}})


def session_entry(session_dir: Path) -> dict:
    """The scenario's entry from a finished session's folder (reads files; no clock, no processes)."""
    import numpy as np

    from controller.metrics import chunk_command_times, load_ground_truth
    from controller.recorder import read_jsonl
    m = json.loads((Path(session_dir) / "metrics.json").read_text())
    events = read_jsonl(Path(session_dir) / "events.jsonl")
    t = chunk_command_times(session_dir)
    loop_start = next((e["t"] for e in events if e.get("source") == "loop" and e.get("status") == "started"), None)
    keep = ~t["configured"] & np.isfinite(t["pushed"])
    if loop_start is not None:
        keep &= t["window_end"] >= loop_start + WARMUP_S   # a chunk-driven command's window end is its spike
    e2e = (t["received"] - t["pushed"])[keep].tolist()
    # The slowest commands with their span on the LSL clock (CLOCK_MONOTONIC on Linux) and who is
    # who, for `stimloop bench blame` against a scheduler trace of the run.
    pushed, received = t["pushed"][keep], t["received"][keep]
    # The loop's own compute span (read → decided: chunk_checks + detect_policy), and how much of
    # it the loop thread was off the CPU.
    loop_s = (t["decided"] - t["read"])[keep]
    loop_cpu_s = (t["cpu_decided"] - t["cpu_read"])[keep]
    slowest = [{"push_t": float(pushed[i]), "done_t": float(received[i]),
                "ms": round(float(received[i] - pushed[i]) * 1e3, 4),
                "loop_ms": round(float(loop_s[i]) * 1e3, 4),
                "loop_off_cpu_ms": (round(float(max(loop_s[i] - loop_cpu_s[i], 0.0)) * 1e3, 4)
                                    if np.isfinite(loop_cpu_s[i]) else None)}
               for i in np.argsort(received - pushed)[::-1][:SLOWEST_N]]
    runner = next((e for e in reversed(events) if e.get("source") == "runner" and "pids" in e), {})
    roles = {"hil": "simulator", "emulator": "stimulator emulator", "acq": "recording",
             "loop": "loop (pull, detect, command)"}
    pids = {roles.get(k, k): v for k, v in (runner.get("pids") or {}).items()}
    raw = {name: (t[b] - t[a])[keep].tolist() for name, (a, b) in STAGES.items()}
    ads = m.get("ads") or {}
    rules = ads.get("refusal_rules") or {}
    # at = None on a trigger: its time had passed when the governor came to it, so it went at once.
    late = sum(1 for e in events if e["kind"] == "command" and e.get("op") == "trigger"
               and e.get("request_source") == "ads" and e.get("at") is None)
    misses = {"dropped_or_refused_too_late": int(rules.get("too_late", 0)), "sent_after_their_time": late}
    faults = m.get("faults") or []
    sched = m.get("scheduling") or {}
    truth = load_ground_truth(Path(session_dir))   # the simulator's own stream layout
    push = truth.get("push") or {}
    out = {"fs_hz": push.get("fs_hz"), "n_channels": (truth.get("spiking") or {}).get("n_channels"),
           "chunk_samples": push.get("chunk_n"), "commands": len(e2e), "configure_commands": int(t["configured"].sum()),
           "end_to_end_ms": stats_ms(e2e), "end_to_end_over_target": share_over(e2e, SPIKE_P99_TARGET_MS),
           "end_to_end_definition": "LSL push of the chunk holding the spike -> TRIGGER received by the device, "
                                    "in a session: the loop process pulls, detects and commands (fast path), "
                                    "the acquisition process records",
           "stages_ms": {k: stats_ms(v) for k, v in raw.items()},
           "cpu_split_ms": {"read_to_decided": cpu_split_ms(loop_s, loop_cpu_s)},
           "end_to_end_from_spike_ms": m.get("end_to_end_ms"),
           "delay_error_ms": ads.get("delay_error_ms"),
           "spikes_detected": ads.get("spikes_detected"), "missed_spikes": ads.get("missed_spikes"),
           "artifact_triggers": ads.get("artifact_triggers"), "false_detections": ads.get("false_detections"),
           "dropped_samples": int(m.get("dropped_samples") or 0),
           "deadline_misses": sum(misses.values()), "deadline_miss_breakdown": misses,
           "refused": int(ads.get("refusals") or 0), "refusal_rules": rules, "faults": faults,
           "slowest_blocks": slowest, "pids": pids,
           "cpu_percent": sched.get("cpu_percent"),
           "host_steal_ms": sched.get("host_steal_ms"),
           "_raw_s": {"end_to_end": e2e, **raw}}
    if faults:
        out["error"] = (f"{len(faults)} fault(s), the first: {faults[0].get('reason')}; stimulation latched off "
                        f"there, so the figures cover only the commands before it")
    return out


def run_spike_session(duration_s: float = 10.0, busy_poll: bool = False, nice: int | None = DEFAULT_NICE) -> dict:
    """Run the ADS session for ``duration_s`` and return the scenario's entry (see the module doc).

    ``busy_poll``: the loop polls the inlet without sleeping (``source.busy_poll``).
    The session folder is written to a temporary folder and removed afterwards.
    """
    from controller.runners.realtime import SessionError, run_session
    check_duration("duration_s", duration_s, 1.0)
    with tempfile.TemporaryDirectory(prefix="stimloop-bench-ads-session-") as tmp:
        cfg = session_config(duration_s, Path(tmp), busy_poll=busy_poll, nice=nice)
        try:
            session_dir = run_session(cfg)
        except SessionError as exc:
            raise RuntimeError(f"the ADS session failed: {exc}") from None
        out = session_entry(session_dir)
    out.update(busy_poll=busy_poll, nice=nice, duration_s=duration_s)
    return out
