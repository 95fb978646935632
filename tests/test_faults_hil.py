"""Fault injection end to end: a real HIL process, a real LSL inlet (``LslSource``), a real pty driver.

One spawned HIL process runs a ~7 s schedule holding every fault kind; the
test side watches it like the controller would (``LslSource`` into a
``SharedRing``; a ``SerialStimulator`` sending heartbeats on the stable port
symlink), then each test checks one fault against ``ground_truth.json``.
"""
import json
import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import pylsl  # noqa: E402

from controller.events import EventKind  # noqa: E402
from controller.ring import SharedRing  # noqa: E402
from controller.sources.lsl import LslSource  # noqa: E402
from drivers.base import DeviceTimeout, StimulatorError  # noqa: E402
from drivers.serial_stimulator import SerialStimulator  # noqa: E402
from hil_sim.process import PORT_LINK_NAME, run_hil  # noqa: E402

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(90)]

FS, N_CH = 256.0, 4
# Patient times; stream faults start at 1.5 s so the inlet is surely attached (time correction ~0.6 s).
FAULTS = [
    {"kind": "nan_burst", "at_s": 1.5, "duration_s": 0.25, "channels": [1]},
    {"kind": "device_mute", "at_s": 1.5, "duration_s": 0.6},
    {"kind": "saturation", "at_s": 2.0, "duration_s": 0.25, "level_uv": 5.0},
    {"kind": "sample_gap", "at_s": 2.5, "n_samples": 32},
    {"kind": "corrupt_frames", "at_s": 2.5, "n": 2},
    {"kind": "stream_stall", "at_s": 3.0, "duration_s": 0.5},
    {"kind": "device_unplug", "at_s": 3.5, "duration_s": 0.6},
    {"kind": "clock_jump", "at_s": 4.0, "offset_s": 0.25},
    {"kind": "stream_loss", "at_s": 4.5, "duration_s": 1.5},
]
END_S = 7.0


def _device_watch(port: str, t0: float, stop_t: float, out: dict) -> None:
    """Heartbeats every 20 ms; on a driver error (not a timeout) reopen the stable port until it works."""
    beats, reopen_fail, drivers = out["beats"], out["reopen_fail"], out["drivers"]
    stim = None
    while pylsl.local_clock() < stop_t:
        if stim is None:
            t = pylsl.local_clock()
            cand = SerialStimulator(port, timeout_s=0.05, retries=3)
            try:
                cand.open()
                stim = cand
                drivers.append((t, stim))
            except StimulatorError as exc:
                reopen_fail.append((t, str(exc)))
                threading.Event().wait(0.02)
                continue
        t_sent = pylsl.local_clock()
        try:
            stim.heartbeat()
            outcome = "ok"
        except DeviceTimeout:
            outcome = "timeout"
        except StimulatorError as exc:
            outcome = f"error: {exc}"
            stim.close()
            stim = None
        beats.append((t_sent, pylsl.local_clock(), outcome, len(drivers) - 1))
        threading.Event().wait(0.02)
    if stim is not None:
        out["device_events"] = list(stim.device_events)
    for _, d in drivers:
        d.close()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    session = tmp_path_factory.mktemp("faults_session")
    stream = f"stimloop-faults-test-{os.getpid()}"
    spec = {"fs_hz": FS, "n_channels": N_CH, "patient": 0, "seed": 3, "seizure_onsets_s": [],
            "spontaneous_seizures": False, "stream": stream, "chunk_s": 1 / 64, "watchdog_s": 0.5,
            "faults": FAULTS}
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_hil, args=(spec, q, stop, str(session)), name="test-hil-faults")
    proc.start()
    ring = None
    dev = {"beats": [], "reopen_fail": [], "drivers": [], "device_events": []}
    try:
        ready = q.get(timeout=60)
        assert "error" not in ready, ready
        t0 = ready["t0"]
        watcher = threading.Thread(target=_device_watch, args=(ready["port"], t0, t0 + 6.0, dev), daemon=True)
        watcher.start()
        src = LslSource(name=stream, resolve_timeout_s=10.0, stall_timeout_s=1.0)
        info = src.open()
        ring = SharedRing.create(None, info.n_channels, 16384, info.fs_hz)
        arrivals, events = [], []
        while pylsl.local_clock() < t0 + END_S:
            n = src.read_into(ring)
            if n:
                arrivals.append((pylsl.local_clock(), ring.counter, n))
            events.extend(src.drain_events())
        src.close()
        watcher.join(10)
        r = ring.reader(start="oldest", max_read=ring.capacity).read_new(copy=True)
        x, ts = r.samples, r.timestamps
        # Arrival time of every sample: the clock reading after the read that delivered it.
        arr = np.empty(ring.counter)
        prev = 0
        for t, end, n in arrivals:
            arr[end - n:end] = t
            prev = end
        assert prev == x.shape[0]
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if ring is not None:
            ring.close()
            ring.unlink()
    assert proc.exitcode == 0
    gt = json.loads((session / "ground_truth.json").read_text())
    faults = {f["kind"]: f for f in gt["faults"]}
    return {"t0": t0, "ready": ready, "x": x, "ts": ts, "arrival": arr, "events": events, "dev": dev,
            "gt": gt, "faults": faults, "session": session, "src": src}


