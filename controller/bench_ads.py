"""Real-time ADS benchmark: spikes at 30 kHz over LSL → detector → ADS policy → governor/actuator → serial device.

    python -m controller.bench_ads [--duration S] [--json F] [--random] [--compare] [--no-low-latency]

A separate process (``hil_sim.ads_sim``) streams ``SpikingUnits`` (30 kHz ×
32 channels, 1 ms chunks) over LSL and runs the stimulator emulator on a pty.
This process runs the fast path: a pylsl inlet pulled into a preallocated
array → :class:`controller.spikes.SpikeDetector` → :class:`AdsPolicy` (or
:class:`RandomStimPolicy` with ``--random``) → :class:`controller.actuator.Actuator`
(safety governor, MICRO profile) → :class:`SerialStimulator` triggers carrying
``at = t_spike + 7.5 ms`` (REFERENCE.md §2).

Measured against ground truth (one clock: ``pylsl.local_clock``):

* ``spike_to_command_ms``: the device's receipt time of the TRIGGER minus the
  push time of the LSL chunk holding the detected spike sample — processing
  only (``spike_time_to_command_ms`` adds the wait for the chunk to be complete);
* ``delay_error_ms``: delivered time − true spike time − 7.5 ms, every delivered
  trigger included (one the device got after its time and delivered at once too);
* ``deadline_misses``: spikes whose 7.5 ms delay had passed when the loop got to
  submit them (dropped), whose TRIGGER the device refused as too late, or whose
  TRIGGER reached the device after its time and was delivered at once (late);
* ``missed_spikes``: true trigger spikes outside blanking windows with no
  detection within ±1 ms;
* ``artifact_triggers``: detections matching no true spike within ±1 ms that
  fall inside a stimulation artifact (``false_detections``: the others, noise);
* ``weight_change``: the trigger → target STDP weight change (``--compare``
  runs ADS then random stimulation at the ADS run's delivered rate).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import numpy as np  # noqa: E402
import pylsl  # noqa: E402

from controller.actuator import Actuator  # noqa: E402
from controller.bench.common import CpuMeter, stats_ms, tree_pids  # noqa: E402
from controller.events import Event, EventKind  # noqa: E402
from controller.low_latency import DEFAULT_NICE, LowLatency, freeze_gc, nice_for, nice_while  # noqa: E402
from controller.metrics import chunk_index, join_receipts  # noqa: E402
from controller.policies.ads import (GUGGENMOS_BLANKING_MS, GUGGENMOS_DELAY_MS, AdsPolicy,  # noqa: E402
                                     RandomStimPolicy, blanking_window)
from controller.safety import MICRO, SafetyGovernor  # noqa: E402
from controller.sources.base import count_gaps  # noqa: E402
from controller.sources.lsl import pull_into  # noqa: E402
from controller.spikes import SpikeDetector  # noqa: E402
from drivers.params import StimParams, Waveform  # noqa: E402
from drivers.serial_stimulator import SerialStimulator  # noqa: E402
from hil_sim.pty_pair import close_pty, open_pty_pair  # noqa: E402

__all__ = ["run", "evaluate", "main", "DEFAULT_STIM", "spike_to_command_samples_ms", "chunk_latency_ms",
           "slowest_blocks", "intended_at", "spike_path_samples"]

FS_HZ = 30_000.0
CHUNK_N = 30                 # 1 ms at 30 kHz
MATCH_S = 0.001              # detection ↔ true spike tolerance (±1 ms)
WARMUP_S = 0.3               # detector noise estimate settling, excluded from scoring
HEARTBEAT_S = 0.2
# 50 µA × 200 µs = 0.01 µC/phase: inside MICRO's Shannon limit (REFERENCE.md §4); its artifact
# (~13 ms) ends well inside the 28 ms blanking (REFERENCE.md §2).
DEFAULT_STIM = StimParams(channel=0, waveform=Waveform.BIPHASIC, amplitude_ua=50.0, pulse_width_us=200.0,
                          frequency_hz=333.0, n_pulses=1)
# The protocol's deliver-at for "now" (drivers/PROTOCOL.md): the emulator records an immediate TRIGGER with
# at = 0.0. It is not a time: such a record's intended time is the one the controller asked for.
IMMEDIATE_AT = 0.0


def run(duration_s: float = 10.0, random_rate_hz: float | None = None, seed: int = 0, n_channels: int = 32,
        trigger_channels: tuple[int, ...] = (0, 1), unit_rate_hz: float = 2.5, k: float = 5.0,
        stim: StimParams = DEFAULT_STIM, delay_ms: float = GUGGENMOS_DELAY_MS,
        blanking_ms: float = GUGGENMOS_BLANKING_MS, keep_dir: str | None = None, low_latency: bool = True,
        telemetry=None, telemetry_signal_hz: float = 64.0, return_samples: bool = False,
        warm: bool = True, busy_poll: bool = False, nice: int | None = DEFAULT_NICE) -> dict:
    """One real-time run (ADS, or random stimulation at ``random_rate_hz``); returns the result dict.

    ``telemetry``: an optional :class:`controller.telemetry.TelemetryPublisher`. When
    given, the fast path publishes as the real-time loop does (``controller/loop.py``):
    after the chunk's commands are submitted, the decimated signal
    (``telemetry_signal_hz``), one ``spike`` event per chunk with detections, and
    every actuator event (decisions, commands, refusals, faults).
    ``busy_poll``: wait for each chunk by polling the inlet without sleeping
    (``controller.sources.lsl.pull_into``; one CPU core spent on it).
    ``nice``: this thread (the controller) runs at that nice value once the
    simulator has started, as a session's controller processes do
    (``session.nice``); ``None`` leaves it alone, and so does ``busy_poll``
    (:func:`controller.low_latency.nice_for`).
    """
    if telemetry is not None and not (0 < telemetry_signal_hz <= FS_HZ):
        raise ValueError(f"telemetry_signal_hz={telemetry_signal_hz!r} invalid, expected 0 < Hz <= {FS_HZ:g}")
    if not (0.5 <= duration_s <= 3600):
        raise ValueError(f"duration_s={duration_s!r} invalid, expected 0.5..3600 s")
    mode = "ads" if random_rate_hz is None else "random"
    qos = LowLatency(low_latency)
    qos.acquire()   # held for the run (released in the finally below): PM QoS, see controller/low_latency.py
    master_fd, slave = open_pty_pair()
    tmp = tempfile.TemporaryDirectory(prefix="bench_ads_")
    gt_path = os.path.join(tmp.name, "ground_truth.json")
    spec = {"units": {"fs_hz": FS_HZ, "n_channels": n_channels, "seed": seed,
                      "trigger_channels": list(trigger_channels), "target_channel": 16,
                      "stim_site_channel": 24, "rate_hz": unit_rate_hz},
            "chunk_n": CHUNK_N, "watchdog_s": 1.0, "stream_name": f"stimloop-spikes-{os.getpid()}"}
    proc = subprocess.Popen([sys.executable, "-m", "hil_sim.ads_sim", "--fd", str(master_fd),
                             "--spec", json.dumps(spec), "--out", gt_path],
                            pass_fds=(master_fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    act = None
    priority = contextlib.ExitStack()
    try:
        line = proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            raise RuntimeError(f"HIL process did not start (said {' '.join(line)!r})")
        infos = pylsl.resolve_byprop("source_id", line[1], 1, 5.0)
        if not infos:
            raise RuntimeError(f"LSL stream with source_id {line[1]!r} not found within 5 s")
        # The simulator runs at its own priority: raised here, after it started, and before the
        # inlet's threads start (they inherit it).
        nice_status = priority.enter_context(nice_while(nice_for(nice, busy_poll)))
        # Small buffer: no hidden lag can build up (REFERENCE.md §1, pylsl default 360 s).
        inlet = pylsl.StreamInlet(infos[0], max_buflen=1, max_chunklen=CHUNK_N, processing_flags=0)
        inlet.open_stream(timeout=5.0)
        # Same host: the sender stamps samples with this very clock (pylsl.local_clock is the system's
        # monotonic clock), so timestamps are exact as received. time_correction would only add its
        # estimation error (tens of µs, ~1 sample at 30 kHz): enough to score a spike against the
        # wrong 1 ms block and to bias the delivered delay. It is recorded, not applied.
        tc = inlet.time_correction(timeout=5.0)
        driver = SerialStimulator(slave, timeout_s=0.05, retries=2)
        driver.open()
        clock = pylsl.local_clock
        act = Actuator(SafetyGovernor(MICRO, driver.capabilities), driver, clock)
        act.heartbeat()
        det = SpikeDetector(FS_HZ, n_channels, channels=trigger_channels, k=k, refractory_ms=1.0,
                            noise_window_s=2.0)
        if mode == "ads":
            policy = AdsPolicy(trigger_channels, stim, delay_ms=delay_ms, blanking_ms=blanking_ms, max_rate_hz=10.0)
        else:
            policy = RandomStimPolicy(random_rate_hz, stim, seed=seed + 1000, min_interval_s=blanking_ms * 1e-3)

        max_n = 4096
        buf = np.empty((max_n, n_channels), np.float32)
        det_t, det_c = [], []
        blanks: list[tuple[float, float]] = []
        faults: list[str] = []
        n_refused = 0
        n_too_late = 0
        refusal_rules: dict[str, int] = {}
        cap = int(duration_s * 200) + 64
        cmd_done = np.empty(cap)        # controller-side: time submit() returned, per request
        cmd_spike = np.empty(cap)
        cmd_pulled = np.empty(cap)      # when the chunk holding the spike came out of pull_chunk
        cmd_submit = np.empty(cap)      # when submit() was called
        cmd_seq = np.empty(cap, np.int64)
        cmd_sent = np.empty(cap)        # when the driver started writing the TRIGGER frame (COMMAND sent_t)
        cmd_at = np.empty(cap)          # the deliver-at time the policy asked for (req.at)
        cmd_cfg = np.zeros(cap, bool)   # the command configured the device first (one extra round trip)
        n_cmd = 0
        decim = max(1, int(round(FS_HZ / telemetry_signal_hz)))
        tele_events: list = []
        pub_s = np.empty(int(duration_s * 1200) + 64)   # publish time per loop iteration (≈1 per 1 ms chunk)
        n_pub = 0
        # Per pulled chunk: first/last sample time and when its processing (detector, policy and any
        # commands) was done. Every chunk is a point on the spike path, not only the ~5/s with a spike.
        # A busy-polled pull can return part of a block (liblsl queues samples one by one as they
        # arrive), so there can be several pulls per block: the arrays grow when full.
        ch_rec = np.empty((int(duration_s * 1100) + 64, 3))   # first sample t, last sample t, done t
        n_chunks = 0
        n_gaps = n_lost = 0
        last_ts = None
        # CPU of the simulator and of this process over the streaming run only: not the simulator's
        # start-up (its imports cost ~1.4 s of CPU) nor the scoring afterwards.
        cpu = CpuMeter({"controller": os.getpid(), "hil_sim (ads_sim)": proc.pid}).start()
        # Who is who in a scheduler trace (stimloop bench blame): the simulator forked its emulator.
        pids = {"controller": os.getpid(), "simulator": proc.pid,
                **{"stimulator emulator": p for p in tree_pids(proc.pid)[1:2]}}
        freeze_gc()   # as a session's loop does (controller/low_latency.py)
        proc.stdin.write("start\n")
        proc.stdin.flush()
        t_start = None
        next_hb = clock() + HEARTBEAT_S
        while True:
            ts = pull_into(inlet, buf, 0.01, busy_poll)
            n = ts.shape[0]
            now = clock()
            if n:
                if t_start is None:
                    t_start = float(ts[0])
                spikes = det.step(buf[:n], ts)
                if spikes.t.size:
                    det_t.append(spikes.t)
                    det_c.append(spikes.channel)
                    reqs = policy.step(spikes.t, spikes.channel, now) if mode == "ads" else []
                else:
                    reqs = []
                if mode == "random":
                    reqs = policy.step(now)
                if telemetry is not None and spikes.t.size:
                    tele_events.append(Event(now, EventKind.SPIKE, "detector",
                                             {"what": "spikes", "n": int(spikes.t.size), "t_spike": spikes.t,
                                              "channel": spikes.channel}))
                for req in reqs:
                    # Blank before the pulse exists: its artifact can never reach the detector.
                    b0, b1 = blanking_window(req.at, blanking_ms)
                    det.blank(b0, b1)
                    # A fresh clock, not the pull's ``now``: the detector, the policy and earlier
                    # commands of this chunk take time, and a request whose delay passes in between
                    # would reach the governor in the past, which maps it to "now" (an immediate
                    # trigger at the wrong delay). What still slips past this check (the governor
                    # reads its clock a few µs later) is scored as a late delivery in ``evaluate``.
                    t_sub = clock()
                    if req.at < t_sub:
                        # Stalled past the imposed delay: a pulse at the wrong delay is worse than none.
                        n_too_late += 1
                        continue
                    evs = act.submit(req)
                    if telemetry is not None:
                        tele_events.extend(evs)
                    last = evs[-1].kind if evs else None
                    if last is EventKind.COMMAND and n_cmd < cap:
                        cmd_done[n_cmd] = clock()
                        cmd_submit[n_cmd] = t_sub
                        cmd_pulled[n_cmd] = now
                        cmd_seq[n_cmd] = evs[-1].data["seq"]
                        cmd_sent[n_cmd] = evs[-1].data["sent_t"]
                        cmd_at[n_cmd] = req.at
                        cmd_spike[n_cmd] = req.meta.get("spike_t", req.at)
                        cmd_cfg[n_cmd] = evs[-1].data.get("configure_seq") is not None
                        n_cmd += 1
                        blanks.append((b0, b1))
                    elif last is EventKind.REFUSAL:
                        n_refused += 1
                        rule = str(evs[-1].data.get("rule"))
                        refusal_rules[rule] = refusal_rules.get(rule, 0) + 1
                    else:
                        faults.extend(str(e.data.get("reason")) for e in evs if e.kind is EventKind.FAULT)
                if n_chunks == ch_rec.shape[0]:
                    ch_rec = np.concatenate((ch_rec, np.empty_like(ch_rec)))   # after this chunk's commands
                ch_rec[n_chunks] = (ts[0], ts[n - 1], clock())
                n_chunks += 1
                # After the chunk's commands: lost samples show as gaps in the sender's timestamps.
                g, lost, _ = count_gaps(ts, last_ts, FS_HZ)
                n_gaps += g
                n_lost += lost
                last_ts = float(ts[n - 1])
            if warm:
                act.warm(stim)   # after the chunk's commands: never between a spike and its command
            if now >= next_hb:
                # Heartbeat between chunks, never between a spike and its command.
                hb = act.heartbeat()
                next_hb = now + HEARTBEAT_S
                if telemetry is not None:
                    tele_events.extend(hb)
            if telemetry is not None and (n or tele_events):
                t_pub = time.perf_counter()
                # After the chunk's commands, as loop.py does: publishing never sits between
                # a spike and its command; its cost shows up as a later pull of the next chunk.
                if n:
                    telemetry.publish_signal(ts[:n], buf[:n], FS_HZ, decimate=decim)
                for e in tele_events:
                    telemetry.publish_event(e)
                tele_events.clear()
                if n_pub < pub_s.size:
                    pub_s[n_pub] = time.perf_counter() - t_pub
                    n_pub += 1
            if t_start is not None and now - t_start >= duration_s:
                break
        t_end = clock()
        cpu_pct = cpu.stop()
        retries_used = driver.retries_used   # resends during the run (a reply not in time), not at shutdown
        inlet.close_stream()
        del inlet
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        done = proc.stdout.readline().strip()
        if done != "done":
            raise RuntimeError(f"HIL process did not finish (said {done!r})")
        proc.wait(timeout=10)
        act.close()
        act = None
        with open(gt_path, encoding="utf-8") as f:
            gt = json.load(f)
    finally:
        if act is not None:
            act.close()
        if proc.poll() is None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        close_pty(master_fd)
        tmp.cleanup()
        priority.close()
        status = qos.status
        qos.release()
    if keep_dir is not None:
        # Raw material for diagnosis: ground truth, detections, blanking windows.
        os.makedirs(keep_dir, exist_ok=True)
        with open(os.path.join(keep_dir, f"ground_truth_{mode}.json"), "w", encoding="utf-8") as f:
            json.dump(gt, f)
        np.savez(os.path.join(keep_dir, f"detections_{mode}.npz"), t=np.concatenate(det_t) if det_t else np.empty(0),
                 channel=np.concatenate(det_c) if det_c else np.empty(0, int), blanks=np.asarray(blanks).reshape(-1, 2))
    detections = (np.concatenate(det_t) if det_t else np.empty(0), np.concatenate(det_c) if det_c else np.empty(0, int))
    requested_at, receipt_t = command_receipts(cmd_seq[:n_cmd], cmd_sent[:n_cmd], cmd_at[:n_cmd],
                                               gt["emulator_records"])
    delivered = command_delivered(cmd_seq[:n_cmd], cmd_sent[:n_cmd], gt["emulator_records"])
    breakdown = spike_path_samples(gt, cmd_spike[:n_cmd], cmd_pulled[:n_cmd], cmd_submit[:n_cmd], cmd_sent[:n_cmd],
                                   receipt_t, delivered, cmd_cfg[:n_cmd], t_from=t_start + WARMUP_S)
    s2c_s = breakdown.pop("spike_to_command") if mode == "ads" else []   # random stimulation follows no spike
    chunk_ms = chunk_latency_ms(gt, ch_rec[:n_chunks, 0], ch_rec[:n_chunks, 1], ch_rec[:n_chunks, 2],
                                t_from=t_start + WARMUP_S)
    slowest = slowest_blocks(gt, ch_rec[:n_chunks, 0], ch_rec[:n_chunks, 1], ch_rec[:n_chunks, 2],
                             t_from=t_start + WARMUP_S)
    res = evaluate(gt, detections, blanks, mode=mode, delay_s=delay_ms * 1e-3, t_eval=(t_start + WARMUP_S, t_end - 0.05),
                   requested_at=requested_at)
    if mode == "ads":
        # The same commands as the stages (spike_path_samples), so the end to end and its parts agree.
        res["spike_to_command_ms"] = stats_ms(s2c_s)
    misses = {"too_late_in_loop": n_too_late, "refused_too_late_by_device": int(refusal_rules.get("too_late", 0)),
              "delivered_late": res["late_deliveries"]}
    res.update({"mode": mode, "duration_s": float(t_end - t_start), "channels": n_channels,
                "trigger_channels": list(trigger_channels), "fs_hz": FS_HZ, "chunk_samples": CHUNK_N,
                "k_sigma": k, "delay_ms": delay_ms, "blanking_ms": blanking_ms, "unit_rate_hz": unit_rate_hz,
                "stim": stim.to_dict(), "refused": n_refused, "refusal_rules": refusal_rules, "dropped_too_late": n_too_late, "faults": faults,
                "deadline_misses": sum(misses.values()), "deadline_miss_breakdown": misses,
                "cpu_percent": cpu_pct, "host_steal_ms": cpu.host_steal_ms,
                "configure_commands": int(cmd_cfg[:n_cmd].sum()),
                "controller_spike_to_submit_done_ms": stats_ms(cmd_done[:n_cmd] - cmd_spike[:n_cmd]),
                "breakdown_ms": {k: stats_ms(v) for k, v in breakdown.items()},
                "dropped_samples": n_lost, "gaps": n_gaps, "low_latency": status, "nice": nice_status, "driver_retries": retries_used, "warm": warm, "busy_poll": busy_poll, "pulls": n_chunks,
                "lsl_time_correction_s": tc,
                "chunk_to_decision_ms": stats_ms(chunk_ms * 1e-3), "slowest_blocks": slowest, "pids": pids,
                "telemetry_publish_ms": None if telemetry is None else stats_ms(pub_s[:n_pub]),
                "requested_rate_hz": None if random_rate_hz is None else random_rate_hz,
                "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                         "load_avg_1min": os.getloadavg()[0]},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if return_samples:
        res["samples_ms"] = {"chunk_to_decision": chunk_ms.tolist(),
                             **{k: (np.asarray(v) * 1e3).tolist() for k, v in breakdown.items()},
                             "spike_to_command": (np.asarray(s2c_s) * 1e3).tolist()}
    return res


def command_receipts(seq, sent_t, at, records: list[dict]) -> tuple[dict, list]:
    """Each TRIGGER command's own device receipt, for commands given as parallel arrays (seq, send
    time, the deliver-at the controller asked for) and the emulator's records.

    The 16-bit seq wraps in a long run, so a seq alone names several commands:
    :func:`controller.metrics.join_receipts` pairs them by send order and receipt time.
    Returns ``({receipt_key: at}, [receipt time or None per command])``.
    """
    join = join_receipts([{"seq": int(q), "sent_t": float(s)} for q, s in zip(seq, sent_t)], records)
    requested_at = {receipt_key(r): float(a) for r, a in zip(join.records, at) if r is not None}
    return requested_at, [None if r is None else float(r["t_received"]) for r in join.records]


def receipt_key(rec: dict) -> tuple:
    """One device receipt's key, ``(seq, t_received)``: the seq alone repeats once it wraps."""
    return rec.get("seq"), rec.get("t_received")


