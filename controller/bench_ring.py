"""Micro-benchmark of the shared-memory ring: write and read latency (p50/p99/max, µs).

``python -m controller.bench_ring --json out.json [--n-channels 64 --chunk 32 --iterations 20000]``

Write: one ``ring.write`` of a (chunk, n_channels) float32 block. Read: one
``read_new`` (zero-copy view) and one ``latest(window)`` copy in the same
process right after the write, so the figure is the cost of the call itself,
not of waiting for data. A cross-process figure (writer in another process,
reader polling) is reported as ``xproc_visible_us``: time from the writer's
``perf_counter`` stamp (stored in the timestamp slot) to the reader seeing it.
"""
from __future__ import annotations

import argparse
import json
import os
import multiprocessing as mp
import platform
import time

import numpy as np

from controller.ring import SharedRing


def _pct(x: np.ndarray) -> dict:
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max()),
            "n": int(x.size)}


def _xproc_writer(name: str, n: int, chunk: int, period_s: float, go) -> None:
    ring = SharedRing.attach(name)
    x = np.zeros((chunk, ring.n_channels), np.float32)
    ts = np.zeros(chunk)
    go.wait(30)
    for _ in range(n):
        t_next = time.perf_counter() + period_s
        ts[-1] = time.perf_counter()  # perf_counter is system-wide CLOCK_MONOTONIC on Linux
        ring.write(x, ts)
        while time.perf_counter() < t_next:  # short spin-wait: sleep() lateness would dominate
            pass
    ring.close()


def run(n_channels: int, chunk: int, iterations: int, window: int, xproc_n: int) -> dict:
    ring = SharedRing.create(None, n_channels, 1 << 14, 1000.0)
    try:
        x = np.random.default_rng(0).normal(size=(chunk, n_channels)).astype(np.float32)
        ts = np.arange(chunk, dtype=np.float64)
        reader = ring.reader("now")
        win = ring.reader("now", max_read=window)
        w_ns = np.empty(iterations, np.int64)
        r_ns = np.empty(iterations, np.int64)
        l_ns = np.empty(iterations, np.int64)
        pc = time.perf_counter_ns
        for i in range(iterations):
            t0 = pc()
            ring.write(x, ts)
            t1 = pc()
            reader.read_new()
            t2 = pc()
            win.latest(window, copy=True)
            t3 = pc()
            w_ns[i], r_ns[i], l_ns[i] = t1 - t0, t2 - t1, t3 - t2
        out = {"write_us": _pct(w_ns / 1e3), "read_new_view_us": _pct(r_ns / 1e3),
               f"latest_copy_{window}_us": _pct(l_ns / 1e3)}
        # cross process
        ctx = mp.get_context("spawn")
        go = ctx.Event()
        p = ctx.Process(target=_xproc_writer, args=(ring.name, xproc_n, chunk, 0.001, go))
        p.start()
        lat = []
        reader = ring.reader("now")
        go.set()
        deadline = time.monotonic() + 60
        while len(lat) < xproc_n and time.monotonic() < deadline and (p.is_alive() or reader.available()):
            res = reader.read_new()
            if res.samples.shape[0]:
                now = time.perf_counter()
                stamps = res.timestamps[chunk - 1::chunk] if res.start % chunk == 0 else res.timestamps[-1:]
                lat.extend((now - stamps) * 1e6)
        p.join(10)
        if lat:
            out["xproc_visible_us"] = _pct(np.asarray(lat))
        return out
    finally:
        ring.close()
        ring.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="output JSON file")
    ap.add_argument("--n-channels", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=20_000)
    ap.add_argument("--xproc-n", type=int, default=2000)
    a = ap.parse_args()
    res = run(a.n_channels, a.chunk, a.iterations, a.window, a.xproc_n)
    res["config"] = {"n_channels": a.n_channels, "chunk": a.chunk, "window": a.window,
                     "iterations": a.iterations, "python": platform.python_version(), "machine": platform.machine(),
                     "loadavg_1min": os.getloadavg()[0]}  # 2 shared cores: load dominates the xproc figure
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
