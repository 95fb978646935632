"""Seizure-loop scenario: 512 Hz × 16 ch, the shipped ONNX model, every stage timed on the LSL clock.

A dedicated harness built from the session's own objects and processes (as
``controller.runners.realtime`` starts them):

    hil   ``hil_sim.process.run_hil``: simulated patient → LSL outlet, stimulator emulator on a pty
    acq   ``LslSource`` → ``SharedRing`` (the source of ``controller.acquisition``), instrumented:
          for every chunk the time it came out of ``pull_chunk`` and the time it was in the ring
    loop  ``SeizureLoop`` + ``ChunkStep`` + ``Actuator`` (governor) + ``SerialStimulator``,
          as in ``controller.loop``, except that the policy requests a burst on **every**
          window (``EveryWindowPolicy``): the responsive policy stimulates a few times per
          seizure, too few commands for percentiles. The governor still checks every request;
          the MACRO profile's 20 bursts/min design ceiling (unverified) is raised to 300 and each
          burst is a single 160 µs biphasic pulse, so the governor passes every window's request.
          Post-stimulus blanking (``DataQuality.blank``: windows overlapping a burst are not acted
          upon, so artifacts never trigger stimulation) is off here: with 1 s windows every 0.25 s
          it would leave one command per ~1.5 s; this policy ignores ``p`` anyway.

Stages (per command, seconds; the window's last sample defines the event):

    lsl_transport   the chunk holding the window's last sample handed to ``push_chunk`` by the
                    simulator (its real push time, ``push_t.f64`` in the session folder) → the
                    pull that returned that sample came out of ``pull_chunk``
    ring_write      out of ``pull_chunk`` → written to the ring
    ring_to_loop    written to the ring → read by the loop
    features        read → features computed      (``ChunkStep`` PREDICTION ``t_read``/``t_features``)
    inference       features → ONNX output         (``t_inference``)
    policy_governor ONNX output → policy decided and the safety governor passed it (COMMAND ``t_governed``)
    port_write      passed → frame written to the port (``sent_t``; a configure round trip first when
                    the parameters changed)
    device_receive  written → received by the device (emulator ``t_received``)
    end_to_end      window complete → received by the device: from the real push of the chunk
                    that holds the window's last sample, the moment the window's data exists
                    for any software — issue 5's "from window complete to command received".
                    The stages above add up to it, command by command.

``cpu_split_ms``: the ``features`` and ``inference`` spans split into the loop
thread's CPU time and the rest, off the CPU (``controller.bench.common.cpu_split_ms``),
with the slowest spans of each: a slow window whose span was off the CPU waited for
the machine, one that was on it waited for the code.

One clock domain: every stamp above is a raw ``pylsl.local_clock()`` reading
taken on this host (simulator, acquisition, loop and emulator processes). The
sample timestamps in the ring are the simulator's own: as in a session on the
simulator, ``LslSource`` applies no time-correction estimate to them
(``time_correction=False``, its offset is 0 on one host;
``lsl_time_correction_offset_ms`` checks that). They serve only to find which
simulator chunk holds a window's last sample; the times are the simulator's
own stamps from its ground truth. The
simulator's lateness in pushing (``simulator_push_late_ms``: real push − the
nominal time of the chunk's last sample) is reported apart, not counted as
transport: it is the amplifier's, not the loop's.

``end_to_end_from_window_end_ms`` measures from the window's last sample's own
timestamp instead (as ``controller.metrics`` does for a session), as the
simulator stamped it (``t0 + i / fs``, its ground truth): it adds the wait for
the simulated amplifier to complete that chunk (up to one chunk,
``simulator.chunk_s`` = 1/64 s, 8 samples) and to push it, which are the
amplifier's, not the loop's.
"""
from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from controller.bench.common import SEIZURE_P99_TARGET_MS, CpuMeter, check_duration, cpu_split_ms, share_over, stats_ms
from controller.low_latency import DEFAULT_NICE