def intended_at(rec: dict, requested_at: dict | None = None) -> float | None:
    """The deliver-at time a TRIGGER record was meant for, or None if unknown.

    A scheduled trigger's record carries it (``at``). An immediate one carries
    ``IMMEDIATE_AT`` (0.0, "now"), which the governor sends when the requested
    time had passed by the time it decided: its intended time is the
    controller's own request, looked up by :func:`receipt_key` in ``requested_at``
    (built from the command ↔ receipt join). (Testing ``at`` for truth dropped
    exactly those, the latest commands of a run.)
    """
    at = rec.get("at")
    if at is not None and at != IMMEDIATE_AT:
        return float(at)
    if requested_at is None:
        return None
    return requested_at.get(receipt_key(rec))


def spike_to_command_samples_ms(gt: dict, delay_s: float, requested_at: dict | None = None,
                                t_from: float = -np.inf) -> np.ndarray:
    """Spike → command (ms) per delivered ADS trigger: the emulator's receipt time of the TRIGGER
    minus the push time of the LSL block holding the spike sample (spike time = intended ``at`` − delay;
    ``requested_at``: ``{receipt_key: at}`` the controller asked for, see :func:`intended_at`); spikes
    before ``t_from`` (the warm-up) are left out. ``run`` reports :func:`spike_path_samples` instead,
    which also leaves out the command that configured the device and keeps the stages' population."""
    if not delay_s >= 0:
        raise ValueError(f"delay_s={delay_s!r} invalid, expected >= 0 s")
    push_t = np.asarray(gt["push_t"], np.float64)
    recs = [(r, intended_at(r, requested_at)) for r in gt["emulator_records"]
            if r.get("type") == "TRIGGER" and r.get("t_delivered") is not None]
    recs = [(r, a) for r, a in recs if a is not None]
    if not recs or push_t.size == 0:
        return np.empty(0)
    at = np.array([a for _, a in recs], np.float64)
    recs = [r for r, _ in recs]
    received = np.array([r["t_received"] for r in recs], np.float64)
    block = chunk_index(at - delay_s, gt["t0"], gt["fs_hz"], gt["chunk_n"])
    ok = (block >= 0) & (block < push_t.size) & (at - delay_s >= t_from)
    return (received[ok] - push_t[block[ok]]) * 1e3