def _win(s, at_s, dur_s):
    t0 = s["t0"]
    return (s["ts"] >= t0 + at_s - 1e-4) & (s["ts"] < t0 + at_s + dur_s - 1e-4)


def test_ground_truth_records_every_fault_with_real_times(scenario):
    s = scenario
    t0, f = s["t0"], s["faults"]
    assert set(f) == {d["kind"] for d in FAULTS} and not s["gt"].get("fault_errors")
    end_t = s["gt"]["end_t"]
    for d in FAULTS:
        rec = f[d["kind"]]
        assert rec["at_s"] == d["at_s"]
        # Applied at its scheduled time, never before it, and while the simulator ran. How soon after
        # it a stream or device fault takes effect is a latency: not asserted here.
        assert t0 + d["at_s"] - 1e-6 <= rec["t_start"] <= end_t, (d["kind"], rec)
        if d["kind"] != "clock_jump":
            assert rec["t_end"] is not None and rec["t_start"] <= rec["t_end"] <= end_t, rec
        if d.get("duration_s") is not None:   # ... and never ended before its time
            assert rec["t_end"] >= t0 + d["at_s"] + d["duration_s"] - 1e-6, (d["kind"], rec)
    for kind in ("nan_burst", "saturation"):   # signal faults: sample times, exact
        assert f[kind]["t_start"] == pytest.approx(t0 + f[kind]["at_s"], abs=1e-9)
        assert f[kind]["t_end"] == pytest.approx(f[kind]["t_start"] + f[kind]["duration_s"], abs=1e-9)
    assert f["sample_gap"]["t_end"] == pytest.approx(t0 + 2.5 + 32 / FS, abs=1e-9)
    # One thread turns each set of knobs, in schedule order: the device injector and the outlet.
    edges = lambda *kinds: [t for k in kinds for t in (f[k]["t_start"], f[k]["t_end"])]  # noqa: E731
    for seq in (edges("device_mute", "corrupt_frames")[:3] + edges("device_unplug"), edges("stream_stall", "stream_loss")):
        assert seq == sorted(seq), seq
    # The kernel may hand out the same pts number again; the port users open is the symlink anyway.
    assert f["device_unplug"]["old_pty"].startswith("/dev/pts/") and f["device_unplug"]["new_pty"].startswith("/dev/pts/")
    assert s["ready"]["port"] == str(s["session"] / PORT_LINK_NAME)


def test_push_times_kept_for_every_chunk_that_left_whole(scenario):
    """push_t.f64 under faults: the push time of each chunk that left whole with its own timestamps
    (through the NaN burst and the saturation, and a held chunk when it was let go), NaN for the
    chunks the sample gap emptied and for every chunk after the clock jump re-stamped them."""
    s = scenario
    t0, gt = s["t0"], s["gt"]
    push_info = gt["push"]
    push = np.fromfile(s["session"] / push_info["file"], dtype="<f8")
    n = push_info["chunk_n"]
    assert push.size == push_info["n_chunks"] and n == 4 and push_info["fs_hz"] == FS
    first = push_info["first_sample"] + np.arange(push.size) * n        # first sample of each chunk
    t_first, t_last = first / FS, (first + n - 1) / FS                   # patient times
    emptied = (t_first >= 2.5 - 1e-9) & (t_last < 2.5 + 32 / FS)         # sample_gap: all 32 samples
    restamped = t_first >= 4.0 - 1e-9                                    # clock_jump from 4.0 s on
    assert emptied.sum() == 8 and restamped.any() and (~emptied & ~restamped).sum() > 200
    assert np.array_equal(np.isnan(push), emptied | restamped), np.flatnonzero(np.isnan(push))
    kept = np.flatnonzero(~np.isnan(push))
    assert np.all(push[kept] >= t0 + t_last[kept]) and np.all(np.diff(push[kept]) >= 0)
    for kind in ("nan_burst", "saturation"):   # values changed, chunk whole: push time kept
        f = s["faults"][kind]
        assert np.isfinite(push[(t_first >= f["at_s"] - 1e-9) & (t_first < f["at_s"] + f["duration_s"])]).all()
    stall = s["faults"]["stream_stall"]         # held chunks: the time they left, after the stall
    held = (t_first >= 3.0 - 1e-9) & (t_first < 3.5 - 1e-9)
    assert held.sum() == 32 and np.all(push[held] >= t0 + 3.5) and np.all(push[held] <= stall["t_end"])
    # The real inlet had each sample only after its chunk left (before the jump, where ts maps to chunks).
    ts, arr = s["ts"], s["arrival"]
    pre = ts < t0 + 4.0 - 1e-4
    k = (np.rint((ts[pre] - t0) * FS).astype(np.int64) - push_info["first_sample"]) // n
    assert k.min() >= 0 and np.isfinite(push[k]).all() and np.all(push[k] <= arr[pre])
    # metrics.json reads the same mapping (pushed_to_device_ms): a kept chunk's time, NaN otherwise.
    from controller.metrics import chunk_push_times
    got = chunk_push_times(s["session"], gt, t0 + first / FS)
    np.testing.assert_array_equal(got, push)