STAGES = ("lsl_transport", "ring_write", "ring_to_loop", "features", "inference", "policy_governor",
          "port_write", "device_receive")
# MACRO's 20 bursts/min is an unverified design ceiling; the bench asks for one pulse per 0.25 s hop.
BENCH_SAFETY_OVERRIDES = {"max_bursts_per_min": 300}
BENCH_STIM = {"n_pulses": 1, "amplitude_ua": 3000.0, "pulse_width_us": 160.0, "frequency_hz": 200.0}


class EveryWindowPolicy:
    """A policy that requests ``stim`` for every valid window (benchmark only: maximal command rate)."""

    def __init__(self, stim):
        self.stim = stim

    def step(self, p: float, t: float):
        from controller.safety import StimRequest
        return [StimRequest(t=t, source="bench.every_window", params=self.stim, at=None,
                            meta={"window_end_t": t, "p": p})], []


class _TimedRing:
    """Forwards to a ``SharedRing``; stamps each ``write`` (just out of the pull, and written).

    Saved to ``out_path`` (``.npy``: ts_last, t_pulled, t_written, n) when the acquisition closes it.
    """

    def __init__(self, ring, out_path: str, cap: int):
        import numpy as np
        import pylsl
        self._ring, self._clock, self._out = ring, pylsl.local_clock, out_path
        self.rec = np.zeros((cap, 4))
        self.k = 0

    def __getattr__(self, name):
        return getattr(self._ring, name)

    def write(self, samples, timestamps):
        t_pulled = self._clock()
        r = self._ring.write(samples, timestamps)
        if self.k < self.rec.shape[0]:
            self.rec[self.k] = (timestamps[-1], t_pulled, self._clock(), samples.shape[0])
            self.k += 1
        return r

    def close(self):
        import numpy as np
        np.save(self._out, self.rec[:self.k])
        self._ring.close()


def timed_ring(ring, out_path: str, cap: int) -> _TimedRing:
    """``run_acquisition(wrap_ring=partial(timed_ring, out_path=..., cap=...))``."""
    return _TimedRing(ring, out_path, cap)


def every_window(loop, cfg) -> None:
    """``run_loop(customize=every_window)``: a burst on every valid window, no post-stimulus blanking."""
    from controller.data_quality import DataQuality
    from controller.policy_drive import PredictionDrive, stim_params

    class NoBlankingQuality(DataQuality):
        """Data checks as in the session, minus post-stimulus blanking (see the module docstring)."""

        def blank(self, t0: float, t1: float) -> None:
            pass

    loop.drive = PredictionDrive(EveryWindowPolicy(stim_params(cfg.policy.stim)), "bench_every_window")
    loop.quality = NoBlankingQuality(loop.stage.source_fs_hz, loop.stage.n_channels, loop.window_s)


def _wait(q, proc, what: str, timeout_s: float = 60.0) -> dict:
    from controller.runners.realtime import wait_ready
    return wait_ready(q, proc, timeout_s, what)


def default_model_path() -> Path:
    """The shipped model (``models/seizure/seizure_v1.onnx``)."""
    from controller.config import Config
    return Config().model_path()


