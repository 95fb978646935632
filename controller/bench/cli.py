"""``stimloop bench``: latency benchmark suite (mounted by ``controller/cli.py`` as the ``bench`` sub-app).

    stimloop bench [--json F] [--out DIR] [--duration S] [--quick] [--scenario NAME ...] [--no-peers]
    stimloop bench loopback [--port P --stream NAME --channel K]
    stimloop bench setup-timeflux
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()   # every bench path loads liblsl; its config must be in place first

app = typer.Typer(help="Latency benchmarks: scenarios, throughput sweep, peers side by side, hardware loopback.",
                  invoke_without_command=True, no_args_is_help=False)


@app.callback(invoke_without_command=True)
def bench(ctx: typer.Context,
          json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here"),
          out: Optional[Path] = typer.Option(None, "--out", help="folder for the PNG histograms, bench.md and bench.json"),
          duration: float = typer.Option(10.0, "--duration", help="seconds per scenario and per peer (1..3600)"),
          quick: bool = typer.Option(False, "--quick", help="a few seconds per scenario, cheap peers only (tests)"),
          scenario: Optional[List[str]] = typer.Option(None, "--scenario",
                                                       help="spike_triggered | spike_triggered_busy_poll | seizure_loop | throughput (repeatable; default all)"),
          peers: Optional[List[str]] = typer.Option(None, "--peer", help="stimloop | stimloop_busy_poll | pylsl_floor | pylsl_floor_busy_poll | mne_lsl | timeflux (repeatable)"),
          no_peers: bool = typer.Option(False, "--no-peers", help="skip the peer comparison"),
          low_latency: bool = typer.Option(True, "--low-latency/--no-low-latency",
                                           help="hold a PM QoS request (/dev/cpu_dma_latency = 0) for the whole run, "
                                                "as cyclictest does: CPUs poll instead of halting; same for every peer")) -> None:
    """Run all scenarios (or the ``--scenario`` ones) and the peers; print a table, write JSON/PNG/Markdown."""
    if ctx.invoked_subcommand is not None:
        return
    from controller.bench.report import rich_tables, write_json, write_markdown, write_pngs
    from controller.bench.suite import SCENARIOS, run_suite
    console = Console()
    chosen = list(scenario) if scenario else list(SCENARIOS)
    bad = [s for s in chosen if s not in SCENARIOS]
    if bad:
        raise typer.BadParameter(f"--scenario {bad[0]!r} unknown, expected one of {', '.join(SCENARIOS)}")
    if not 1.0 <= duration <= 3600:
        raise typer.BadParameter(f"--duration {duration} invalid, expected 1..3600 s")
    from controller.low_latency import LowLatency
    with LowLatency(low_latency) as qos:
        doc = run_suite(duration, chosen, peers=not no_peers, quick=quick, peer_names=peers or None, console=console)
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


@app.command("loopback")
def loopback(port: Optional[str] = typer.Option(None, "--port", help="stimulator serial port (omit: simulator)"),
             stream: Optional[str] = typer.Option(None, "--stream", help="LSL stream name of the amplifier"),
             channel: Optional[int] = typer.Option(None, "--channel", help="channel wired to the stimulator output"),
             n: int = typer.Option(20, "--n", help="number of triggers"),
             interval: float = typer.Option(3.2, "--interval", help="s between triggers (MACRO: <= 20 bursts/min)"),
             threshold_uv: Optional[float] = typer.Option(None, "--threshold-uv", help="default: 8 σ of the baseline"),
             profile: str = typer.Option("macro", "--profile", help="safety profile for the triggers"),
             json_path: Optional[Path] = typer.Option(None, "--json", help="write the result JSON here")) -> None:
    """Command → artifact seen in the incoming stream (hardware loopback; simulator without --port)."""
    from controller.bench.loopback import measure, run_simulated
    from controller.bench.report import write_json
    console = Console()
    if port is None:
        res = run_simulated(n_triggers=n, interval_s=min(interval, 0.4), channel=channel)
    else:
        if not stream or channel is None:
            raise typer.BadParameter("--port needs --stream NAME and --channel K (the channel wired to the output)")
        res = measure(port, stream, channel, n_triggers=n, interval_s=interval, threshold_uv=threshold_uv,
                      profile=profile)
    s = res["command_to_artifact_ms"]
    console.print(f"loopback {'(simulator)' if res.get('simulated') else res['port']}: channel {res['channel']}, "
                  f"threshold {res['threshold_uv']} µV, detected {res['detected']}/{res['triggers']}")
    console.print(f"command → artifact sample (ms): p50 {s['p50']}  p90 {s['p90']}  p99 {s['p99']}  max {s['max']}")
    if res["refused"] or res["faults"]:
        from rich.markup import escape
        console.print(f"[red]{res['refused']} trigger(s) refused[/]" + "".join(f"\n  fault: {escape(f)}" for f in res["faults"]),
                      highlight=False)
    if json_path is not None:
        write_json({"loopback": res}, json_path)


@app.command("setup-timeflux")
def setup_timeflux(path: Optional[Path] = typer.Option(None, "--path", help="venv folder (default: user cache)")) -> None:
    """Create Timeflux's own virtual environment for the peer comparison."""
    from controller.bench.peers import create_timeflux_venv
    Console().print(f"Timeflux venv: {create_timeflux_venv(path)}")


if __name__ == "__main__":
    app()