def chunk_latency_ms(gt: dict, first_t, last_t, done_t, t_from: float = -np.inf) -> np.ndarray:
    """Push of each sample block → the controller done with the chunk holding it (ms), one value per block.

    A pull can return several blocks (the older ones waited longer), and a block
    can arrive split over two pulls; each block counts once, with the time the
    last of its samples had been through the detector, policy and commands.
    Blocks whose samples start before ``t_from`` are left out (warm-up).
    """
    push_t, done = _block_push_done(gt, first_t, last_t, done_t, t_from)
    return (done - push_t) * 1e3


def slowest_blocks(gt: dict, first_t, last_t, done_t, t_from: float = -np.inf, n: int = 20) -> list[dict]:
    """The ``n`` slowest blocks of ``chunk_latency_ms``, slowest first: ``{"push_t", "done_t", "ms"}``.

    Times are on the LSL clock, which on Linux is ``CLOCK_MONOTONIC``: a scheduler trace
    taken with ``perf record -k CLOCK_MONOTONIC`` is on the same clock, so ``stimloop bench
    blame`` can say which thread held a CPU while each of these blocks waited.
    """
    push_t, done = _block_push_done(gt, first_t, last_t, done_t, t_from)
    order = np.argsort(push_t - done)[:n]
    return [{"push_t": round(float(push_t[i]), 6), "done_t": round(float(done[i]), 6),
             "ms": round(float(done[i] - push_t[i]) * 1e3, 3)} for i in order]


