"""Outputs of ``stimloop bench``: JSON, one PNG histogram per stage, a Markdown table, rich tables."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from controller.bench.common import SEIZURE_P99_TARGET_MS, SPIKE_P99_TARGET_MS, STAT_KEYS
from controller.bench.peers.harness import OURS
from controller.bench.suite import failures, strip_raw

_HEAD = ("p50", "p90", "p99", "p99.9", "max", "jitter p99−p50", "n")


def fmt(v) -> str:
    if v is None:   # no value: not measured, failed, or too few samples for that percentile (stats_ms)
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _bound_note(tp: dict) -> str:
    """After the sweep's largest passing count: whether it is the machine's limit or only a lower bound."""
    if tp.get("max_channels_at_30khz") is None or tp.get("limit_found") is not False:
        return ""
    return " (a lower bound: no point failed, up to the sweep's largest)"


def _with_ci(ratio, ci) -> str:
    """``1.672 (1.45–1.92)``: a ratio with its 95 % interval when there is one."""
    return fmt(ratio) if not ci or ratio is None else f"{fmt(ratio)} ({ci[0]:.2f}–{ci[1]:.2f})"


def _row(stats: dict) -> list[str]:
    return [fmt(stats.get(k)) for k in STAT_KEYS] + [fmt(stats.get("jitter_p99_p50")), fmt(stats.get("n"))]


def _ran(entry) -> bool:
    """A scenario or peer entry with figures (failed and skipped ones keep the keys, empty)."""
    return isinstance(entry, dict) and "end_to_end_ms" in entry and not entry.get("error") and not entry.get("skipped")


def _why_not(entry) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    return f"error: {entry['error']}" if entry.get("error") else f"skipped: {entry.get('skipped')}"



def target_verdicts(doc: dict) -> list[dict]:
    """Each target of the suite, what the run measured, and whether it was met (pure).

    Rows ``{"target", "measured", "met"}``; ``met`` is True, False, or None when the run cannot
    say (a part not run, failed, or with too few values for a p99). For stimloop against the
    peers, a p99 above a peer's is "not met" even when the ratio's 95 % interval holds 1: the
    row says the interval, so a reader can tell a measured difference from noise. The blocking
    stimloop is held to the peers that block (not the busy-polling floor, which spends a core
    waiting: the busy-polling stimloop is held to it and to every other peer).
    """
    rows = []
    sc = doc.get("scenarios") or {}

    def p99_row(name: str, label: str, limit: float) -> None:
        e = sc.get(name)
        if e is None:
            return
        p99 = (e.get("end_to_end_ms") or {}).get("p99") if _ran(e) else None
        n = (e.get("end_to_end_ms") or {}).get("n", 0) if _ran(e) else 0
        measured = (_why_not(e) if not _ran(e) else
                    f"p99 {fmt(p99)} ms" if p99 is not None else f"no p99 (n = {n} < 100)")
        if p99 is not None:
            measured += over_target_note(e.get("end_to_end_over_target"))
        rows.append({"target": f"{label} p99 ≤ {limit:g} ms", "measured": measured,
                     "met": None if p99 is None else bool(p99 <= limit)})

    p99_row("spike_triggered", "spike-triggered path", SPIKE_P99_TARGET_MS)
    p99_row("spike_triggered_busy_poll", "spike-triggered path, busy poll", SPIKE_P99_TARGET_MS)
    p99_row("spike_triggered_session", "spike-triggered path in a session", SPIKE_P99_TARGET_MS)
    p99_row("seizure_loop", "seizure loop", SEIZURE_P99_TARGET_MS)
    tp = doc.get("throughput") or {}
    if "throughput" in sc:
        rows.append({"target": tp.get("target") or "zero drops at 64 ch × 30 kHz",
                     "measured": f"max_channels_at_30khz = {fmt(tp.get('max_channels_at_30khz'))}{_bound_note(tp)}",
                     "met": tp.get("target_met")})
    peers = doc.get("peers") or {}
    cis = doc.get("peer_ratio_ci95") or {}
    for ours in OURS:
        mine = peers.get(ours)
        others = {k: v for k, v in peers.items() if k not in OURS and _ran(v)
                  and (ours.endswith("_busy_poll") or not k.endswith("_busy_poll"))}
        if mine is None or not others:
            continue
        p = mine["end_to_end_ms"].get("p99") if _ran(mine) else None
        theirs = {k: v["end_to_end_ms"].get("p99") for k, v in others.items()}
        if p is None or None in theirs.values():
            rows.append({"target": f"{ours} p99 ≤ every peer's", "met": None,
                         "measured": _why_not(mine) if not _ran(mine) else "no p99 on one side (n < 100)"})
            continue
        above = {k: v for k, v in theirs.items() if p > v}
        worst = max(theirs, key=lambda k: p / theirs[k])
        ci = ((cis.get(ours) or {}).get(worst) or {}).get("p99")
        rows.append({"target": f"{ours} p99 ≤ every peer's",
                     "measured": f"p99 {fmt(p)} ms; highest ratio {p / theirs[worst]:.2f} against {worst} "
                                 f"({fmt(theirs[worst])} ms" + (f", 95 % interval {ci[0]:g}–{ci[1]:g})" if ci else ")") +
                                 (f"; above {', '.join(sorted(above))}" if above else "") +
                                 (f": {_ratio_settled(ci)}" if ci else ""),
                     "met": not above})
    return rows


def _ratio_settled(ci) -> str:
    """What a ratio's 95 % interval says about "stimloop at or below the peer" (the words of ``over_target_note``)."""
    return ("at or below it at 95 % confidence" if ci[1] <= 1.0 else
            "above it at 95 % confidence" if ci[0] > 1.0 else "this run cannot tell")


