"""Low-latency mode: keep the CPUs out of idle states while a session or benchmark runs (PM QoS).

An idle CPU halts (here a vCPU: the hypervisor deschedules it); waking it for the
next 1 ms chunk or command costs tens to hundreds of µs, every time, with cold
caches. Linux's PM QoS interface lets a process forbid that: write the largest
tolerable wake-up latency (0 µs) to ``/dev/cpu_dma_latency`` and keep the file
open; idle CPUs then poll instead of halting until it is closed (the kernel's
``Documentation/power/pm_qos_interface.rst``; ``cyclictest`` does the same).

On by default in sessions (``session.low_latency``) and benchmarks
(``--no-low-latency`` to turn it off), as ``cyclictest`` holds it by default.
Price: idle cores stay busy polling (power, and the host sees busy vCPUs), and
the device needs write access (root, or a udev rule for your user). Never
required: when the device cannot be written, the run goes on without it and
says so. Measured on the 2-core CI VM (``stimloop bench ads --duration 30``):
spike → command p50 0.39–0.49 ms, p99 0.90–1.09 ms without; p50 0.30 ms, p99
0.48–0.54 ms with.

Also here: what the host took. On a VM the hypervisor now and then runs something
else on a vCPU that wanted to run (its *steal* time, ``steal_ms``); a session and
every benchmark record how much over their span, so a tail can be told apart from
one of the machine's own (docs/performance_log.md, "Where the last tails come from"),
and what each process used (``CpuMeter``). And ``freeze_gc``: start-up's objects kept out of
Python's full garbage collections, which otherwise held a loop for ~40 ms about once a minute.
"""
from __future__ import annotations

import contextlib
import gc
import os
import struct
import time
from typing import Iterator

__all__ = ["LowLatency", "PM_QOS_DEVICE", "DEFAULT_NICE", "set_nice", "nice_while", "nice_for", "freeze_gc", "parse_steal_ms",
           "steal_ms", "steal_since", "cpu_seconds", "CpuMeter"]

PM_QOS_DEVICE = "/dev/cpu_dma_latency"


#: The controller's processes run at this nice value by default (``session.nice``, ``stimloop bench --nice``).
#: Not a busy-polling one (:func:`nice_for`).
DEFAULT_NICE = -10


def nice_for(nice: int | None, busy_poll: bool) -> int | None:
    """The nice value a process that waits for samples should run at: ``nice``, unless it busy-polls.

    A raised priority pays off for a thread that sleeps until a sample lands: it wins the CPU as
    it wakes. A busy-polling thread never sleeps; raised, it crowds out the other tasks of its core
    (under EEVDF its ``sched_yield`` gives way for a shorter time the heavier it is). Measured on the
    2-core VM, spike path p99 0.94 and 1.84 ms at nice -10 against 0.62 and 0.63 at 0
    (docs/performance_log.md, "Priority"). So a busy-polling process keeps its inherited priority (``None``).
    """
    return None if busy_poll else nice


def freeze_gc() -> str:
    """Collect once, then keep every object alive now out of later collections (``gc.freeze``).

    Python's full (generation-2) collection walks every tracked object, and a loop process
    holds 80–90 thousand once started (numpy, onnxruntime, pydantic, pylsl, the policy): one
    took 42 ms on the 2-core CI VM, about once a minute in an ADS session (measured with
    ``gc.callbacks`` in the loop process, 2026-12-07), and the loop does nothing else
    meanwhile, so a spike whose pulse falls due then is refused as too late. After a freeze a
    full collection walks only what was made since: 0.2 ms in the same session. Call it once
    start-up is done and before the real-time work (ARCHITECTURE.md lists it among the
    real-time options); objects made later are collected as before. Returns the status for
    the record, e.g. ``"froze 82426 objects"``.
    """
    gc.collect()
    gc.freeze()
    return f"froze {gc.get_freeze_count()} objects"


def set_nice(nice: int) -> str:
    """Run the calling thread at ``nice`` (-20 highest priority .. 19), and the threads it starts after.

    Returns the status for the record: ``"nice -10"``, or ``"unavailable: <why>"``
    when raising the priority is not permitted (needs root or ``CAP_SYS_NICE``, or
    an ``RLIMIT_NICE`` allowing it); the caller then goes on at its old priority.
    Never raises for that. On Linux a nice value belongs to a thread, not a
    process: call this before starting threads (liblsl starts its own when an
    inlet opens), and in each process that needs it; processes spawned later inherit it.
    """
    if not (isinstance(nice, int) and not isinstance(nice, bool) and -20 <= nice <= 19):
        raise ValueError(f"nice={nice!r} invalid, expected an integer -20..19")
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)   # who=0: the calling thread on Linux
    except OSError as exc:
        return f"unavailable: nice {nice}: {exc.strerror or exc}"
    return f"nice {nice}"


