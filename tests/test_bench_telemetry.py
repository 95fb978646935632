"""Telemetry cost benchmark: summary math, the decimation the fast path relies on, and a short real run."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from controller.bench_ads import chunk_latency_ms, slowest_blocks, spike_to_command_samples_ms
from controller.bench_telemetry import METRICS, MODES, summarize
from controller.telemetry import TelemetryPublisher, TelemetrySubscriber


def _runs(off, on0, on2, rounds=2):
    return [{"mode": m, "round": r, "samples_ms": {"chunk_to_decision": list(x)}} for r in range(rounds)
            for m, x in zip(MODES, (off, on0, on2))]


def test_summarize_pools_rounds_and_gives_p99_ratio_with_interval():
    rng = np.random.default_rng(1)
    off = rng.gamma(4.0, 0.25, 400)
    res = summarize(_runs(off, off * 1.05, off * 1.5, rounds=3), seed=3)
    assert res["modes"]["off"]["n"] == 1200 and len(res["modes"]["off"]["per_round_p99"]) == 3
    assert res["ratio_p99"]["on_no_subscriber"] == pytest.approx(1.05)
    assert res["ratio_p99"]["on_2_subscribers"] == pytest.approx(1.5)
    lo, hi = res["ratio_p99_ci95"]["on_2_subscribers"]
    assert lo < 1.5 < hi and hi - lo < 1.0
    assert res["target_met"] is False  # 1.5 > 1.10
    assert summarize(_runs(off, off, off * 1.08), seed=3)["target_met"] is True


def test_summarize_rejects_unknown_mode_and_handles_empty_mode():
    with pytest.raises(ValueError, match="run mode 'fast' unknown"):
        summarize([{"mode": "fast", "round": 0, "samples_ms": {"chunk_to_decision": [1.0]}}])
    with pytest.raises(ValueError, match="metric 'latency' unknown"):
        summarize(_runs([1.0], [1.0], [1.0]), metric="latency")
    res = summarize(_runs([1.0, 2.0], [], [1.0, 2.0], rounds=1))
    assert res["modes"]["on_no_subscriber"]["n"] == 0 and res["ratio_p99"]["on_no_subscriber"] is None
    assert res["target_met"] is False


def test_spike_to_command_uses_the_chunk_push_time_of_the_spike():
    gt = {"fs_hz": 1000.0, "chunk_n": 10, "t0": 100.0, "push_t": [100.010, 100.020, 100.030],
          "emulator_records": [
              # spike at sample 15 (block 1, pushed 100.020); at = spike + 7.5 ms; received 100.0215
              {"type": "TRIGGER", "at": 100.015 + 0.0075, "t_received": 100.0215, "t_delivered": 100.0225},
              {"type": "TRIGGER", "at": 100.005 + 0.0075, "t_received": 100.0130, "t_delivered": None},  # not delivered
              {"type": "HEARTBEAT"}]}
    np.testing.assert_allclose(spike_to_command_samples_ms(gt, 7.5e-3), [1.5], atol=1e-9)
    with pytest.raises(ValueError, match="delay_s=-1"):
        spike_to_command_samples_ms(gt, -1)


def test_chunk_latency_counts_every_block_of_a_pull_once():
    gt = {"fs_hz": 1000.0, "chunk_n": 10, "t0": 100.0, "push_t": [100.010, 100.020, 100.030, 100.040]}
    # Pull 1: block 0 alone, done at 100.0112. Pull 2: blocks 1 and 2 together, done at 100.0305.
    first = [100.000, 100.010]
    last = [100.009, 100.029]
    done = [100.0112, 100.0305]
    np.testing.assert_allclose(chunk_latency_ms(gt, first, last, done), [1.2, 10.5, 0.5], atol=1e-9)
    # Warm-up: pulls starting before t_from are left out.
    np.testing.assert_allclose(chunk_latency_ms(gt, first, last, done, t_from=100.005), [10.5, 0.5], atol=1e-9)
    # A block split over two pulls counts once, when its last part was handled.
    split = chunk_latency_ms(gt, [100.000, 100.005], [100.004, 100.009], [100.0105, 100.0112])
    np.testing.assert_allclose(split, [1.2], atol=1e-9)
    # The slowest blocks, slowest first, with their push and done times (for a scheduler trace).
    top = slowest_blocks(gt, first, last, done, n=2)
    assert [b["ms"] for b in top] == [10.5, 1.2]
    assert top[0] == {"push_t": 100.02, "done_t": 100.0305, "ms": 10.5}


def test_signal_decimation_keeps_an_even_rate_across_small_blocks():
    """1 ms blocks at 30 kHz decimated to 64 Hz publish 64 rows/s, not one row per block."""
    fs_hz, decim = 30_000.0, 469
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=10_000, signal_rows=1) as pub, \
            TelemetrySubscriber(pub.endpoint, topics=["signal"]) as sub:
        for _ in range(200):  # slow joiner: wait until the subscription is in place
            pub.publish("signal", -1.0, {"x": np.zeros((1, 1), np.float32)})
            if sub.recv(timeout_ms=10) is not None:
                break
        while sub.recv(timeout_ms=50) is not None:
            pass
        stream = np.arange(30_000, dtype=np.float32)[:, None]  # 1 s, value = sample index
        ts = 10.0 + np.arange(30_000) / fs_hz
        for i in range(0, 30_000, 30):
            pub.publish_signal(ts[i:i + 30], stream[i:i + 30], fs_hz, decimate=decim)
        got = []
        while (msg := sub.recv(timeout_ms=200)) is not None:
            got.append(msg)
    kept = np.concatenate([p["x"][:, 0] for _, _, p in got])
    np.testing.assert_array_equal(kept, np.arange(0, 30_000, decim))
    assert len(got) == math.ceil(30_000 / decim)
    # Each message is stamped with its first kept sample.
    assert all(t == pytest.approx(ts[int(p["x"][0, 0])]) for _, t, p in got)
    assert got[0][2]["fs_hz"] == pytest.approx(fs_hz / decim)


def test_signal_rows_travel_several_to_a_message():
    """Fewer messages, same rows: 64 rows/s in messages of 8 rows, stamped with their first row."""
    fs_hz, decim = 30_000.0, 469
    with TelemetryPublisher("tcp://127.0.0.1:*", hwm=10_000) as pub, \
            TelemetrySubscriber(pub.endpoint, topics=["signal"]) as sub:
        assert pub.signal_rows == 8
        for _ in range(200):  # slow joiner
            pub.publish("signal", -1.0, {"x": np.zeros((1, 1), np.float32)})
            if sub.recv(timeout_ms=10) is not None:
                break
        while sub.recv(timeout_ms=50) is not None:
            pass
        buf = np.empty((30, 1), np.float32)   # one block buffer reused, as a ring view would be
        ts = 10.0 + np.arange(30_000) / fs_hz
        for i in range(0, 30_000, 30):
            buf[:, 0] = np.arange(i, i + 30)
            pub.publish_signal(ts[i:i + 30], buf, fs_hz, decimate=decim)
        got = []
        while (msg := sub.recv(timeout_ms=200)) is not None:
            got.append(msg)
    kept = np.arange(0, 30_000, decim)
    assert len(got) == kept.size // 8 and all(p["x"].shape == (8, 1) for _, _, p in got)
    np.testing.assert_array_equal(np.concatenate([p["x"][:, 0] for _, _, p in got]), kept[:len(got) * 8])
    assert all(t == pytest.approx(ts[int(p["x"][0, 0])]) for _, t, p in got)
    with pytest.raises(ValueError, match="signal_rows=0"):
        TelemetryPublisher("tcp://127.0.0.1:*", signal_rows=0)


def test_signal_timestamps_must_match_the_block():
    with TelemetryPublisher("tcp://127.0.0.1:*") as pub:
        with pytest.raises(ValueError, match=r"timestamps shape \(3,\) .* expected \(4,\)"):
            pub.publish_signal(np.zeros(3), np.zeros((4, 1), np.float32), 100.0)
        with pytest.raises(ValueError, match="fs_hz=0"):
            pub.publish_signal(0.0, np.zeros((4, 1), np.float32), 0)


@pytest.mark.timeout(120)
def test_short_benchmark_runs_three_modes_and_subscribers_receive(tmp_path):
    out = tmp_path / "bt.json"
    proc = subprocess.run([sys.executable, "-m", "controller.bench_telemetry", "--duration", "1.5", "--rounds", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on_2_subscribers" in proc.stdout and "p99/off" in proc.stdout
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["runs"]] == list(MODES)
    for metric in METRICS:
        for m in MODES:
            assert res[metric]["modes"][m]["n"] > 0 and math.isfinite(res[metric]["modes"][m]["p99"])
    # Every 1 ms block is a sample of the per-chunk measure (1.5 s minus the 0.3 s warm-up).
    assert res["chunk_to_decision"]["modes"]["off"]["n"] > 900
    by_mode = {r["mode"]: r for r in res["runs"]}
    assert by_mode["off"]["telemetry"] is None
    assert by_mode["on_no_subscriber"]["telemetry"]["sent"] > 10
    # The end to end covers delivered triggers only (device records, counted apart).
    for r in res["runs"]:
        assert 0 < r["spike_to_command_ms"]["n"] <= r["pulses_delivered"]
    tele = by_mode["on_2_subscribers"]["telemetry"]
    normal, slow = tele["subscribers"]
    assert normal["slow_ms"] == 0 and slow["slow_ms"] == 50
    # The fast path published its signal, spikes and commands and the normal subscriber got them.
    assert normal["received"]["signal"] >= 8 and normal["received"]["stim"] > 0 and normal["received"]["prediction"] > 0
    # The slow subscriber (50 ms per message) is served too.
    assert sum(slow["received"].values()) > 0
    assert res["machine"]["cpus"] >= 1 and isinstance(res["target_met"], bool)
