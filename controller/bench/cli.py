"""``stimloop bench``: latency benchmark suite (mounted by ``controller/cli.py`` as the ``bench`` sub-app).

    stimloop bench [--json F] [--out DIR] [--duration S] [--quick] [--scenario NAME ...] [--no-peers]
    stimloop bench loopback [--port P --stream NAME --channel K]
    stimloop bench setup-timeflux
    stimloop bench blame --timehist T --json F
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from controller.cli_checks import output_file
from controller.low_latency import DEFAULT_NICE
from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()   # every bench path loads liblsl; its config must be in place first

app = typer.Typer(help="Latency benchmarks: scenarios, throughput sweep, peers side by side, hardware loopback.",
                  invoke_without_command=True, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def bench(ctx: typer.Context,
          json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here", callback=output_file),
          out: Optional[Path] = typer.Option(None, "--out", help="folder for the PNG histograms, bench.md and bench.json"),
          duration: float = typer.Option(10.0, "--duration", help="seconds per scenario and per peer (1..3600)"),
          quick: bool = typer.Option(False, "--quick", help="a few seconds per scenario, cheap peers only (tests)"),
          scenario: Optional[List[str]] = typer.Option(None, "--scenario",
                                                       help="spike_triggered | spike_triggered_busy_poll | spike_triggered_session | seizure_loop | throughput (repeatable; default all)"),
          peers: Optional[List[str]] = typer.Option(None, "--peer", help="stimloop | stimloop_busy_poll | pylsl_floor | pylsl_floor_busy_poll | mne_lsl | timeflux (repeatable)"),
          no_peers: bool = typer.Option(False, "--no-peers", help="skip the peer comparison"),
          low_latency: bool = typer.Option(True, "--low-latency/--no-low-latency",
                                           help="hold a PM QoS request (/dev/cpu_dma_latency = 0) for the whole run, "
                                                "as cyclictest does: CPUs poll instead of halting; same for every peer"),
          nice: int = typer.Option(DEFAULT_NICE, "--nice", min=-20, max=19,
                                   help="nice value of the controller's processes and the stimloop peers, as "
                                        "session.nice (below 0 needs root or CAP_SYS_NICE); simulators and the "
                                        "other peers keep the default")) -> None:
    """Run all scenarios (or the ``--scenario`` ones) and the peers; print a table, write JSON/PNG/Markdown.

    Exit code 1 (after the JSON/Markdown are written) when a scenario or a peer failed.
    """
    if ctx.invoked_subcommand is not None:
        return
    from controller.bench.peers import PEERS
    from controller.bench.suite import SCENARIOS
    # Every argument is checked before anything runs: a typo must not cost minutes of scenarios first.
    chosen = list(scenario) if scenario else list(SCENARIOS)
    bad = [s for s in chosen if s not in SCENARIOS]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} unknown, expected one of {', '.join(SCENARIOS)}", param_hint="--scenario")
    bad = [p for p in (peers or []) if p not in PEERS]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} unknown, expected one of {', '.join(PEERS)}", param_hint="--peer")
    if not 1.0 <= duration <= 3600:
        raise typer.BadParameter(f"{duration} invalid, expected 1..3600 s", param_hint="--duration")
    from controller.bench.report import rich_tables, write_json, write_markdown, write_pngs
    from controller.bench.suite import failures, run_suite
    console = Console()
    from controller.low_latency import LowLatency
    with LowLatency(low_latency) as qos:
        doc = run_suite(duration, chosen, peers=not no_peers, quick=quick, peer_names=peers or None, console=console,
                        nice=nice)
        doc["machine"]["low_latency"] = qos.status
    for t in rich_tables(doc):
        console.print(t)
    if json_path is not None:
        console.print(f"JSON: {write_json(doc, json_path)}")
    if out is not None:
        write_json(doc, out / "bench.json")
        pngs = write_pngs(doc, out)
        console.print(f"{out}: bench.json, bench.md, {len(pngs)} histogram(s); "
                      f"{write_markdown(doc, out / 'bench.md').name}")
    failed = failures(doc)
    if failed:
        from rich.markup import escape
        console.print(f"[red]{len(failed)} part(s) of the benchmark failed:[/]\n" +
                      "\n".join(f"  {escape(f)}" for f in failed), highlight=False)
        raise typer.Exit(1)


@app.command("loopback")
def loopback(port: Optional[str] = typer.Option(None, "--port", help="stimulator serial port (omit: simulator)"),
             stream: Optional[str] = typer.Option(None, "--stream", help="LSL stream name of the amplifier"),
             channel: Optional[int] = typer.Option(None, "--channel", help="channel wired to the stimulator output"),
             n: int = typer.Option(20, "--n", help="number of triggers (1..10000)"),
             interval: float = typer.Option(3.2, "--interval",
                                            help="s between triggers, 0.05..600 (MACRO: <= 20 bursts/min); "
                                                 "the simulator uses at most 0.4 s"),
             threshold_uv: Optional[float] = typer.Option(None, "--threshold-uv", help="default: 8 σ of the baseline"),
             profile: str = typer.Option("macro", "--profile",
                                         help="safety profile for the triggers (hardware; the simulator uses macro "
                                              "with its rate ceiling raised)"),
             json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here",
                                                      callback=output_file)) -> None:
    """Command → artifact seen in the incoming stream (hardware loopback; simulator without --port)."""
    from controller.bench import loopback as lb
    from controller.bench.report import write_json
    console = Console()
    # Checked before the simulator (or the port) is touched: a bad value costs no start-up.
    if not lb.N_TRIGGERS_RANGE[0] <= n <= lb.N_TRIGGERS_RANGE[1]:
        raise typer.BadParameter(f"{n} invalid, expected {lb.N_TRIGGERS_RANGE[0]}..{lb.N_TRIGGERS_RANGE[1]}",
                                 param_hint="--n")
    if not lb.INTERVAL_RANGE_S[0] <= interval <= lb.INTERVAL_RANGE_S[1]:
        raise typer.BadParameter(f"{interval} invalid, expected {lb.INTERVAL_RANGE_S[0]:g}..{lb.INTERVAL_RANGE_S[1]:g} s",
                                 param_hint="--interval")
    if threshold_uv is not None and not threshold_uv > 0:
        raise typer.BadParameter(f"{threshold_uv} invalid, expected > 0 µV", param_hint="--threshold-uv")
    if port is None:
        if channel is not None and not 0 <= channel < lb.SIM_N_CHANNELS:
            raise typer.BadParameter(f"{channel} invalid, the simulator streams channels 0..{lb.SIM_N_CHANNELS - 1}",
                                     param_hint="--channel")
        sim_interval = min(interval, lb.SIM_MAX_INTERVAL_S)
        if sim_interval < interval:
            console.print(f"simulator: --interval {interval:g} s clamped to {sim_interval:g} s (its governor allows "
                          f"{lb.SIM_OVERRIDES['max_bursts_per_min']} bursts/min; the wait would only lengthen the run)")
    else:
        if not stream or channel is None:
            raise typer.BadParameter("--port needs --stream NAME and --channel K (the channel wired to the output)")
        if channel < 0:
            raise typer.BadParameter(f"{channel} invalid, expected a channel index >= 0", param_hint="--channel")
        try:
            from controller.safety import build_profile
            build_profile(profile)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--profile") from None
    try:
        if port is None:
            res = lb.run_simulated(n_triggers=n, interval_s=sim_interval, channel=channel)
        else:
            res = lb.measure(port, stream, channel, n_triggers=n, interval_s=interval, threshold_uv=threshold_uv,
                             profile=profile)
    except (ValueError, RuntimeError, OSError) as exc:
        # What the stream or the device turned out to be (no such stream, a channel it does not have,
        # a port that does not open): one line, no traceback.
        from rich.markup import escape
        console.print(f"[red]loopback failed:[/] {escape(f'{type(exc).__name__}: {exc}')}", highlight=False)
        raise typer.Exit(1) from None
    s = res["command_to_artifact_ms"]
    console.print(f"loopback {'(simulator)' if res.get('simulated') else res['port']}: channel {res['channel']}, "
                  f"threshold {res['threshold_uv']} µV, detected {res['detected']}/{res['triggers']}")
    from controller.bench.report import fmt   # "–" where there are too few triggers for a percentile
    console.print(f"command → artifact sample (ms): p50 {fmt(s['p50'])}  p90 {fmt(s['p90'])}  "
                  f"p99 {fmt(s['p99'])}  max {fmt(s['max'])}  (n = {s['n']})")
    if res["refused"] or res["faults"]:
        from rich.markup import escape
        console.print(f"[red]{res['refused']} trigger(s) refused[/]" + "".join(f"\n  fault: {escape(f)}" for f in res["faults"]),
                      highlight=False)
    if json_path is not None:
        write_json({"loopback": res}, json_path)


@app.command("setup-timeflux")
def setup_timeflux(path: Optional[Path] = typer.Option(None, "--path", help="venv folder (default: user cache)")) -> None:
    """Create Timeflux's own virtual environment for the peer comparison."""
    from controller.bench.peers.harness import SetupError, create_timeflux_venv
    console = Console()
    try:
        console.print(f"Timeflux venv: {create_timeflux_venv(path)}")
    except SetupError as exc:
        from rich.markup import escape
        console.print(f"[red]setup-timeflux failed:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None


@app.command("blame")
def blame(timehist: Path = typer.Option(..., "--timehist", help="output of `perf sched timehist -w` for the run"),
          json_path: Path = typer.Option(..., "--json", help="the bench JSON of the same run (stimloop bench --json)"),
          scenario: Optional[List[str]] = typer.Option(None, "--scenario",
                                                       help="spike scenario(s) to explain (default: every one in the JSON)"),
          min_wait_ms: float = typer.Option(0.3, "--min-wait-ms", help="count a task's wait for a CPU from this long"),
          out_json: Optional[Path] = typer.Option(None, "--out", help="write the per-block findings here (JSON)",
                                                   callback=output_file)) -> None:
    """Which thread held the CPU while each of the slowest blocks waited (a scheduler trace of the run).

    Record the trace on the LSL clock, then explain the run:

        perf record -e sched:sched_switch -e sched:sched_wakeup -a -k CLOCK_MONOTONIC -o perf.data -- \\
            stimloop bench --scenario spike_triggered --no-peers --duration 30 --json bench.json
        perf sched timehist -w -i perf.data > timehist.txt
        stimloop bench blame --timehist timehist.txt --json bench.json
    """
    import json

    from rich.markup import escape
    from rich.table import Table

    from controller.bench import sched_blame as sb
    from controller.bench.report import write_json
    console = Console()

    def fail(msg: str) -> None:
        console.print(f"[red]error:[/] {escape(msg)}", highlight=False)
        raise typer.Exit(1)

    if not min_wait_ms > 0:
        raise typer.BadParameter(f"{min_wait_ms} invalid, expected > 0 ms", param_hint="--min-wait-ms")
    try:
        doc = json.loads(json_path.read_text())
        text = timehist.read_text(errors="replace")
    except (OSError, ValueError) as exc:
        fail(f"cannot read the inputs: {exc}")
    scenarios = {k: v for k, v in (doc.get("scenarios") or {}).items() if isinstance(v, dict) and v.get("slowest_blocks")}
    if scenario:
        missing = [s for s in scenario if s not in scenarios]
        if missing:
            fail(f"{json_path}: no slowest_blocks for {missing} (have: {sorted(scenarios) or 'none'}); "
                 "only the spike scenarios record them")
        scenarios = {k: scenarios[k] for k in scenario}
    if not scenarios:
        fail(f"{json_path}: no scenario with slowest_blocks (run the spike scenarios with this version of stimloop)")
    switches = sb.parse_timehist(text)
    span = sb.trace_span(switches)
    if span is None:
        fail(f"{timehist}: no context-switch lines (expected the output of `perf sched timehist -w -i perf.data`)")
    found = {}
    for name, sc in scenarios.items():
        blocks = sc["slowest_blocks"]
        inside = [b for b in blocks if span[0] <= b["push_t"] and b["done_t"] <= span[1]]
        if not inside:
            fail(f"the trace covers {span[0]:.3f}..{span[1]:.3f} s, {name}'s blocks {blocks[-1]['push_t']:.3f}.."
                 f"{blocks[0]['done_t']:.3f} s: another run, or perf not recorded with -k CLOCK_MONOTONIC")
        roles = {int(pid): role for role, pid in (sc.get("pids") or {}).items()}
        m = doc.get("machine") or {}
        res = sb.blame(switches, inside, roles, min_wait_ms, sb.idle_cause(m.get("virtualized"), m.get("low_latency")))
        found[name] = {"blocks": res, "summary": sb.summarize(res), "outside_trace": len(blocks) - len(inside)}
        t = Table(title=f"{name}: the {len(inside)} slowest blocks, what kept them waiting", show_lines=False)
        for col in ("push → done (ms)", "main blocker", "waits ≥ %g ms: task (cpu) waited ← blockers" % min_wait_ms):
            t.add_column(col)
        for r in res:
            waits = "; ".join(f"{w['role']} ({w['cpu']}) {w['waited_ms']:.2f} ← " +
                              ", ".join(f"{lab} {ms:.2f}" for lab, ms in w["blockers"][:2]) for w in r["waits"][:3])
            t.add_row(f"{r['ms']:.3f}", escape(r["main"]), escape(waits or "–"))
        console.print(t)
        summ = found[name]["summary"]
        console.print(f"{name}, main blocker by episode (overlapping slow blocks are one): " +
                      ", ".join(f"{escape(k)}: {v}" for k, v in summ["episodes"].items()) +
                      f" — {sum(summ['episodes'].values())} episode(s), {len(inside)} block(s)" +
                      (f"; {found[name]['outside_trace']} block(s) outside the trace" if found[name]["outside_trace"] else ""))
    if out_json is not None:
        console.print(f"JSON: {write_json({'min_wait_ms': min_wait_ms, 'scenarios': found}, out_json)}")


if __name__ == "__main__":
    app()
