"""``metrics.json`` from a session folder: latency per stage, detections, dose.

Pure functions over the recorded files, so metrics can be rebuilt after a
crash (``stimloop report``). Latency end to end is measured against ground
truth: timestamp of the last sample of the deciding window (LSL clock) →
command received by the device (the emulator's receipt time, same clock).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from controller.recorder import read_jsonl

# Detection scoring for the built-in demo: a detection counts for a seizure when it
# starts between the onset and the offset (+ this grace, for stimulation-shortened seizures).
DETECTION_GRACE_S = 3.0


def percentiles_ms(values_s) -> dict:
    v = np.asarray([x for x in values_s if x is not None and np.isfinite(x)], dtype=float) * 1e3
    if v.size == 0:
        return {"p50": None, "p90": None, "p99": None, "p999": None, "max": None, "n": 0}
    q = np.percentile(v, [50, 90, 99, 99.9])
    return {"p50": round(float(q[0]), 4), "p90": round(float(q[1]), 4), "p99": round(float(q[2]), 4),
            "p999": round(float(q[3]), 4), "max": round(float(v.max()), 4), "n": int(v.size)}


def load_ground_truth(session_dir: Path) -> dict:
    p = Path(session_dir) / "ground_truth.json"
    return json.loads(p.read_text()) if p.exists() else {}


def score_detections(detection_starts: list[float], seizures: list[dict], session_end_t: float | None = None) -> dict:
    """Event-level scoring of detections against true seizures (all times on the session clock)."""
    onsets = [s["onset_t"] for s in seizures]
    latencies, detected = [], 0
    used = set()
    for s in seizures:
        end = s.get("offset_t") or session_end_t or float("inf")
        hits = [d for d in detection_starts if s["onset_t"] <= d <= end + DETECTION_GRACE_S]
        if hits:
            detected += 1
            latencies.append(hits[0] - s["onset_t"])
            used.update(hits)
    false = [d for d in detection_starts if d not in used]
    return {
        "onsets": len(onsets),
        "detected": detected,
        "sensitivity": (detected / len(onsets)) if onsets else None,
        "false_detections": len(false),
        "false_detection_t": false,
        "latency_s_median": float(np.median(latencies)) if latencies else None,
        "latency_s": latencies,
        "scoring": f"detection start within [onset, offset + {DETECTION_GRACE_S} s]",
    }


def compute_metrics(session_dir: Path) -> dict:
    session_dir = Path(session_dir)
    events = read_jsonl(session_dir / "events.jsonl")
    device_log = read_jsonl(session_dir / "device_log.jsonl")
    truth = load_ground_truth(session_dir)

    received = {}
    for rec in device_log:
        if rec.get("type") in ("trigger", "TRIGGER") and rec.get("ok", True):
            received.setdefault(rec["seq"], rec["t_received"])

    by_kind: dict[str, list[dict]] = {}
    for e in events:
        by_kind.setdefault(e["kind"], []).append(e)

    predictions = by_kind.get("prediction", [])
    commands = [c for c in by_kind.get("command", []) if c.get("op") == "trigger"]
    stages = {
        "ring_read": [p["t_read"] - p["window_end_t"] for p in predictions if "t_read" in p],
        "features": [p["t_features"] - p["t_read"] for p in predictions if "t_features" in p],
        "inference": [p["t_inference"] - p["t_features"] for p in predictions if "t_inference" in p],
        "policy_governor": [c["t_decided"] - c["t_inference"] for c in commands if "t_decided" in c and "t_inference" in c],
        "port_write": [c["sent_t"] - c["t_decided"] for c in commands if "t_decided" in c],
        "device_receive": [received[c["seq"]] - c["sent_t"] for c in commands if c.get("seq") in received],
    }
    end_to_end = [received[c["seq"]] - c["window_end_t"] for c in commands
                  if c.get("seq") in received and c.get("window_end_t") is not None]

    detection_starts = [e["t"] for e in by_kind.get("decision", [])
                        if e.get("what") == "detection_start"]
    seizures = truth.get("seizures", [])
    session_end = truth.get("end_t")
    detection = score_detections(detection_starts, seizures, session_end) if truth else None

    allowed = [c for c in commands]
    charge = sum(float(c.get("burst_charge_uc", 0.0)) for c in allowed)
    unreached = [c["seq"] for c in commands if device_log and c.get("seq") not in received]
    return {
        "end_to_end_ms": percentiles_ms(end_to_end),
        "stage_ms": {k: percentiles_ms(v) for k, v in stages.items()},
        "deadline_misses": len(by_kind.get("deadline_miss", [])),
        "dropped_samples": int(sum(int(e.get("n", e.get("n_lost", 0)) or 0) for e in by_kind.get("dropped", []))),
        "predictions": len(predictions),
        # Operator stops (pause, emergency stop) latch the governor too, but they are not faults.
        "faults": [{"t": e["t"], "source": e["source"], "reason": e.get("reason", "")} for e in by_kind.get("fault", [])
                   if not str(e.get("reason", "")).startswith("emergency_stop")],
        "operator_stops": [{"t": e["t"], "reason": e.get("reason", "")} for e in by_kind.get("fault", [])
                           if str(e.get("reason", "")).startswith("emergency_stop")],
        "detection": detection,
        "stim": {
            "commands": len(commands),
            "received_by_device": len(commands) - len(unreached),
            "charge_uc": round(charge, 3),
            "clamps": len(by_kind.get("clamp", [])),
            "refusals": len(by_kind.get("refusal", [])),
        },
    }
