"""Remote control of a running loop over ZeroMQ (REQ/REP, JSON), CURVE-authenticated off-host.

The loop owns a :class:`ControlServer` and calls ``poll_once(now)`` once per
iteration: it never waits (poll timeout 0), handles at most ``max_per_poll``
requests, and returns the :class:`~controller.events.Event` list to record. No
thread runs on the real-time path; the only thread is libzmq's own I/O thread and,
when authentication is on, pyzmq's ZAP authenticator thread (it only answers
handshakes).

Commands (one JSON object per request; optional ``"id"`` is echoed back)::

    {"cmd": "status"}
    {"cmd": "pause"}            {"cmd": "resume"}          {"cmd": "emergency_stop"}
    {"cmd": "set_param", "name": "amplitude_ua", "value": 500}
    {"cmd": "mark", "label": "patient moved"}

The server adds ``who``: the client's CURVE public key (z85) when authenticated,
else ``"local"``; a client cannot choose it. Malformed or unknown commands are
answered ``{"ok": false, "error": ...}`` and never reach the handler; so is a
request that breaks the server itself (recorded as a ``FAULT``): every request
gets a reply and the loop goes on. A server given a ``session_id`` puts it in
every reply as ``"session"``; a request may carry ``"session"`` (the id from the
session's ``endpoints.json``) and is refused, with nothing done, when it names
another session (ports are reused once a session ends). The
handler (given by the loop) applies valid commands and returns a reply dict; the
loop routes ``set_param`` through the safety governor.

Binding is loopback-only unless CURVE is configured: a non-loopback address
without a server secret key and an authorized-clients folder raises
:class:`ControlConfigError`. Refused connection attempts (unknown key, no CURVE,
wrong server key) are returned by ``poll_once`` as ``STATUS`` events with
``status="control_auth_refused"``.
"""
from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from controller.events import Event, EventKind, _clean
from controller.keys import load_key_pair, load_public_key

Handler = Callable[[dict], dict]

MAX_MESSAGE_BYTES = 64 * 1024  # commands are tiny; a larger message is an attack or a bug
MAX_LABEL_CHARS = 200
MAX_NAME_CHARS = 64

# Arguments each command takes (name -> accepted types); "cmd" and "id" are always allowed.
COMMANDS: dict[str, dict[str, tuple[type, ...]]] = {
    "status": {},
    "pause": {},
    "resume": {},
    "emergency_stop": {},
    "set_param": {"name": (str,), "value": (int, float, str, bool)},
    "mark": {"label": (str,)},
}

_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication refused (client key not authorized)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake protocol error",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake aborted (client without CURVE or with a wrong server public key, or it disconnected)",
}
_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "client does not use CURVE",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic error (wrong server public key?)",
}


class ControlConfigError(ValueError):
    """The control server cannot start safely with the given address and keys."""


class CommandError(ValueError):
    """A control request is malformed or unknown; the message says what is wrong."""