def run(duration_s: float = 20.0, model_path: str | Path | None = None, keep_dir: str | Path | None = None,
        nice: int | None = DEFAULT_NICE) -> dict:
    """Run the scenario; ``{"skipped": "no model"}`` when the ONNX file is missing.

    ``nice``: the acquisition and loop processes run at that nice value (``session.nice``; ``None``:
    this process's own, i.e. unchanged); the simulator keeps the default.
    """
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    check_duration("duration_s", duration_s, 1.0)
    model = Path(model_path) if model_path else default_model_path()
    if not model.exists():
        return {"skipped": "no model", "model_path": str(model)}
    from controller.config import load_config
    cfg = load_config(overrides={
        "session": {"duration_s": duration_s,
                    "nice": os.getpriority(os.PRIO_PROCESS, 0) if nice is None else nice},
        "model": {"path": str(model)},
        "simulator": {"fs_hz": 512.0, "n_channels": 16, "seizure_onsets_s": []},
        "policy": {"stim": BENCH_STIM},
        "safety": {"profile": "macro", "overrides": BENCH_SAFETY_OVERRIDES},
        "telemetry": {"enabled": False}, "control": {"enabled": False}})
    tmp = None
    if keep_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="stimloop_bench_sz_")
        session = Path(tmp.name)
    else:
        session = Path(keep_dir)
        if (session / "events.jsonl").exists():
            raise ValueError(f"keep_dir={str(session)!r} already holds a run (events.jsonl); "
                             f"expected a new or empty folder (logs are appended)")
        session.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, session, duration_s, model)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(cfg, session: Path, duration_s: float, model: Path) -> dict:
    from controller.ring import SharedRing
    from controller.runners.realtime import source_spec
    from hil_sim.process import run_hil

    ctx = mp.get_context("spawn")
    stops = {k: ctx.Event() for k in ("hil", "acq", "loop")}
    procs: dict = {}
    ring = None
    sim = cfg.simulator
    acq_path = str(session / "acq_chunks.npy")
    try:
        q = ctx.Queue()
        spec = {"fs_hz": sim.fs_hz, "n_channels": sim.n_channels, "patient": sim.patient, "seed": cfg.session.seed,
                "seizure_onsets_s": [], "spontaneous_seizures": False,
                "stream": f"stimloop-bench-sz-{os.getpid()}", "chunk_s": sim.chunk_s, "watchdog_s": cfg.device.watchdog_s}
        p = ctx.Process(target=run_hil, args=(spec, q, stops["hil"], str(session)), name="bench-hil")
        p.start()
        procs["hil"] = p
        info = _wait(q, procs["hil"], "simulator")
        src = source_spec(cfg, info["stream"], info["source_id"])
        ring = SharedRing.create(None, sim.n_channels, int(cfg.ring.capacity_s * sim.fs_hz), sim.fs_hz)
        cap = int((duration_s + 30) * sim.fs_hz) + 1000
        # The session's own process bodies, with two hooks: stamped ring writes, a burst on every window.
        from controller.acquisition import run_acquisition
        from controller.loop import run_loop
        from controller.wakeup import make_wakeup
        wakeup = str(make_wakeup(session / "wakeup.fifo"))
        ready_acq = ctx.Event()
        p = ctx.Process(target=run_acquisition, name="bench-acq",
                        args=(src, ring.name, stops["acq"], str(session / "events.jsonl"), None),
                        kwargs={"ready_event": ready_acq, "wakeup_path": wakeup, "nice": cfg.session.nice,
                                "wrap_ring": functools.partial(timed_ring, out_path=acq_path, cap=cap)})
        p.start()
        procs["acq"] = p
        if not ready_acq.wait(60):
            raise RuntimeError(f"acquisition did not start within 60 s (exit code {p.exitcode})")
        ql = ctx.Queue()
        p = ctx.Process(target=run_loop, args=(cfg.model_dump_json(), ring.name, info["port"], str(session),
                                               stops["loop"], ql),
                        kwargs={"wakeup_path": wakeup, "customize": every_window}, name="bench-loop")
        p.start()
        procs["loop"] = p
        _wait(ql, procs["loop"], "control loop")
        cpu = CpuMeter({k: p.pid for k, p in procs.items()}).start()
        # The model acts only after its warm-up (contract.warmup_s): run that long on top of the measured time.
        from controller.inference import read_contract
        c = read_contract(model)
        t_end = time.monotonic() + duration_s + c.warmup_s + c.window_s
        while time.monotonic() < t_end:
            dead = [k for k, p in procs.items() if not p.is_alive()]
            if dead:
                raise RuntimeError(f"{dead} process(es) stopped during the run (exit codes "
                                   f"{ {k: procs[k].exitcode for k in dead} })")
            time.sleep(0.1)
        cpu_pct = cpu.stop()
    finally:
        from controller.runners.realtime import stop_processes
        stop_processes(stops, procs)   # stimulation off first, as the session runner does
        if ring is not None:
            ring.close()
            ring.unlink()
    return {**analyze(session, acq_path, cpu_pct, duration_s, model), "host_steal_ms": cpu.host_steal_ms}


