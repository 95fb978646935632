"""Control channel: real REQ/REP sockets, real CURVE handshakes and ZAP refusals."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from controller.control import (COMMANDS, CommandError, ControlClient, ControlConfigError, ControlServer,
                                is_loopback, validate_command)
from controller.events import EventKind
from controller.keys import load_key_pair, load_public_key, make_keys

pytestmark = pytest.mark.timeout(60)


class FakeLoop:
    """The loop's side: state the handler changes, like the real loop's handler."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.params: dict = {"amplitude_ua": 100.0}
        self.marks: list[str] = []
        self.calls: list[dict] = []

    def handler(self, command: dict) -> dict:
        self.calls.append(command)
        cmd = command["cmd"]
        if cmd == "pause":
            self.paused = True
        elif cmd == "resume":
            self.paused = False
        elif cmd == "emergency_stop":
            self.stopped = True
        elif cmd == "set_param":
            if command["name"] not in self.params:  # the loop refuses, the server relays it
                return {"ok": False, "error": f"parameter {command['name']!r} is unknown"}
            self.params[command["name"]] = command["value"]
        elif cmd == "mark":
            self.marks.append(command["label"])
        elif cmd == "boom":
            raise AssertionError("unreachable")
        return {"paused": self.paused, "stopped": self.stopped, "params": dict(self.params)}

    def snapshot(self) -> tuple:
        return (self.paused, self.stopped, dict(self.params), list(self.marks), len(self.calls))


@contextmanager
def polled(server: ControlServer):
    """Play the real-time loop: call poll_once every 2 ms in a thread, collect events."""
    events: list = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            events.extend(server.poll_once(time.monotonic()))
            time.sleep(0.002)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        yield events
    finally:
        stop.set()
        th.join(5)
        server.close()


@pytest.fixture
def local():
    loop = FakeLoop()
    server = ControlServer("tcp://127.0.0.1:*", loop.handler)
    with polled(server) as events, ControlClient(server.endpoint, timeout_ms=3000) as client:
        yield loop, client, events, server


def test_each_command_round_trips_and_is_recorded(local):
    loop, client, events, _ = local
    r = client.status()
    assert r["ok"] and r["cmd"] == "status" and r["paused"] is False
    assert client.pause()["paused"] is True and loop.paused
    assert client.resume()["paused"] is False and not loop.paused
    r = client.set_param("amplitude_ua", 250.5)
    assert r["ok"] and r["params"]["amplitude_ua"] == 250.5 and loop.params["amplitude_ua"] == 250.5
    assert client.mark("electrode check")["ok"] and loop.marks == ["electrode check"]
    assert client.emergency_stop()["stopped"] is True and loop.stopped
    r = client.request({"cmd": "pause", "id": 42})
    assert r["id"] == 42
    assert all(c["who"] == "local" for c in loop.calls)
    time.sleep(0.05)
    recorded = [(e.kind, e.data["cmd"]) for e in events]
    # status is a read-only query: answered, not recorded.
    assert recorded == [(EventKind.MARK, c) for c in
                        ("pause", "resume", "set_param", "mark", "emergency_stop", "pause")]
    mark = [e for e in events if e.data["cmd"] == "mark"][0]
    assert mark.source == "control" and mark.data["label"] == "electrode check" and mark.data["who"] == "local"
    assert all(e.data["ok"] for e in events)


def test_handler_refusal_is_relayed_and_recorded_as_not_ok(local):
    loop, client, events, _ = local
    r = client.set_param("frequency_hz", 130)
    assert r == {"ok": False, "cmd": "set_param", "error": "parameter 'frequency_hz' is unknown"}
    time.sleep(0.05)
    assert events[-1].data["ok"] is False and "frequency_hz" in events[-1].data["error"]


@pytest.mark.parametrize("request_, message", [
    ({"cmd": "launch"}, r"command 'launch' is unknown; expected one of \['emergency_stop'"),
    ({"label": "x"}, r"command None is unknown"),
    ({"cmd": "set_param", "name": "amplitude_ua"}, r"missing field 'value'"),
    ({"cmd": "set_param", "name": "amplitude_ua", "value": None}, r"'value'=None is invalid.*expected int/float/str/bool"),
    ({"cmd": "set_param", "name": "amplitude_ua", "value": [1, 2]}, r"'value'=\[1, 2\] is invalid"),
    ({"cmd": "set_param", "name": "", "value": 1}, r"name '' is invalid; expected 1-64"),
    ({"cmd": "mark", "label": 5}, r"'label'=5 is invalid for 'mark'; expected str"),
    ({"cmd": "mark", "label": "x" * 201}, r"201 characters is invalid; expected 1-200"),
    ({"cmd": "pause", "force": True}, r"unexpected field\(s\) \['force'\]"),
    ({"cmd": "pause", "who": "admin"}, r"'who' is set by the server"),
    ([1, 2], r"request list is invalid; expected a JSON object"),
])
def test_malformed_commands_get_a_clear_error_and_change_nothing(local, request_, message):
    loop, client, events, _ = local
    before = loop.snapshot()
    r = client.request(request_)
    assert r["ok"] is False
    assert pytest.importorskip("re").search(message, r["error"]), r["error"]
    assert loop.snapshot() == before
    time.sleep(0.05)
    assert events and events[-1].kind is EventKind.MARK and events[-1].data["ok"] is False


