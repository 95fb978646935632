"""Real-time HIL process for ADS: spiking units streamed over LSL + the stimulator emulator on a pty.

    python -m hil_sim.ads_sim --fd MASTER_FD --spec '{"units": {...}}' --out ground_truth.json

The process owns a :class:`hil_sim.spiking.SpikingUnits` and an LSL outlet
(float32 µV, ``chunk_n`` samples per push, ~1 ms); a child process it forks
(:class:`hil_sim.emulator_process.EmulatorProcess`) runs the
:class:`hil_sim.emulator.StimulatorEmulator` on the inherited pty master, so the
device stamps a command's arrival without waiting for the generator's GIL. Each
pulse the emulator delivers comes back on a pipe and is written into the recording (artifact, evoked spike) at its true
delivery time: unit time = LSL time − t0.

Protocol on stdin/stdout (one line each): the process prints
``ready <source_id>`` once the outlet exists, waits for ``start``, streams
until ``stop`` (or EOF, e.g. the parent died), writes the ground truth JSON to
``--out`` and prints ``done``.

Pacing: the block ending at sample index i is produced and pushed once the LSL
clock has passed t0 + i/fs, never ahead, so a pulse delivered before then is
already in it. A plain sleep, no spin: its lateness (p99 ≈ 180 µs, REFERENCE.md
§1) only shifts when a block leaves, and the push time of every block is
recorded (``push_t``, as the block is handed to ``push_chunk``) so a benchmark
measures from it; spinning 1000 times a second would take most of a core from
the controller on a 2-core machine (spike → command p99 1.9 → 1.4 ms when the
spin went).
"""
from __future__ import annotations

import argparse
import signal
import json
import os
import sys
import threading
import time

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import numpy as np  # noqa: E402
import pylsl  # noqa: E402

from drivers.params import StimParams  # noqa: E402
from hil_sim.emulator_process import EmulatorProcess  # noqa: E402
from hil_sim.spiking import SpikingUnits  # noqa: E402

__all__ = ["SpikingHil", "main"]

class SpikingHil:
    """Paces ``units`` over an LSL outlet; deliveries from the emulator process are rendered into it."""

    def __init__(self, units: SpikingUnits, emulator: EmulatorProcess, stream_name: str = "stimloop-spikes",
                 chunk_n: int = 30) -> None:
        if not 1 <= chunk_n <= 3000:
            raise ValueError(f"SpikingHil chunk_n={chunk_n!r} invalid, expected 1..3000 samples")
        self.units = units
        self.chunk_n = int(chunk_n)
        self.source_id = f"stimloop-spikes-{os.getpid()}"
        info = pylsl.StreamInfo(stream_name, "ExtracellularV", units.n_channels, units.fs_hz,
                                pylsl.cf_float32, self.source_id)
        chans = info.desc().append_child("channels")
        for name in units.channel_names:
            ch = chans.append_child("channel")
            ch.append_child_value("label", name)
            ch.append_child_value("unit", "microvolts")
        self.outlet = pylsl.StreamOutlet(info, self.chunk_n, 2)
        self.t0: float | None = None
        self.emulator = emulator
        self.emulator_result: dict = {"records": [], "counters": {}}
        self._push_t = np.zeros(1 << 16)
        self.n_blocks = 0
        self.deliveries: list[tuple[float, float]] = []   # (t_lsl delivered, unit t)

    def _render_deliveries(self) -> None:
        # A pulse delivered after its block left keeps its true onset (SpikingUnits.stimulate
        # renders the rest of the artifact and counts late_samples in the ground truth).
        for t_lsl, params in self.emulator.deliveries():
            if self.t0 is None:
                continue
            t_unit = max(0.0, t_lsl - self.t0)
            self.units.stimulate(t_unit, params)
            self.deliveries.append((t_lsl, t_unit))

    def run(self, stop: threading.Event) -> None:
        """Stream until ``stop`` is set."""
        u, fs, n = self.units, self.units.fs_hz, self.chunk_n
        clock = pylsl.local_clock
        self.t0 = clock() + 0.01 - u.t
        k = 0
        while not stop.is_set():
            idx_last = u.n_samples + n - 1
            t_last = self.t0 + idx_last / fs
            wait = t_last - clock()
            while wait > 0:
                time.sleep(wait)
                wait = t_last - clock()
            self._render_deliveries()
            x = u.step(n)
            t_push = clock()   # as handed over: the reader may have the block before push_chunk returns
            self.outlet.push_chunk(x, t_last, True)
            if k == self._push_t.size:
                self._push_t = np.concatenate([self._push_t, np.zeros_like(self._push_t)])
            self._push_t[k] = t_push
            k += 1
            self.n_blocks = k

    def ground_truth(self) -> dict:
        """Ground truth on the LSL clock: true spikes, pulses, weight trajectory, block push times."""
        from hil_sim.process import spiking_truth

        t0 = self.t0 if self.t0 is not None else 0.0
        return {
            **spiking_truth(self.units, t0), "t0": t0, "chunk_n": self.chunk_n,
            # Block i holds samples [i*chunk_n, (i+1)*chunk_n); push_t[i] is when it left.
            "push_t": self._push_t[:self.n_blocks].tolist(),
            "emulator_records": list(self.emulator_result["records"]),
            "emulator_counters": dict(self.emulator_result["counters"]),
        }


