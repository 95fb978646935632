"""Faults injected into the HIL simulator during a real-time session: the controller's reaction is in its events."""
import json
import os
import re
import subprocess
import sys
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
    # metrics.json: each fault placed in the session, and the device back in time to confirm the
    # final stop.
    metrics = json.loads((session / "metrics.json").read_text())
    at = {f.get("what"): f["after_start_s"] for f in metrics["faults"]}
    assert 5.0 < at["stream_lost"] < 9.0 and 5.0 < at["stream_stalled"] < 9.0, at
    assert metrics["final_stop"] == {"confirmed": True, "errors": []}


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


def test_a_device_gone_at_the_end_fails_the_run_with_code_3(tmp_path):
    """The stimulator unplugged until after the session: the final STOP cannot reach it. The run
    says so after its summary and exits 3, as an unconfirmed `stimloop stop` does."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[session]
duration_s = 7.0
[source]
stream = "stimloop-gone-{uuid.uuid4().hex[:8]}"
[simulator]
seizure_onsets_s = []
[telemetry]
enabled = false
[control]
enabled = false
[[faults]]
kind = "device_unplug"
at_s = 3.0
duration_s = 60.0
""")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", "-c", str(cfg), "--out", str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "the stimulator did not confirm stimulation off when the session ended" in r.stderr
    assert "STOP not sent" in r.stderr and "NOT confirmed by the device" in r.stdout
    # The driver error, placed in the session (patient time 3 s; the recording starts a little later).
    assert re.search(r"at [23]\.\d s: governor", r.stdout), r.stdout
    (session,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    metrics = json.loads((session / "metrics.json").read_text())
    assert metrics["final_stop"]["confirmed"] is False and metrics["final_stop"]["errors"]
    assert (session / "report.png").exists()