def stage_samples(cmds: list[dict], preds: dict, received: list, acq, push_t, truth: dict) -> dict:
    """Per-command stage times (s) from already-loaded records; no I/O.

    ``cmds``: COMMAND events with ``window_end_t``; ``preds``: PREDICTION events by
    ``round(window_end_t, 6)``; ``received``: each command's own device receipt time, or None
    (from :func:`controller.metrics.join_receipts`: the seq wraps); ``acq``: rows
    ``(ts_last, t_pulled, t_written, n)`` of the acquisition's ring writes (ring
    timestamps, raw-clock stamps); ``push_t``: the simulator's real push time per
    chunk; ``truth``: its ground truth (``t0`` and ``push`` layout). Returns
    ``{stage: [...], "end_to_end": [...], "end_to_end_from_window_end": [...],
    "simulator_push_late": [...], "features_cpu": [...], "inference_cpu": [...]}``, the last two
    the loop thread's CPU time over the ``features`` and ``inference`` spans, aligned with them.
    """
    import numpy as np

    from controller.metrics import chunk_index, governed_t
    push = truth["push"]
    fs, t0, chunk_n, first = float(push["fs_hz"]), float(truth["t0"]), int(push["chunk_n"]), int(push["first_sample"])
    push_t = np.asarray(push_t, np.float64)
    acq = np.asarray(acq, np.float64).reshape(-1, 4)
    acq = acq[np.argsort(acq[:, 0], kind="stable")]
    out: dict = {k: [] for k in (*STAGES, "end_to_end", "end_to_end_from_window_end", "simulator_push_late",
                                 "features_cpu", "inference_cpu")}
    if len(received) != len(cmds):
        raise ValueError(f"received has {len(received)} receipt times for {len(cmds)} commands")
    for c, t_recv in zip(cmds, received):
        w = c["window_end_t"]
        p = preds.get(round(w, 6))
        if p is None or t_recv is None:
            continue
        # The window's last sample as the simulator stamped it (sample i carries t0 + i / fs), on
        # its raw clock: the ring's copy carries LslSource's time-correction offset on top.
        i = int(np.rint((w - t0) * fs))
        out["end_to_end_from_window_end"].append(t_recv - (t0 + i / fs))
        k = int(chunk_index(w, t0, fs, chunk_n, first))
        # The pull that delivered the window's last sample: the first whose newest sample is not older.
        j = int(np.searchsorted(acq[:, 0], w - 0.5 / fs))
        if 0 <= k < push_t.size and j < acq.shape[0]:
            _, t_pulled, t_written, _ = acq[j]
            t_push = push_t[k]
            out["lsl_transport"].append(t_pulled - t_push)
            out["ring_write"].append(t_written - t_pulled)
            out["ring_to_loop"].append(p["t_read"] - t_written)
            out["end_to_end"].append(t_recv - t_push)
            out["simulator_push_late"].append(t_push - (t0 + (first + (k + 1) * chunk_n - 1) / fs))
        out["features"].append(p["t_features"] - p["t_read"])
        out["inference"].append(p["t_inference"] - p["t_features"])
        # The loop thread's CPU time over the same spans (NaN in records from before it was kept).
        out["features_cpu"].append(p.get("cpu_features", np.nan) - p.get("cpu_read", np.nan))
        out["inference_cpu"].append(p.get("cpu_inference", np.nan) - p.get("cpu_features", np.nan))
        out["policy_governor"].append(governed_t(c) - c["t_inference"])
        out["port_write"].append(c["sent_t"] - governed_t(c))
        out["device_receive"].append(t_recv - c["sent_t"])
    return out


