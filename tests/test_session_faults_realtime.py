"""Faults injected into the HIL simulator during a real-time session: the controller's reaction is in its events."""
import json
import uuid

import numpy as np
import pytest

from controller.config import parse_config
from controller.recorder import read_jsonl
from controller.runners.realtime import run_session

pytestmark = pytest.mark.realtime


def test_controller_reacts_to_stream_loss_bad_data_and_an_unplugged_device(tmp_path):
    cfg = parse_config({
        "session": {"duration_s": 16.0, "out_dir": str(tmp_path)},
        "source": {"stream": f"stimloop-faults-{uuid.uuid4().hex[:8]}", "resolve_timeout_s": 10.0,
                   "stall_timeout_s": 0.5},
        "simulator": {"seizure_onsets_s": []},
        "telemetry": {"enabled": False}, "control": {"enabled": False},
        "faults": [
            {"kind": "nan_burst", "at_s": 3.0, "duration_s": 0.5},
            {"kind": "stream_loss", "at_s": 6.0, "duration_s": 2.0},
            {"kind": "device_unplug", "at_s": 10.0, "duration_s": 1.5},
        ],
    })
    session = run_session(cfg)
    events = read_jsonl(session / "events.jsonl")
    truth = json.loads((session / "ground_truth.json").read_text())
    assert [f["kind"] for f in truth["faults"]] == ["nan_burst", "stream_loss", "device_unplug"]
    whats = [(e["kind"], e.get("what"), e["source"]) for e in events]
    # NaN burst: fault, stimulation off, released after a clean window.
    assert ("fault", "bad_data", "loop") in whats and ("status", "data_clean", "loop") in whats
    # Stream loss: the loop notices the silence (safe state), the source reports loss and recovery.
    assert ("fault", "stream_stalled", "loop") in whats and ("status", "stream_resumed", "loop") in whats
    assert any(e["kind"] == "fault" and e.get("what") == "stream_lost" for e in events)
    # Unplugged device: driver error -> safe state, then the controller reconnects on the stable port.
    assert any(e["kind"] == "safe_state" and "driver error" in e.get("reason", "") for e in events)
    assert ("status", "device_reconnected", "actuator") in whats
    # The simulator's push times survive the faults (pushed_to_device_ms measures from them): every
    # chunk has its own, except those the stream loss dropped.
    push = np.fromfile(session / truth["push"]["file"], dtype="<f8")
    fs, n, first = truth["push"]["fs_hz"], truth["push"]["chunk_n"], truth["push"]["first_sample"]
    t_chunk = (first + np.arange(push.size) * n) / fs            # patient time of each chunk's first sample
    lost = (t_chunk >= 6.0 - 1e-9) & (t_chunk < 8.0 - 1e-9)
    assert push.size == truth["push"]["n_chunks"] and t_chunk[-1] > 8.0 and lost.sum() == round(2.0 * fs / n)
    assert np.array_equal(np.isnan(push), lost)
    # Every fault is reported with stimulation off first: each governor FAULT comes with the
    # actuator's SAFE_STATE for the same reason (its STOP sent at that moment) and says whether
    # the STOP got through. It did while the device was there; with the device unplugged it could not.
    gov = _check_every_governor_fault_has_its_safe_state(events)
    assert len(gov) >= 3, gov   # bad data, the stall, the driver error
    unplug = truth["faults"][2]
    away = [s["t"] for _, s in gov if unplug["t_start"] <= s["t"] <= unplug["t_end"]]
    assert away and any("driver error" in f["reason"] for f, _ in gov if f["t"] in away)
    assert all(s["stop_ok"] is (s["t"] not in away) for _, s in gov), gov


def _check_every_governor_fault_has_its_safe_state(events: list[dict]) -> list[tuple[dict, dict]]:
    """Each governor FAULT is followed by the actuator's SAFE_STATE with the same reason and time
    (the governor's emergency stops carry an ``emergency_stop: `` prefix) and a STOP outcome:
    ``stop_ok`` true exactly when the STOP had no error. Returns the (FAULT, SAFE_STATE) pairs."""
    pairs = []
    for i, e in enumerate(events):
        if e["kind"] != "fault" or e["source"] != "governor":
            continue
        safe = next((x for x in events[i + 1:] if x["kind"] == "safe_state" and x["source"] == "actuator"), None)
        assert safe is not None, f"governor fault without a safe state after it: {e}"
        assert safe["reason"] == e["reason"].removeprefix("emergency_stop: ") and safe["t"] == e["t"], (e, safe)
        assert isinstance(safe["stop_ok"], bool) and safe["stop_ok"] == (not safe["stop_errors"]), safe
        pairs.append((e, safe))
    return pairs