def _block_push_done(gt: dict, first_t, last_t, done_t, t_from: float) -> tuple[np.ndarray, np.ndarray]:
    """Per block (each once): its push time and when the controller was done with it (s)."""
    fs, chunk_n, t0 = gt["fs_hz"], gt["chunk_n"], gt["t0"]
    push_t = np.asarray(gt["push_t"], np.float64)
    first_t, last_t, done_t = (np.asarray(a, np.float64) for a in (first_t, last_t, done_t))
    b0 = chunk_index(first_t, t0, fs, chunk_n)
    b1 = chunk_index(last_t, t0, fs, chunk_n)
    n_per = np.maximum(b1 - b0 + 1, 0)
    blocks = np.repeat(b1, n_per) - (np.arange(n_per.sum()) - np.repeat(np.cumsum(n_per) - n_per, n_per))
    done = np.repeat(done_t, n_per)
    start = np.repeat(first_t, n_per)
    ok = (blocks >= 0) & (blocks < push_t.size) & (start >= t_from)
    blocks, done = blocks[ok], done[ok]
    # Pulls are in time order: the last one holding a block is when the whole block was handled.
    last = blocks.size - 1 - np.unique(blocks[::-1], return_index=True)[1]
    return push_t[blocks[last]], done[last]


#: The stages of ``spike_path_samples`` that add up to its ``spike_to_command``.
SPIKE_PATH_STAGES = ("lsl_push_to_pull", "detect_policy", "governor_and_framing", "write_to_device_receipt")