def analyze(session: Path, acq_path: str, cpu_pct: dict, duration_s: float, model: Path) -> dict:
    """Stage and end-to-end statistics from the recorded events, device log, acquisition chunk stamps
    and the simulator's ground truth (its real chunk push times)."""
    import numpy as np

    from controller.metrics import compute_metrics, join_receipts, load_ground_truth
    from controller.recorder import read_jsonl
    events = read_jsonl(session / "events.jsonl")
    device = read_jsonl(session / "device_log.jsonl") if (session / "device_log.jsonl").exists() else []
    truth = load_ground_truth(session)
    push = truth.get("push")
    if not push or truth.get("t0") is None or not (session / push["file"]).exists():
        # Without them end to end would start from nominal timestamps and count the simulator's own
        # lateness as the loop's: no figure is better than that one.
        raise RuntimeError(f"seizure_loop: the simulator left no chunk push times in {session} "
                           f"(ground_truth.json 'push' / push_t.f64): cannot measure from the real push")
    push_t = np.fromfile(session / push["file"], dtype="<f8")
    preds = {round(e["window_end_t"], 6): e for e in events if e["kind"] == "prediction" and "t_read" in e}
    cmds = [c for c in events if c["kind"] == "command" and c.get("op") == "trigger" and c.get("window_end_t")]
    received = join_receipts(cmds, device).received_t
    acq = np.load(acq_path) if Path(acq_path).exists() else np.zeros((0, 4))
    raw = stage_samples(cmds, preds, received, acq, push_t, truth)
    # LslSource's time-correction offset as applied to the ring's timestamps: ring stamp − the
    # simulator's own stamp of the same sample (a diagnostic; no figure above depends on it).
    fs, t0 = float(push["fs_hz"]), float(truth["t0"])
    offset_s = acq[:, 0] - (t0 + np.rint((acq[:, 0] - t0) * fs) / fs) if acq.size else np.zeros(0)
    m = compute_metrics(session)
    st = {k: raw[k] for k in STAGES}
    return {"fs_hz": fs, "n_channels": 16, "model": str(model), "duration_s": duration_s,
            "policy": "every window (EveryWindowPolicy), MACRO profile with overrides " + json.dumps(BENCH_SAFETY_OVERRIDES),
            "commands": len(cmds), "received_by_device": sum(1 for r in received if r is not None),
            "predictions": m["predictions"], "refusals": m["stim"]["refusals"],
            "end_to_end_ms": stats_ms(raw["end_to_end"]),
            "end_to_end_over_target": share_over(raw["end_to_end"], SEIZURE_P99_TARGET_MS),
            "end_to_end_from_window_end_ms": stats_ms(raw["end_to_end_from_window_end"]),
            "end_to_end_definition": "real push of the chunk holding the window's last sample (window complete) "
                                     "-> command received by the device; raw local clock throughout",
            "stages_ms": {k: stats_ms(v) for k, v in st.items()},
            "cpu_split_ms": {k: cpu_split_ms(raw[k], raw[f"{k}_cpu"]) for k in ("features", "inference")},
            "simulator_push_late_ms": stats_ms(raw["simulator_push_late"]),
            "lsl_time_correction_offset_ms": None if offset_s.size == 0 else round(float(np.median(offset_s)) * 1e3, 4),
            "dropped_samples": int(m["dropped_samples"]),  # DROPPED events of acquisition and loop
            "deadline_misses": int(m["deadline_misses"]), "faults": m["faults"][:10],
            "cpu_percent": cpu_pct, "_raw_s": {**st, "end_to_end": raw["end_to_end"]}}
