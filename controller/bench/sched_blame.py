"""Which thread held the CPU while a slow block waited: a benchmark's slowest blocks against a scheduler trace.

    perf record -e sched:sched_switch -e sched:sched_wakeup -a -k CLOCK_MONOTONIC -o perf.data -- \\
        stimloop bench --scenario spike_triggered --no-peers --duration 30 --json bench.json
    perf sched timehist -w -i perf.data > timehist.txt
    stimloop bench blame --timehist timehist.txt --json bench.json

The spike scenarios record their slowest 1 ms blocks (``slowest_blocks``: push →
done, on the LSL clock, which on Linux is ``CLOCK_MONOTONIC``) and the pids of the
controller and the simulator. ``perf sched timehist`` prints one line per context
switch: the task switched out, how long it waited for a CPU after its wake-up
(``sch delay``) and how long it ran. For every slow block this module finds the
tasks that waited at least ``min_wait_ms`` for a CPU inside the block's window, and
what ran on that CPU while they waited. A CPU that was *idle* while a woken task
waited for it was not running at all: on a VM, the host had not scheduled that
vCPU (its steal time); on bare metal, a deep idle state (see low-latency mode).

Pure functions over text and dicts (``parse_timehist``, ``blame``, ``summarize``);
``stimloop bench blame`` reads the files and prints the table.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

__all__ = ["Switch", "parse_timehist", "blame", "summarize", "trace_span", "idle_cause", "IDLE_LABEL", "SPREAD_LABEL",
           "ALL_IDLE_LABEL", "LONG_TURN", "HOST_CAUSE"]

#: why an idle CPU does not run a woken task at once, on a VM in low-latency mode (idle CPUs poll)
HOST_CAUSE = "vCPU not running: host"
#: what an idle CPU that kept a woken task waiting is called in the summary (on a VM in low-latency mode)
IDLE_LABEL = f"idle CPU ({HOST_CAUSE})"
#: a slow block in which no task waited ``min_wait_ms`` for a CPU, and nothing else stands out
SPREAD_LABEL = "no single wait (several small delays)"
#: no task waited for a CPU, yet every CPU sat idle through most of the block: the thread the
#: block needed was asleep and its timer or wake-up came late, which on a VM is the host not
#: running the vCPU (the guest sees an idle CPU, and no wait: the wake-up itself was late)
ALL_IDLE_LABEL = f"every CPU idle: a timer or wake-up came late ({HOST_CAUSE})"
#: prefix for a block covered mostly by one task's turn on a CPU (on a VM, a turn much longer than
#: the task's usual ones can be the host's: the guest counts a preempted vCPU's time as its task's)
LONG_TURN = "long turn: "

# "   17574.646268 [0000]  python[15551/15545]     4.903      3.956      0.010"
_ROW = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")
_TASK = re.compile(r"^(.*?)\[(\d+)(?:/(\d+))?\]$")


@dataclass(frozen=True)
class Switch:
    """One task's turn on a CPU, ending at a context switch (times in s, durations in ms)."""
    t_out: float
    cpu: int
    task: str          # as perf prints it: "comm[tid/pid]", "comm[tid]" or "<idle>"
    wait_ms: float     # off the CPU before this turn
    sch_delay_ms: float  # woken → on the CPU
    run_ms: float

    @property
    def t_in(self) -> float:
        return self.t_out - self.run_ms / 1e3

    @property
    def t_woken(self) -> float:
        return self.t_in - self.sch_delay_ms / 1e3

    @property
    def comm(self) -> str:
        m = _TASK.match(self.task)
        return m.group(1) if m else self.task

    @property
    def pid(self) -> int | None:
        """The process id (a thread's tgid; a single-threaded task's own id); None for ``<idle>``."""
        m = _TASK.match(self.task)
        if not m:
            return None
        return int(m.group(3) or m.group(2))


def parse_timehist(text: str) -> list[Switch]:
    """The context-switch lines of ``perf sched timehist [-w]`` output, in file order.

    Header lines and wake-up lines (``awakened: ...``, printed with ``-w``) are skipped.
    """
    out = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            t, cpu, task, wait, sch, run = m.groups()
            out.append(Switch(float(t), int(cpu), task.strip(), float(wait), float(sch), float(run)))
    return out


def idle_cause(virtualized: bool | None, low_latency: str | None) -> str:
    """Why an idle CPU kept a woken task waiting, from the run's ``machine`` record (pure).

    In low-latency mode an idle CPU polls and takes a woken task within microseconds, so on a
    VM only the host (not running the vCPU) explains a wait; without it, the CPU was halted and
    its wake-up is what took the time (on a VM the host's too).
    """
    held = isinstance(low_latency, str) and low_latency.startswith("cpu_dma_latency")
    if held:
        return HOST_CAUSE if virtualized else "a polling CPU not taking it: not seen from the guest's scheduler"
    return ("halted vCPU waking: host, low-latency mode off" if virtualized
            else "CPU waking from an idle state: low-latency mode off")


def _label(sw: Switch, roles: dict[int, str], cause: str = HOST_CAUSE) -> str:
    if sw.task == "<idle>":
        return f"idle CPU ({cause})"
    pid = sw.pid
    return f"{roles[pid]} ({sw.comm})" if pid in roles else sw.comm