def command_delivered(seq, sent_t, records: list[dict]) -> list[bool]:
    """Per command: whether its own device record shows the TRIGGER delivered (joined as in
    :func:`command_receipts`)."""
    join = join_receipts([{"seq": int(q), "sent_t": float(s)} for q, s in zip(seq, sent_t)], records)
    return [r is not None and r.get("t_delivered") is not None for r in join.records]


def spike_path_samples(gt: dict, spike_t, pulled_t, submit_t, sent_t, receipt_t, delivered, configured,
                       t_from: float = -np.inf) -> dict:
    """The spike path per command (s): the end to end (``spike_to_command``: push of the block holding
    the spike → the device's receipt) and its stages, LSL (push → pull return), detect+policy
    (→ submit), governor+framing (→ the write starts), write → device receipt, and submit → receipt.

    Every list covers the same commands, so the stages add up to the end to end command by command:
    those the device delivered (``delivered``), with a receipt, whose spike is at or after ``t_from``
    (the detector's warm-up, scored nowhere else either) and that did not configure the device first
    (``configured``: a one-off round trip the session pays once per parameter change, not per spike).
    """
    push_t = np.asarray(gt["push_t"], np.float64)
    blocks = chunk_index(np.asarray(spike_t, np.float64), gt["t0"], gt["fs_hz"], gt["chunk_n"])
    out: dict[str, list[float]] = {k: [] for k in ("spike_to_command", "lsl_push_to_pull", "detect_policy",
                                                   "governor_and_framing", "write_to_device_receipt",
                                                   "submit_to_device_receipt")}
    for b, sp, p, sub, snt, rt, ok, cfg in zip(blocks, spike_t, pulled_t, submit_t, sent_t, receipt_t, delivered,
                                               configured):
        if not (0 <= b < push_t.size) or rt is None or not ok or cfg or sp < t_from:
            continue
        out["spike_to_command"].append(rt - push_t[b])
        out["lsl_push_to_pull"].append(p - push_t[b])
        out["detect_policy"].append(sub - p)
        out["governor_and_framing"].append(snt - sub)
        out["write_to_device_receipt"].append(rt - snt)
        out["submit_to_device_receipt"].append(rt - sub)
    return out