def test_nan_burst_appears_in_the_stream(scenario):
    s = scenario
    x, win = s["x"], _win(scenario, 1.5, 0.25)
    bad = np.isnan(x)
    assert win.sum() == 64 and bad[win, 1].all()
    assert not bad[:, [0, 2, 3]].any() and not bad[~win].any()


def test_saturation_clips_the_stream(scenario):
    x, win = scenario["x"], _win(scenario, 2.0, 0.25)
    assert np.abs(x[win]).max() <= 5.0
    assert (np.abs(x[win]) == 5.0).mean() > 0.3          # background is ~15–30 µV rms
    before = _win(scenario, 1.8, 0.2)
    assert np.abs(x[before]).max() > 10.0


def test_sample_gap_is_a_timestamp_gap_and_lslsource_counts_it(scenario):
    s = scenario
    t0, ts = s["t0"], s["ts"]
    i = np.searchsorted(ts, t0 + 2.5 - 1e-4)
    assert ts[i] - ts[i - 1] == pytest.approx(33 / FS, abs=1e-4)
    drops = [e for e in s["events"] if e.kind is EventKind.DROPPED]
    gap = [e for e in drops if abs(e.data["at_t"] - (t0 + 2.5 + 32 / FS)) < 1e-3]
    assert len(gap) == 1 and gap[0].data["n_lost"] == 32


def test_clock_jump_visible_in_timestamps(scenario):
    s = scenario
    t0, ts = s["t0"], s["ts"]
    steps = np.diff(ts)
    j = np.flatnonzero(np.abs(steps - (0.25 + 1 / FS)) < 1e-4)
    assert len(j) == 1
    assert ts[j[0] + 1] == pytest.approx(t0 + 4.0 + 0.25, abs=1e-4)
    jump = [e for e in s["events"] if e.kind is EventKind.DROPPED and abs(e.data["at_t"] - (t0 + 4.25)) < 1e-3]
    assert len(jump) == 1 and jump[0].data["n_lost"] == 64   # a forward jump looks like loss to the source


def test_stream_stall_holds_data_then_resumes_with_backlog(scenario):
    s = scenario
    ts, arr, stall = s["ts"], s["arrival"], s["faults"]["stream_stall"]
    win = _win(s, 3.0, 0.5)
    assert win.sum() == 128                                # backlog: nothing lost
    assert np.all(np.abs(np.diff(ts[win]) - 1 / FS) < 1e-4)
    # Held samples arrive only when the stall ends, the first one ~0.5 s late.
    assert arr[win].min() >= stall["t_end"] - 0.01
    assert arr[win][0] - ts[win][0] > 0.4
    during = (arr > stall["t_start"] + 0.05) & (arr < stall["t_end"] - 0.02)
    assert not during.any()
    # 0.5 s < stall_timeout_s: the source must not call it a loss.
    lost = [e for e in s["events"] if e.kind is EventKind.FAULT]
    assert all(e.t > stall["t_end"] + 0.5 for e in lost)


