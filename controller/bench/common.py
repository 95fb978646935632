"""Shared pieces of the benchmark suite: percentiles and their uncertainty, machine description, per-process CPU.

All latencies are float seconds on one clock (``pylsl.local_clock``) until
they are summarized here in milliseconds.
"""
from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np

from controller.low_latency import CpuMeter, cpu_seconds, steal_ms, steal_since  # noqa: F401  (re-exported)
# One percentile rule for sessions and benchmarks (re-exported: the bench modules import it from here).
from controller.metrics import MIN_N, PERCENTILES, STAT_KEYS, finite_ms, min_n_for, summarize_ms  # noqa: F401

BOOTSTRAP_N = 2000      # resamples per interval: the bounds move by 1–3 % between seeds (12 rounds × ~50 values)
MIN_ROUNDS = 3          # fewer rounds say nothing about how much a run differs from the next one
MIN_ROUND_S = 1.0       # a peer round shorter than this is mostly start-up


def stats_ms(values_s) -> dict:
    """Summary of latencies given in seconds: p50/p90/p99/p99.9/max, mean, jitter (std, p99 − p50), n; in ms.

    Non-finite values are ignored. A percentile is ``None`` when there are too few
    values to estimate it (``MIN_N``: n < 100 for p99, n < 1000 for p99.9), and so
    is the p99 − p50 jitter then; ``max`` and ``n`` are always given. Every key is
    always present: an empty input gives ``None`` figures and ``n = 0``.
    """
    v = finite_ms(values_s)
    out, q = summarize_ms(v)
    if v.size == 0:
        return {**out, "mean": None, "std": None, "jitter_p99_p50": None}
    jitter = None if out["p99"] is None or out["p50"] is None else round(float(q[2] - q[0]), 4)
    n = out.pop("n")
    out.update(mean=round(float(v.mean()), 4), std=round(float(v.std()), 4), jitter_p99_p50=jitter, n=n)
    return out


def ratio_ci95(a_rounds, b_rounds, q: float = 99.0, seed: int = 0,
               n_boot: int = BOOTSTRAP_N) -> list[float] | None:
    """Bootstrap 95 % interval of ``percentile(a, q) / percentile(b, q)``, resampling rounds, then values.

    ``a_rounds`` and ``b_rounds`` are the latencies of each side, one array per
    round (a stretch of time in which that side ran). On a shared machine the
    latencies of one round are not independent: a noisy spell raises a whole
    round. Resampling single values treats them as independent and gave a copy
    of the pylsl floor a p99 ratio to the floor of 0.31 with an interval of
    0.07–0.80, "a real difference" between two identical programs
    (docs/performance_log.md, "Intervals over rounds"). So each resample draws the
    rounds with replacement, then the values within each drawn round: the
    interval holds the spread between rounds as well as the sampling of values.

    Non-finite values are ignored. None when either side has fewer than
    ``MIN_ROUNDS`` rounds, fewer than 20 values or fewer than ``min_n_for(q)``
    (the same rule as ``stats_ms``: no p99 interval from under 100 values), or
    its resampled percentiles include 0. Deterministic for a given ``seed``.
    """
    sides = []
    for rounds in (a_rounds, b_rounds):
        arrs = [np.asarray(r, dtype=np.float64).ravel() for r in rounds]
        arrs = [r[np.isfinite(r)] for r in arrs]
        arrs = [r for r in arrs if r.size]
        if len(arrs) < MIN_ROUNDS or sum(r.size for r in arrs) < max(20, min_n_for(q)):
            return None
        sides.append(arrs)
    rng = np.random.default_rng(seed)

    def resampled(arrs: list[np.ndarray]) -> np.ndarray:
        values = np.concatenate(arrs)
        sizes = np.array([r.size for r in arrs])
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        out = np.empty(n_boot)
        for i in range(n_boot):
            pick = rng.integers(0, len(arrs), len(arrs))
            n = np.repeat(sizes[pick], sizes[pick])
            idx = np.repeat(starts[pick], sizes[pick]) + (rng.random(n.size) * n).astype(np.int64)
            out[i] = np.percentile(values[idx], q)
        return out

    pa, pb = resampled(sides[0]), resampled(sides[1])
    if not np.all(pb > 0):
        return None
    lo, hi = np.percentile(pa / pb, [2.5, 97.5])
    return [round(float(lo), 3), round(float(hi), 3)]


#: issue #5's latency targets for the suite (the throughput one is the sweep's own ``target_met``)
SPIKE_P99_TARGET_MS = 1.0
SEIZURE_P99_TARGET_MS = 5.0