def evaluate(gt: dict, detections: tuple[np.ndarray, np.ndarray], blanks: list[tuple[float, float]], mode: str,
             delay_s: float, t_eval: tuple[float, float], requested_at: dict | None = None) -> dict:
    """Score one run against the HIL ground truth (all times on the LSL clock).

    ``requested_at``: ``{receipt_key: deliver-at}`` as the controller asked (see :func:`intended_at`).
    ``late_deliveries``: delivered TRIGGERs that reached the device after their intended time, so
    the device delivered them at once (immediate, or scheduled but accepted within its lateness
    tolerance): deadline misses that still stimulated, counted in ``delay_error_ms`` as they were.
    """
    t0 = gt["t0"]
    true_t = np.asarray(gt["trigger_spikes"]["t"])
    true_c = np.asarray(gt["trigger_spikes"]["channel"])
    d_t, d_c = detections
    recs = [r for r in gt["emulator_records"] if r.get("type") == "TRIGGER"]
    delivered = [r for r in recs if r.get("t_delivered") is not None]

    def nearest(ts: np.ndarray, x: float) -> float:
        if ts.size == 0:
            return np.inf
        j = np.searchsorted(ts, x)
        return min(abs(ts[j] - x) if j < ts.size else np.inf, abs(ts[j - 1] - x) if j > 0 else np.inf)

    by_ch_true = {int(c): np.sort(true_t[true_c == c]) for c in np.unique(true_c)}
    by_ch_det = {int(c): np.sort(d_t[d_c == c]) for c in np.unique(d_c)} if d_t.size else {}
    # Artifact extents from the simulator: [delivered, delivered + artifact duration + 1 ms).
    art = [(p["t"], p["t"] + p["artifact_s"] + 0.001) for p in gt["pulses"]]
    unmatched_art = unmatched_noise = 0
    unmatched: list[dict] = []
    pulse_t = np.sort(np.asarray([p["t"] for p in gt["pulses"]]))
    for t, c in zip(d_t.tolist(), d_c.tolist()):
        if nearest(by_ch_true.get(int(c), np.empty(0)), t) <= MATCH_S:
            continue
        if any(a0 <= t < a1 for a0, a1 in art):
            unmatched_art += 1
        else:
            unmatched_noise += 1
        if len(unmatched) < 20:   # for diagnosis: where the unmatched detections were
            j = np.searchsorted(pulse_t, t) - 1
            unmatched.append({"t_from_start_s": t - t0, "channel": int(c),
                              "ms_after_pulse": (t - pulse_t[j]) * 1e3 if j >= 0 else None,
                              "ms_to_true_spike": nearest(by_ch_true.get(int(c), np.empty(0)), t) * 1e3})
    blank_arr = np.asarray(blanks).reshape(-1, 2)
    missed = scored = 0
    for t, c in zip(true_t.tolist(), true_c.tolist()):
        if not (t_eval[0] <= t <= t_eval[1]):
            continue
        if blank_arr.size and np.any((blank_arr[:, 0] - MATCH_S <= t) & (t < blank_arr[:, 1] + MATCH_S)):
            continue   # inside (or within 1 ms of) a blanking window: not expected to be seen
        scored += 1
        if nearest(by_ch_det.get(int(c), np.empty(0)), t) > MATCH_S:
            missed += 1

    s2c = spike_to_command_samples_ms(gt, delay_s, requested_at, t_eval[0]) * 1e-3 if mode == "ads" else []
    s2c_wait, delay_err = [], []
    late = 0
    for r in delivered:
        at = intended_at(r, requested_at)
        if at is None:
            continue
        if r["t_received"] > at:
            late += 1
        t_spike = at - delay_s if mode == "ads" else None
        if mode == "ads":
            s2c_wait.append(r["t_received"] - t_spike)
            all_true = np.sort(true_t)
            j = np.searchsorted(all_true, t_spike)
            cand = [all_true[x] for x in (j - 1, j) if 0 <= x < all_true.size]
            if cand:
                tt = min(cand, key=lambda v: abs(v - t_spike))
                if abs(tt - t_spike) <= MATCH_S:
                    delay_err.append(r["t_delivered"] - tt - delay_s)
    dur = max(t_eval[1] - t_eval[0], 1e-9)
    n_del_eval = sum(1 for r in delivered if t_eval[0] <= r["t_delivered"] <= t_eval[1])
    return {
        "spike_to_command_ms": stats_ms(s2c),
        "spike_time_to_command_ms": stats_ms(s2c_wait),
        "delay_error_ms": stats_ms(delay_err),
        "true_spikes": int(np.sum((true_t >= t_eval[0]) & (true_t <= t_eval[1]))),
        "scored_spikes": scored,
        "missed_spikes": missed,
        "detections": int(d_t.size),
        "artifact_triggers": unmatched_art,
        "false_detections": unmatched_noise,
        "unmatched_detections": unmatched,
        "pulses_requested": len(recs),
        "pulses_delivered": len(delivered),
        "late_deliveries": late,
        "rate_hz": n_del_eval / dur,
        "weight_change": {mode: gt["w_final"] - gt["w_init"]},
        "w_init": gt["w_init"], "w_final": gt["w_final"],
        "emulator_counters": gt["emulator_counters"],
        "late_render_pulses": sum(1 for p in gt["pulses"] if p["late_samples"] > 0),
    }