def test_invalid_json_and_oversized_message(local):
    loop, _, events, server = local
    before = loop.snapshot()
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 3000)
    req.connect(server.endpoint)
    try:
        req.send(b"{pause")
        r = json.loads(req.recv())
        assert r["ok"] is False and "not valid JSON" in r["error"]
        req.send(b"\xff\xfe")
        assert "not valid JSON" in json.loads(req.recv())["error"]
    finally:
        req.close(0)
        ctx.term()
    # A message above MAXMSGSIZE makes libzmq drop the connection: no reply, no change.
    with ControlClient(server.endpoint, timeout_ms=500) as big:
        with pytest.raises(TimeoutError):
            big.mark("x" * 70_000)
    assert loop.snapshot() == before


def test_handler_exception_gives_error_reply_and_fault_event():
    def broken(command: dict) -> dict:
        raise RuntimeError("governor unavailable")

    server = ControlServer("tcp://127.0.0.1:*", broken)
    with polled(server) as events, ControlClient(server.endpoint, timeout_ms=3000) as client:
        r = client.pause()
        assert r["ok"] is False and "RuntimeError: governor unavailable" in r["error"]
        time.sleep(0.05)
        assert events[-1].kind is EventKind.FAULT and events[-1].data["cmd"] == "pause"
        # The server survives: next request is answered too.
        assert client.status()["ok"] is False


def test_client_times_out_clearly_and_recovers_when_no_server():
    with ControlClient("tcp://127.0.0.1:1", timeout_ms=200) as client:
        with pytest.raises(TimeoutError, match=r"tcp://127.0.0.1:1 did not answer 'status' within 200 ms"):
            client.status()
        with pytest.raises(TimeoutError):  # the socket was recreated, not left in a broken REQ state
            client.pause()


def test_validate_command_accepts_every_command():
    samples = {"set_param": {"name": "amplitude_ua", "value": 3}, "mark": {"label": "go"}}
    for cmd in COMMANDS:
        assert validate_command({"cmd": cmd, **samples.get(cmd, {})})["cmd"] == cmd
    with pytest.raises(CommandError, match="NaN"):
        validate_command({"cmd": "set_param", "name": "a", "value": float("nan")})


