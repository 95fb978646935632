"""Faults inside the session's processes are reported in events.jsonl and end in the safe state."""
import json
import os
import queue
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from controller.recorder import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ loop crash
def _explode_on_30th_chunk(loop, cfg):
    orig = loop.windows
    n = {"k": 0}

    def windows(*a):
        n["k"] += 1
        if n["k"] == 30:
            raise RuntimeError("feature stage exploded")
        return orig(*a)
    loop.windows = windows


def test_a_crash_in_the_loop_body_is_a_fault_and_stimulation_goes_off(tmp_path):
    from pylsl import local_clock

    from controller.config import load_config
    from controller.loop import run_loop
    from controller.ring import SharedRing
    cfg = load_config(overrides={"device": {"kind": "simulated"}, "telemetry": {"enabled": False},
                                 "control": {"enabled": False}})
    fs, nch = 512.0, 16
    ring = SharedRing.create(None, nch, int(10 * fs), fs)
    alive = True

    def writer():  # an amplifier's worth of data in 8-sample chunks
        rng = np.random.default_rng(0)
        while alive:
            ring.write(rng.normal(0, 50, (8, nch)).astype(np.float32), local_clock() - (7 - np.arange(8)) / fs)
            time.sleep(8 / fs)
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    import multiprocessing as mp
    try:
        with pytest.raises(RuntimeError, match="feature stage exploded"):
            run_loop(cfg.model_dump_json(), ring.name, None, str(tmp_path), mp.get_context("spawn").Event(),
                     queue.Queue(), customize=_explode_on_30th_chunk)
    finally:
        alive = False
        th.join()
        ring.close()
        ring.unlink()
    events = read_jsonl(tmp_path / "events.jsonl")
    crash = [i for i, e in enumerate(events) if e["kind"] == "fault" and e.get("what") == "loop_crashed"]
    assert crash and "feature stage exploded" in events[crash[0]]["reason"]
    safe = [i for i, e in enumerate(events) if e["kind"] == "safe_state"]
    assert safe and safe[-1] > crash[0]  # written after the crash, in time order
    assert events[safe[-1]]["t"] >= events[crash[0]]["t"]


def test_a_source_that_fails_in_the_loops_own_pull_is_a_fault_and_stimulation_goes_off(tmp_path, monkeypatch):
    # The spike fast path: the loop pulls the source itself (run_loop(source_spec=...)), so a read
    # failure (a BrainFlow board error: SourceError from read_into) is the loop's to report.
    import multiprocessing as mp

    from controller.config import load_config
    from controller.loop import run_loop
    from controller.ring import SharedRing
    from controller.sources import SourceError
    from controller.sources.replay import ArraySource
    from controller.wakeup import make_wakeup
    reads = {"n": 0}
    real_read = ArraySource.read_into

    def read_into(self, ring):
        reads["n"] += 1
        if reads["n"] == 40:
            raise SourceError("BrainFlow board 0: read failed: BOARD_NOT_READY_ERROR:7")
        return real_read(self, ring)
    monkeypatch.setattr(ArraySource, "read_into", read_into)
    cfg = load_config(Path(ROOT / "examples" / "ads.toml"),
                      {"device": {"kind": "simulated"}, "telemetry": {"enabled": False}, "control": {"enabled": False}})
    fs, nch = 30000.0, 8
    ring = SharedRing.create(None, nch, int(2 * fs), fs)
    spec = {"kind": "array", "data": np.random.default_rng(2).normal(0, 20, (int(fs), nch)).astype(np.float32),
            "fs_hz": fs, "chunk": 30}
    try:
        with pytest.raises(SourceError, match="BOARD_NOT_READY"):
            run_loop(cfg.model_dump_json(), ring.name, None, str(tmp_path), mp.get_context("spawn").Event(),
                     queue.Queue(), wakeup_path=str(make_wakeup(tmp_path / "wake")), source_spec=spec)
        n_ring = ring.counter
    finally:
        ring.close()
        ring.unlink()
    events = read_jsonl(tmp_path / "events.jsonl")
    started = next(e for e in events if e.get("status") == "started")
    assert started["pulls_source"] is True and n_ring > 0
    faults = [i for i, e in enumerate(events) if e["kind"] == "fault"]
    assert [events[i]["what"] for i in faults] == ["source_read_failed"]   # named once, not also a crash
    assert "BOARD_NOT_READY" in events[faults[0]]["error"]
    safe = [i for i, e in enumerate(events) if e["kind"] == "safe_state"]
    assert safe and safe[-1] > faults[0]


# ------------------------------------------------------------------ acquisition
class _FailingWrites:
    """Ring-like: the 20th write fails, as BrainFlowSource.read_into raises SourceError on a board error."""

    def __init__(self, ring):
        self.ring, self.k = ring, 0

    def __getattr__(self, a):
        return getattr(self.ring, a)

    def write(self, s, t):
        self.k += 1
        if self.k == 20:
            from controller.sources import SourceError
            raise SourceError("BrainFlow board 0: read failed: BOARD_NOT_READY_ERROR:7")
        return self.ring.write(s, t)