@contextlib.contextmanager
def nice_while(nice: int | None) -> Iterator[str]:
    """The calling thread at ``nice`` inside the block, its old value back after; yields the status.

    For a benchmark that runs the controller in the caller's own thread: start
    the simulator's processes before entering, or they inherit it. ``None``
    leaves the priority alone (status ``"unchanged"``).
    """
    if nice is None:
        yield "unchanged"
        return
    old = os.getpriority(os.PRIO_PROCESS, 0)
    status = set_nice(nice)
    try:
        yield status
    finally:
        if status.startswith("nice"):
            try:
                os.setpriority(os.PRIO_PROCESS, 0, old)   # going back up from a raised priority is always allowed
            except OSError:
                pass


class LowLatency:
    """Hold a PM QoS CPU wake-up latency request for as long as the object is entered.

    ``with LowLatency() as ll: ...``; ``ll.status`` says what was obtained
    (``"cpu_dma_latency 0 µs held"`` or ``"unavailable: <why>"``) for the record.
    ``enabled=False`` does nothing (status ``"off"``), so callers need no branch.
    """

    def __init__(self, enabled: bool = True, max_latency_us: int = 0, device: str = PM_QOS_DEVICE) -> None:
        if not (isinstance(max_latency_us, int) and 0 <= max_latency_us <= 1_000_000):
            raise ValueError(f"max_latency_us={max_latency_us!r} invalid, expected an integer 0..1000000 µs")
        self.enabled = bool(enabled)
        self.max_latency_us = max_latency_us
        self.device = device
        self.status = "off"
        self._fd: int | None = None

    def acquire(self) -> str:
        """Make the request (idempotent); returns and records the status. Never raises for an unwritable device."""
        if not self.enabled or self._fd is not None:
            return self.status
        try:
            fd = os.open(self.device, os.O_WRONLY)
        except OSError as exc:
            self.status = f"unavailable: {self.device}: {exc.strerror or exc}"
            return self.status
        try:
            os.write(fd, struct.pack("i", self.max_latency_us))   # the request lasts while fd is open
        except OSError as exc:
            os.close(fd)
            self.status = f"unavailable: writing {self.device}: {exc.strerror or exc}"
            return self.status
        self._fd = fd
        self.status = f"cpu_dma_latency {self.max_latency_us} µs held"
        return self.status

    def release(self) -> None:
        """Withdraw the request (closing the file is what withdraws it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.status = "released"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "LowLatency":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_steal_ms(proc_stat: str, clk_tck: int = _CLK_TCK) -> dict[str, float]:
    """Per-CPU steal time in ms since boot, from the text of /proc/stat (pure).

    Steal is the time a virtual CPU wanted to run and the hypervisor ran something
    else: the 8th value of each ``cpuN`` line, in clock ticks (10 ms with the usual
    USER_HZ = 100, so a figure has that resolution). CPUs whose line has no steal
    value (kernels before 2.6.11) are left out.
    """
    out = {}
    for line in proc_stat.splitlines():
        f = line.split()
        if len(f) > 8 and f[0].startswith("cpu") and f[0] != "cpu":
            out[f[0]] = int(f[8]) * 1000.0 / clk_tck
    return out


def steal_ms() -> dict[str, float] | None:
    """``parse_steal_ms`` of this machine's /proc/stat; None where there is none (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return parse_steal_ms(f.read())
    except OSError:
        return None


def steal_since(before: dict[str, float] | None) -> dict | None:
    """Steal since ``before`` (a ``steal_ms()`` reading): ``{"total": ms, "per_cpu": {...}}``; None if
    either reading is missing. What the hypervisor took from this machine over that span."""
    after = steal_ms()
    if not before or not after:
        return None
    per = {c: round(after[c] - v, 1) for c, v in before.items() if c in after}
    return {"total": round(sum(per.values()), 1), "per_cpu": per}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all its threads), from ``/proc``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may contain spaces: fields start after its closing parenthesis.
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuMeter:
    """CPU use per named process over an interval: ``start()``, then ``stop() -> {name: percent of one core}``.

    After ``stop()``, ``host_steal_ms`` holds the CPU time the hypervisor took from this
    machine over the same interval: ``{"total": ms, "per_cpu": {"cpu0": ms, ...}}`` (10 ms
    resolution, see ``parse_steal_ms``), None where the kernel does not say. On a VM it is
    what tells a scheduling tail of the machine's own from one of the host's.
    """

    def __init__(self, pids: dict[str, int]):
        self.pids = {k: int(v) for k, v in pids.items() if v is not None}
        self._t0 = None
        self._c0: dict[str, float | None] = {}
        self._s0: dict[str, float] | None = None
        self.host_steal_ms: dict | None = None

    def start(self) -> "CpuMeter":
        self._t0 = time.monotonic()
        self._c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._s0 = steal_ms()
        return self

    def stop(self) -> dict:
        if self._t0 is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        wall = max(time.monotonic() - self._t0, 1e-9)
        out = {}
        for k, p in self.pids.items():
            c1, c0 = cpu_seconds(p), self._c0.get(k)
            out[k] = None if c1 is None or c0 is None else round(100.0 * (c1 - c0) / wall, 1)
        self.host_steal_ms = steal_since(self._s0)
        return out
