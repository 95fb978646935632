"""A live session's control and telemetry: a malformed request does not end it, the loop publishes its
state for late monitors, and the CLI addresses a session by its id (never a finished folder's stale port)."""
import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
import zmq

from controller.config import parse_config
from controller.control import ControlServer
from controller.recorder import read_jsonl

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(120)]


def _stimloop(*args):
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True, timeout=60)


def test_a_live_session_survives_bad_requests_publishes_its_state_and_is_addressed_by_its_id(tmp_path):
    from controller.runners.realtime import run_session
    from controller.telemetry import TelemetrySubscriber

    cfg = parse_config({
        "session": {"duration_s": 7.0, "out_dir": str(tmp_path)},
        "source": {"stream": f"stimloop-live-ctl-{uuid.uuid4().hex[:8]}", "resolve_timeout_s": 10.0},
        "simulator": {"seizure_onsets_s": []},
        "telemetry": {"address": "tcp://127.0.0.1:*"}, "control": {"address": "tcp://127.0.0.1:*"},
    })
    result = {}
    runner = threading.Thread(target=lambda: result.update(session=run_session(cfg)), daemon=True)
    runner.start()
    t_end = time.monotonic() + 60
    found = []
    while not found and time.monotonic() < t_end:
        found = list(tmp_path.glob("*/endpoints.json"))
        time.sleep(0.05)
    session = found[0].parent
    endpoints = json.loads(found[0].read_text())
    assert endpoints["session_id"].startswith(session.name + "-")

    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 3000)
    req.connect(endpoints["control"])
    try:
        for bad in (b'{"cmd": []}', b"[" * 60000):      # used to crash the loop and end the session
            req.send(bad)
            r = json.loads(req.recv())
            assert r["ok"] is False and r["session"] == endpoints["session_id"]
    finally:
        req.close(0)
        ctx.term()

    status = _stimloop("ctl", "status", "--session", str(session))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["session"] == endpoints["session_id"]
    stop = _stimloop("stop", "--session", str(session))
    assert stop.returncode == 0 and "stimulation off" in stop.stdout, stop.stderr
    # A monitor that starts after the stop learns it from the loop's periodic state message.
    with TelemetrySubscriber(endpoints["telemetry"], topics=["status"]) as sub:
        state = None
        t_end = time.monotonic() + 3
        while state is None and time.monotonic() < t_end:
            msg = sub.recv(timeout_ms=200)
            if msg is not None and msg[2].get("kind") == "state":
                state = msg[2]
    assert state is not None and state["session"] == endpoints["session_id"]
    assert state["paused"] is True and any("emergency stop by the operator" in r for r in state["latched"])

    runner.join(60)
    assert result.get("session") == session
    events = read_jsonl(session / "events.jsonl")
    assert not [e for e in events if e.get("what") == "loop_crashed"]
    refused = [e for e in events if e["kind"] == "mark" and e.get("ok") is False]
    assert len(refused) == 2 and "unknown" in refused[0]["error"] and "RecursionError" in refused[1]["error"]
    # Over: its folder is refused, even though a new session might own its port by now.
    late = _stimloop("ctl", "resume", "--session", str(session))
    assert late.returncode != 0 and "has ended" in " ".join(late.stderr.split())


def _folder(tmp_path, **endpoints):
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    return str(tmp_path)


def test_a_session_folder_whose_id_another_server_does_not_have_is_refused_and_nothing_changes(tmp_path):
    calls = []
    server = ControlServer("tcp://127.0.0.1:*", lambda c: calls.append(c) or {}, session_id="NEW-00000000")
    stop = threading.Event()

    def run():
        while not stop.is_set():
            server.poll_once(time.monotonic())
            time.sleep(0.002)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        # An old session's folder (kill -9: no end marker) whose port the new session now owns.
        old = _folder(tmp_path, session_id="OLD-11111111", control=server.endpoint, telemetry=None)
        r = _stimloop("ctl", "resume", "--session", old)
    finally:
        stop.set()
        th.join(5)
        server.close()
    assert r.returncode != 0 and calls == []
    err = " ".join(r.stderr.split())
    assert "belongs to session 'NEW-00000000', not 'OLD-11111111'" in err and "nothing was done" in err


def test_a_session_with_control_disabled_is_refused_instead_of_the_default_port(tmp_path):
    r = _stimloop("stop", "--session", _folder(tmp_path, session_id="S-1", control=None, telemetry=None))
    assert r.returncode == 2
    assert "runs with control disabled" in " ".join(r.stderr.split())
    r = _stimloop("monitor", "--session", str(tmp_path), "--duration", "0.1")
    assert r.returncode == 2 and "telemetry disabled" in " ".join(r.stderr.split())


def test_a_folder_whose_runner_recorded_its_end_is_refused(tmp_path):
    folder = _folder(tmp_path, session_id="S-1", control="tcp://127.0.0.1:5557", telemetry=None)
    (tmp_path / "events.jsonl").write_text(
        '{"t":1.0,"kind":"status","source":"loop","status":"started"}\n'
        '{"t":2.0,"kind":"status","source":"runner","status":"completed","exit_codes":{"loop":0}}\n')
    r = _stimloop("ctl", "status", "--session", folder)
    assert r.returncode == 2 and "has ended (the runner recorded its end: completed)" in " ".join(r.stderr.split())


def test_a_report_written_while_the_session_runs_does_not_block_its_stop(tmp_path):
    """`stimloop report` writes metrics.json into a running session's folder; an emergency stop by
    --session must still reach it (only the runner's own final record says a session has ended)."""
    calls = []
    server = ControlServer("tcp://127.0.0.1:*", lambda c: calls.append(c["cmd"]) or {}, session_id="LIVE-1")
    stop = threading.Event()

    def run():
        while not stop.is_set():
            server.poll_once(time.monotonic())
            time.sleep(0.002)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        folder = _folder(tmp_path, session_id="LIVE-1", control=server.endpoint, telemetry=None)
        (tmp_path / "metrics.json").write_text("{}")   # what `stimloop report` leaves mid-session
        r = _stimloop("ctl", "status", "--session", folder)
    finally:
        stop.set()
        th.join(5)
        server.close()
    assert r.returncode == 0, r.stderr
    assert calls == ["status"]
