"""Benchmark stimulus outlet (its own process): paced LSL stream with pulses at known times.

    python -m controller.bench.outlet --spec '{"fs_hz": 1000, "n_channels": 8, "chunk_n": 1, "pulse_rate_hz": 10}'

Protocol on stdin/stdout (one line each), like ``hil_sim.ads_sim``: prints
``ready <source_id>``, waits for ``start``, streams until ``stop`` (or EOF),
then prints one JSON line: ``t0``, ``n_pushed``, ``pulse_t`` (LSL time of
every pulse sample), ``pulse_push_t`` (the ``local_clock()`` reading as each
pulse's chunk is handed to ``push_chunk``: when it really left),
``max_behind_s`` (how far the pacing fell behind the
nominal sample clock: a throughput limit of the generator, not of the reader).
The outlet stays open, silent, until stdin closes, so readers can close first.

Pulses are ``pulse_uv`` on channel ``pulse_channel`` for one sample over
Gaussian noise; inter-pulse intervals are ``1/pulse_rate_hz`` ± 30 % (seeded),
so a peer cannot lock onto a period. ``index_channels``: channels 0 and 1
carry each sample's index (``i % 65536`` and ``i // 65536``, exact in float32)
instead of noise, so a reader can tell which sample it holds without the
timestamps (a reader's time correction shifts those). The sample with index i carries the
timestamp ``t0 + i/fs`` and is pushed once the clock has passed it (a sample
cannot leave an amplifier before it was measured), sleep-then-spin
(REFERENCE.md §1: plain sleep p99 ≈ 180 µs late, max 1.8 ms).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import numpy as np  # noqa: E402
import pylsl  # noqa: E402

DEFAULTS = {"fs_hz": 1000.0, "n_channels": 8, "chunk_n": 1, "pulse_rate_hz": 10.0, "pulse_uv": 1000.0,
            "noise_uv": 10.0, "pulse_channel": 0, "seed": 0, "name": "stimloop-bench", "spin_s": 0.0003,
            "lead_s": 0.05, "index_channels": False}


#: ``index_channels``: a sample's index is ``ch0 + INDEX_BASE * ch1``; float32 holds integers exactly up
#: to 2**24, so one channel alone would wrap after ~9 min at 30 kHz.
INDEX_BASE = 65536


def sample_index(samples) -> "np.ndarray":
    """The sample indices an ``index_channels`` outlet wrote into rows of ``samples`` (pure)."""
    a = np.asarray(samples)
    return a[:, 0].astype(np.int64) + INDEX_BASE * a[:, 1].astype(np.int64)


def check_spec(spec: dict) -> dict:
    """Defaults filled in, ranges checked (ValueError naming the field, value and range)."""
    s = {**DEFAULTS, **spec}
    unknown = set(s) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"outlet spec: unknown field(s) {sorted(unknown)}, expected {sorted(DEFAULTS)}")
    for key, lo, hi in (("fs_hz", 1.0, 100_000.0), ("n_channels", 1, 4096), ("chunk_n", 1, 10_000),
                        ("pulse_rate_hz", 0.0, 100.0), ("noise_uv", 0.0, 1e6), ("spin_s", 0.0, 0.01)):
        if not (lo <= s[key] <= hi):
            raise ValueError(f"outlet spec {key}={s[key]!r} invalid, expected {lo}..{hi}")
    if s["index_channels"] and s["n_channels"] < 2:
        raise ValueError(f"outlet spec index_channels needs n_channels >= 2, got {s['n_channels']!r}")
    if not 0 <= s["pulse_channel"] < s["n_channels"]:
        raise ValueError(f"outlet spec pulse_channel={s['pulse_channel']!r} invalid, expected 0..{s['n_channels'] - 1}")
    return s


class PacedOutlet:
    """The outlet and its pacing loop; ``run(stop)`` returns the summary dict."""

    def __init__(self, spec: dict):
        s = self.spec = check_spec(spec)
        self.fs, self.n_ch, self.chunk_n = float(s["fs_hz"]), int(s["n_channels"]), int(s["chunk_n"])
        self.source_id = f"{s['name']}-{os.getpid()}"
        info = pylsl.StreamInfo(s["name"], "EEG", self.n_ch, self.fs, pylsl.cf_float32, self.source_id)
        self.outlet = pylsl.StreamOutlet(info, self.chunk_n, 1)
        rng = np.random.default_rng(s["seed"])
        # A pre-generated noise block cycled chunk by chunk: generating 30 kHz × 256 ch live would
        # measure the generator, not the reader.
        n_blocks = max(1, int(self.fs // self.chunk_n) // 4)
        self._noise = (rng.standard_normal((n_blocks * self.chunk_n, self.n_ch)) * s["noise_uv"]).astype(np.float32)
        self._n_blocks = n_blocks
        self._rng = rng
        self._buf = np.empty((self.chunk_n, self.n_ch), np.float32)
        self._index = bool(s["index_channels"])
        self._ar = np.arange(self.chunk_n, dtype=np.int64)

    def _next_gap(self) -> int:
        rate = self.spec["pulse_rate_hz"]
        return max(2, int(round(self.fs / rate * self._rng.uniform(0.7, 1.3))))

    def run(self, stop: threading.Event) -> dict:
        s, fs, n_ch, chunk_n = self.spec, self.fs, self.n_ch, self.chunk_n
        spin, clock = float(s["spin_s"]), pylsl.local_clock
        pulses = s["pulse_rate_hz"] > 0
        t0 = clock() + float(s["lead_s"])
        next_pulse = self._next_gap() if pulses else -1
        pulse_idx: list[int] = []
        pulse_push: list[float] = []
        n = k = 0
        max_behind = 0.0
        while not stop.is_set():
            buf = self._buf
            j = (k % self._n_blocks) * chunk_n
            buf[:] = self._noise[j:j + chunk_n]
            if self._index:
                i = n + self._ar
                buf[:, 0] = i % INDEX_BASE
                buf[:, 1] = i // INDEX_BASE
            n_pulses = len(pulse_idx)
            while pulses and n <= next_pulse < n + chunk_n:
                buf[next_pulse - n, s["pulse_channel"]] = s["pulse_uv"]
                pulse_idx.append(next_pulse)
                next_pulse += self._next_gap()
            t_last = t0 + (n + chunk_n - 1) / fs
            while True:
                wait = t_last - clock()
                if wait <= 0:
                    break
                if wait > spin:
                    time.sleep(wait - spin)
            behind = -wait
            if behind > max_behind:
                max_behind = behind
            # The pulse exists for a reader only from here: the sleep-then-spin above is often late
            # (a busy neighbour, ~1 ms p99, tens of ms in a stall), and latencies measured from the
            # nominal sample time would charge that lateness to whichever peer was running. Stamped as
            # it is handed over, not after push_chunk returns (as hil_sim's outlets do): a fast reader
            # can answer before this thread runs again, and an answer before its pulse's stamp would be
            # paired with the pulse before it.
            t_push = clock()
            self.outlet.push_chunk(buf, t_last, True)
            if len(pulse_idx) > n_pulses:
                pulse_push.extend([t_push] * (len(pulse_idx) - n_pulses))
            n += chunk_n
            k += 1
        return {"t0": t0, "n_pushed": n, "fs_hz": fs, "n_channels": n_ch, "chunk_n": chunk_n,
                "pulse_t": [t0 + i / fs for i in pulse_idx], "pulse_push_t": pulse_push, "max_behind_s": max_behind,
                "t_end": clock()}


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m controller.bench.outlet", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="{}", help="JSON spec (fields: %s)" % ", ".join(DEFAULTS))
    args = ap.parse_args(argv)
    po = PacedOutlet(json.loads(args.spec))
    print(f"ready {po.source_id}", flush=True)
    if sys.stdin.readline().strip() != "start":
        return 1
    stop, released = threading.Event(), threading.Event()

    def watch_stdin() -> None:
        sys.stdin.readline()  # "stop" or EOF (the parent died): either way stop streaming
        stop.set()
        while sys.stdin.readline():
            pass
        released.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    summary = po.run(stop)
    print(json.dumps(summary), flush=True)
    # Keep the outlet open until the parent closes stdin: readers still connected then close their
    # inlets first, instead of liblsl logging "Stream transmission broke off" for each of them.
    released.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())


class OutletProcess:
    """Parent side: start the outlet process, ``start()`` streaming, ``stop() -> summary``. A context manager."""

    def __init__(self, spec: dict, ready_timeout_s: float = 20.0):
        import subprocess
        check_spec(spec)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen([sys.executable, "-m", "controller.bench.outlet", "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "ready":
            self.close()
            raise RuntimeError(f"benchmark outlet did not start (said {' '.join(line)!r}, "
                               f"exit code {self.proc.poll()})")
        self.source_id = line[1]
        self.pid = self.proc.pid
        self.summary: dict | None = None

    def start(self) -> None:
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()

    def stop(self) -> dict:
        """Stop streaming; returns the summary. The outlet stays open (no data) until :meth:`close`."""
        if self.summary is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"benchmark outlet ended without a summary (exit code {self.proc.poll()})")
            self.summary = json.loads(line)
        return self.summary

    def close(self) -> None:
        import subprocess
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "OutletProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