def _table(res: dict) -> str:
    rows = [("mode", res["mode"] + (" (busy poll)" if res.get("busy_poll") else "")),
            ("duration_s", f"{res['duration_s']:.2f}"),
            ("channels × fs", f"{res['channels']} × {res['fs_hz']:.0f} Hz"),
            ("rate_hz (delivered)", f"{res['rate_hz']:.2f}")]
    def f(v) -> str:
        return "–" if v is None else f"{v:.3f}"   # too few values for that percentile (stats_ms)

    for key in ("spike_to_command_ms", "spike_time_to_command_ms", "delay_error_ms", "chunk_to_decision_ms"):
        s = res[key]
        if s["n"]:
            rows.append((key, f"p50 {f(s['p50'])}  p99 {f(s['p99'])}  max {f(s['max'])}  (n={s['n']})"))
        else:
            rows.append((key, "n/a"))
    for key in ("true_spikes", "scored_spikes", "missed_spikes", "detections", "artifact_triggers",
                "false_detections", "pulses_delivered", "refused", "deadline_misses"):
        rows.append((key, str(res[key])))
    rows.append(("weight_change", ", ".join(f"{k} {v:+.4f}" for k, v in res["weight_change"].items())))
    steal = res.get("host_steal_ms")
    if steal is not None:   # a VM's host running something else on our vCPUs during the run (10 ms resolution)
        rows.append(("host_steal_ms", f"{steal['total']:.0f} (" +
                     ", ".join(f"{c} {v:.0f}" for c, v in steal["per_cpu"].items()) + ")"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.bench_ads", description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of real time per run (default 10)")
    ap.add_argument("--json", default=None, help="write the result JSON here")
    ap.add_argument("--random", action="store_true",
                    help="run the random-stimulation control instead of ADS (at --rate-hz)")
    ap.add_argument("--rate-hz", type=float, default=None,
                    help="random-control rate (default: the trigger population's total rate)")
    ap.add_argument("--compare", action="store_true",
                    help="run ADS, then random stimulation at the ADS run's delivered rate; report both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="folder for the ground truth (every true spike, every pulse with its receipt time, "
                         "the synaptic weight over time) and the detections")
    ap.add_argument("--low-latency", action=argparse.BooleanOptionalAction, default=True,
                    help="hold a PM QoS request (/dev/cpu_dma_latency = 0) for the run, as cyclictest does: CPUs "
                         "poll instead of halting when idle (needs write access; recorded in the JSON; default on)")
    ap.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                    help="rehearse the governor and the frame encoder between commands (Actuator.warm) so a "
                         "spike finds them in the CPU caches (default on)")
    ap.add_argument("--busy-poll", action="store_true",
                    help="wait for chunks by polling without sleeping: less latency, one CPU core spent "
                         "(docs/performance_log.md, 'Busy polling')")
    ap.add_argument("--nice", type=int, default=DEFAULT_NICE,
                    help=f"the controller's nice value (-20..19; default {DEFAULT_NICE}, as session.nice; below 0 "
                         "needs root or CAP_SYS_NICE, recorded in the JSON)")
    ap.add_argument("--k", type=float, default=5.0, help="threshold in σ (REFERENCE.md §2: 4-5)")
    args = ap.parse_args(argv)
    if not 0.5 <= args.duration <= 3600:
        ap.error(f"--duration {args.duration} invalid, expected 0.5..3600 s")
    if not -20 <= args.nice <= 19:
        ap.error(f"--nice {args.nice} invalid, expected -20..19")
    trig = (0, 1)
    unit_rate = 2.5
    if args.random and not args.compare:
        rate = args.rate_hz if args.rate_hz is not None else unit_rate * len(trig)
        res = run(args.duration, random_rate_hz=rate, seed=args.seed, k=args.k, low_latency=args.low_latency, keep_dir=args.out,
                  warm=args.warm, busy_poll=args.busy_poll, nice=args.nice)
    else:
        res = run(args.duration, seed=args.seed, k=args.k, low_latency=args.low_latency, keep_dir=args.out,
                  warm=args.warm, busy_poll=args.busy_poll, nice=args.nice)
        if args.compare:
            rate = args.rate_hz if args.rate_hz is not None else max(res["rate_hz"], 0.1)
            rnd = run(args.duration, random_rate_hz=rate, seed=args.seed, k=args.k, low_latency=args.low_latency, keep_dir=args.out,
                  warm=args.warm, busy_poll=args.busy_poll, nice=args.nice)
            res["random"] = rnd
            res["weight_change"] = {"ads": res["weight_change"]["ads"], "random": rnd["weight_change"]["random"]}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, allow_nan=False)
    print(_table(res))
    if "random" in res:
        print("\n-- random control --")
        print(_table(res["random"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