def validate_command(request: Any) -> dict:
    """Check one decoded request; return a clean copy or raise :class:`CommandError`."""
    if not isinstance(request, dict):
        raise CommandError(f"control request {type(request).__name__} is invalid; expected a JSON object")
    cmd = request.get("cmd")
    # The type first: `in` on an unhashable value (a list, an object) raises TypeError, not a refusal.
    if not isinstance(cmd, str) or cmd not in COMMANDS:
        raise CommandError(f"control command {_short(cmd)} is unknown; expected one of {sorted(COMMANDS)}")
    spec = COMMANDS[cmd]
    extra = sorted(set(request) - set(spec) - {"cmd", "id", "session"})
    if "who" in extra:
        raise CommandError("control field 'who' is set by the server from the client's key; do not send it")
    if extra:
        raise CommandError(f"control command {cmd!r} got unexpected field(s) {extra}; expected {sorted(spec) or 'none'}")
    clean: dict[str, Any] = {"cmd": cmd}
    if "id" in request:
        if not isinstance(request["id"], (int, str)) or isinstance(request["id"], bool):
            raise CommandError(f"control field 'id' {request['id']!r} is invalid; expected an integer or string")
        clean["id"] = request["id"]
    if "session" in request:
        if not isinstance(request["session"], str) or not 0 < len(request["session"]) <= MAX_NAME_CHARS:
            raise CommandError(f"control field 'session' {_short(request['session'])} is invalid; "
                               f"expected the session id (1-{MAX_NAME_CHARS} characters) from endpoints.json")
        clean["session"] = request["session"]
    for arg, types in spec.items():
        if arg not in request:
            raise CommandError(f"control command {cmd!r} is missing field {arg!r}")
        value = request[arg]
        if not isinstance(value, types) or (value is None):
            names = "/".join(t.__name__ for t in types)
            raise CommandError(f"control field {arg!r}={value!r} is invalid for {cmd!r}; expected {names}")
        if isinstance(value, float) and value != value:
            raise CommandError(f"control field {arg!r}=NaN is invalid for {cmd!r}; expected a number")
        clean[arg] = value
    if cmd == "set_param" and not (0 < len(clean["name"]) <= MAX_NAME_CHARS):
        raise CommandError(f"set_param name {clean['name']!r} is invalid; expected 1-{MAX_NAME_CHARS} characters")
    if cmd == "mark" and not (0 < len(clean["label"]) <= MAX_LABEL_CHARS):
        raise CommandError(f"mark label of {len(clean['label'])} characters is invalid; expected 1-{MAX_LABEL_CHARS}")
    return clean


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: an error message must not echo a 64 KiB request back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def is_loopback(address: str) -> bool:
    """True when a ZeroMQ endpoint can only be reached from this machine."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        raise ControlConfigError(f"control address {address!r} is invalid; expected tcp://HOST:PORT, ipc:// or inproc://")
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: may be reachable from outside


class _ListHandler(logging.Handler):
    """Collects the ZAP authenticator's DENIED lines (written from its thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.denied: deque[str] = deque(maxlen=256)  # deque append/popleft are thread-safe

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("DENIED"):
            key = msg.split("client_key=", 1)[1].strip() if "client_key=" in msg else ""
            # client_key is logged as the repr of bytes: b'...'
            if key.startswith("b'") and key.endswith("'"):
                key = key[2:-1]
            self.denied.append(key)


_server_ids = itertools.count()


