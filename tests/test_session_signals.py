"""Signals to a live `stimloop run`: Ctrl-C, SIGTERM to the group, a second SIGTERM during shutdown.

Each test runs the real CLI in its own process group (as a terminal, systemd or docker would),
sends the signal and checks the session folder: stimulation off at the device, the recording
finished, the simulator's ground truth written, every child ended cleanly.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from controller.recorder import read_jsonl

pytestmark = pytest.mark.realtime


@contextlib.contextmanager
def _running_session(tmp_path: Path):
    """``(process, session folder)`` of a `stimloop run` in its own process group, recording;
    whatever is left of it is killed on the way out."""
    proc, out = _start(tmp_path)
    try:
        yield proc, _wait_running(proc, out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "sessions"
    cfg = tmp_path / "sig.toml"
    cfg.write_text(f'[source]\nstream = "stimloop-sig-{uuid.uuid4().hex[:8]}"\n'
                   '[telemetry]\nenabled = false\n[control]\nenabled = false\n')
    log = open(tmp_path / "cli.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "controller.cli", "run", "--config", str(cfg),
                             "--duration", "60", "--out", str(out)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, out


def _wait_running(proc, out: Path, record_s: float = 2.0) -> Path:
    """The session folder once the loop runs and ``record_s`` of 16 ch @ 512 Hz are on disk."""
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end and proc.poll() is None:
        raw = list(out.glob("*/raw/samples.f32"))
        if raw and raw[0].stat().st_size > record_s * 512 * 16 * 4:
            session = raw[0].parent.parent
            if '"status":"started"' in (session / "events.jsonl").read_text():
                return session
        time.sleep(0.1)
    raise AssertionError(f"session did not start (exit code {proc.poll()})")


def _finish(proc, timeout_s: float = 30.0) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"stimloop run still running {timeout_s:g} s after the signal")


def _runner_status(events: list[dict]) -> dict:
    st = [e for e in events if e["source"] == "runner" and "status" in e]
    assert st, "no runner status event"
    return st[-1]


def _check_ordered_stop(session: Path, t_signal: float) -> list[dict]:
    events = read_jsonl(session / "events.jsonl")
    safe = [e for e in events if e["kind"] == "safe_state" and e["source"] == "actuator" and e["t"] >= t_signal]
    assert safe and safe[0]["stop_ok"] is True, "stimulation was not turned off"
    stops = [r for r in read_jsonl(session / "device_log.jsonl")
             if r.get("type") == "STOP" and r["t_received"] >= t_signal]
    assert stops, "the device never received STOP"
    acq = [e for e in events if e.get("what") == "acquisition_stopped"]
    assert acq, "the acquisition did not finish its recording"
    # One clock for every event: the runner's status is on the same (LSL) clock as the children's.
    runner = _runner_status(events)
    assert abs(runner["t"] - safe[0]["t"]) < 60
    assert safe[0]["t"] <= acq[0]["t"], "sources stopped before stimulation"
    from controller.acquisition import load_raw
    _, ts = load_raw(session / "raw")
    assert len(ts) == acq[0]["n_recorded"]
    assert ts[-1] >= t_signal - 0.5  # recorded up to the stop
    truth = json.loads((session / "ground_truth.json").read_text())
    assert truth["end_t"] >= stops[0]["t_received"]  # the device outlived the loop's STOP
    assert (session / "push_t.f64").exists()
    assert all(code == 0 for code in runner["exit_codes"].values()), runner["exit_codes"]
    return events


def test_sigterm_to_the_process_group_stops_stimulation_then_sources(tmp_path):
    from pylsl import local_clock
    with _running_session(tmp_path) as (proc, session):
        t_term = local_clock()
        os.killpg(proc.pid, signal.SIGTERM)  # systemctl stop / docker stop: every process at once
        _finish(proc)
    events = _check_ordered_stop(session, t_term)
    assert _runner_status(events)["status"] == "stopped by SIGTERM"


def test_ctrl_c_to_the_foreground_group_stops_in_order(tmp_path):
    from pylsl import local_clock
    with _running_session(tmp_path) as (proc, session):
        t_int = local_clock()
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
        rc = _finish(proc)
    events = _check_ordered_stop(session, t_int)
    assert _runner_status(events)["status"] == "stopped by SIGINT"
    assert rc == 0, (tmp_path / "cli.log").read_text()[-2000:]


def test_repeated_sigterm_during_shutdown_does_not_cut_it(tmp_path):
    from pylsl import local_clock
    with _running_session(tmp_path) as (proc, session):
        t_term = local_clock()
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end and proc.poll() is None:  # an impatient operator or supervisor
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.05)
        _finish(proc)
    events = _check_ordered_stop(session, t_term)
    ring = next(e["ring"] for e in events if e.get("what") == "acquisition_started")
    assert not Path("/dev/shm", ring).exists(), "shared memory ring leaked"
    assert not list(Path("/tmp").glob(f"stimloop-wakeup-{ring}*")), "wake-up FIFO leaked"
