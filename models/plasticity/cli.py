"""``stimloop plasticity ...``: curves, evaluation and sensitivity of the plasticity surrogate.

Mounted by ``controller/cli.py``; also runs standalone:
``python -m models.plasticity.cli evaluate --json out.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from models.plasticity.surrogate import DEFAULT_MODEL_PATH

app = typer.Typer(help="Synaptic plasticity simulators and their ONNX surrogate.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
console = Console()

_MODEL_OPT = typer.Option(DEFAULT_MODEL_PATH, "--model", help="surrogate ONNX file")


def _check_model(model: Path) -> None:
    if not model.is_file():
        console.print(f"[bold red]error:[/] surrogate {model} not found: train it with "
                      f"`python -m models.plasticity.train`")
        raise typer.Exit(2)


@app.command()
def curves(out: Path = typer.Option(Path("plasticity_curves.png"), "--out", help="PNG to write"),
           model: Path = _MODEL_OPT):
    """STDP window and Δw vs stimulation frequency (1–100 Hz), simulator and surrogate side by side."""
    _check_model(model)
    from models.plasticity.curves import plot_curves

    path = plot_curves(out, model)
    console.print(f"wrote {path}")


@app.command()
def evaluate(json_out: Optional[Path] = typer.Option(None, "--json", help="write the metrics as JSON here"),
             n_heldout: int = typer.Option(1000, "--n-heldout", min=10, help="held-out protocols to simulate"),
             model: Path = _MODEL_OPT):
    """Held-out R², MSE and per-call p99 latency of the surrogate (protocols never used in training)."""
    _check_model(model)
    from models.plasticity.curves import evaluate as _evaluate

    ev = _evaluate(model, n_heldout=n_heldout)
    table = Table(title=f"plasticity surrogate {model.name}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, fmt in (("r2", "{:.4f}"), ("mse", "{:.3g}"), ("n_heldout", "{}"), ("p50_us", "{:.1f}"),
                     ("p99_us", "{:.1f}")):
        table.add_row(key, fmt.format(ev[key]))
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps({k: ev[k] for k in ("r2", "mse", "n_heldout", "p99_us")}, indent=1))
        console.print(f"wrote {json_out}")


@app.command()
def sensitivity(simulator: bool = typer.Option(False, "--simulator", help="use the simulator instead of the surrogate"),
                n_base: int = typer.Option(400, "--n-base", min=5, help="random base protocols"),
                model: Path = _MODEL_OPT):
    """Per-parameter sensitivity: span of Δw when one input sweeps its range, others fixed."""
    if not simulator:
        _check_model(model)
    from models.plasticity.curves import sensitivity as _sensitivity

    rows = _sensitivity(model, n_base=n_base, simulator=simulator)
    table = Table(title=f"Δw sensitivity ({'simulator' if simulator else 'surrogate'}, {n_base} base protocols)")
    for col in ("parameter", "unit", "mean span", "p90 span"):
        table.add_column(col, justify="right" if "span" in col else "left")
    for r in sorted(rows, key=lambda r: -r["mean_span"]):
        table.add_row(r["parameter"], r["unit"], f"{r['mean_span']:.4f}", f"{r['p90_span']:.4f}")
    console.print(table)


if __name__ == "__main__":
    app()
