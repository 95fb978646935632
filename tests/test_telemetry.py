"""Telemetry: real ZeroMQ PUB/SUB sockets, a subscriber in a spawned process, drops counted."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time

import numpy as np
import pytest
import zmq

from controller.events import Event, EventKind
from controller.telemetry import (EVENT_TOPIC, TOPICS, TelemetryPublisher, TelemetrySubscriber, decode, encode)


def _wire(frames: list) -> list[bytes]:
    """What a receiver gets: every frame as bytes."""
    return [bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in frames]


def test_encode_decode_round_trip_keeps_arrays_and_scalars():
    x = (np.arange(12, dtype=np.float32) * 1.5).reshape(6, 2)
    idx = np.array([3, 1, 4], dtype=np.int64)
    payload = {"fs_hz": 250.0, "x": x, "idx": idx, "n": np.int32(7), "name": "ch1"}
    topic, t, out = decode(_wire(encode("signal", 12.25, payload)))
    assert (topic, t) == ("signal", 12.25)
    np.testing.assert_array_equal(out["x"], x)
    assert out["x"].dtype == np.float32 and out["x"].shape == (6, 2)
    np.testing.assert_array_equal(out["idx"], idx)
    assert out["n"] == 7 and out["fs_hz"] == 250.0 and out["name"] == "ch1"
    assert isinstance(payload["x"], np.ndarray), "encode must not mutate the caller's payload"


def test_unknown_topic_is_refused_with_the_list_of_topics():
    with pytest.raises(ValueError, match=r"topic 'sgnal' is unknown.*signal"):
        encode("sgnal", 0.0, {})
    with pytest.raises(ValueError, match="'bogus'"):
        TelemetrySubscriber("tcp://127.0.0.1:1", topics=["bogus"])


def test_decode_rejects_frame_count_mismatch():
    frames = _wire(encode("signal", 0.0, {"x": np.zeros((2, 1), np.float32)}))
    with pytest.raises(ValueError, match="header announces 3"):
        decode(frames[:2])


def test_every_event_kind_has_a_topic():
    assert set(EVENT_TOPIC) == set(EventKind)
    assert set(EVENT_TOPIC.values()) <= set(TOPICS)


def _subscriber_process(address: str, out: mp.Queue, stop: mp.Event) -> None:
    """Child process: collect the first message of each topic, report, exit."""
    seen: dict[str, tuple] = {}
    with TelemetrySubscriber(address, topics=["signal", "stim", "prediction"]) as sub:
        out.put("subscribed")
        deadline = time.monotonic() + 20
        while len(seen) < 3 and time.monotonic() < deadline and not stop.is_set():
            msg = sub.recv(timeout_ms=100)
            if msg is not None and msg[0] not in seen:
                seen[msg[0]] = msg
    out.put(seen)


@pytest.mark.timeout(60)
def test_subscriber_in_another_process_receives_signal_and_events():
    ctx = mp.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    with TelemetryPublisher("tcp://127.0.0.1:*") as pub:
        child = ctx.Process(target=_subscriber_process, args=(pub.endpoint, out, stop), daemon=True)
        child.start()
        try:
            assert out.get(timeout=30) == "subscribed"
            block = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
            cmd = Event(5.0, EventKind.COMMAND, "actuator", {"seq": 17, "amplitude_ua": 500.0})
            pred = Event(5.1, EventKind.PREDICTION, "seizure", {"p": 0.93})
            result = None
            # PUB/SUB has no delivery guarantee until the subscription has reached the
            # publisher (slow joiner): repeat until the child has one of each.
            for _ in range(400):
                pub.publish_signal(4.0, block, fs_hz=500.0, decimate=4, channel_names=["a", "b", "c"])
                pub.publish_event(cmd)
                pub.publish_event(pred)
                pub.publish("fault", 5.2, {"note": "not subscribed, must not arrive"})
                try:
                    result = out.get(timeout=0.05)
                    break
                except queue.Empty:
                    pass
            assert isinstance(result, dict), "subscriber process received nothing"
        finally:
            stop.set()
            child.join(10)
            if child.is_alive():
                child.kill()
    assert set(result) == {"signal", "stim", "prediction"}
    topic, t, sig = result["signal"]
    assert t == 4.0 and sig["fs_hz"] == 125.0 and sig["channels"] == ["a", "b", "c"]
    np.testing.assert_array_equal(sig["x"], block[::4])
    _, t, stim = result["stim"]
    assert t == 5.0 and stim == {"kind": "command", "source": "actuator", "seq": 17, "amplitude_ua": 500.0}
    assert result["prediction"][2]["p"] == 0.93


@pytest.mark.timeout(30)
def test_publishing_without_subscriber_never_blocks_and_drops_nothing():
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=5) as pub:
        x = np.zeros((64, 8), np.float32)
        ok = [pub.publish_signal(float(i), x, fs_hz=1000.0) for i in range(5000)]
    # No subscriber: PUB discards without queueing, so nothing is ever "full".
    assert all(ok) and pub.sent == 5000 and pub.dropped == 0


@pytest.mark.timeout(60)
def test_slow_subscriber_never_blocks_publisher_and_drops_are_counted():
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=10) as pub:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 10)
        sub.setsockopt(zmq.RCVBUF, 4096)  # small kernel buffer: the queue fills quickly
        sub.setsockopt(zmq.SUBSCRIBE, b"signal")
        sub.connect(pub.endpoint)
        try:
            big = np.ones((4096, 4), np.float32)  # 64 KiB per message
            for _ in range(2000):  # wait for the subscription to reach the publisher
                pub.publish_signal(0.0, big, fs_hz=1000.0)
                if sub.poll(5):
                    break
            else:
                pytest.fail("subscription never reached the publisher")
            sent_before, dropped_before = pub.sent, pub.dropped
            n = 3000  # ~190 MiB offered to a reader that does not read
            results = [pub.publish_signal(float(i), big, fs_hz=1000.0) for i in range(n)]
            dropped = pub.dropped - dropped_before
            assert dropped > 0, "a stalled subscriber must make the publisher drop (and count) messages"
            assert dropped == results.count(False)
            assert (pub.sent - sent_before) + dropped == n
            # What did arrive is intact.
            topic, t, payload = decode(sub.recv_multipart())
            assert topic == "signal" and payload["x"].shape == (4096, 4) and float(payload["x"][0, 0]) == 1.0
        finally:
            sub.close(0)


def test_subscriber_recv_times_out_with_none():
    with TelemetryPublisher("tcp://127.0.0.1:*") as pub, TelemetrySubscriber(pub.endpoint, topics=["fault"]) as sub:
        assert sub.recv(timeout_ms=50) is None


def test_bad_publisher_arguments_are_named():
    with pytest.raises(ValueError, match="hwm=0"):
        TelemetryPublisher("tcp://127.0.0.1:*", hwm=0)
    with pytest.raises(OSError, match="cannot bind 'tcp://256.0.0.1:1'"):
        TelemetryPublisher("tcp://256.0.0.1:1")
    with TelemetryPublisher("tcp://127.0.0.1:*") as pub:
        with pytest.raises(ValueError, match="decimate=0"):
            pub.publish_signal(0.0, np.zeros((4, 1), np.float32), 100.0, decimate=0)
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            pub.publish_signal(0.0, np.zeros(4, np.float32), 100.0)