def test_stream_loss_reported_lost_then_recovered(scenario):
    s = scenario
    loss = s["faults"]["stream_loss"]
    faults = [e for e in s["events"] if e.kind is EventKind.FAULT and e.data.get("what") == "stream_lost"]
    rec = [e for e in s["events"] if e.kind is EventKind.STATUS and e.data.get("what") == "stream_recovered"]
    assert len(faults) == 1 and len(rec) == 1
    assert loss["t_start"] <= faults[0].t < loss["t_end"]
    assert rec[0].t >= loss["t_end"] and rec[0].t - loss["t_end"] < 1.0
    assert s["src"].n_lost_events == 1
    ts = s["ts"]
    after = ts[ts > s["t0"] + 4.5 + 0.25]
    assert after.size > 0 and after[0] >= loss["resumed_at_t"] + 0.25 - 1e-4   # fresh data, shifted by the jump


def _beats_within(s, t_a, t_b):
    return [b for b in s["dev"]["beats"] if t_a <= b[0] and b[1] <= t_b]


def test_device_mute_gives_device_timeout(scenario):
    s = scenario
    mute = s["faults"]["device_mute"]
    # A muted heartbeat takes 4 attempts x 50 ms: those sent early enough must all time out.
    started = [b for b in s["dev"]["beats"] if mute["t_start"] + 0.01 <= b[0] <= mute["t_end"] - 0.21]
    assert started and all(b[2] == "timeout" for b in started)
    timeouts = [b for b in s["dev"]["beats"] if b[2] == "timeout"]
    assert len(timeouts) >= 2 and all(b[0] < mute["t_end"] and b[1] > mute["t_start"] for b in timeouts)
    before = _beats_within(s, mute["t_start"] - 0.5, mute["t_start"] - 0.01)
    assert before and all(b[2] == "ok" for b in before)
    after = _beats_within(s, mute["t_end"] + 0.02, mute["t_end"] + 0.3)
    assert after and all(b[2] == "ok" for b in after)
    # The 0.6 s mute outlasts the 0.5 s watchdog: the device trips, and over a dead link the host
    # hears nothing of it (the device's log has the trip; the driver got no EVENT then).
    log = [json.loads(x) for x in (s["session"] / "device_log.jsonl").read_text().splitlines()]
    trips = [r["t_received"] for r in log if r["type"] == "WATCHDOG"]
    assert any(mute["t_start"] <= t <= mute["t_end"] for t in trips), trips
    first = s["dev"]["drivers"][0][1]
    assert [e for e in first.device_events if mute["t_start"] <= e[1] <= mute["t_end"]] == []


def test_corrupted_frames_force_retries_and_decoder_errors(scenario):
    s = scenario
    cor = s["faults"]["corrupt_frames"]
    first_driver = s["dev"]["drivers"][0][1]
    assert first_driver.decoder_errors["crc"] == 2
    assert first_driver.retries_used >= 2
    near = _beats_within(s, cor["t_start"] - 0.01, cor["t_end"] + 0.2)
    assert near and all(b[2] == "ok" for b in near)      # retried through the corruption
    slow = [b for b in near if b[1] - b[0] >= 2 * 0.05 - 0.005]
    assert slow, "a heartbeat should have needed two resends"


def test_device_unplug_errors_then_reopen_on_stable_port(scenario):
    s = scenario
    unplug, dev = s["faults"]["device_unplug"], s["dev"]
    errors = [b for b in dev["beats"] if b[2].startswith("error")]
    assert len(errors) == 1 and unplug["t_start"] <= errors[0][1] <= unplug["t_end"]
    fails = [f for f in dev["reopen_fail"] if unplug["t_start"] <= f[0] < unplug["t_end"]]
    assert fails and all("not found" in msg or "cannot be opened" in msg for _, msg in fails)
    assert len(dev["drivers"]) == 2
    t_reopen, new = dev["drivers"][1]
    assert t_reopen >= unplug["t_end"] - 0.01
    assert new.port == s["ready"]["port"]
    later = [b for b in dev["beats"] if b[3] == 1]
    assert len(later) >= 5 and all(b[2] == "ok" for b in later)


def test_bad_fault_spec_reported_by_the_hil_process(tmp_path):
    spec = {"fs_hz": FS, "n_channels": N_CH, "patient": 0, "seed": 3, "stream": f"stimloop-faults-bad-{os.getpid()}",
            "faults": [{"kind": "nan_burst", "at_s": 1.0, "duration_s": 0.5, "channels": [7]}]}
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_hil, args=(spec, q, stop, str(tmp_path)))
    proc.start()
    try:
        msg = q.get(timeout=60)
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    assert "error" in msg
    assert "FaultConfigError" in msg["error"] and "channels=[7], expected indices 0..3" in msg["error"]
    assert not (tmp_path / PORT_LINK_NAME).exists()