def run_simulated(mode: str = "ads", duration_s: float = 20.0, seed: int = 0, rate_hz: float | None = None,
                  chunk_n: int = 150, k: float = 5.0, units_kw: dict | None = None,
                  stim: StimParams | None = None) -> dict:
    """ADS or random stimulation in simulated time (no LSL, no device): the same detector and policies.

    Pulses are delivered exactly at their ``at``; blocks of ``chunk_n`` samples
    (5 ms) stay shorter than the 7.5 ms delay, so every pulse lands in a block
    not yet produced. Returns ``w_init``, ``w_final``, ``n_pulses``, ``rate_hz``
    and the ground truth: the plasticity comparison of ADS vs random stimulation
    (REFERENCE.md §2, §7) without waiting in real time.
    """
    from controller.policies.ads import AdsPolicy, RandomStimPolicy, blanking_window
    from controller.spikes import SpikeDetector

    if mode not in ("ads", "random", "none"):
        raise ValueError(f"run_simulated mode={mode!r} invalid, expected 'ads', 'random' or 'none'")
    if mode == "random" and not (rate_hz and rate_hz > 0):
        raise ValueError(f"run_simulated rate_hz={rate_hz!r} invalid, expected > 0 Hz for mode='random'")
    kw = {"n_channels": 8, "trigger_channels": (0, 1), "target_channel": 4, "stim_site_channel": 6,
          "rate_hz": 2.5, "seed": seed}
    kw.update(units_kw or {})
    units = SpikingUnits(**kw)
    stim = stim if stim is not None else StimParams(channel=0, amplitude_ua=50.0, pulse_width_us=200.0,
                                                    frequency_hz=333.0, n_pulses=1)
    fs = units.fs_hz
    det = SpikeDetector(fs, units.n_channels, channels=units.trigger_channels, k=k)
    ads = AdsPolicy(units.trigger_channels, stim) if mode == "ads" else None
    rnd = RandomStimPolicy(rate_hz, stim, seed=seed + 1000) if mode == "random" else None
    pending: list[float] = []
    ts_base = np.arange(chunk_n) / fs
    n_blocks = int(round(duration_s * fs / chunk_n))
    for _ in range(n_blocks):
        t_start = units.t
        t_end = t_start + chunk_n / fs
        due = [a for a in pending if a < t_end]
        for a in due:
            units.stimulate(a, stim)
        pending = [a for a in pending if a >= t_end]
        x = units.step(chunk_n)
        sp = det.step(x, t_start + ts_base)
        if ads is not None:
            reqs = ads.step(sp.t, sp.channel, t_end)
        elif rnd is not None:
            reqs = rnd.step(t_end)
        else:
            reqs = []
        for r in reqs:
            det.blank(*blanking_window(r.at))
            pending.append(max(r.at, t_end))
    gt = units.ground_truth()
    return {"mode": mode, "w_init": float(gt["weight"]["w"][0]), "w_final": gt["w_final"],
            "n_pulses": len(gt["pulses"]), "rate_hz": len(gt["pulses"]) / units.t, "ground_truth": gt}


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil_sim.ads_sim", description=__doc__.splitlines()[0])
    ap.add_argument("--fd", type=int, required=True, help="inherited pty master fd for the emulator")
    ap.add_argument("--spec", default="{}", help="JSON: {'units': SpikingUnits kwargs, 'chunk_n', 'stream_name'}")
    ap.add_argument("--out", required=True, help="ground truth JSON written at stop")
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    units_kw = dict(spec.get("units", {}))
    for key in ("trigger_channels", "amplitude_range_uv", "noise_band_hz", "burst_size", "w_bounds"):
        if key in units_kw:
            units_kw[key] = tuple(units_kw[key])
    units = SpikingUnits(**units_kw)
    # Forked before any thread exists, so it stays our child (bench ads finds it in our process tree).
    emulator = EmulatorProcess(args.fd, watchdog_s=float(spec.get("watchdog_s", 1.0)), start_method="fork").start()
    hil = SpikingHil(units, emulator, stream_name=spec.get("stream_name", "stimloop-spikes"),
                     chunk_n=int(spec.get("chunk_n", 30)))
    print(f"ready {hil.source_id}", flush=True)
    stop = threading.Event()
    # SIGTERM (ours, or the whole group's) takes the same path as "stop": ground truth still written,
    # the emulator process stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        line = sys.stdin.readline().strip()
    except _Terminated:
        line = ""
    if line != "start":
        emulator.stop()
        return 1
    from controller.low_latency import freeze_gc
    freeze_gc()   # a full collection would hold a 1 ms block for tens of ms (controller/low_latency.py)
    th = threading.Thread(target=hil.run, args=(stop,), name="spiking-outlet", daemon=True)
    th.start()
    try:
        sys.stdin.readline()          # "stop" or EOF
    except _Terminated:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the ground truth short
    stop.set()
    th.join(timeout=5.0)
    hil._render_deliveries()   # pulses delivered after the last block still belong to the ground truth
    hil.emulator_result = emulator.stop()
    gt = hil.ground_truth()
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(gt, f, allow_nan=False)
    os.replace(tmp, args.out)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
