"""Live telemetry over a ZeroMQ PUB socket: the loop publishes, monitors subscribe.

Wire format (one ZeroMQ multipart message per publication)::

    frame 0   topic, ASCII (one of TOPICS)
    frame 1   header, compact JSON: {"t": float, "p": {...payload without arrays...},
                                     "a": [[key, dtype, shape], ...]}
    frame 2+  one raw C-contiguous buffer per array listed in "a", in order

Arrays travel as raw bytes beside the JSON so that a decimated signal block costs
one memcpy instead of a JSON encode of every number (the publisher runs on the
real-time path). Any process that speaks ZeroMQ can read it: the header is strict
JSON (a NaN or infinite value is sent as ``null``, as in ``events.jsonl``).

Never blocks the caller: sends use ``NOBLOCK`` and ``XPUB_NODROP`` so that a full
send queue (SNDHWM reached because a subscriber is slow or stuck) surfaces as
``zmq.Again``, which is counted in ``dropped`` instead of being silently discarded
by libzmq. The price of counting: while one subscriber is stuck at its HWM,
publications are dropped for every subscriber.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

import numpy as np
import zmq

from controller.events import Event, EventKind, _clean

TOPICS: tuple[str, ...] = ("signal", "features", "prediction", "decision", "stim", "clamp", "fault", "status")

# Which telemetry topic carries which event kind. A monitor watching "fault"
# sees everything that means the loop is not healthy (including dropped samples
# and deadline misses); governor clamps and refusals share "clamp".
EVENT_TOPIC: dict[EventKind, str] = {
    EventKind.CHUNK: "status",
    EventKind.SPIKE: "prediction",
    EventKind.PREDICTION: "prediction",
    EventKind.DECISION: "decision",
    EventKind.CLAMP: "clamp",
    EventKind.REFUSAL: "clamp",
    EventKind.COMMAND: "stim",
    EventKind.ACK: "stim",
    EventKind.FAULT: "fault",
    EventKind.SAFE_STATE: "fault",
    EventKind.DEADLINE_MISS: "fault",
    EventKind.DROPPED: "fault",
    EventKind.STATUS: "status",
    EventKind.MARK: "status",
}

_TOPIC_BYTES = {t: t.encode("ascii") for t in TOPICS}


def _json_default(value: Any) -> Any:
    """Make numpy scalars and enums JSON-encodable (only called for those, so cheap)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


