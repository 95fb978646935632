"""Peer "mne-lsl": ``mne_lsl.stream.StreamLSL`` polling → threshold → one byte to a pty.

    python -m controller.bench.peers.mne_lsl_peer --source-id SID --port /dev/pts/N --duration 5

mne-lsl keeps a ring buffer filled by a background acquisition thread
(``acquisition_delay`` between pulls); the recommended use is to poll
``n_new_samples`` and ``get_data(winsize=...)``. We poll every 0.5 ms so the
polling period is not what is measured. Same output and protocol as
:mod:`controller.bench.peers.pylsl_floor`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()

from controller.bench.peers.pylsl_floor import rising_edges  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.bench.peers.mne_lsl_peer", description=__doc__.splitlines()[0])
    ap.add_argument("--source-id", required=True)
    ap.add_argument("--port", required=True)
    ap.add_argument("--channel", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--acquisition-delay", type=float, default=0.001, help="mne-lsl pull period, s")
    a = ap.parse_args(argv)
    try:
        from mne_lsl.lsl import local_clock
        from mne_lsl.stream import StreamLSL
    except ImportError as exc:
        print(f"error: mne-lsl not installed ({exc}); pip install mne-lsl", flush=True)
        return 2
    import mne
    mne.set_log_level("ERROR")
    stream = StreamLSL(bufsize=1.0, source_id=a.source_id)
    stream.connect(acquisition_delay=a.acquisition_delay, processing_flags=None, timeout=5.0)
    fs = stream.info["sfreq"]
    if not 0 <= a.channel < len(stream.ch_names):
        print(f"error: --channel {a.channel} invalid, expected 0..{len(stream.ch_names) - 1}", flush=True)
        return 1
    pick = stream.ch_names[a.channel]
    fd = os.open(a.port, os.O_WRONLY | os.O_NOCTTY)
    byte = b"\x01"
    above = False
    n_out = 0
    print("ready", flush=True)
    t_end = local_clock() + a.duration
    while local_clock() < t_end:
        n_new = stream.n_new_samples
        if n_new:
            data, _ = stream.get_data(winsize=min(n_new, int(fs)) / fs, picks=pick)
            k, above = rising_edges(data[0], a.threshold, above)
            if k:
                os.write(fd, byte * k)
                n_out += k
        else:
            time.sleep(0.0005)
    os.close(fd)
    stream.disconnect()
    print(f"done {n_out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