class ControlServer:
    """Non-blocking control endpoint polled by the loop (see module docstring).

    ``handler(command) -> dict`` is called for each valid command with the clean
    command dict plus ``who``; its dict is merged into the reply. A handler
    exception becomes an error reply and a ``FAULT`` event (the loop keeps going).
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5557", handler: Handler | None = None,
                 server_secret_key: str | os.PathLike | None = None,
                 authorized_clients_dir: str | os.PathLike | None = None,
                 require_auth: bool = False, max_per_poll: int = 8,
                 refusal_coalesce_s: float = 5.0, session_id: str | None = None) -> None:
        if handler is None or not callable(handler):
            raise ControlConfigError(f"control handler {handler!r} is invalid; expected a callable(command) -> dict")
        if max_per_poll < 1:
            raise ControlConfigError(f"control max_per_poll={max_per_poll} is invalid; expected >= 1")
        self.address = address
        self.handler = handler
        self.max_per_poll = max_per_poll
        self.refusal_coalesce_s = refusal_coalesce_s
        self.session_id = session_id
        self.auth = bool(require_auth) or not is_loopback(address)
        if self.auth:
            if server_secret_key is None or authorized_clients_dir is None:
                why = "require_auth=True" if require_auth else f"address {address!r} is not loopback"
                raise ControlConfigError(
                    f"control server: {why}, so CURVE authentication is required; pass server_secret_key "
                    "(a .key_secret file from 'stimloop keys') and authorized_clients_dir (folder of client .key files)")
            clients = Path(authorized_clients_dir)
            if not clients.is_dir() or not any(clients.glob("*.key")):
                raise ControlConfigError(
                    f"control authorized_clients_dir {str(clients)!r} has no client .key files; "
                    "expected a folder holding the public keys of the allowed clients")
            public, secret = load_key_pair(server_secret_key)
        self._ctx = zmq.Context()  # own context: its ZAP authenticator must not affect other sockets
        self._authenticator: ThreadAuthenticator | None = None
        self._log_handler: _ListHandler | None = None
        self._pending_keys: deque[str] = deque(maxlen=256)
        self._last_refusal: dict[tuple[str, str], tuple[float, int]] = {}
        try:
            if self.auth:
                self._log_handler = _ListHandler()
                log = logging.getLogger(f"stimloop.control.zap.{next(_server_ids)}")
                log.setLevel(logging.DEBUG)
                log.propagate = False  # refusals become events, not console noise
                log.addHandler(self._log_handler)
                self._authenticator = ThreadAuthenticator(self._ctx, log=log)
                self._authenticator.start()
                self._authenticator.configure_curve(domain="*", location=str(clients))
            self._sock = self._ctx.socket(zmq.REP)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            if self.auth:
                self._sock.curve_server = True
                self._sock.curve_publickey = public
                self._sock.curve_secretkey = secret
            self._monitor = self._sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            try:
                self._sock.bind(address)
            except zmq.ZMQError as exc:
                raise OSError(f"control server cannot bind {address!r}: {exc}") from exc
            self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.close()
            raise

    # -- the loop's side -------------------------------------------------
    def poll_once(self, now: float, events: list[Event] | None = None) -> list[Event]:
        """Answer waiting requests without blocking; return the events to record.

        With ``events`` given, events are appended to it as they happen and it is returned: should
        the socket itself fail (raise), what earlier requests of the batch produced is already
        the caller's.
        """
        if events is None:
            events = []
        if self._authenticator is not None:
            self._collect_refusals(now, events)
        for _ in range(self.max_per_poll):
            try:
                frame = self._sock.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            who = frame.get("User-Id") if self.auth else "local"
            # A REP socket that received must send before it can receive again: whatever a request
            # does, it gets a reply, or every later request (an emergency stop) would be refused.
            try:
                reply = self._handle(frame.bytes, who, now, events)
                text = json.dumps(_clean(reply), separators=(",", ":"), default=str, allow_nan=False)
            except Exception as exc:
                error = f"control server failed on this request: {exc.__class__.__name__}: {str(exc)[:200]}"
                events.append(Event(now, EventKind.FAULT, "control",
                                    {"what": "control_request_failed", "who": who, "ok": False, "error": error}))
                text = json.dumps({"ok": False, "error": error, **self._identity()}, separators=(",", ":"))
            try:
                self._sock.send(text.encode(), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # the requester vanished; REP then drops the reply
        return events

    def _handle(self, raw: bytes, who: str, now: float, events: list[Event]) -> dict:
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: deeply nested input ("[[[[…"), refused like any other bad JSON.
            error = (f"control request is not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]}); "
                     "expected a JSON object")
            events.append(Event(now, EventKind.MARK, "control", {"cmd": None, "who": who, "ok": False, "error": error}))
            return {"ok": False, "error": error, **self._identity()}
        try:
            command = validate_command(request)
        except CommandError as exc:
            cmd = request.get("cmd") if isinstance(request, dict) else None
            events.append(Event(now, EventKind.MARK, "control",
                                {"cmd": cmd if isinstance(cmd, str) else None, "who": who, "ok": False, "error": str(exc)}))
            reply = {"ok": False, "error": str(exc), **self._identity()}
            if isinstance(request, dict) and isinstance(request.get("id"), (int, str)):
                reply["id"] = request["id"]
            return reply
        sent = command.pop("session", None)
        if sent is not None and sent != self.session_id:
            # Ports are reused: a client holding an ended session's endpoints.json reaches whichever
            # session owns the port now, and must not pause or resume that one by mistake.
            error = (f"this control server belongs to session {self.session_id!r}, not {sent!r}: the session "
                     "you addressed is not the one running here (it has ended, and another owns the port); "
                     "nothing was done")
            events.append(Event(now, EventKind.MARK, "control",
                                {**command, "who": who, "ok": False, "error": error, "session_sent": sent}))
            return {"ok": False, "error": error, **self._identity(),
                    **({"id": command["id"]} if "id" in command else {})}
        command["who"] = who
        try:
            result = self.handler(dict(command))
            if not isinstance(result, dict):
                raise TypeError(f"control handler returned {type(result).__name__}; expected dict")
        except Exception as exc:  # the loop must survive a bad handler; the event says what happened
            error = f"control handler failed on {command['cmd']!r}: {exc.__class__.__name__}: {exc}"
            events.append(Event(now, EventKind.FAULT, "control", {**command, "ok": False, "error": error}))
            return {"ok": False, "error": error, **self._identity(),
                    **({"id": command["id"]} if "id" in command else {})}
        reply = {"ok": True, "cmd": command["cmd"], **result, **self._identity()}
        if "id" in command:
            reply["id"] = command["id"]
        if command["cmd"] != "status":  # status is a read-only query polled often: not worth an event
            data = {**command, "ok": bool(reply.get("ok"))}
            if not data["ok"] and "error" in reply:
                data["error"] = reply["error"]
            events.append(Event(now, EventKind.MARK, "control", data))
        return reply

    def _identity(self) -> dict:
        """What every reply carries so that a client sees which session answered."""
        return {"session": self.session_id} if self.session_id is not None else {}

    def _collect_refusals(self, now: float, events: list[Event]) -> None:
        while self._log_handler.denied:
            self._pending_keys.append(self._log_handler.denied.popleft())
        while True:
            try:
                msg = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                break  # monitor closed
            code = msg["event"]
            reason = _HANDSHAKE_FAILURES.get(code, f"handshake event {code}")
            if code == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason += f" ({_PROTOCOL_ERRORS.get(msg.get('value'), hex(int(msg.get('value', 0))))})"
            key = ""
            if code == zmq.EVENT_HANDSHAKE_FAILED_AUTH and self._pending_keys:
                key = self._pending_keys.popleft()
            # A refused client retries every ~100 ms: coalesce repeats into one event per window.
            slot = (reason, key)
            last = self._last_refusal.get(slot)
            if last is not None and now - last[0] < self.refusal_coalesce_s:
                self._last_refusal[slot] = (last[0], last[1] + 1)
                continue
            repeats = last[1] if last is not None else 0
            self._last_refusal[slot] = (now, 0)
            events.append(Event(now, EventKind.STATUS, "control", {
                "status": "control_auth_refused", "reason": reason, "client_key": key or None,
                "zmq_event": int(code), "value": int(msg.get("value", 0)), "repeats_before": repeats}))

    @property
    def refusals_pending(self) -> int:
        """Refusals coalesced into the current window and not yet reported."""
        return sum(n for _, n in self._last_refusal.values())

    def close(self) -> None:
        """Stop the authenticator, close the sockets and the context."""
        sock = getattr(self, "_sock", None)
        if sock is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(0)
        mon = getattr(self, "_monitor", None)
        if mon is not None:
            mon.close(0)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self._ctx.term()

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ControlClient:
    """REQ client for a :class:`ControlServer`, local or remote.

    With ``client_keys`` (the client's ``.key_secret``) and ``server_public_key``
    (the server's ``.key`` file or z85 string) the connection is CURVE-encrypted
    and authenticated. With ``session`` (the id in the session's ``endpoints.json``)
    every request names its session and is refused by any other. ``request`` raises ``TimeoutError`` when no reply comes
    within ``timeout_ms`` (server down, or the connection refused by authentication).
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5557", client_keys: str | os.PathLike | None = None,
                 server_public_key: str | bytes | os.PathLike | None = None, timeout_ms: int = 2000,
                 session: str | None = None) -> None:
        if (client_keys is None) != (server_public_key is None):
            raise ControlConfigError("control client: CURVE needs both client_keys (.key_secret) and "
                                     "server_public_key (the server's .key); got only one")
        if timeout_ms <= 0:
            raise ControlConfigError(f"control client timeout_ms={timeout_ms} is invalid; expected > 0")
        self.address = address
        self.timeout_ms = int(timeout_ms)
        self.session = session   # sent with every request: the server refuses it when another session owns the port
        self._keys = None
        if client_keys is not None:
            public, secret = load_key_pair(client_keys)
            self._keys = (public, secret, load_public_key(server_public_key))
        self._ctx = zmq.Context()
        self._sock = self._new_socket()

    def _new_socket(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)  # a stuck request must not hang close()
        sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self._keys is not None:
            public, secret, server_public = self._keys
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_public
        sock.connect(self.address)
        return sock

    def request(self, cmd: dict) -> dict:
        """Send one command dict and return the server's reply dict."""
        if self.session is not None and isinstance(cmd, dict) and "session" not in cmd:
            cmd = {**cmd, "session": self.session}
        try:
            self._sock.send(json.dumps(cmd).encode())
            return json.loads(self._sock.recv())
        except zmq.Again:
            # A REQ socket that missed its reply is stuck in the wrong state: start over.
            self._sock.close(0)
            self._sock = self._new_socket()
            raise TimeoutError(
                f"control server at {self.address} did not answer {cmd.get('cmd') if isinstance(cmd, dict) else cmd!r} "
                f"within {self.timeout_ms} ms (not running, unreachable, or this client was refused by authentication)"
            ) from None

    def status(self) -> dict:
        return self.request({"cmd": "status"})

    def pause(self) -> dict:
        return self.request({"cmd": "pause"})

    def resume(self) -> dict:
        return self.request({"cmd": "resume"})

    def emergency_stop(self) -> dict:
        return self.request({"cmd": "emergency_stop"})

    def set_param(self, name: str, value: Any) -> dict:
        return self.request({"cmd": "set_param", "name": name, "value": value})

    def mark(self, label: str) -> dict:
        return self.request({"cmd": "mark", "label": label})

    def close(self) -> None:
        """Close the socket and the context."""
        self._sock.close(0)
        self._ctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_poll(n: int = 20_000) -> dict:
    """Cost of ``poll_once`` on the loop (µs): idle (nothing waiting) and with CURVE on."""
    import tempfile
    import time

    import numpy as np

    from controller.keys import make_keys

    out: dict[str, Any] = {"n": n, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}
    with tempfile.TemporaryDirectory() as d:
        _, server_secret = make_keys(Path(d) / "server", "server")
        make_keys(Path(d) / "clients", "client")
        configs = {"idle_loopback_us": {}, "idle_curve_us": {"server_secret_key": server_secret,
                                                            "authorized_clients_dir": Path(d) / "clients",
                                                            "require_auth": True}}
        for name, kwargs in configs.items():
            with ControlServer("tcp://127.0.0.1:*", lambda c: {}, **kwargs) as server:
                times = np.empty(n)
                for i in range(n):
                    t0 = time.perf_counter()
                    server.poll_once(0.0)
                    times[i] = time.perf_counter() - t0
            out[name] = {"p50": float(np.percentile(times, 50) * 1e6), "p99": float(np.percentile(times, 99) * 1e6),
                         "max": float(times.max() * 1e6)}
    return out


if __name__ == "__main__":  # python -m controller.control [out.json]
    import sys

    result = bench_poll()
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
    print(text)