def over_target_note(over: dict | None) -> str:
    """``"; 2 of 136 over 1 ms (1.5 %, 95 % interval 0.18–5.21 %): this run cannot tell"`` (pure).

    The interval has two decimals: at one, a top of 1.04 % would read "1.0 %", which looks settled.

    A p99 target allows 1 % of the values over the limit. The note says whether the run's
    sample settles the verdict: the whole interval of the share under 1 % (met, beyond the luck
    of a few values), over it (missed), or across it ("this run cannot tell"; a longer run can:
    with none over, it takes 368 values for the interval to end under 1 %).
    Empty when the entry has no such record (a document from before it was kept).
    """
    if not over or over.get("share") is None or not over.get("share_ci95"):
        return ""
    lo, hi = over["share_ci95"]
    settled = ("under 1 % at 95 % confidence" if hi < 0.01 else
               "over 1 % at 95 % confidence" if lo > 0.01 else "this run cannot tell")
    return (f"; {over['n_over']} of {over['n']} over {over['limit_ms']:g} ms ({100 * over['share']:.1f} %, "
            f"95 % interval {100 * lo:.2f}–{100 * hi:.2f} %): {settled}")


def _met(v) -> str:
    return "–" if v is None else ("yes" if v else "no")


def interference_line(doc: dict) -> str:
    """What else had the CPUs during the run: the hypervisor's steal per scenario, DAMON's monitor (pure)."""
    m = doc.get("machine", {})
    parts = [f"virtualized: {fmt(m.get('virtualized'))}",
             f"DAMON kdamonds running: {fmt(m.get('damon_kdamonds_running'))}"]
    steal = {name: (sc.get("host_steal_ms") or {}).get("total") for name, sc in doc.get("scenarios", {}).items()
             if isinstance(sc, dict) and sc.get("host_steal_ms")}
    if steal:
        parts.append("host steal (ms, all CPUs, 10 ms resolution): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in steal.items() if v is not None))
    return "; ".join(parts)


def scenario_rows(doc: dict):
    """``(scenario, stage, stats)`` for every stage and the end to end of every scenario that ran."""
    for name, sc in doc.get("scenarios", {}).items():
        if not _ran(sc):
            continue
        for stage, st in sc.get("stages_ms", {}).items():
            yield name, stage, st
        yield name, "end_to_end", sc["end_to_end_ms"]


CPU_SPLIT_HEAD = ("on-CPU p50", "on-CPU p99", "off-CPU p99", "off-CPU max", "slowest: wall / off-CPU")


def cpu_split_rows(doc: dict, slowest_n: int | None = None):
    """``(scenario, span, cells)`` for every loop span a scenario split into on- and off-CPU time
    (the last cell: its ``slowest_n`` slowest spans, all that were kept by default)."""
    for name, sc in doc.get("scenarios", {}).items():
        if not _ran(sc):
            continue
        for span, split in (sc.get("cpu_split_ms") or {}).items():
            on, off = split["on_cpu"], split["off_cpu"]
            slowest = ", ".join(f"{fmt(x['wall_ms'])} / {fmt(x['off_cpu_ms'])}"
                                for x in split.get("slowest", [])[:slowest_n])
            yield name, span, [fmt(on["p50"]), fmt(on["p99"]), fmt(off["p99"]), fmt(off["max"]), slowest or "–"]


def write_json(doc: dict, path: str | Path) -> Path:
    """The document without raw arrays, strict JSON (no NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strip_raw(doc), indent=1, allow_nan=False, default=float))
    return path


def write_pngs(doc: dict, out_dir: str | Path) -> list[Path]:
    """One latency histogram per stage (and per peer) that has raw samples; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for name, sc in doc.get("scenarios", {}).items():
        for stage, vals in (sc.get("_raw_s") or {}).items():
            series.append((f"{name}__{stage}", f"{name}: {stage}", vals))
    for peer, r in (doc.get("peers") or {}).items():
        if isinstance(r, dict):
            for stage, vals in (r.get("_raw_s") or {}).items():
                series.append((f"peer_{peer}__{stage}", f"peer {peer}: {stage}", vals))
    files = []
    for fname, title, vals in series:
        v = np.asarray(vals, float) * 1e3
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(v, bins=min(60, max(5, int(math.sqrt(v.size)) * 2)), color="#4477aa")
        for q, style in ((50, "-"), (99, "--")):
            x = float(np.percentile(v, q))
            ax.axvline(x, color="k", ls=style, lw=1, label=f"p{q} {x:.3f} ms")
        ax.set_xlabel("latency, ms")
        ax.set_ylabel("count")
        ax.set_title(f"{title} (n={v.size})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", fname) + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def markdown(doc: dict) -> str:
    """Markdown: machine, per-scenario stage tables, throughput, peers and the stimloop/peer ratio table."""
    m = doc.get("machine", {})
    lines = [f"# stimloop bench — {m.get('time', '')}", "",
             f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, Python {m.get('python')}, {m.get('os')}, "
             f"load average {m.get('load_average')}, PREEMPT_RT: {m.get('preempt_rt')}. "
             f"Duration per scenario: {doc.get('settings', {}).get('duration_s')} s"
             f"{' (quick)' if doc.get('settings', {}).get('quick') else ''}.", "",
             f"Sharing the CPUs: {interference_line(doc)}.", ""]
    verdicts = target_verdicts(doc)
    if verdicts:
        lines += ["## Targets (issue #5)", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {v['target']} | {v['measured']} | {_met(v['met'])} |" for v in verdicts]
        lines.append("")
    lines += ["## Scenarios (ms)", "", "| scenario | stage | " + " | ".join(_HEAD) + " |",
              "|---|---|" + "---:|" * len(_HEAD)]
    for name, stage, st in scenario_rows(doc):
        lines.append(f"| {name} | {stage} | " + " | ".join(_row(st)) + " |")
    lines.append("")
    for name, sc in doc.get("scenarios", {}).items():
        extra = {k: sc.get(k) for k in ("dropped_samples", "deadline_misses", "cpu_percent", "commands",
                                       "skipped", "error") if k in sc}
        lines.append(f"- **{name}**: " + ", ".join(f"{k} = {fmt(v)}" for k, v in extra.items()))
    split = list(cpu_split_rows(doc))
    if split:
        lines += ["", "Where the loop thread spent its own spans (ms): on the CPU, or off it (waiting for a "
                      "core, or its vCPU held by the host); a slow span mostly off the CPU was the machine's:", "",
                  "| scenario | span | " + " | ".join(CPU_SPLIT_HEAD) + " |", "|---|---|" + "---:|" * len(CPU_SPLIT_HEAD)]
        lines += [f"| {name} | {span} | " + " | ".join(cells) + " |" for name, span, cells in split]
    tp = doc.get("throughput") or {}
    lines += ["", "## Throughput (30 kHz)", "", f"max_channels_at_30khz = {fmt(tp.get('max_channels_at_30khz'))}{_bound_note(tp)} "
              f"(target: {tp.get('target', '–')}, met: {fmt(tp.get('target_met'))})"
              + (f"; error: {tp['error']}" if tp.get("error") else "")
              + (f". A point passes if {tp['pass_rule']}." if tp.get("pass_rule") else ""), ""]
    sweep = doc.get("scenarios", {}).get("throughput", {}).get("sweep", [])
    if sweep:
        lines += ["| channels | MB/s | pushed / due | dropped | outlet behind, ms | ring visible p50 | p99 | max | CPU % | passed |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for p in sweep:
            rv = p["stages_ms"]["ring_visible"]
            verdict = "yes" if p.get("passed") else "no: " + "; ".join(p.get("fail_reasons") or [])
            lines.append(f"| {p['n_channels']} | {p['mb_per_s']} | {p['pushed_samples']} / {fmt(p.get('due_samples'))} | "
                         f"{p['dropped_samples']} | {fmt(p.get('outlet_max_behind_ms'))} | "
                         f"{fmt(rv['p50'])} | {fmt(rv['p99'])} | {fmt(rv['max'])} | {p['cpu_percent']} | {verdict} |")
    peers = doc.get("peers") or {}
    if peers:
        lines += ["", "## Peers: same stream, same machine (end to end, ms)", ""]
        ps = doc.get("peer_stream")
        if ps:
            lines += [f"Stream: {ps['fs_hz']:g} Hz × {ps['n_channels']} ch, {ps['chunk_n']} sample(s) per push, "
                      f"pulses at ~{ps['pulse_rate_hz']:g} Hz; output = one byte on a pty (stimloop: a TRIGGER "
                      f"frame to the emulator), stamped on the LSL clock on arrival; "
                      f"{ps.get('rounds', 1)} round(s), peers in rotated order each round, figures pooled.", ""]
        lines += ["| peer | " + " | ".join(_HEAD) + " | detected | missed | refused | CPU % |",
                  "|---|" + "---:|" * (len(_HEAD) + 4)]
        for name, r in peers.items():
            if not _ran(r):
                lines.append(f"| {name} | {_why_not(r)} |")
                continue
            lines.append(f"| {name} | " + " | ".join(_row(r["end_to_end_ms"])) +
                         f" | {r['detected']}/{r['pulses']} | {r['missed']} | {fmt(r.get('refused'))} | {r['cpu_percent']} |")
        lines += ["", "(refused: the safety governor's refusals, scored as missed; – for peers without a governor.)"]
        ratios = doc.get("peer_ratios") or {}
        cis = doc.get("peer_ratio_ci95") or {}
        if ratios:
            lines += ["", "Ratio stimloop / peer (> 1: stimloop slower), p50 and p99 with their 95 % interval "
                          "(bootstrap over rounds, then pulses; none under 3 rounds): an interval that holds 1 "
                          "means this run cannot tell the two apart there:", "",
                      "| stimloop | peer | p50 | p90 | p99 | p99.9 | max |", "|---|---|---:|---:|---:|---:|---:|"]
            for ours, by_peer in ratios.items():
                for name, r in by_peer.items():
                    ci = (cis.get(ours) or {}).get(name) or {}
                    lines.append(f"| {ours} | {name} | " +
                                 " | ".join(_with_ci(r.get(k), ci.get(k)) for k in STAT_KEYS) + " |")
        for ours, own in peers.items():
            stages = own.get("stages_ms") if _ran(own) else None
            if not stages:
                continue
            lines += ["", f"Where the `{ours}` peer's time goes (per command, ms): what it does beyond the pylsl "
                          "floor is the ring, the governor and a framed, acknowledged command:", "",
                      "| stage | " + " | ".join(_HEAD) + " |", "|---|" + "---:|" * len(_HEAD)]
            for stage, st in stages.items():
                lines.append(f"| {stage} | " + " | ".join(_row(st)) + " |")
    failed = failures(doc)
    if failed:
        lines += ["", "## Failed", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(doc))
    return path


def rich_tables(doc: dict) -> list:
    """Rich tables for the terminal: scenarios × stages, then peers with ratios."""
    from rich.markup import escape
    from rich.table import Table
    t = Table(title="stimloop bench (ms)", caption=interference_line(doc))
    for col in ("scenario", "stage", *_HEAD):
        t.add_column(col, justify="left" if col in ("scenario", "stage") else "right")
    for name, stage, st in scenario_rows(doc):
        t.add_row(name, stage, *_row(st))
    for name, sc in doc.get("scenarios", {}).items():
        if not _ran(sc):
            t.add_row(name, f"[{'red' if sc.get('error') else 'yellow'}]{escape(_why_not(sc))}[/]", *[""] * len(_HEAD))
    tables = [t]
    split = list(cpu_split_rows(doc, slowest_n=1))
    if split:
        c = Table(title="loop thread: on / off the CPU (ms)")
        for col in ("scenario", "span", *CPU_SPLIT_HEAD):
            c.add_column(col, justify="left" if col in ("scenario", "span") else "right")
        for name, span, cells in split:
            c.add_row(name, span, *cells)
        tables.append(c)
    verdicts = target_verdicts(doc)
    if verdicts:
        v = Table(title="targets (issue #5)")
        for col in ("target", "measured", "met"):
            v.add_column(col)
        for row in verdicts:
            color = {True: "green", False: "red", None: "yellow"}[row["met"]]
            v.add_row(escape(row["target"]), escape(row["measured"]), f"[{color}]{_met(row['met'])}[/]")
        tables.append(v)
    peers = doc.get("peers") or {}
    if peers:
        p = Table(title="peers: end to end (ms), same stream")
        for col in ("peer", "p50", "p99", "max", "missed", "refused"):
            p.add_column(col, justify="left" if col == "peer" else "right")
        for name, r in peers.items():
            if not _ran(r):
                err = isinstance(r, dict) and r.get("error")
                p.add_row(name, f"[{'red' if err else 'yellow'}]{escape(_why_not(r))}[/]", "", "", "", "")
                continue
            e = r["end_to_end_ms"]
            p.add_row(name, fmt(e["p50"]), fmt(e["p99"]), fmt(e["max"]), str(r["missed"]), fmt(r.get("refused")))
            for stage, st in (r.get("stages_ms") or {}).items():
                p.add_row(f"  {stage}", fmt(st["p50"]), fmt(st["p99"]), fmt(st["max"]), "", "")
        tables.append(p)
        ratios = doc.get("peer_ratios") or {}
        if ratios:
            cis = doc.get("peer_ratio_ci95") or {}
            q = Table(title="stimloop / peer (> 1: stimloop slower; 95 % interval over rounds)")
            for col in ("stimloop", "peer", "p50", "p99"):
                q.add_column(col, justify="left" if col in ("stimloop", "peer") else "right")
            for ours, by_peer in ratios.items():
                for name, rr in by_peer.items():
                    ci = (cis.get(ours) or {}).get(name) or {}
                    q.add_row(ours, name, _with_ci(rr.get("p50"), ci.get("p50")), _with_ci(rr.get("p99"), ci.get("p99")))
            tables.append(q)
    return tables