def blame(switches: list[Switch], windows: list[dict], roles: dict[int, str] | None = None,
          min_wait_ms: float = 0.3, cause: str = HOST_CAUSE) -> list[dict]:
    """For each window (``{"push_t", "done_t", "ms"}``): the waits for a CPU inside it and their blockers.

    A *wait* is a task woken and kept off a CPU for at least ``min_wait_ms`` (its ``sch
    delay``), overlapping the window; its *blockers* are what ran on that CPU meanwhile,
    with how long (ms), largest first. ``roles`` names processes by pid (e.g. the
    controller and the simulator), so their threads read as such. Each result:
    ``{**window, "waits": [{"task", "role", "cpu", "waited_ms", "blockers": [[label, ms], ...]}],
    "turns": [[label, cpu, ms inside the window, whole turn ms], ...], "main": label}``: ``turns``
    are the three longest turns on any CPU overlapping the window; ``main`` is the blocker that
    held the waiting tasks longest. When nothing waited that long: ``LONG_TURN`` + the task whose
    one turn covers half the window or more, else ``ALL_IDLE_LABEL`` when every CPU was idle
    for half of it or more, else ``SPREAD_LABEL``. ``cause`` says why an idle CPU did not run
    a woken task (``idle_cause``; the labels above are for the default, a VM in low-latency mode).
    """
    roles = roles or {}
    by_cpu: dict[int, list[Switch]] = {}
    for sw in switches:
        by_cpu.setdefault(sw.cpu, []).append(sw)
    for rows in by_cpu.values():
        rows.sort(key=lambda s: s.t_out)
    outs = {cpu: [s.t_out for s in rows] for cpu, rows in by_cpu.items()}
    waits_all = [s for s in switches if s.sch_delay_ms >= min_wait_ms and s.task != "<idle>"]
    results = []
    for w in windows:
        t0, t1 = float(w["push_t"]), float(w["done_t"])
        waits = []
        held: dict[str, float] = {}
        for s in waits_all:
            if s.t_woken >= t1 or s.t_in <= t0:
                continue
            rows, ts = by_cpu[s.cpu], outs[s.cpu]
            blockers: dict[str, float] = {}
            # Turns on this CPU that ended after the wake-up and began before this task got on.
            for r in rows[bisect.bisect_right(ts, s.t_woken):bisect.bisect_left(ts, s.t_in + 1e-9)]:
                if r is s:
                    continue
                overlap = min(r.t_out, s.t_in) - max(r.t_in, s.t_woken)
                if overlap > 0:
                    lab = _label(r, roles, cause)
                    blockers[lab] = blockers.get(lab, 0.0) + overlap * 1e3
            for lab, ms in blockers.items():
                held[lab] = held.get(lab, 0.0) + ms
            waits.append({"task": s.task, "role": _label(s, roles, cause), "cpu": s.cpu,
                          "waited_ms": round(s.sch_delay_ms, 3),
                          "blockers": [[lab, round(ms, 3)] for lab, ms in
                                       sorted(blockers.items(), key=lambda kv: -kv[1])]})
        span_ms = max((t1 - t0) * 1e3, 1e-9)
        turns, idle_ms = [], {cpu: 0.0 for cpu in by_cpu}
        for cpu, rows in by_cpu.items():
            for r in rows[bisect.bisect_right(outs[cpu], t0):]:
                if r.t_in >= t1:
                    break
                inside = (min(r.t_out, t1) - max(r.t_in, t0)) * 1e3
                if inside <= 0:
                    continue
                if r.task == "<idle>":
                    idle_ms[cpu] += inside
                else:
                    turns.append([_label(r, roles, cause), cpu, round(inside, 3), round(r.run_ms, 3)])
        turns.sort(key=lambda x: -x[2])
        if held:
            main = max(held, key=held.get)
        elif turns and turns[0][2] >= span_ms / 2:
            main = LONG_TURN + turns[0][0]
        elif idle_ms and all(ms >= span_ms / 2 for ms in idle_ms.values()):
            main = f"every CPU idle: a timer or wake-up came late ({cause})"
        else:
            main = SPREAD_LABEL
        results.append({**w, "waits": waits, "turns": turns[:3], "main": main})
    return results


def summarize(results: list[dict]) -> dict[str, dict[str, int]]:
    """How many slow blocks, and how many *episodes*, each main blocker explains (most first).

    Blocks whose windows overlap are one episode (one stall delays the blocks queued
    behind it); an episode takes the main blocker of its slowest block.
    """
    blocks: dict[str, int] = {}
    for r in results:
        blocks[r["main"]] = blocks.get(r["main"], 0) + 1
    episodes: dict[str, int] = {}
    group: list[dict] = []
    for r in sorted(results, key=lambda r: r["push_t"]) + [None]:
        if group and (r is None or r["push_t"] > max(g["done_t"] for g in group)):
            main = max(group, key=lambda g: g["ms"])["main"]
            episodes[main] = episodes.get(main, 0) + 1
            group = []
        if r is not None:
            group.append(r)

    def ranked(d: dict) -> dict:
        return dict(sorted(d.items(), key=lambda kv: -kv[1]))
    return {"blocks": ranked(blocks), "episodes": ranked(episodes)}


def trace_span(switches: list[Switch]) -> tuple[float, float] | None:
    """First and last switch time of the trace (s), None when empty."""
    if not switches:
        return None
    ts = [s.t_out for s in switches]
    return min(ts), max(ts)