def _failing(ring):
    return _FailingWrites(ring)


def test_a_source_read_error_is_reported_and_nothing_read_is_lost(tmp_path):
    import multiprocessing as mp

    from controller.acquisition import load_raw, run_acquisition
    from controller.ring import SharedRing
    from controller.sources import SourceError
    ring = SharedRing.create(None, 4, 4096, 512.0)
    spec = {"kind": "array", "data": np.random.default_rng(1).normal(size=(2000, 4)).tolist(), "fs_hz": 512.0,
            "chunk": 16}
    try:
        with pytest.raises(SourceError, match="BOARD_NOT_READY"):
            run_acquisition(spec, ring.name, mp.get_context("spawn").Event(), str(tmp_path / "events.jsonl"),
                            str(tmp_path / "raw"), wrap_ring=_failing)
        n_ring = ring.counter
    finally:
        ring.close()
        ring.unlink()
    faults = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["kind"] == "fault"]
    assert [f["what"] for f in faults] == ["source_read_failed"]
    assert "BOARD_NOT_READY" in faults[0]["error"]
    _, ts = load_raw(tmp_path / "raw")
    assert n_ring > 0 and len(ts) == n_ring


def test_a_failed_final_flush_is_a_fault_and_the_count_is_what_is_on_disk(tmp_path):
    # The disk "fills up" (RLIMIT_FSIZE) in a child process of its own: the limit must not touch pytest.
    script = textwrap.dedent(f"""
        import multiprocessing as mp, resource, signal, sys, threading
        import numpy as np
        from controller.acquisition import run_acquisition
        from controller.ring import SharedRing
        ring = SharedRing.create(None, 4, 4096, 512.0)
        spec = {{"kind": "array", "data": np.zeros((50000, 4)).tolist(), "fs_hz": 512.0, "chunk": 16}}
        stop = mp.Event(); threading.Timer(1.6, stop.set).start()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (10000, resource.RLIM_INFINITY))
        try:
            rc = run_acquisition(spec, ring.name, stop, {str(tmp_path / "events.jsonl")!r}, {str(tmp_path / "raw")!r})
        except OSError as exc:
            rc = "raised " + type(exc).__name__
        finally:
            ring.close(); ring.unlink()
        print("RESULT", rc)
    """)
    (tmp_path / "raw").mkdir()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "RESULT raised OSError" in r.stdout, r.stdout + r.stderr  # not a clean stop
    events = read_jsonl(tmp_path / "events.jsonl")
    fault = [e for e in events if e["kind"] == "fault" and e.get("what") == "recording_flush_failed"]
    stopped = [e for e in events if e.get("what") == "acquisition_stopped"]
    assert fault and stopped
    from controller.acquisition import load_raw
    _, ts = load_raw(tmp_path / "raw")
    assert stopped[0]["n_recorded"] == fault[0]["n_recorded"] == len(ts) < stopped[0]["n_samples"]


# ------------------------------------------------------------------ LSL stream back at another rate
def test_an_lsl_stream_back_at_another_rate_is_refused_and_stays_lost():
    import pylsl

    from controller.ring import SharedRing
    from controller.sources.lsl import LslSource
    name = f"stimloop-rate-{uuid.uuid4().hex[:8]}"

    def outlet(fs):
        return pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, fs, "float32", "rate-test"))
    o = outlet(512.0)
    src = LslSource(name=name, resolve_timeout_s=3, stall_timeout_s=0.3)
    info = src.open()
    ring = SharedRing.create(None, 4, 4096, info.fs_hz)
    try:
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            o.push_chunk(np.zeros((8, 4), np.float32))
            src.read_into(ring)
            time.sleep(8 / 512)
        del o
        o2 = outlet(256.0)  # the amplifier restarts at another rate, same name and source_id
        t_end = time.monotonic() + 4.0
        while time.monotonic() < t_end:
            o2.push_chunk(np.zeros((8, 4), np.float32))
            src.read_into(ring)
            time.sleep(8 / 256)
        events = src.drain_events()
    finally:
        src.close()
        ring.close()
        ring.unlink()
    whats = [e.data.get("what") for e in events]
    assert "stream_lost" in whats and "stream_recovered" not in whats
    refused = [e for e in events if e.data.get("what") == "reconnect_failed"]
    assert len(refused) == 1 and "256 Hz" in refused[0].data["error"]  # once, not once per poll
    assert src.info.fs_hz == 512.0


# ------------------------------------------------------------------ ring data the loop computes on
def test_the_loop_computes_on_a_copy_a_lapping_writer_cannot_change():
    from controller.loop import read_chunk
    from controller.ring import SharedRing
    fs = 512
    ring = SharedRing.create(None, 2, fs, fs)  # ring.capacity_s = 1, the smallest allowed
    try:
        reader = ring.reader("now", max_read=min(ring.capacity, 2 * fs + 1))  # as run_loop
        ring.write(np.full((500, 2), 1, np.float32), np.arange(500) / fs)
        samples, ts = read_chunk(reader)
        ring.write(np.full((64, 2), -7, np.float32), (500 + np.arange(64)) / fs)  # while the loop computes
        assert samples.shape == (500, 2) and (samples == 1).all() and ts[-1] == 499 / fs
    finally:
        ring.close()
        ring.unlink()