@pytest.mark.parametrize("address, loopback", [
    ("tcp://127.0.0.1:5557", True), ("tcp://localhost:5557", True), ("tcp://[::1]:5557", True),
    ("ipc:///tmp/stimloop.ctl", True), ("tcp://0.0.0.0:5557", False), ("tcp://*:5557", False),
    ("tcp://192.168.1.10:5557", False), ("tcp://eth0:5557", False), ("tcp://lab-pc:5557", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_non_loopback_without_keys_refuses_to_start(tmp_path):
    loop = FakeLoop()
    with pytest.raises(ControlConfigError, match=r"'tcp://0.0.0.0:5557' is not loopback.*CURVE authentication is required"):
        ControlServer("tcp://0.0.0.0:5557", loop.handler)
    with pytest.raises(ControlConfigError, match=r"require_auth=True"):
        ControlServer("tcp://127.0.0.1:*", loop.handler, require_auth=True)
    _, secret = make_keys(tmp_path / "server", "server")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ControlConfigError, match="has no client .key files"):
        ControlServer("tcp://127.0.0.1:*", loop.handler, secret, tmp_path / "empty", require_auth=True)
    with pytest.raises(ControlConfigError, match="'udp://x:1' is invalid"):
        ControlServer("udp://x:1", loop.handler)
    with pytest.raises(ControlConfigError, match="handler None"):
        ControlServer("tcp://127.0.0.1:*", None)


def test_make_keys_files_and_errors(tmp_path):
    pub, sec = make_keys(tmp_path, "alice")
    assert pub == tmp_path / "alice.key" and sec == tmp_path / "alice.key_secret"
    assert sec.stat().st_mode & 0o077 == 0
    public, secret = load_key_pair(sec)
    assert load_public_key(pub) == public and len(public) == 40 and len(secret) == 40
    assert load_public_key(public.decode()) == public
    with pytest.raises(FileExistsError, match="'alice' already exists"):
        make_keys(tmp_path, "alice")
    assert make_keys(tmp_path, "alice", overwrite=True)[0] == pub
    assert load_key_pair(sec)[0] != public
    with pytest.raises(ValueError, match="key name '../x' is invalid"):
        make_keys(tmp_path, "../x")
    with pytest.raises(ValueError, match="holds no secret key"):
        load_key_pair(pub)
    with pytest.raises(FileNotFoundError, match="nope.key"):
        load_public_key(tmp_path / "nope.key")


@pytest.fixture
def curve(tmp_path: Path):
    _, server_secret = make_keys(tmp_path / "server", "server")
    server_public = tmp_path / "server" / "server.key"
    _, alice_secret = make_keys(tmp_path / "authorized", "alice")
    _, mallory_secret = make_keys(tmp_path / "elsewhere", "mallory")
    loop = FakeLoop()
    server = ControlServer("tcp://127.0.0.1:*", loop.handler, server_secret_key=server_secret,
                           authorized_clients_dir=tmp_path / "authorized", require_auth=True)
    with polled(server) as events:
        yield dict(loop=loop, server=server, events=events, server_public=server_public,
                   alice=alice_secret, mallory=mallory_secret)


def _refusals(events: list) -> list:
    return [e for e in events if e.kind is EventKind.STATUS and e.data.get("status") == "control_auth_refused"]


def test_curve_authorized_client_succeeds_and_is_identified_by_its_key(curve):
    with ControlClient(curve["server"].endpoint, client_keys=curve["alice"],
                       server_public_key=curve["server_public"], timeout_ms=3000) as client:
        assert client.pause()["paused"] is True
        assert client.mark("remote hello")["ok"]
    alice_public = load_key_pair(curve["alice"])[0].decode()
    assert [c["who"] for c in curve["loop"].calls] == [alice_public, alice_public]
    time.sleep(0.05)
    assert [e.data["who"] for e in curve["events"] if e.kind is EventKind.MARK] == [alice_public] * 2
    assert not _refusals(curve["events"])


def test_curve_unknown_key_is_refused_and_recorded_with_the_key(curve):
    before = curve["loop"].snapshot()
    with ControlClient(curve["server"].endpoint, client_keys=curve["mallory"],
                       server_public_key=curve["server_public"], timeout_ms=700) as client:
        with pytest.raises(TimeoutError, match="refused by authentication"):
            client.emergency_stop()
    time.sleep(0.1)
    assert curve["loop"].snapshot() == before
    refused = _refusals(curve["events"])
    assert refused, "the ZAP refusal must be recorded as an event"
    mallory_public = load_key_pair(curve["mallory"])[0].decode()
    assert refused[0].data["client_key"] == mallory_public
    assert refused[0].data["value"] == 400 and "not authorized" in refused[0].data["reason"]
    assert len([e for e in refused if e.data["value"] == 400]) == 1


def test_curve_plain_client_is_refused_and_recorded(curve):
    before = curve["loop"].snapshot()
    with ControlClient(curve["server"].endpoint, timeout_ms=700) as client:
        with pytest.raises(TimeoutError):
            client.pause()
    time.sleep(0.1)
    assert curve["loop"].snapshot() == before
    refused = _refusals(curve["events"])
    # Which side notices the mechanism mismatch first is a race: the server logs either
    # the mismatch or an aborted handshake; both are recorded refusals.
    assert refused and all(("does not use CURVE" in e.data["reason"] or "aborted" in e.data["reason"])
                           for e in refused), refused


def test_repeated_refusals_are_coalesced_per_window(curve):
    for _ in range(3):  # three fresh connections, each refused
        with ControlClient(curve["server"].endpoint, timeout_ms=300) as client:
            with pytest.raises(TimeoutError):
                client.pause()
    time.sleep(0.1)
    refused = _refusals(curve["events"])
    assert 1 <= len(refused) <= 2, "one event per distinct reason per window, not one per attempt"
    assert len(refused) + curve["server"].refusals_pending >= 3


def test_curve_wrong_server_key_is_refused_and_recorded(curve, tmp_path):
    before = curve["loop"].snapshot()
    impostor_public, _ = make_keys(tmp_path / "impostor", "impostor")
    with ControlClient(curve["server"].endpoint, client_keys=curve["alice"],
                       server_public_key=impostor_public, timeout_ms=700) as client:
        with pytest.raises(TimeoutError):
            client.resume()
    time.sleep(0.1)
    assert curve["loop"].snapshot() == before
    assert _refusals(curve["events"]), "a handshake with the wrong server key must be recorded"


def test_client_needs_both_keys(tmp_path):
    _, sec = make_keys(tmp_path, "a")
    with pytest.raises(ControlConfigError, match="needs both"):
        ControlClient("tcp://127.0.0.1:1", client_keys=sec)


def _raw_request(server: ControlServer, payload: bytes, events: list | None = None) -> dict:
    """Send raw bytes, answer by polling on this thread (no helper thread: poll_once's raise is seen)."""
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 50)
    req.connect(server.endpoint)
    try:
        req.send(payload)
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end:
            got = server.poll_once(0.0)
            if events is not None:
                events.extend(got)
            try:
                return json.loads(req.recv())
            except zmq.Again:
                continue
        raise AssertionError("no reply")
    finally:
        req.close(0)
        ctx.term()


@pytest.mark.parametrize("payload, message", [
    (b'{"cmd": []}', r"control command \[\] is unknown"),        # `in` on a list: TypeError
    (b'{"cmd": {}}', r"control command \{\} is unknown"),
    (b'{"cmd": ["pause"] }', r"control command \['pause'\] is unknown"),
    (b"[" * 60000, r"not valid JSON \(RecursionError"),         # nesting deeper than json's recursion limit
    (b'{"cmd": "' + b"x" * 50000 + b'"}', r"control command 'xxx+… is unknown"),  # echoed, cut short
])
def test_a_malformed_request_is_refused_and_the_server_keeps_answering(payload, message):
    loop = FakeLoop()
    with ControlServer("tcp://127.0.0.1:*", loop.handler) as server:
        events: list = []
        r = _raw_request(server, payload, events)
        assert r["ok"] is False and pytest.importorskip("re").search(message, r["error"]), r
        assert len(r["error"]) < 400
        assert [e.kind for e in events] == [EventKind.MARK] and events[0].data["ok"] is False
        # The REP socket is back in step: the next request (an emergency stop) is carried out.
        assert _raw_request(server, b'{"cmd": "emergency_stop"}')["ok"] is True and loop.stopped


def test_a_request_that_breaks_the_server_itself_gets_an_error_reply_and_a_fault(monkeypatch):
    """Whatever raises while a request is handled, the requester is answered and the loop is not."""
    import controller.control as control

    def broken(request):
        raise KeyError("defect in validation")

    loop = FakeLoop()
    with ControlServer("tcp://127.0.0.1:*", loop.handler) as server:
        monkeypatch.setattr(control, "validate_command", broken)
        events: list = []
        r = _raw_request(server, b'{"cmd": "pause"}', events)
        assert r["ok"] is False and "control server failed on this request: KeyError" in r["error"]
        assert events[-1].kind is EventKind.FAULT and events[-1].data["what"] == "control_request_failed"
        monkeypatch.undo()
        assert _raw_request(server, b'{"cmd": "pause"}')["ok"] is True and loop.paused


def test_events_of_a_batch_reach_the_callers_list_as_they_happen():
    """poll_once(now, events): an emergency stop answered before a later failure stays recorded."""
    loop = FakeLoop()
    with ControlServer("tcp://127.0.0.1:*", loop.handler) as server:
        mine: list = ["earlier"]
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 3000)
        req.connect(server.endpoint)
        try:
            req.send(b'{"cmd": "emergency_stop"}')
            t_end = time.monotonic() + 3
            while len(mine) == 1 and time.monotonic() < t_end:
                assert server.poll_once(0.0, mine) is mine
                time.sleep(0.002)
            assert json.loads(req.recv())["ok"] is True
        finally:
            req.close(0)
            ctx.term()
        assert mine[0] == "earlier" and mine[1].data["cmd"] == "emergency_stop"