def encode(topic: str, t: float, payload: dict) -> list:
    """Encode one publication as multipart frames (see module docstring).

    Raises ``ValueError`` naming the topic when it is not one of ``TOPICS``.
    """
    topic_b = _TOPIC_BYTES.get(topic)
    if topic_b is None:
        raise ValueError(f"telemetry topic {topic!r} is unknown; expected one of {TOPICS}")
    arrays = None
    plain = payload
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            if arrays is None:
                arrays = []
                plain = dict(payload)
            arrays.append((key, value))
            del plain[key]
    header: dict[str, Any] = {"t": float(t), "p": plain}
    frames: list = [topic_b, b""]
    if arrays:
        header["a"] = [[k, a.dtype.str, list(a.shape)] for k, a in arrays]
        # ascontiguousarray is a no-op for the usual C-ordered block; zmq takes the
        # buffer directly, with no bytes() conversion.
        frames.extend(np.ascontiguousarray(a) for _, a in arrays)
    try:
        text = json.dumps(header, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError:
        # NaN/inf (a prediction on an invalid window): json would write the bare word NaN, which strict
        # JSON readers (most languages' parsers) refuse. null, as in events.jsonl. Cleaned only on this
        # rare path: walking every payload would cost the real-time loop on every message.
        text = json.dumps(_clean(header), separators=(",", ":"), default=_json_default, allow_nan=False)
    frames[1] = text.encode()
    return frames


def decode(frames: list) -> tuple[str, float, dict]:
    """Inverse of :func:`encode`: ``(topic, t, payload)`` with arrays restored."""
    if len(frames) < 2:
        raise ValueError(f"telemetry message has {len(frames)} frame(s); expected at least 2 (topic, header)")
    topic = bytes(frames[0]).decode("ascii")
    header = json.loads(bytes(frames[1]))
    payload = dict(header.get("p", {}))
    specs = header.get("a", [])
    if len(frames) != 2 + len(specs):
        raise ValueError(f"telemetry message on {topic!r} has {len(frames)} frames; header announces {2 + len(specs)}")
    for (key, dtype, shape), buf in zip(specs, frames[2:]):
        payload[key] = np.frombuffer(bytes(buf), dtype=np.dtype(dtype)).reshape(shape)
    t = header.get("t")
    return topic, (float(t) if t is not None else float("nan")), payload


class TelemetryPublisher:
    """Non-blocking ZeroMQ PUB endpoint for the real-time loop.

    ``publish`` never waits: when the send queue is full the message is dropped
    and ``dropped`` is incremented. Not thread-safe (one publisher per process,
    like every ZeroMQ socket).
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5556", hwm: int = 1000,
                 context: zmq.Context | None = None, signal_rows: int = 8) -> None:
        if not isinstance(hwm, int) or hwm < 1:
            raise ValueError(f"telemetry hwm={hwm!r} is invalid; expected an integer >= 1 (messages)")
        if not isinstance(signal_rows, int) or not 1 <= signal_rows <= 10_000:
            raise ValueError(f"telemetry signal_rows={signal_rows!r} is invalid; expected an integer 1..10000")
        self.address = address
        self.hwm = hwm
        # Decimated signal rows travel `signal_rows` to a message (8 at 64 Hz: 8 messages/s). Every message
        # wakes libzmq's I/O thread and each subscriber; on a 2-core machine those wake-ups are what
        # telemetry costs the spike path (measured: one row per message cost +27 % at p99 with two
        # subscribers in the low-latency mode, controller/bench_telemetry.py).
        self.signal_rows = signal_rows
        self._signal_parts: list[np.ndarray] = []
        self._signal_n = 0
        self._signal_t = 0.0
        self.sent = 0
        self.dropped = 0
        # Decimation phase carried across signal blocks: samples to skip at the start
        # of the next block so that kept samples are evenly spaced in the stream.
        self._signal_phase = 0
        self._signal_decimate = 1
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)  # closing must not wait for slow subscribers
        self._sock.setsockopt(zmq.XPUB_NODROP, 1)  # full queue -> Again, so drops are counted
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise OSError(f"telemetry publisher cannot bind {address!r}: {exc}") from exc
        # The actual endpoint (resolves a wildcard port such as tcp://127.0.0.1:*).
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, topic: str, t: float, payload: dict) -> bool:
        """Send ``payload`` on ``topic`` stamped ``t``; False when dropped (queue full)."""
        frames = encode(topic, t, payload)
        try:
            # copy=True: the caller may reuse its array (a ring buffer view) right after.
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def publish_event(self, event: Event) -> bool:
        """Publish an :class:`~controller.events.Event` on the topic of its kind."""
        topic = EVENT_TOPIC.get(event.kind, "status")
        payload = {"kind": str(event.kind), "source": event.source}
        payload.update(event.data)
        return self.publish(topic, event.t, payload)

    def publish_signal(self, t: float | np.ndarray, samples: np.ndarray, fs_hz: float, decimate: int = 1,
                       channel_names: Iterable[str] | None = None) -> bool:
        """Publish a signal block ``(n, ch)``, keeping every ``decimate``-th sample of the stream.

        The decimation phase continues across calls, so the published rate is
        ``fs_hz / decimate`` whatever the block size (a block shorter than
        ``decimate`` may publish nothing; then nothing is sent and True is returned).
        Restarting the phase at every block would publish one row per block: with
        1 ms blocks at 30 kHz that is 1000 messages/s instead of the configured rate.
        Plain sub-sampling (no anti-alias filter): the view is for eyes, not analysis.
        One publisher carries one signal stream (the phase is the publisher's).

        ``t`` is the timestamp of the block's first sample, or the ``(n,)`` array of
        per-sample timestamps. Kept rows are sent ``signal_rows`` (or more) to a
        message, stamped with its first row's time.
        ``fs_hz`` is the block's rate; the message carries the published rate.
        """
        if samples.ndim != 2:
            raise ValueError(f"signal block shape {samples.shape} is invalid; expected (n_samples, n_channels)")
        if not isinstance(decimate, int) or decimate < 1:
            raise ValueError(f"signal decimate={decimate!r} is invalid; expected an integer >= 1")
        if not fs_hz > 0:
            raise ValueError(f"signal fs_hz={fs_hz!r} is invalid; expected > 0 (Hz)")
        n = samples.shape[0]
        if isinstance(t, np.ndarray) and t.shape != (n,):
            raise ValueError(f"signal timestamps shape {t.shape} is invalid; expected ({n},) like the block")
        if decimate != self._signal_decimate:
            self._signal_decimate, self._signal_phase = decimate, 0
        phase = self._signal_phase
        self._signal_phase = (phase - n) % decimate
        if phase >= n:
            return True
        if not self._signal_parts:
            self._signal_t = float(t[phase]) if isinstance(t, np.ndarray) else float(t) + phase / float(fs_hz)
        kept = samples[phase::decimate]
        self._signal_parts.append(np.array(kept, copy=True))   # the caller may reuse its block (a ring view)
        self._signal_n += kept.shape[0]
        if self._signal_n < self.signal_rows:
            return True
        x = self._signal_parts[0] if len(self._signal_parts) == 1 else np.concatenate(self._signal_parts)
        self._signal_parts, self._signal_n = [], 0
        payload: dict[str, Any] = {"fs_hz": float(fs_hz) / decimate, "x": x}
        if channel_names is not None:
            payload["channels"] = list(channel_names)
        return self.publish("signal", self._signal_t, payload)

    def close(self) -> None:
        """Close the socket (drops anything still queued)."""
        self._sock.close(0)

    def __enter__(self) -> "TelemetryPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TelemetrySubscriber:
    """SUB endpoint: connects to a publisher (local or remote) and decodes messages.

    ``topics`` None subscribes to all of ``TOPICS``. Messages whose topic is not
    exactly one of the requested topics are skipped (ZeroMQ filters by prefix).
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5556", topics: Iterable[str] | None = None,
                 context: zmq.Context | None = None, rcvhwm: int = 1000) -> None:
        wanted = tuple(TOPICS if topics is None else topics)
        for topic in wanted:
            if topic not in TOPICS:
                raise ValueError(f"telemetry topic {topic!r} is unknown; expected one of {TOPICS}")
        self.address = address
        self.topics = frozenset(wanted)
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in wanted:
            self._sock.setsockopt(zmq.SUBSCRIBE, _TOPIC_BYTES[topic])
        self._sock.connect(address)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    def recv(self, timeout_ms: int = 1000) -> tuple[str, float, dict] | None:
        """Next ``(topic, t, payload)``, or None when nothing arrived within ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poller.poll(left_ms):
                return None
            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            topic, t, payload = decode(frames)
            if topic in self.topics:
                return topic, t, payload

    def close(self) -> None:
        """Close the socket."""
        self._sock.close(0)

    def __enter__(self) -> "TelemetrySubscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_publish(n: int = 20_000, block_shape: tuple[int, int] = (32, 8)) -> dict:
    """Cost of ``publish`` on the caller's thread (µs per call), with one live subscriber.

    Measures what the real-time loop pays: encode + non-blocking hand-off to libzmq.
    """
    block = np.zeros(block_shape, np.float32)
    event = Event(0.0, EventKind.COMMAND, "actuator", {"seq": 1, "amplitude_ua": 500.0, "channel": 0})
    out: dict[str, Any] = {"n": n, "block_shape": list(block_shape), "pyzmq": zmq.__version__,
                           "libzmq": zmq.zmq_version()}
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=n * 4) as pub, TelemetrySubscriber(pub.endpoint) as sub:
        for _ in range(200):  # let the subscription reach the publisher
            pub.publish("status", 0.0, {})
            if sub.recv(timeout_ms=10) is not None:
                break
        for name, call in (("signal_block_us", lambda i: pub.publish_signal(float(i), block, 250.0)),
                           ("event_us", lambda i: pub.publish_event(event))):
            times = np.empty(n)
            for i in range(n):
                t0 = time.perf_counter()
                call(i)
                times[i] = time.perf_counter() - t0
            out[name] = {"p50": float(np.percentile(times, 50) * 1e6), "p99": float(np.percentile(times, 99) * 1e6),
                         "max": float(times.max() * 1e6)}
        out["dropped"] = pub.dropped
    return out


if __name__ == "__main__":  # python -m controller.telemetry [out.json]
    import sys

    result = bench_publish()
    text = json.dumps(result, indent=1)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    print(text)
