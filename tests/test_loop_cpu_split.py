"""The loop's CPU time beside its wall clock: where a slow stage waited (on the CPU or off it)."""
import math

import numpy as np
import pytest

from controller.bench.common import SLOWEST_SPLIT_N, cpu_split_ms


class Ticking:
    """A clock that advances by ``step_s`` on every reading (the loop's clocks, made deterministic)."""

    def __init__(self, t0: float, step_s: float):
        self.t, self.step_s = t0, step_s
        self.readings = 0

    def __call__(self) -> float:
        self.t += self.step_s
        self.readings += 1
        return self.t


def test_cpu_split_separates_waiting_from_working():
    wall = [1e-3, 5e-3, 0.2e-3, 2e-3, math.nan]
    cpu = [0.9e-3, 0.5e-3, 0.2e-3, math.nan, 1e-3]     # the last two pairs are incomplete records
    out = cpu_split_ms(wall, cpu)
    assert out["on_cpu"]["n"] == out["off_cpu"]["n"] == 3
    assert out["off_cpu"]["max"] == pytest.approx(4.5)
    assert out["on_cpu"]["max"] == pytest.approx(0.9)
    # Slowest first, each with the part of it spent off the CPU.
    assert [s["wall_ms"] for s in out["slowest"]] == [5.0, 1.0, 0.2]
    assert [s["off_cpu_ms"] for s in out["slowest"]] == pytest.approx([4.5, 0.1, 0.0])
    assert len(cpu_split_ms(np.full(10, 1e-3), np.full(10, 1e-4))["slowest"]) == SLOWEST_SPLIT_N


def test_cpu_split_never_reports_negative_time():
    # The CPU clock is read just after the wall clock: it can run a few µs ahead of it.
    out = cpu_split_ms([1.0e-4], [1.03e-4])
    assert out["off_cpu"]["max"] == 0.0 and out["on_cpu"]["max"] == pytest.approx(0.1)


def test_cpu_split_rejects_misaligned_inputs():
    with pytest.raises(ValueError, match="3 wall times for 2 CPU times"):
        cpu_split_ms([1e-3, 1e-3, 1e-3], [1e-4, 1e-4])


def _rig(cfg, fs_hz, n_channels, clock, cpu_clock, modeled_latency_s=None):
    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.loop import make_actuator
    from drivers.simulated import SimulatedStimulator
    act = make_actuator(cfg, SimulatedStimulator(clock=clock), clock)
    act.heartbeat()
    loop = SeizureLoop.from_config(cfg, fs_hz, n_channels)
    return ChunkStep(loop, act, clock, modeled_latency_s=modeled_latency_s, cpu_clock=cpu_clock)


def _predictions(events):
    return [e.data for e in events if e.kind.value == "prediction"]


def test_real_time_windows_carry_the_loop_threads_cpu_time():
    from controller.config import load_config
    cfg = load_config(None)   # the seizure loop with the shipped model
    fs, n_ch = 256.0, 16
    clock, cpu = Ticking(0.0, 1e-6), Ticking(100.0, 0.5e-6)
    step = _rig(cfg, fs, n_ch, clock, cpu)
    rng = np.random.default_rng(0)
    preds = []
    for i in range(40):   # 10 s of 0.25 s chunks: windows once the first is full
        n = int(fs // 4)
        ts = (np.arange(n) + i * n) / fs
        clock.t = float(ts[-1])   # the loop runs on the stream's clock domain
        preds += _predictions(step.step(rng.normal(0, 20, (n, n_ch)).astype(np.float32), ts))
    assert preds
    for p in preds:
        # Read in turn with the wall clock at read, features and inference.
        assert p["cpu_read"] < p["cpu_features"] < p["cpu_inference"]
        assert p["t_read"] < p["t_features"] < p["t_inference"]
        # The fake CPU clock ran at half the wall clock's pace: half of every span was on the CPU.
        assert p["cpu_inference"] - p["cpu_features"] == pytest.approx((p["t_inference"] - p["t_features"]) / 2)


def test_modeled_time_records_no_cpu_time():
    # Simulated time has no thread to measure: the virtual clock charges a modeled latency.
    from controller.config import load_config
    from controller.runners.simulated import VirtualClock
    cfg = load_config(None)
    clock, cpu = VirtualClock(), Ticking(0.0, 1e-6)
    step = _rig(cfg, 256.0, 16, clock, cpu, modeled_latency_s=0.002)
    rng = np.random.default_rng(1)
    preds = []
    for i in range(40):
        ts = (np.arange(64) + i * 64) / 256.0
        clock.advance_to(float(ts[-1]))
        preds += _predictions(step.step(rng.normal(0, 20, (64, 16)).astype(np.float32), ts))
    assert preds and not any(k.startswith("cpu_") for p in preds for k in p)
    assert cpu.readings == 0


def test_spike_commands_carry_cpu_time_at_read_and_decision():
    from controller.bench.spike_session import ADS_SESSION
    from controller.config import load_config
    from hil_sim.spiking import SpikingUnits
    cfg = load_config(None, {**ADS_SESSION, "safety": {"profile": "micro"}})
    fs, n_ch, n = 30000.0, 32, 30
    clock, cpu = Ticking(0.0, 1e-7), Ticking(50.0, 1e-7)
    step = _rig(cfg, fs, n_ch, clock, cpu)
    units = SpikingUnits(fs_hz=fs, n_channels=n_ch, seed=3)
    commands = []
    for i in range(3000):   # 3 s of 1 ms chunks
        ts = (np.arange(n) + i * n) / fs
        clock.t = float(ts[-1])
        for e in step.step(units.step(n).astype(np.float32), ts):
            if e.kind.value == "command" and e.data.get("op") == "trigger":
                commands.append(e.data)
    assert commands, "no spike reached a command in 3 s of the spiking simulator"
    for c in commands:
        assert c["cpu_read"] < c["cpu_decided"]
        assert c["t_read"] < c["t_decided"]
