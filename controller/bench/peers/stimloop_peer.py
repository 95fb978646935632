"""Peer "stimloop": the project's own path on the peer stimulus stream.

    python -m controller.bench.peers.stimloop_peer --source-id SID --port /dev/pts/N --duration 5

LSL → ``LslSource`` → ``SharedRing`` → threshold, all in this one process: the
fast path of ARCHITECTURE.md (spike-triggered stimulation runs in the process
that receives the samples, no extra hop) → rising-edge threshold (vectorized per chunk) →
``Actuator`` (safety governor, MICRO profile with ``BENCH_SAFETY_OVERRIDES``) → ``SerialStimulator`` →
the stimulator emulator on the pty, which stamps the TRIGGER on the LSL clock.
So unlike the byte-writing peers it pays for the ring, the governor and the
framed, acknowledged serial protocol: what a stimloop command really costs.
Between chunks it keeps the command path warm (``Actuator.warm``), as the
session loop and ``bench ads`` do. ``--busy-poll`` (peer ``stimloop_busy_poll``)
opens the source with ``busy_poll=True``, as ``source.busy_poll = true`` does
in a session.
"""
from __future__ import annotations

import argparse
import sys

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import numpy as np  # noqa: E402
import pylsl  # noqa: E402



def edge_starts(x, threshold: float, was_above: bool) -> tuple[list[int], bool]:
    """Indices in ``x`` where it rises above ``threshold`` (given the state before it), and the state after.

    The same edges as the floor's ``rising_edges`` counts, found in one pass: the peer needs their
    positions (each edge's timestamp goes to the governor), and the work to find them is charged
    to stimloop's decision stage, so it should be no more than the floor's.
    """
    if x.shape[0] == 0:
        return [], was_above
    if x.shape[0] == 1:   # the peer stream's usual chunk: a scalar compare, no array temporaries
        now = bool(x[0] > threshold)
        return ([0] if now and not was_above else []), now
    hit = x > threshold
    starts = (np.flatnonzero(hit[1:] & ~hit[:-1]) + 1).tolist()
    if hit[0] and not was_above:
        starts.insert(0, 0)
    return starts, bool(hit[-1])

# MICRO caps bursts at 600/min, which is the peer stream's *mean* pulse rate (10 Hz, intervals
# 100 ms ± 30 %): once a peer process ran 60 s, about half its pulses were refused (rate_limit) and
# scored as missed, for stimloop only. The bench measures the command path, not the rate rule: raise
# the cap well above what the stream can produce (pulses >= 70 ms apart: at most ~857/min), as the
# seizure_loop scenario does for MACRO. Every other MICRO rule stays, and the governor still checks
# every request. Benchmark only.
BENCH_SAFETY_OVERRIDES = {"max_bursts_per_min": 3000}


def bench_profile():
    """The peer's safety profile: MICRO with ``BENCH_SAFETY_OVERRIDES`` (validated like any profile)."""
    from controller.safety import build_profile
    return build_profile("micro", BENCH_SAFETY_OVERRIDES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controller.bench.peers.stimloop_peer", description=__doc__.splitlines()[0])
    ap.add_argument("--source-id", required=True)
    ap.add_argument("--port", required=True)
    ap.add_argument("--channel", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--busy-poll", action="store_true", help="LslSource(busy_poll=True): spends a CPU core")
    ap.add_argument("--nice", type=int, default=None,
                    help="run the peer at this nice value, as a session's controller processes run (session.nice; "
                         "not with --busy-poll: controller.low_latency.nice_for)")
    ap.add_argument("--stages", default=None,
                    help="write per-command stage times here (JSON: {\"commands\": rows of sample_t, pulled_t, "
                         "submit_t, sent_t, seq; \"refusals\": rows of sample_t, rule})")
    a = ap.parse_args(argv)
    from controller.low_latency import nice_for, set_nice
    own_nice = nice_for(a.nice, a.busy_poll)   # first: liblsl's threads, started when the inlet opens, inherit it
    nice_status = "unchanged" if own_nice is None else set_nice(own_nice)

    from controller.actuator import Actuator
    from controller.bench_ads import DEFAULT_STIM
    from controller.events import EventKind
    from controller.ring import Overrun, SharedRing
    from controller.safety import SafetyGovernor, StimRequest
    from controller.sources import probe_source
    from drivers.serial_stimulator import SerialStimulator

    spec = {"kind": "lsl", "source_id": a.source_id, "resolve_timeout_s": 5.0, "max_buflen_s": 1,
            "busy_poll": a.busy_poll}
    info = probe_source(spec)
    if not 0 <= a.channel < info.n_channels:
        print(f"error: --channel {a.channel} invalid, expected 0..{info.n_channels - 1}", flush=True)
        return 1
    ring = SharedRing.create(None, info.n_channels, int(2 * info.fs_hz), info.fs_hz)
    act = source = None
    counts = {"commands": 0, "refused": 0, "faults": 0}
    stages: list[tuple[float, float, float, float, int]] = []
    refusals: list[tuple[float, str]] = []   # the governor's no, by pulse: the harness scores it with the pulse
    try:
        from controller.sources import build_source
        source = build_source({**spec, "wait_s": 0.005})
        source.open()
        clock = pylsl.local_clock
        driver = SerialStimulator(a.port, timeout_s=0.05, retries=2, clock=clock)
        driver.open()
        act = Actuator(SafetyGovernor(bench_profile(), driver.capabilities), driver, clock)
        act.heartbeat()
        reader = ring.reader("now", max_read=ring.capacity)
        above = False
        from controller.low_latency import freeze_gc
        freeze_gc()   # as a session's loop does
        print("ready", flush=True)
        t_end = clock() + a.duration
        next_hb = clock() + 0.1
        while True:
            now = clock()
            if now >= t_end:
                break
            source.read_into(ring)  # waits up to wait_s for the first sample, returns as soon as one lands
            t_pulled = clock()      # the chunk is in the ring
            try:
                res = reader.read_new()
            except Overrun:
                continue
            n = res.samples.shape[0]
            if n:
                starts, was = edge_starts(res.samples[:, a.channel], a.threshold, above)
                for i in starts:
                    t_edge = float(res.timestamps[i])
                    t_submit = clock()
                    evs = act.submit(StimRequest(t=t_edge, source="bench.stimloop_peer", params=DEFAULT_STIM,
                                                 at=None, meta={"window_end_t": t_edge}))
                    last = evs[-1].kind if evs else None
                    key = ("commands" if last is EventKind.COMMAND else
                           "refused" if last is EventKind.REFUSAL else "faults")
                    counts[key] += 1
                    if last is EventKind.COMMAND:
                        cmd = evs[-1].data
                        stages.append((t_edge, t_pulled, t_submit, cmd["sent_t"], cmd["seq"]))
                    elif last is EventKind.REFUSAL:
                        refusals.append((t_edge, str(evs[-1].data.get("rule"))))
                above = was
            act.warm(DEFAULT_STIM)   # after this chunk's commands, as the session loop does when idle
            if now >= next_hb:
                act.heartbeat()
                next_hb = now + 0.1
    finally:
        if act is not None:
            act.close()
        if source is not None:
            source.close()
        ring.close()
        ring.unlink()
    if a.stages:
        import json
        with open(a.stages, "w", encoding="utf-8") as f:
            json.dump({"commands": stages, "refusals": refusals, "nice": nice_status}, f)
    print(f"done {counts['commands']} refused={counts['refused']} faults={counts['faults']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