# ------------------------------------------------------------------ the simulator never stands in for the user's stream
def test_lsl_source_with_the_hil_device_fails_clearly_on_a_missing_stream(tmp_path):
    stream = f"NoSuchStream-{uuid.uuid4().hex[:6]}"
    cfg = tmp_path / "lsl.toml"
    cfg.write_text('[source]\nresolve_timeout_s = 2.0\n[telemetry]\nenabled = false\n[control]\nenabled = false\n')
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "controller.cli", "run", "-c", str(cfg), "--source", "lsl",
                        "--stream", stream, "--duration", "10", "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
    assert r.returncode != 0
    assert f"no LSL stream named '{stream}'" in r.stdout + r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30


def test_another_source_with_the_hil_device_is_not_scored_against_the_simulators_patient(tmp_path):
    # BrainFlow's synthetic board is recorded; the simulator is only the stimulator. Its patient's
    # seizures are not in the recording, so nothing may be scored against them.
    from controller.config import parse_config
    from controller.runners.realtime import run_session
    cfg = parse_config({"session": {"duration_s": 6.0, "out_dir": str(tmp_path)},
                        "source": {"kind": "brainflow", "board_id": -1},
                        "simulator": {"seizure_onsets_s": [1.0]},
                        "telemetry": {"enabled": False}, "control": {"enabled": False}})
    session = run_session(cfg)
    truth = json.loads((session / "ground_truth.json").read_text())
    assert truth["stimulator_only"] is True and truth["seizures"] == [] and "push" not in truth
    assert not (session / "push_t.f64").exists()
    m = json.loads((session / "metrics.json").read_text())
    assert m["detection"] is None
    meta = json.loads((session / "raw" / "meta.json").read_text())
    assert meta["fs_hz"] == 250.0   # the board's rate, not the simulator's


# ------------------------------------------------------------------ `stimloop hil` and `run` start the same simulator
def test_hil_spec_carries_model_triggers_and_faults():
    from controller.config import load_config
    from controller.runners.realtime import hil_spec
    cfg = load_config(ROOT / "examples" / "ads.toml")
    spec = hil_spec(cfg)
    assert spec["model"] == "spiking" and spec["trigger_channels"] == [0, 1]
    assert spec["stream"] == cfg.source.stream and spec["n_channels"] == 8
    assert hil_spec(cfg, "other")["stream"] == "other"
    assert isinstance(spec["faults"], list)
    assert spec["source_id"] == f"stimloop-hil-{cfg.simulator.patient}-{os.getpid()}"   # picked by it, not by name
    json.dumps(spec)  # plain data: crosses to a spawned process


def test_stimloop_hil_runs_the_ads_example(tmp_path):
    r = subprocess.run([sys.executable, "-m", "controller.cli", "hil", "-c", str(ROOT / "examples" / "ads.toml"),
                        "--duration", "3", "--out", str(tmp_path)], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    assert truth.get("model") == "spiking"
    # A source_id of its own, printed: with two simulators up, a client names the one it means.
    assert re.search(r"LSL stream: stimloop-sim, source_id stimloop-hil-0-\d+ ", " ".join(r.stdout.split())), r.stdout


def test_a_slow_stream_opening_does_not_starve_the_devices_watchdog(tmp_path):
    # The fast path opens its stream after the device: however long resolving it takes, the
    # device keeps hearing the host (its watchdog would otherwise stop all and latch the session).
    from controller.actuator import Actuator
    from controller.loop import open_heartbeating
    from controller.safety import SafetyGovernor, build_profile
    from drivers.serial_stimulator import SerialStimulator
    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.pty_pair import close_pty, open_pty_pair

    class SlowToOpen:
        def open(self):
            time.sleep(0.9)   # longer than the device's 0.3 s watchdog, three times over

    master_fd, slave = open_pty_pair()
    emu = StimulatorEmulator(master_fd, watchdog_s=0.3, log_path=tmp_path / "device_log.jsonl").start()
    drv = SerialStimulator(slave, timeout_s=0.05, retries=2)
    try:
        drv.open()
        act = Actuator(SafetyGovernor(build_profile("micro"), drv.capabilities), drv, drv.clock)
        act.open()
        act.heartbeat()
        events = open_heartbeating(SlowToOpen(), act, 0.1)
        time.sleep(0.05)
        assert emu.counters["watchdog_trips"] == 0
        assert not act.governor.latch_reasons and not [e for e in events if e.kind == "fault"]
    finally:
        drv.close()
        emu.stop()   # flushes the device log
        close_pty(master_fd)
    beats = [r["t_received"] for r in read_jsonl(tmp_path / "device_log.jsonl") if r.get("type") == "HEARTBEAT"]
    assert len(beats) >= 8 and np.diff(beats).max() < 0.3
