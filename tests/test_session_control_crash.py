"""A live session: remote control round trips, emergency stop, and crash safety after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from controller.config import parse_config
from controller.recorder import read_jsonl

pytestmark = pytest.mark.realtime


def _wait_for(path, timeout_s=60.0):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not appear")


def test_control_commands_and_emergency_stop_on_a_running_session(tmp_path):
    from controller.control import ControlClient
    from controller.runners.realtime import run_session

    cfg = parse_config({
        "session": {"duration_s": 14.0, "out_dir": str(tmp_path)},
        "source": {"stream": f"stimloop-ctl-{uuid.uuid4().hex[:8]}", "resolve_timeout_s": 10.0},
        # open-loop bursts every second so that there is stimulation to stop
        "policy": {"kind": "periodic", "open_loop": {"period_s": 1.0, "start_s": 0.0}, "stim": {"n_pulses": 20}},
        "simulator": {"seizure_onsets_s": []},
        "safety": {"overrides": {"max_bursts_per_min": 120}},
        "telemetry": {"address": "tcp://127.0.0.1:*"}, "control": {"address": "tcp://127.0.0.1:*"},
    })
    result = {}
    runner = threading.Thread(target=lambda: result.update(session=run_session(cfg)), daemon=True)
    runner.start()
    session = None
    t_end = time.monotonic() + 60
    while session is None and time.monotonic() < t_end:
        found = list(tmp_path.glob("*/endpoints.json"))
        session = found[0].parent if found else None
        time.sleep(0.05)
    endpoints = _wait_for(session / "endpoints.json")
    with ControlClient(endpoints["control"], timeout_ms=3000) as client:
        status = client.status()
        assert status["ok"] and status["paused"] is False
        refused = client.set_param("amplitude_ua", 50_000)  # above the macro profile's 12 mA
        assert refused["ok"] is False and "refused by the safety profile" in refused["error"]
        assert client.status()["stim"]["amplitude_ua"] == 3000.0  # nothing changed
        assert client.request({"cmd": "launch_missiles"})["ok"] is False
        assert client.set_param("amplitude_ua", 2000)["ok"] is True
        time.sleep(3.0)  # some bursts at the new amplitude
        from pylsl import local_clock
        t_stop = local_clock()
        assert client.emergency_stop()["ok"] is True
        t_stopped = local_clock()   # the reply: stimulation is off
        time.sleep(2.5)  # bursts would continue every second if the stop did not hold
        assert client.status()["latched"]
        t_resume = local_clock()
        assert client.resume()["ok"] is True
    runner.join(60)
    session = result["session"]
    events = read_jsonl(session / "events.jsonl")
    device = read_jsonl(session / "device_log.jsonl")
    cmds = [e for e in events if e["kind"] == "command"]
    assert any(c["params"]["amplitude_ua"] == 2000.0 for c in cmds)
    # The STOP reached the device (and was acknowledged) before the operator was told stimulation
    # is off: causality, not a latency bound (how soon is for the benchmarks).
    stops = [r for r in device if r["type"] == "STOP" and not r.get("duplicate") and t_stop <= r["t_received"] <= t_stopped]
    assert len(stops) == 1 and stops[0]["ok"], stops
    safe = [e for e in events if e["kind"] == "safe_state" and e["reason"].startswith("emergency stop by the operator")]
    assert len(safe) == 1 and safe[0]["stop_ok"] is True and t_stop <= safe[0]["t"] <= t_stopped
    # Nothing was stimulated from the STOP until the resume: no trigger reached the device, none was sent.
    t_off = stops[0]["t_received"]
    assert not [r for r in device if r["type"] == "TRIGGER" and t_off <= r["t_received"] <= t_resume]
    assert not [c for c in cmds if t_off <= c["sent_t"] <= t_resume]
    marks = [e for e in events if e["kind"] == "mark" and e.get("cmd") == "emergency_stop"]
    assert marks and marks[0].get("who") == "local"
    assert any(c["t"] > t_resume for c in cmds)  # resumed
    # A burst falling due is not a spike: its chunk's stage is named for what it is.
    from controller.metrics import compute_metrics
    stages = compute_metrics(session)["stage_ms"]
    triggers = [c for c in cmds if c.get("op") == "trigger"]
    assert stages["chunk_to_loop"]["n"] == len(triggers) > 0 and stages["spike_to_loop"]["n"] == 0


def test_sigkill_leaves_a_folder_that_reports_and_exports(tmp_path):
    out = tmp_path / "sessions"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stream = f"stimloop-kill-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "kill.toml"
    cfg.write_text(f'[source]\nstream = "{stream}"\n[telemetry]\naddress = "tcp://127.0.0.1:*"\n'
                   f'[control]\naddress = "tcp://127.0.0.1:*"\n')
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(cfg), "--duration", "60",
                             "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t_end = time.monotonic() + 60
        raw = None
        while time.monotonic() < t_end:
            found = list(out.glob("*/raw/samples.f32"))
            if found and found[0].stat().st_size > 512 * 16 * 4 * 4:  # 4 s recorded
                raw = found[0]
                break
            time.sleep(0.1)
        assert raw is not None, "the session did not start recording"
        time.sleep(2.0)
        from pylsl import local_clock
        t_kill = local_clock()
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(proc.pid, signal.SIGKILL)  # the runner dies; its children must notice and stop by themselves
        t_end = time.monotonic() + 15
        while time.monotonic() < t_end and any(os.path.exists(f"/proc/{c}") and
                                               "Z" not in open(f"/proc/{c}/stat").read().split()[2] for c in children):
            time.sleep(0.1)
        alive = [c for c in children if os.path.exists(f"/proc/{c}") and
                 "Z" not in open(f"/proc/{c}/stat").read().split()[2]]
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (nothing, if the children behaved)
        assert children and not alive, f"orphaned session processes still running: {alive}"
    finally:
        proc.wait(10)
    session = raw.parent.parent
    from controller.acquisition import load_raw
    samples, ts = load_raw(session / "raw")
    assert ts[-1] >= t_kill - 1.5  # at most about the last second is lost
    r = subprocess.run([sys.executable, "-m", "controller.cli", "report", str(session)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (session / "metrics.json").exists() and (session / "report.png").exists()
    r = subprocess.run([sys.executable, "-m", "controller.cli", "export", str(session), "--format", "edf"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import edfio
    edf = edfio.read_edf(session / "session.edf")
    assert len(edf.signals) == 16
    assert edf.signals[0].data.size >= len(ts) - 1
