"""``metrics.json`` from a session folder: latency per stage, detections, dose.

Pure functions over the recorded files, so metrics can be rebuilt after a
crash (``stimloop report``). Latency end to end is measured against ground
truth: timestamp of the last sample of the deciding window (LSL clock) →
command received by the device (the emulator's receipt time, same clock).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from controller.recorder import read_json_object, read_jsonl

#: Device-log records that are a trigger command's receipt: the emulator writes ``TRIGGER`` (one per
#: executed frame: delivered, refused, or a scheduled one cancelled), the simulated runner ``TRIGGER``
#: too, older logs ``trigger``. A retry the device answered from its dedup memory (``duplicate``) is
#: the same command again, stamped when the retry arrived: not a receipt (PROTOCOL.md §4).
TRIGGER_RECORD_TYPES = ("trigger", "TRIGGER")
#: A receipt later than this after the command was sent is not its receipt. The host gives up on a
#: command after ``(1 + retries) × timeout_s`` (0.2 s by default) and then records no COMMAND event;
#: a receipt this late can only be another command's that reused the seq (PROTOCOL.md §4: the seq
#: is 16-bit and wraps, from a random start, in about 1.8 h of heartbeats at 10 Hz).
MAX_RECEIPT_DELAY_S = 10.0

# Detection scoring for the built-in demo: a detection counts for a seizure when it
# starts between the onset and the offset (+ this grace, for stimulation-shortened seizures).
DETECTION_GRACE_S = 3.0


PERCENTILES = (50.0, 90.0, 99.0, 99.9)
STAT_KEYS = ("p50", "p90", "p99", "p999", "max")


def min_n_for(q_percent: float) -> int:
    """Fewest values that can estimate percentile ``q_percent``: ``1 / (1 − q)`` (p99: 100, p99.9: 1000).

    With fewer, the top ``1 − q`` of the distribution holds less than one value and
    ``np.percentile`` only interpolates between the largest few: a "p99" of ~45
    values is their second-largest value, not a p99.
    """
    return int(round(1.0 / (1.0 - q_percent / 100.0)))


#: per reported percentile key, the fewest values it is reported for (``None`` below); the rule is
#: for tails: the median of one value is that value (a session with one trigger has a p50).
MIN_N = {k: (1 if q <= 50.0 else min_n_for(q)) for k, q in zip(STAT_KEYS, PERCENTILES)}


def percentiles_ms(values_s) -> dict:
    """p50/p90/p99/p99.9/max and n of latencies given in seconds (None and non-finite ignored), in ms.

    The same rule as the benchmarks' ``stats_ms``: a percentile is ``None`` below ``MIN_N``
    values (a session with 12 commands has a p50 and a max, not a p99); ``max`` and ``n``
    are always given.
    """
    return summarize_ms(finite_ms(values_s))[0]


def finite_ms(values_s) -> np.ndarray:
    """The finite values of ``values_s`` (seconds; None becomes NaN and is dropped), in ms."""
    v = np.asarray(values_s, dtype=np.float64).ravel()
    return v[np.isfinite(v)] * 1e3


def summarize_ms(v_ms: np.ndarray) -> tuple[dict, np.ndarray]:
    """``(percentiles_ms's dict, the unrounded PERCENTILES)`` of finite values in ms (``q`` empty if none)."""
    if v_ms.size == 0:
        return {**{k: None for k in STAT_KEYS}, "n": 0}, np.empty(0)
    q = np.percentile(v_ms, PERCENTILES)
    out = {k: (round(float(x), 4) if v_ms.size >= MIN_N[k] else None) for k, x in zip(STAT_KEYS, q)}
    out["max"] = round(float(v_ms.max()), 4)
    out["n"] = int(v_ms.size)
    return out, q


def trigger_commands(events: list[dict]) -> list[dict]:
    """The session's trigger COMMAND events (every trigger the device acknowledged), in log order."""
    return [e for e in events if e["kind"] == "command" and e.get("op") == "trigger"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and bool(np.isfinite(x))


@dataclass
class ReceiptJoin:
    """Each trigger command paired with its device receipt (``join_receipts``).

    ``records[i]``: the device-log record of command ``i``'s receipt, ``None`` when none fits.
    ``received_t[i]``: its ``t_received`` when the device accepted the trigger (``ok``), else ``None``.
    ``before_send``: same-seq receipts passed over because they precede the send of the command
    that would have claimed them (a negative latency, never reported). ``too_late``: commands left
    unpaired because their next same-seq receipt came after ``MAX_RECEIPT_DELAY_S`` or after the
    next command with that seq was sent (an implausible latency, never reported).
    """
    records: list
    received_t: list
    before_send: int = 0
    too_late: int = 0


def join_receipts(commands: list[dict], device_log: list[dict],
                  max_delay_s: float = MAX_RECEIPT_DELAY_S) -> ReceiptJoin:
    """Pair each trigger command with the device receipt of the same ``seq`` sent in reply to it.

    The 16-bit seq wraps (and restarts at random with each host connection), so a seq alone does
    not name one command. Receipts (``TRIGGER_RECORD_TYPES``, duplicates left out) are queued per
    seq in ``t_received`` order; commands are taken in send order (``sent_t``, else their event
    time) and each takes the first receipt of its seq at or after its send time, within
    ``max_delay_s`` and before the next command with the same seq was sent. Every receipt is used
    at most once; none earlier than its command's send is ever paired. The one join behind
    ``metrics.json``, the ADS timeline and the report's histogram.
    """
    queues: dict = {}
    for k, r in enumerate(device_log):
        if r.get("type") not in TRIGGER_RECORD_TYPES or r.get("duplicate") or r.get("seq") is None:
            continue
        if not _finite(r.get("t_received")):
            continue
        queues.setdefault(r["seq"], []).append((float(r["t_received"]), k, r))
    for q in queues.values():
        q.sort(key=lambda x: (x[0], x[1]))
    send = [c.get("sent_t") if _finite(c.get("sent_t")) else c.get("t") for c in commands]
    order = sorted((i for i, c in enumerate(commands) if c.get("seq") is not None and _finite(send[i])),
                   key=lambda i: (send[i], i))
    next_send: dict[int, float] = {}
    last_of_seq: dict = {}
    for i in reversed(order):
        seq = commands[i]["seq"]
        next_send[i] = last_of_seq.get(seq, float("inf"))
        last_of_seq[seq] = send[i]
    out = ReceiptJoin(records=[None] * len(commands), received_t=[None] * len(commands))
    cursor: dict = {}
    for i in order:
        seq, t_send = commands[i]["seq"], float(send[i])
        q, k = queues.get(seq, ()), cursor.get(seq, 0)
        while k < len(q) and q[k][0] < t_send:
            k += 1
            out.before_send += 1
        if k < len(q):
            if q[k][0] <= t_send + max_delay_s and q[k][0] < next_send[i]:
                rec = q[k][2]
                k += 1
                out.records[i] = rec
                if rec.get("ok", True):
                    out.received_t[i] = float(rec["t_received"])
            else:
                out.too_late += 1
        cursor[seq] = k
    return out


def end_to_end_pairs(commands: list[dict], received_t: list) -> list[tuple[dict, float]]:
    """``(command, device receipt time)`` of the commands that reached the device and carry the
    end of their deciding window: the end-to-end latency is ``receipt − window_end_t``."""
    return [(c, r) for c, r in zip(commands, received_t) if r is not None and c.get("window_end_t") is not None]


def _session_info(session_dir: Path) -> dict:
    """``session.json`` (which runner, when, where), ``{}`` if the folder has none or it is unreadable."""
    try:
        return json.loads((Path(session_dir) / "session.json").read_text())
    except (OSError, ValueError):
        return {}


def load_ground_truth(session_dir: Path) -> dict:
    p = Path(session_dir) / "ground_truth.json"
    return read_json_object(p) if p.exists() else {}


def chunk_index(sample_t, t0: float, fs_hz: float, chunk_n: int, first_sample: int = 0) -> np.ndarray:
    """Which simulator chunk holds each sample time: sample i carries ``t0 + i / fs_hz``, chunk k
    holds samples ``first_sample + k * chunk_n`` onwards (the HIL outlets' layout)."""
    return (np.rint((np.asarray(sample_t, np.float64) - t0) * fs_hz).astype(np.int64) - first_sample) // chunk_n


def chunk_push_times(session_dir: Path, truth: dict, sample_t) -> np.ndarray:
    """When the simulator pushed the chunk holding each sample time in ``sample_t`` (NaN if unknown).

    From ``push_t.f64`` (``hil_sim.process.write_ground_truth``): chunk k holds
    samples ``first_sample + k * chunk_n ...``, sample i carries ``t0 + i / fs``.
    Real sources have no such truth: all NaN. Under stream faults the simulator writes NaN for
    the chunks it dropped, cut short or re-stamped, and their samples get NaN here.
    """
    t = np.asarray(sample_t, float)
    push, t0 = truth.get("push"), truth.get("t0")
    path = Path(session_dir) / push["file"] if push else None
    if path is None or t0 is None or not path.exists():
        return np.full(t.shape, np.nan)
    pt = np.fromfile(path, dtype="<f8")
    k = chunk_index(t, t0, push["fs_hz"], push["chunk_n"], push["first_sample"])
    ok = (k >= 0) & (k < pt.size)
    return np.where(ok, pt[np.clip(k, 0, max(pt.size - 1, 0))] if pt.size else np.nan, np.nan)


def score_detections(detection_starts: list[float], seizures: list[dict], session_end_t: float | None = None,
                     min_detect_s: float = 0.0) -> dict:
    """Event-level scoring of detections against true seizures (all times on the session clock).

    A seizure starting less than ``min_detect_s`` (the model's window + how long p must stay
    above threshold) before ``session_end_t`` could not be confirmed before the end: it is
    listed in ``unscored_near_end`` (session-clock times, as the other times here) and in
    ``unscored_before_end_s`` (how long before the end each started: what a reader of the summary
    can place, the session clock being LSL's, seconds since the machine booted) and counts neither
    as detected nor as missed; a detection it explains is not a false one.
    """
    cut = session_end_t - min_detect_s if session_end_t is not None and min_detect_s > 0 else float("inf")
    onsets = [s["onset_t"] for s in seizures if s["onset_t"] <= cut]
    latencies, detected = [], 0
    used = set()
    for s in seizures:
        end = s.get("offset_t") or session_end_t or float("inf")
        hits = [d for d in detection_starts if s["onset_t"] <= d <= end + DETECTION_GRACE_S]
        used.update(hits)
        if hits and s["onset_t"] <= cut:
            detected += 1
            latencies.append(hits[0] - s["onset_t"])
    false = [d for d in detection_starts if d not in used]
    return {
        "onsets": len(onsets),
        "unscored_near_end": [s["onset_t"] for s in seizures if s["onset_t"] > cut],
        "unscored_before_end_s": [session_end_t - s["onset_t"] for s in seizures if s["onset_t"] > cut],
        "detected": detected,
        "sensitivity": (detected / len(onsets)) if onsets else None,
        "false_detections": len(false),
        "false_detection_t": false,
        "latency_s_median": float(np.median(latencies)) if latencies else None,
        "latency_s": latencies,
        "scoring": f"detection start within [onset, offset + {DETECTION_GRACE_S} s]; onsets less than "
                   f"{min_detect_s:g} s (window + min duration) before the end are not scored",
    }


#: ``detection["source"]``: where the scored detections come from (README, metrics table)
DETECTIONS_FROM_POLICY = "policy"   # the responsive policy's own detection_start decisions: what the loop acted on
DETECTIONS_FROM_MODEL = "model"     # the model's predictions, scored here as a detector with its contract's settings


@dataclass
class Detections:
    """Detection starts to score, where they came from, and the rule that made them (``None``: not scorable)."""
    starts: list | None
    source: str | None
    min_detect_s: float
    rule: str = ""
    reason: str | None = None   # why ``starts`` is None
    settings: dict | None = None


def _session_contract(session_dir: Path, model_sha256: str | None):
    """``(contract, config, None)`` of the model the session ran, read from the file its ``config.toml``
    names, or ``(None, None, reason)``. A file that no longer hashes to the session's ``model_sha256`` is refused:
    another model's threshold would score this session's probabilities."""
    import hashlib

    from controller.config import ConfigError, load_config
    from controller.inference import ContractError, read_contract

    try:
        cfg = load_config(session_dir / "config.toml")
    except ConfigError as e:
        return None, None, f"the session's config.toml cannot be read ({e}), so neither can its model's contract"
    path = cfg.model_path()
    if not path.is_file():
        return None, None, f"the session's model {path} is not there to read its contract from"
    if model_sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != model_sha256:
        return None, None, (f"{path} is not the model the session ran (sha256 differs from the recorded "
                            f"{model_sha256[:12]}…)")
    try:
        return read_contract(path), cfg, None
    except (ContractError, OSError, ValueError) as e:
        return None, None, f"the contract of {path} cannot be read ({e})"


def session_detections(session_dir: Path, by_kind: dict[str, list[dict]]) -> Detections:
    """The detections a session's ``detection`` score is computed from.

    The responsive policy records its detections (``decision`` / ``detection_start``): those are scored,
    since they are what the loop acted on. Every other model-driven policy (adaptive, periodic, Poisson,
    personalized, plasticity-aware, none) runs the same model but declares no detection; scoring its empty
    decision list would report sensitivity 0 however many seizures the model detected. For those the model's
    ``prediction`` events are scored as the responsive policy would have acted on them
    (``models.seizure.scoring.detector_events``, the scorer tested against ``ResponsivePolicy``), with the
    contract's threshold, ``min_duration_s`` and ``refractory_s`` — the operating point its figures were
    measured at — and every window the loop did not act on (invalid: warm-up, blanking after a burst,
    bad samples; or late) as a hole that restarts the onset timer.
    """
    started = next((e for e in by_kind.get("status", []) if e.get("status") == "started" and "min_detect_s" in e), {})
    policy = started.get("policy")
    # A detection_start inside the refractory period (suppressed) is a re-detection of the last one,
    # as detector_events merges it for the model-scored path: counted once, either way.
    decided = [e["t"] for e in by_kind.get("decision", [])
               if e.get("what") == "detection_start" and not e.get("suppressed")]
    if policy == "responsive" or (policy is None and decided):
        return Detections(decided, DETECTIONS_FROM_POLICY, started.get("min_detect_s") or 0.0,
                          "the responsive policy's detection_start decisions")
    predictions = by_kind.get("prediction", [])
    if not predictions:
        return Detections(None, None, 0.0, reason=f"policy {policy!r} runs no seizure model and declares no "
                                                   "detection: nothing to score")
    contract, cfg, why = _session_contract(session_dir, started.get("model_sha256"))
    if contract is None:
        return Detections(None, None, 0.0, reason=f"policy {policy!r} declares no detection and {why}")
    from controller.inference import contract_min_duration_s
    from models.seizure.scoring import detector_events

    late = {e["window_end_t"] for e in by_kind.get("deadline_miss", [])}
    windows: dict[float, float] = {}
    for e in predictions:
        t = e["window_end_t"]
        acted = e.get("valid") and t not in late and _finite(e.get("p"))
        windows[t] = float(e["p"]) if acted else np.nan
    t = np.array(sorted(windows), dtype=np.float64)
    p = np.array([windows[x] for x in t], dtype=np.float64)
    # A contract without them gets what the responsive policy would use: the loop's default min duration,
    # the session's policy.refractory_s.
    min_s = contract_min_duration_s(contract)
    refractory_s = float((contract.model_extra or {}).get("refractory_s", cfg.policy.refractory_s))
    starts = [ev[0] for ev in detector_events(t, p, contract.threshold, min_s, refractory_s)]
    settings = {"model": contract.version, "threshold": contract.threshold, "min_duration_s": min_s,
                "refractory_s": refractory_s}
    return Detections(starts, DETECTIONS_FROM_MODEL, contract.window_s + min_s,
                      f"the model's predictions (policy {policy!r} declares no detection), scored offline as "
                      f"detector events at its contract's threshold {contract.threshold:g}, min_duration_s "
                      f"{min_s:g} s, refractory_s {refractory_s:g} s; windows the loop did not act on (invalid "
                      "or late) restart the onset timer", settings=settings)


def governed_t(command: dict) -> float:
    """When the governor had passed ``command`` (``t_governed``); sessions recorded before
    2026-12-07 have only ``t_decided``, the policy's decision just before the governor."""
    return command.get("t_governed", command["t_decided"])


def _latencies(session_dir: Path, truth: dict, predictions: list[dict], commands: list[dict],
               received: list, spike_policy: bool = True) -> dict:
    """Per-command latencies in s: ``end_to_end`` (decision's last sample → device receipt),
    ``pushed_to_device`` (that sample's chunk pushed by the simulator → receipt) and ``stages``.
    ``spike_policy``: the chunk-driven commands answer a detected spike (ADS, random control), not a
    schedule falling due in a chunk (periodic, Poisson, personalized, plasticity-aware)."""
    chunk_cmds = [c for c in commands if "t_read" in c]   # chunk-driven (spike and clock policies)
    chunk_push = chunk_push_times(session_dir, truth, [c["window_end_t"] for c in chunk_cmds])
    reached = end_to_end_pairs(commands, received)
    reached_push = chunk_push_times(session_dir, truth, [c["window_end_t"] for c, _ in reached])
    read_preds = [p for p in predictions if "t_read" in p]
    read_preds_push = chunk_push_times(session_dir, truth, [p["window_end_t"] for p in read_preds])
    stages = {
        # Model policies: the window's newest source sample -> read by the loop. That includes the wait
        # for the rest of its chunk and the chunk's push (the shipped model's windows end one sample
        # before a simulator chunk does: 2 ms at 512 Hz, then ~0.6 ms to compute and push it), so ...
        "ring_read": [p["t_read"] - p["window_end_t"] for p in read_preds],
        # Spike policies: detected spike sample -> its chunk read by the loop (chunking, LSL, ring);
        # clock-driven policies the same from the newest sample of the chunk a burst fell due in ...
        "spike_to_loop": [c["t_read"] - c["window_end_t"] for c in chunk_cmds] if spike_policy else [],
        "chunk_to_loop": [] if spike_policy else [c["t_read"] - c["window_end_t"] for c in chunk_cmds],
        # ... of either, after the chunk left the simulator (LSL, ring): the controller's share.
        "pushed_to_loop": [c["t_read"] - p for c, p in zip(chunk_cmds, chunk_push) if np.isfinite(p)]
                          + [w["t_read"] - p for w, p in zip(read_preds, read_preds_push) if np.isfinite(p)],
        # ... then the chunk's data-quality check and windowing, before the spike policy sees it.
        "chunk_checks": [c["t_inference"] - c["t_read"] for c in chunk_cmds if "t_inference" in c],
        "features": [p["t_features"] - p["t_read"] for p in predictions if "t_features" in p],
        "inference": [p["t_inference"] - p["t_features"] for p in predictions if "t_inference" in p],
        # Policy (spike policies: detector + policy) and the safety governor's check ...
        "policy_governor": [governed_t(c) - c["t_inference"] for c in commands if "t_decided" in c and "t_inference" in c],
        # ... then the driver: configure round trip if the parameters changed, framing, write.
        "port_write": [c["sent_t"] - governed_t(c) for c in commands if "t_decided" in c],
        "device_receive": [r - c["sent_t"] for c, r in zip(commands, received) if r is not None],
    }
    return {"end_to_end": [r - c["window_end_t"] for c, r in reached],
            "pushed_to_device": [r - p for (_, r), p in zip(reached, reached_push) if np.isfinite(p)],
            "stages": stages}


def chunk_command_times(session_dir: Path) -> dict[str, np.ndarray]:
    """For each chunk-driven trigger (spike policies) the device received, its moments in s on the
    session clock, one array each, aligned: ``window_end`` (the decision's last sample: the detected
    spike), ``pushed`` (the spike's chunk left the simulator; NaN
    where the simulator recorded no push times), ``read`` (the loop read it), ``checked`` (data-quality
    check done), ``decided`` (the policy's request), ``governed`` (the governor passed it), ``sent``
    (the frame's write began), ``received`` (the device's receipt stamp); and ``configured``: True
    where a CONFIGURE round trip went first (the parameters had changed), inside sent − governed;
    ``cpu_read``, ``cpu_decided``: the loop thread's CPU time at read and decided (NaN in a session
    recorded without it), so that decided − read splits into on- and off-CPU time."""
    session_dir = Path(session_dir)
    events = read_jsonl(session_dir / "events.jsonl")
    commands = [e for e in events if e["kind"] == "command" and e.get("op") == "trigger" and "t_read" in e]
    received = join_receipts(commands, read_jsonl(session_dir / "device_log.jsonl")).received_t
    reached = [(c, r) for c, r in zip(commands, received) if r is not None]
    pushed = chunk_push_times(session_dir, load_ground_truth(session_dir), [c["window_end_t"] for c, _ in reached])
    col = lambda f: np.asarray([f(c) for c, _ in reached], float)   # noqa: E731
    return {"window_end": col(lambda c: c["window_end_t"]),
            "pushed": np.asarray(pushed, float).reshape(-1), "read": col(lambda c: c["t_read"]),
            "checked": col(lambda c: c["t_inference"]), "decided": col(lambda c: c["t_decided"]),
            "governed": col(governed_t), "sent": col(lambda c: c["sent_t"]),
            "received": np.asarray([r for _, r in reached], float),
            "configured": np.asarray([c.get("configure_seq") is not None for c, _ in reached], bool),
            "cpu_read": col(lambda c: c.get("cpu_read", np.nan)),
            "cpu_decided": col(lambda c: c.get("cpu_decided", np.nan))}


def compute_metrics(session_dir: Path) -> dict:
    session_dir = Path(session_dir)
    events = read_jsonl(session_dir / "events.jsonl")
    device_log = read_jsonl(session_dir / "device_log.jsonl")
    truth = load_ground_truth(session_dir)

    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["kind"], []).append(e)

    predictions = by_kind.get("prediction", [])
    commands = [c for c in by_kind.get("command", []) if c.get("op") == "trigger"]
    join = join_receipts(commands, device_log)
    received = join.received_t   # per command: its device receipt time, None if it has none
    from controller.config import SPIKE_POLICY_KINDS
    started = next((e for e in by_kind.get("status", []) if e.get("status") == "started" and "policy" in e), {})
    lat = _latencies(session_dir, truth, predictions, commands, received,
                     spike_policy=started.get("policy", "ads") in SPIKE_POLICY_KINDS)

    seizures = truth.get("seizures", [])
    session_end = truth.get("end_t")
    detection = None
    # A spiking simulator has no seizures to score, nor has a simulator that was only the stimulator.
    if truth and truth.get("model") != "spiking" and not truth.get("stimulator_only"):
        found = session_detections(session_dir, by_kind)
        if found.starts is None:
            detection = {"source": None, "reason": found.reason, "onsets": len(seizures), "detected": None,
                         "sensitivity": None, "false_detections": None, "latency_s_median": None}
        else:
            detection = {"source": found.source,
                         **score_detections(found.starts, seizures, session_end, found.min_detect_s)}
            detection["scoring"] = f"detections: {found.rule}; {detection['scoring']}"
            detection["detection_t"] = list(found.starts)
            if found.settings:
                detection["detector"] = found.settings

    ads = ads_metrics(events, device_log, truth)
    charge = sum(float(c.get("burst_charge_uc", 0.0)) for c in commands)
    t_first = first_sample_t(session_dir)
    since_start = (lambda t: None) if t_first is None else (lambda t: round(t - t_first, 3))   # noqa: E731
    unreached = [c["seq"] for c, r in zip(commands, received) if device_log and r is None]
    return {
        # "virtual": a simulated-time session (stimloop sim), whose latencies are the modeled ones
        # (simulator.stim_latency_ms) and whose stages take no time on its clock.
        "clock": "virtual" if _session_info(session_dir).get("runner") == "simulated" else "real",
        "end_to_end_ms": percentiles_ms(lat["end_to_end"]),
        # From the moment the decision's last sample left the simulator (its chunk pushed): what the
        # controller adds, without the wait of a sample in its chunk. Simulator sessions only.
        "pushed_to_device_ms": percentiles_ms(lat["pushed_to_device"]),
        "stage_ms": {k: percentiles_ms(v) for k, v in lat["stages"].items()},
        "deadline_misses": len(by_kind.get("deadline_miss", [])),
        "dropped_samples": int(sum(int(e.get("n", e.get("n_lost", 0)) or 0) for e in by_kind.get("dropped", []))),
        "predictions": len(predictions),
        # Operator stops (pause, emergency stop) latch the governor too, but they are not faults.
        "faults": [{"t": e["t"], "after_start_s": since_start(e["t"]), "source": e["source"],
                    **({"what": e["what"]} if e.get("what") else {}),
                    "reason": e.get("reason", "")} for e in by_kind.get("fault", [])
                   if not str(e.get("reason", "")).startswith("emergency_stop")],
        "final_stop": final_stop(by_kind.get("safe_state", [])),
        "operator_stops": [{"t": e["t"], "after_start_s": since_start(e["t"]), "reason": e.get("reason", "")}
                           for e in by_kind.get("fault", []) if str(e.get("reason", "")).startswith("emergency_stop")],
        "detection": detection,
        "stim": {
            "commands": len(commands),
            "received_by_device": len(commands) - len(unreached),
            # Same-seq receipts refused as a command's (join_receipts): before its send, or too late.
            "receipts_refused": {"before_send": join.before_send, "too_late": join.too_late},
            "charge_uc": round(charge, 3),
            "clamps": len(by_kind.get("clamp", [])),
            "refusals": len(by_kind.get("refusal", [])),
        },
        **({"ads": ads} if ads is not None else {}),
        **({"ipf_estimate": ipf} if (ipf := ipf_estimate(by_kind.get("decision", []), since_start)) else {}),
        "scheduling": scheduling(by_kind.get("status", [])),
    }


IPF_KEYS = ("ipf_hz", "accepted", "reason", "peak_db", "n_segments", "n_segments_rejected", "rejected_segments_s")


def ipf_estimate(decisions: list[dict], since_start=lambda t: None) -> dict | None:
    """The personalized policy's estimate (its one ``ipf_estimate`` decision), or None: why a
    session stimulated at the frequency it did, or not at all."""
    e = next((d for d in decisions if d.get("what") == "ipf_estimate"), None)
    if e is None:
        return None
    return {"after_start_s": since_start(e["t"]), **{k: e.get(k) for k in IPF_KEYS}}


def first_sample_t(session_dir: Path) -> float | None:
    """The session clock's time of the first recorded sample (what the report's time axis starts
    from), or None without a recording."""
    path = Path(session_dir) / "raw" / "timestamps.f64"
    if not path.exists() or path.stat().st_size < 8:
        return None
    return float(np.fromfile(path, dtype="<f8", count=1)[0])


def final_stop(safe_states: list[dict]) -> dict | None:
    """Whether the device confirmed stimulation off when the session closed its actuator: the last
    ``safe_state`` with reason ``actuator closed`` (its STOP, sent twice at most). ``confirmed``
    false means the device may still be stimulating: a device that speaks drivers/PROTOCOL.md stops
    by its own watchdog once heartbeats cease (§7), others may not. None: the actuator never
    closed (its process was killed), or the session ran before this was recorded."""
    closed = [e for e in safe_states if e.get("reason") == "actuator closed"]
    if not closed:
        return None
    return {"confirmed": bool(closed[-1].get("stop_ok")), "errors": list(closed[-1].get("stop_errors") or [])}


def scheduling(status_events: list[dict]) -> dict:
    """What the real-time session got from the OS, as its processes recorded it (``None``: not recorded,
    e.g. a simulated-time session): the PM QoS request, each controller process's priority, the
    CPU time the hypervisor took over the session (``host_steal_ms``: ``{"total", "per_cpu"}`` in ms),
    and each process's CPU use while the loop ran (``cpu_percent``: % of one core, by process)."""
    def first(pred, key):
        return next((e[key] for e in status_events if pred(e) and key in e), None)

    return {"low_latency": first(lambda e: e.get("source") == "runner", "low_latency"),
            "nice": {"acquisition": first(lambda e: e.get("what") == "acquisition_started", "nice"),
                     "loop": first(lambda e: e.get("source") == "loop" and e.get("status") == "started", "nice")},
            "host_steal_ms": first(lambda e: e.get("source") == "runner", "host_steal_ms"),
            "cpu_percent": first(lambda e: e.get("source") == "runner", "cpu_percent")}


#: a detection within this of a true spike on its channel is that spike (as ``controller.bench_ads``)
SPIKE_MATCH_S = 0.001
SPIKE_POLICY_SOURCES = ("ads", "random")


def _nearest_gap(sorted_t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|x - nearest value of sorted_t| for each x (inf when sorted_t is empty)."""
    if sorted_t.size == 0:
        return np.full(x.shape, np.inf)
    j = np.searchsorted(sorted_t, x)
    lo = np.abs(x - sorted_t[np.clip(j - 1, 0, sorted_t.size - 1)])
    hi = np.abs(sorted_t[np.clip(j, 0, sorted_t.size - 1)] - x)
    return np.minimum(lo, hi)


def ads_timeline(events: list[dict], device_log: list[dict], truth: dict) -> dict | None:
    """What a spike-driven session (ADS, random control) did, as arrays on the session clock.

    ``None`` for other sessions. Keys: ``kind``, ``delay_s``, ``blanking_s``,
    ``det_t``/``det_ch`` (detections), ``cmd`` (per trigger command: ``seq``,
    ``spike_t``, ``spike_channel``, ``at``, ``t_delivered``; delivered from the device log),
    ``refusals`` (rule → count), ``true_t``/``true_ch`` and ``pulses`` (ground
    truth, empty without it), ``weight_t``/``weight_w``.
    """
    started = next((e for e in events if e["kind"] == "status" and e.get("status") == "started"
                    and e.get("source") == "loop"), {})
    kind = started.get("policy")
    spk = truth.get("spiking") or {}
    if kind not in SPIKE_POLICY_SOURCES and not spk:
        return None
    det = [e for e in events if e["kind"] == "spike"]
    det_t = np.asarray([t for e in det for t in e.get("t_spike", [])], float)
    det_ch = np.asarray([c for e in det for c in e.get("channel", [])], int)
    # Joined over every trigger command, so each claims its own receipt before the spike ones are kept.
    all_cmds = trigger_commands(events)
    join = join_receipts(all_cmds, device_log)
    spike_cmds = [(c, rec) for c, rec in zip(all_cmds, join.records)
                  if c.get("request_source") in SPIKE_POLICY_SOURCES]
    cmds = [c for c, _ in spike_cmds]
    delivered = [rec.get("t_delivered") if rec is not None and rec.get("t_delivered") is not None else np.nan
                 for _, rec in spike_cmds]
    cmd = {"seq": np.asarray([c["seq"] for c in cmds], int),
           "spike_t": np.asarray([c.get("spike_t", np.nan) if c.get("spike_t") is not None else np.nan
                                  for c in cmds], float),
           "spike_channel": np.asarray([c.get("spike_channel") if c.get("spike_channel") is not None else -1
                                        for c in cmds], int),
           "at": np.asarray([c.get("at") if c.get("at") is not None else c["t"] for c in cmds], float),
           "t_delivered": np.asarray(delivered, float)}
    refusals: dict[str, int] = {}
    for e in events:
        if e["kind"] == "refusal" and e.get("request_source") in SPIKE_POLICY_SOURCES:
            refusals[str(e.get("rule"))] = refusals.get(str(e.get("rule")), 0) + 1
    cfg_delay = next((c.get("delay_s") for c in cmds if c.get("delay_s") is not None), None)
    if cfg_delay is None and kind == "ads":
        cfg_delay = next((e.get("delay_s") for e in events if e["kind"] == "decision" and e.get("delay_s")), None)
    blanking = next((c.get("blanking_s") for c in cmds if c.get("blanking_s") is not None), None)
    w = spk.get("weight") or {}
    return {
        "kind": kind, "delay_s": cfg_delay, "blanking_s": blanking, "t_start": started.get("t"), "det_t": det_t, "det_ch": det_ch, "cmd": cmd, "refusals": refusals,
        "true_t": np.asarray((spk.get("trigger_spikes") or {}).get("t", []), float),
        "true_ch": np.asarray((spk.get("trigger_spikes") or {}).get("channel", []), int),
        "pulses": spk.get("pulses", []), "trigger_channels": spk.get("trigger_channels"),
        "weight_t": np.asarray(w.get("t", []), float), "weight_w": np.asarray(w.get("w", []), float),
        "w_init": spk.get("w_init"), "w_final": spk.get("w_final"), "t0": truth.get("t0"), "end_t": truth.get("end_t"),
    }


def ads_metrics(events: list[dict], device_log: list[dict], truth: dict) -> dict | None:
    """The ``ads`` block of ``metrics.json`` (``None`` unless the session ran ADS or its random control).

    ``delivered_delay_ms``: device delivery − detected spike (ADS; the imposed
    delay plus the device's timing error). ``delay_error_ms``: delivery − true
    spike − imposed delay, for pulses whose spike matches a true one (±1 ms).
    ``schedule_error_ms``: delivery − the requested ``at``. ``artifact_triggers``:
    detections matching no true spike that fall inside a delivered pulse's
    artifact; ``pulses_within_blanking``: delivered pulses closer than the
    blanking to the previous one (never expected). Ground-truth counts cover
    the time the loop ran (from its start to the end of the simulator);
    ``missed_spikes``: true spikes there, outside every blanking window, with no
    detection within ±1 ms.
    """
    tl = ads_timeline(events, device_log, truth)
    if tl is None:
        return None
    cmd, delay_s = tl["cmd"], tl["delay_s"]
    ok = np.isfinite(cmd["t_delivered"])
    t_del = cmd["t_delivered"][ok]
    out: dict = {"policy": tl["kind"], "imposed_delay_ms": None if delay_s is None else delay_s * 1e3,
                 "spikes_detected": int(tl["det_t"].size),
                 "pulses_requested": int(cmd["seq"].size + sum(tl["refusals"].values())),
                 "pulses_commanded": int(cmd["seq"].size), "pulses_delivered": int(ok.sum()),
                 "refusals": int(sum(tl["refusals"].values())), "refusal_rules": tl["refusals"],
                 "schedule_error_ms": percentiles_ms(t_del - cmd["at"][ok])}
    has_spike = ok & np.isfinite(cmd["spike_t"])
    out["delivered_delay_ms"] = percentiles_ms(cmd["t_delivered"][has_spike] - cmd["spike_t"][has_spike])
    d_sorted = np.sort(t_del)
    gaps = np.diff(d_sorted)
    blanking_s = tl["blanking_s"] if tl["blanking_s"] is not None else 0.028  # REFERENCE.md §2 when unrecorded
    out["blanking_ms"] = blanking_s * 1e3
    out["pulses_within_blanking"] = int(np.sum(gaps < blanking_s - 1e-4))
    t_from = tl["t_start"] if tl["t_start"] is not None else tl["t0"]
    if t_from is not None and tl["end_t"] is not None and tl["end_t"] > t_from:
        out["delivered_rate_hz"] = round(float(np.sum(t_del >= t_from)) / (tl["end_t"] - t_from), 4)
    true_t, true_ch, det_t, det_ch = tl["true_t"], tl["true_ch"], tl["det_t"], tl["det_ch"]
    if t_from is not None:
        # Both sides from the same instant: the loop's first chunk holds samples from just before its
        # start event, whose true spikes would otherwise be left out while their detections count.
        keep = true_t >= t_from
        true_t, true_ch = true_t[keep], true_ch[keep]
        keep = det_t >= t_from
        det_t, det_ch = det_t[keep], det_ch[keep]
    if true_t.size or tl["pulses"]:
        matched = np.zeros(det_t.size, bool)
        for c in np.unique(det_ch):
            m = det_ch == c
            matched[m] = _nearest_gap(np.sort(true_t[true_ch == c]), det_t[m]) <= SPIKE_MATCH_S
        art = np.asarray([(p["t"], p["t"] + p["artifact_s"] + 0.001) for p in tl["pulses"]], float).reshape(-1, 2)
        in_art = np.zeros(det_t.size, bool)
        if art.size:
            k = np.searchsorted(art[:, 0], det_t, "right") - 1
            in_art = (k >= 0) & (det_t < art[np.clip(k, 0, None), 1])
        out["true_trigger_spikes"] = int(true_t.size)
        out["detections_matching_true_spikes"] = int(matched.sum())
        out["artifact_triggers"] = int(np.sum(~matched & in_art))
        out["false_detections"] = int(np.sum(~matched & ~in_art))
        seen = np.zeros(true_t.size, bool)
        for c in np.unique(true_ch):
            m = true_ch == c
            seen[m] = _nearest_gap(np.sort(det_t[det_ch == c]), true_t[m]) <= SPIKE_MATCH_S
        # Spikes inside a blanking window (or the detector's first noise block) are not expected to be seen.
        bl = np.sort(cmd["at"])
        k = np.searchsorted(bl, true_t + SPIKE_MATCH_S, "right") - 1
        blanked = (k >= 0) & (true_t < bl[np.clip(k, 0, None)] + blanking_s + SPIKE_MATCH_S) if bl.size else \
            np.zeros(true_t.size, bool)
        warm = true_t < (t_from + 0.1 if t_from is not None else -np.inf)
        out["missed_spikes"] = int(np.sum(~seen & ~blanked & ~warm))
        if delay_s is not None and has_spike.any():
            s_t = cmd["spike_t"][has_spike]
            gap = _nearest_gap(np.sort(true_t), s_t)
            j = np.searchsorted(np.sort(true_t), s_t)
            srt = np.sort(true_t)
            cand = np.stack([srt[np.clip(j - 1, 0, srt.size - 1)], srt[np.clip(j, 0, srt.size - 1)]]) \
                if srt.size else np.full((2, s_t.size), np.nan)
            nearest = cand[np.argmin(np.abs(cand - s_t[None, :]), axis=0), np.arange(s_t.size)] \
                if srt.size else np.full(s_t.size, np.nan)
            good = gap <= SPIKE_MATCH_S
            out["delay_error_ms"] = percentiles_ms(cmd["t_delivered"][has_spike][good] - nearest[good] - delay_s)
    if tl["w_init"] is not None:
        out["weight"] = {"w_init": tl["w_init"], "w_final": tl["w_final"],
                         "change": round(float(tl["w_final"]) - float(tl["w_init"]), 6)}
    return out