def test_replies_name_the_session_and_a_request_for_another_session_is_refused():
    loop = FakeLoop()
    server = ControlServer("tcp://127.0.0.1:*", loop.handler, session_id="20261121T152056Z-ab12cd34")
    with polled(server) as events:
        with ControlClient(server.endpoint, timeout_ms=3000) as anyone:
            assert anyone.status()["session"] == "20261121T152056Z-ab12cd34"
        with ControlClient(server.endpoint, timeout_ms=3000, session="20261121T152056Z-ab12cd34") as same:
            assert same.pause()["ok"] is True and loop.paused
        with ControlClient(server.endpoint, timeout_ms=3000, session="20261120T090000Z-00000000") as old:
            before = loop.snapshot()
            r = old.resume()
            assert r["ok"] is False and r["session"] == "20261121T152056Z-ab12cd34"
            assert "not '20261120T090000Z-00000000'" in r["error"] and "nothing was done" in r["error"]
            assert loop.snapshot() == before and loop.paused
            time.sleep(0.05)
            assert events[-1].data["ok"] is False and events[-1].data["session_sent"] == "20261120T090000Z-00000000"
        with ControlClient(server.endpoint, timeout_ms=3000) as bad:
            assert "'session' 5 is invalid" in bad.request({"cmd": "status", "session": 5})["error"]
