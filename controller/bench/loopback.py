"""Hardware loopback latency: stimulator output wired into an amplifier input.

    stimloop bench loopback --port /dev/ttyACM0 --stream MyAmp --channel 3

Per trigger: the command goes through the ``Actuator`` (safety governor) and
``SerialStimulator``; ``sent_t`` is when the frame was written (the COMMAND
event, ``pylsl.local_clock``). The LSL stream is then watched on ``channel``
for the first sample whose deviation from the baseline median exceeds the
threshold (default ``k_sigma`` × σ, σ = median(|x − median|)/0.6745,
REFERENCE.md §2 convention): ``latency = timestamp of that sample − sent_t``.
That includes the stimulator's own output delay and every amplifier pipeline
delay LSL cannot see (REFERENCE.md §1: 2–52 ms, measure per device).

Without ``--port``, the same code runs against the simulator: ``run_hil``
streams a simulated patient and runs the stimulator emulator on a pty; the
patient writes each delivered pulse's artifact into its signal, so the
measured figure is the emulator's delivery + the sample quantization (1/fs).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time

from controller.bench.common import stats_ms

SIM_OVERRIDES = {"max_bursts_per_min": 300}   # simulator only: MACRO's 20/min ceiling would need 3 s per trigger
# The simulator's triggers come at most this far apart: its governor allows 300/min (0.2 s), and a longer
# wait (the 3.2 s default, sized for MACRO's 20/min on hardware) would only lengthen the run.
SIM_MAX_INTERVAL_S = 0.4
SIM_N_CHANNELS = 16
N_TRIGGERS_RANGE = (1, 10_000)
INTERVAL_RANGE_S = (0.05, 600.0)
# The HIL outlet generates a chunk before waiting to push it: an artifact delivered inside an already
# generated chunk is lost, so the simulated loopback streams 1-sample chunks (artifact in the next sample).
SIM_CHUNK_S = 1 / 512


def measure(port: str, stream: str, channel: int, n_triggers: int = 20, interval_s: float = 3.2,
            threshold_uv: float | None = None, k_sigma: float = 8.0, profile: str = "macro",
            overrides: dict | None = None, stim=None, timeout_s: float = 0.5) -> dict:
    """Trigger ``n_triggers`` times on ``port``; detect each artifact in LSL stream ``stream``; return latencies."""
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import numpy as np
    import pylsl

    from controller.actuator import Actuator
    from controller.events import EventKind
    from controller.safety import SafetyGovernor, StimRequest, build_profile
    from drivers.params import StimParams, Waveform
    from drivers.serial_stimulator import SerialStimulator

    _check_counts(n_triggers, interval_s)
    stim = stim or StimParams(channel=0, waveform=Waveform.BIPHASIC, amplitude_ua=3000.0, pulse_width_us=160.0,
                              frequency_hz=200.0, n_pulses=1)
    infos = pylsl.resolve_byprop("name", stream, 1, 5.0)
    if not infos:
        raise RuntimeError(f"no LSL stream named {stream!r} within 5 s")
    n_ch = infos[0].channel_count()
    if not 0 <= channel < n_ch:
        raise ValueError(f"channel={channel!r} invalid, stream {stream!r} has channels 0..{n_ch - 1}")
    fs = infos[0].nominal_srate()
    inlet = pylsl.StreamInlet(infos[0], max_buflen=1, processing_flags=0)
    inlet.open_stream(timeout=5.0)
    tc = inlet.time_correction(timeout=5.0)
    buf = np.empty((max(64, int(fs)), n_ch), np.float32)
    clock = pylsl.local_clock
    driver = SerialStimulator(port, timeout_s=0.05, retries=2, clock=clock)
    driver.open()
    act = Actuator(SafetyGovernor(build_profile(profile, overrides), driver.capabilities), driver, clock)
    faults: list[str] = []   # a latched actuator refuses every trigger after it: say why

    def beat() -> None:
        faults.extend(e.data.get("reason", e.data.get("what", "")) for e in act.heartbeat() if e.kind is EventKind.FAULT)

    beat()

    def pull():
        _, ts = inlet.pull_chunk(timeout=0.005, max_samples=buf.shape[0], dest_obj=buf, min_samples=1)
        n = len(ts)
        return buf[:n, channel].copy(), np.asarray(ts[:n]) + tc

    try:
        base = []
        t_b = clock() + 1.0   # 1 s of baseline
        next_hb = clock() + 0.1
        while clock() < t_b:
            x, _ = pull()
            base.append(x)
            if clock() >= next_hb:   # longer than the device's watchdog: it would stop and latch us
                beat()
                next_hb = clock() + 0.1
        base = np.concatenate(base) if base else np.zeros(0)
        if base.size < 10:
            raise RuntimeError(f"stream {stream!r}: only {base.size} samples in 1 s of baseline")
        med = float(np.median(base))
        sigma = float(np.median(np.abs(base - med)) / 0.6745)
        thr = threshold_uv if threshold_uv is not None else k_sigma * max(sigma, 1e-6)
        lat, seen_after, missed, refused = [], [], 0, 0
        for i in range(n_triggers):
            t_go = clock() + (interval_s if i else 0.2)
            while clock() < t_go:   # keep the heartbeat alive and the inlet drained between triggers
                pull()
                if clock() >= next_hb:
                    beat()
                    next_hb = clock() + 0.1
            evs = act.submit(StimRequest(t=clock(), source="bench.loopback", params=stim, at=None))
            faults.extend(e.data.get("reason", e.data.get("what", "")) for e in evs if e.kind is EventKind.FAULT)
            cmd = next((e for e in evs if e.kind is EventKind.COMMAND), None)
            if cmd is None:
                refused += 1
                continue
            sent_t = float(cmd.data.get("sent_t", cmd.t))
            found = None
            while clock() < sent_t + timeout_s and found is None:
                x, ts = pull()
                if x.size:
                    hit = np.flatnonzero((np.abs(x - med) > thr) & (ts >= sent_t))
                    if hit.size:
                        found = float(ts[hit[0]])
                        seen_after.append(clock() - sent_t)
            if found is None:
                missed += 1
            else:
                lat.append(found - sent_t)
            if clock() >= next_hb:
                beat()
                next_hb = clock() + 0.1
    finally:
        act.close()
        inlet.close_stream()
    return {"port": port, "stream": stream, "channel": channel, "fs_hz": fs, "threshold_uv": round(thr, 3),
            "baseline_sigma_uv": round(sigma, 3), "triggers": n_triggers, "detected": len(lat), "missed": missed,
            "refused": refused, "faults": faults, "command_to_artifact_ms": stats_ms(lat),
            "command_to_detected_in_stream_ms": stats_ms(seen_after),
            "sample_period_ms": round(1e3 / fs, 4) if fs else None, "stim": stim.to_dict(), "_raw_s": {"end_to_end": lat}}


def _check_counts(n_triggers: int, interval_s: float) -> None:
    lo, hi = N_TRIGGERS_RANGE
    if not lo <= n_triggers <= hi:
        raise ValueError(f"n_triggers={n_triggers!r} invalid, expected {lo}..{hi}")
    lo, hi = INTERVAL_RANGE_S
    if not lo <= interval_s <= hi:
        raise ValueError(f"interval_s={interval_s!r} invalid, expected {lo:g}..{hi:g} s")


def run_simulated(n_triggers: int = 20, interval_s: float = SIM_MAX_INTERVAL_S, channel: int | None = None,
                  fs_hz: float = 512.0, n_channels: int = SIM_N_CHANNELS) -> dict:
    """The loopback on the simulator: HIL patient + emulator in their own process, same code path as hardware.

    ``channel=None``: the recording channel nearest to stimulation site 0 (largest artifact).
    Arguments are checked before the simulator starts (ValueError naming value and range).
    """
    _check_counts(n_triggers, interval_s)
    if channel is not None and not 0 <= channel < n_channels:
        raise ValueError(f"channel={channel!r} invalid, the simulator streams channels 0..{n_channels - 1}")
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import os

    import numpy as np

    from hil_sim.process import make_patient, run_hil
    if channel is None:
        pat = make_patient({"patient": 0, "fs_hz": fs_hz, "n_channels": n_channels, "seed": 0})
        channel = int(np.argmin(np.abs(pat._ch_pos - pat.params.stim_site_positions[0])))
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    spec = {"fs_hz": fs_hz, "n_channels": n_channels, "patient": 0, "seed": 0, "seizure_onsets_s": [],
            "spontaneous_seizures": False, "stream": f"stimloop-bench-loopback-{os.getpid()}", "chunk_s": SIM_CHUNK_S,
            "watchdog_s": 0.5}
    proc = ctx.Process(target=run_hil, args=(spec, q, stop, None), name="bench-loopback-hil")
    proc.start()
    try:
        info = q.get(timeout=60)
        if "error" in info:
            raise RuntimeError(f"simulator: {info['error']}")
        time.sleep(0.6)   # the outlet's first sample is 0.5 s in the future
        res = measure(info["port"], info["stream"], channel, n_triggers=n_triggers, interval_s=interval_s,
                      overrides=SIM_OVERRIDES)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
    res["simulated"] = True
    res["note"] = ("simulator: artifact written by the HIL patient at the emulator's delivery time; "
                   f"quantized to the sample period ({1e3 / fs_hz:.2f} ms)")
    return res


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)
