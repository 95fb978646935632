"""Peer "pylsl floor": the least a Python closed loop can do — inlet → threshold → one byte to a pty.

    python -m controller.bench.peers.pylsl_floor --source-id SID --port /dev/pts/N --duration 5

A plain pylsl polling loop: ``pull_chunk`` into a preallocated array, returning as
soon as one sample is there (``min_samples=1``; without it liblsl waits for a
full chunk or the 10 ms timeout), rising-edge threshold on one channel
(vectorized per chunk), ``os.write`` of one byte per detected edge. Small
``max_buflen`` so no hidden lag builds up (REFERENCE.md §1). Prints ``ready``
once the inlet is open, streams for ``--duration`` s, prints ``done <n>``.

``--busy-poll`` (peer ``pylsl_floor_busy_poll``): ``pull_chunk(timeout=0.0)``
in a loop that never sleeps, ``sched_yield`` when empty — the floor for
``LslSource(busy_poll=True)``.
"""
from __future__ import annotations

import argparse
import os
import sys

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import numpy as np  # noqa: E402
import pylsl  # noqa: E402


def rising_edges(x: np.ndarray, threshold: float, was_above: bool) -> tuple[int, bool]:
    """Number of below→above threshold crossings in ``x`` given the state before it; returns (n, last state)."""
    above = x > threshold
    if above.size == 0:
        return 0, was_above
    n = int(np.count_nonzero(above[1:] & ~above[:-1])) + int(bool(above[0]) and not was_above)
    return n, bool(above[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.bench.peers.pylsl_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--source-id", required=True)
    ap.add_argument("--port", required=True, help="serial device (pty slave) to write to")
    ap.add_argument("--channel", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--busy-poll", action="store_true", help="poll without sleeping (spends a CPU core)")
    a = ap.parse_args(argv)
    infos = pylsl.resolve_byprop("source_id", a.source_id, 1, 5.0)
    if not infos:
        print(f"error: no LSL stream with source_id {a.source_id!r} within 5 s", flush=True)
        return 1
    n_ch = infos[0].channel_count()
    if not 0 <= a.channel < n_ch:
        print(f"error: --channel {a.channel} invalid, expected 0..{n_ch - 1}", flush=True)
        return 1
    inlet = pylsl.StreamInlet(infos[0], max_buflen=1, processing_flags=0)
    inlet.open_stream(timeout=5.0)
    fd = os.open(a.port, os.O_WRONLY | os.O_NOCTTY)
    buf = np.empty((4096, n_ch), np.float32)
    byte = b"\x01"
    above = False
    n_out = 0
    clock = pylsl.local_clock
    # Blocking: liblsl wakes this thread when a sample lands (min_samples=1). Busy poll: ask again at once.
    wait = {"timeout": 0.0} if a.busy_poll else {"timeout": 0.01, "min_samples": 1}
    print("ready", flush=True)
    t_end = clock() + a.duration
    while clock() < t_end:
        _, ts = inlet.pull_chunk(max_samples=buf.shape[0], dest_obj=buf, **wait)
        n = len(ts)
        if not n and a.busy_poll:
            os.sched_yield()   # as LslSource's busy poll does: other runnable tasks on this core go first
        if n:
            k, above = rising_edges(buf[:n, a.channel], a.threshold, above)
            if k:
                os.write(fd, byte * k)
                n_out += k
    os.close(fd)
    inlet.close_stream()
    print(f"done {n_out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