def share_over(values_s, limit_ms: float) -> dict:
    """How many latencies exceed ``limit_ms``, their share, and its exact 95 % interval (Clopper–Pearson).

    "p99 ≤ L" says that at most 1 % of the values exceed L. A run measures that share on a
    sample: 2 of 136 spikes over 1 ms is 1.5 %, a miss, but 136 values cannot tell 1.5 % from
    0.5 % (its interval is 0.2–5.2 %). The interval says whether a run's verdict on a p99 target
    is a finding (the whole interval on one side of 1 %) or the luck of a few values; it needs no
    assumption about the latency distribution, only that the values are independent draws, which
    a noisy spell on a shared machine bends (``ratio_ci95`` on rounds is the stricter tool).
    Non-finite values are ignored; with none, ``share`` and ``share_ci95`` are None.
    """
    from scipy.stats import binomtest
    v = finite_ms(values_s)
    n, k = int(v.size), int(np.count_nonzero(v > limit_ms))
    if n == 0:
        return {"limit_ms": limit_ms, "n": 0, "n_over": 0, "share": None, "share_ci95": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"limit_ms": limit_ms, "n": n, "n_over": k, "share": round(k / n, 5),
            "share_ci95": [round(float(ci.low), 5), round(float(ci.high), 5)]}


#: how many of a span's slowest instances ``cpu_split_ms`` lists with their off-CPU part
SLOWEST_SPLIT_N = 3


def cpu_split_ms(wall_s, cpu_s) -> dict:
    """A loop span's wall times split into on-CPU and off-CPU parts (both in s, aligned; in ms out).

    ``cpu_s``: the loop thread's CPU time over each span (``ChunkStep``'s ``cpu_clock``). The
    rest of the wall time the thread was off the CPU: runnable but waiting for a core, or, on
    a VM, its vCPU held by the host (steal is not counted as a thread's CPU time under
    paravirtual steal accounting). So a slow span with little CPU time was the machine's, one
    with as much CPU time as wall time was the loop's own work. Pairs with a non-finite value
    (records from before the CPU time was kept) are left out. Returns ``{"on_cpu": stats,
    "off_cpu": stats, "slowest": [{"wall_ms", "off_cpu_ms"}, ...]}`` (the ``SLOWEST_SPLIT_N``
    slowest spans, slowest first).
    """
    wall = np.asarray(wall_s, np.float64).reshape(-1)
    cpu = np.asarray(cpu_s, np.float64).reshape(-1)
    if wall.shape != cpu.shape:
        raise ValueError(f"cpu_split_ms: {wall.size} wall times for {cpu.size} CPU times")
    ok = np.isfinite(wall) & np.isfinite(cpu)
    wall, cpu = wall[ok], cpu[ok]
    # CPU time can read a few µs over the wall time around it (the two clocks are read in turn).
    off = np.maximum(wall - cpu, 0.0)
    slowest = [{"wall_ms": round(float(wall[i]) * 1e3, 4), "off_cpu_ms": round(float(off[i]) * 1e3, 4)}
               for i in np.argsort(wall)[::-1][:SLOWEST_SPLIT_N]]
    return {"on_cpu": stats_ms(np.minimum(cpu, wall)), "off_cpu": stats_ms(off), "slowest": slowest}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _virtualized() -> bool | None:
    """True when the CPU says it runs under a hypervisor (the ``hypervisor`` flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return "hypervisor" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return None


def damon_kdamonds_running(root: str = "/sys/kernel/mm/damon/admin/kdamonds") -> int | None:
    """How many DAMON monitors (``kdamond`` kernel threads) are on; None without DAMON's sysfs.

    A VM platform may run one to reclaim guest memory. On the CI VM it wakes every 0.5 s and
    runs ~1.2 ms (up to 4–7 ms) of kernel work that a thread waking on that CPU waits out: 0–3
    of ~10 stall episodes per traced 30 s run, 7 of 12 slow blocks in another
    (docs/performance_log.md, "Where the last tails come from").
    """
    try:
        names = os.listdir(root)
    except OSError:
        return None
    n = 0
    for name in names:
        try:
            with open(os.path.join(root, name, "state"), encoding="ascii") as f:
                n += f.read().strip() == "on"
        except OSError:
            continue
    return n


def machine_info() -> dict:
    """What the figures were measured on: CPU model, cores, Python, OS, load average, library versions,
    and what else takes the CPUs: a hypervisor (``virtualized``), DAMON's kernel monitor."""
    info = {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "os": platform.platform(), "kernel": platform.release(), "machine": platform.machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
    try:
        from controller.lsl_config import ensure_lsl_config
        ensure_lsl_config()   # before liblsl loads, or it never reads the loopback-only config
        import pylsl
        info["pylsl"] = pylsl.__version__
        info["liblsl"] = pylsl.library_version()
    except Exception as exc:  # the suite still describes the machine without LSL
        info["pylsl"] = f"unavailable: {exc}"
    try:
        with open("/sys/kernel/realtime", encoding="utf-8") as f:
            info["preempt_rt"] = f.read().strip() == "1"
    except OSError:
        info["preempt_rt"] = False
    info["virtualized"] = _virtualized()
    info["damon_kdamonds_running"] = damon_kdamonds_running()
    return info


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc children lists)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def check_duration(name: str, value: float, lo: float = 0.5, hi: float = 3600.0) -> float:
    """``value`` as float if ``lo <= value <= hi``; else ValueError naming ``name``."""
    v = float(value)
    if not (lo <= v <= hi):
        raise ValueError(f"{name}={value!r} invalid, expected {lo:g}..{hi:g} s")
    return v
