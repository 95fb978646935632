"""The ``stimloop`` command.

Heavy imports (onnxruntime, pylsl, matplotlib) happen inside the commands so
that ``stimloop --help`` and ``stimloop config ...`` stay instant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from controller.config import ConfigError, load_config

app = typer.Typer(help="stimloop: closed-loop neurostimulation controller, HIL simulator and latency benchmarks.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, markup=True)
    raise typer.Exit(code)


def _load(config: Optional[Path], overrides: dict | None = None):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


@config_app.command("validate")
def config_validate(file: Path = typer.Argument(..., help="TOML config file")):
    """Check a config file; print every problem with its field, value and allowed range."""
    cfg = _load(file)
    try:
        from controller.safety import build_profile  # the profile is validated too: unsafe limits are refused
        build_profile(cfg.safety.profile, cfg.safety.overrides)
    except ImportError:
        pass
    except Exception as exc:  # UnsafeProfileError and pydantic errors carry their own message
        _fail(f"{file}: safety: {exc}")
    console.print(f"[green]ok[/] {file}")


@config_app.command("show")
def config_show(config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config file on top of the defaults")):
    """Print the resolved configuration (defaults + file) as TOML."""
    cfg = _load(config)
    sys.stdout.write(cfg.to_toml())


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML config file on top of the defaults"),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", help="session length in seconds"),
    out: Optional[Path] = typer.Option(None, "--out", help="parent folder for the session folder"),
    source: Optional[str] = typer.Option(None, help="hil | lsl | brainflow"),
    stream: Optional[str] = typer.Option(None, help="LSL stream name (with --source lsl)"),
    board_id: Optional[int] = typer.Option(None, "--board-id", help="BrainFlow board id (with --source brainflow)"),
    device: Optional[str] = typer.Option(None, help="hil | serial | simulated"),
    port: Optional[str] = typer.Option(None, help="serial port path (with --device serial)"),
):
    """Run a real-time closed-loop session (default: on the built-in simulator) and write its report."""
    overrides: dict = {}
    if duration is not None:
        overrides.setdefault("session", {})["duration_s"] = duration
    if out is not None:
        overrides.setdefault("session", {})["out_dir"] = str(out)
    if source is not None:
        overrides.setdefault("source", {})["kind"] = source
    if stream is not None:
        overrides.setdefault("source", {})["stream"] = stream
    if board_id is not None:
        overrides.setdefault("source", {})["board_id"] = board_id
    if device is not None:
        overrides.setdefault("device", {})["kind"] = device
    if port is not None:
        overrides.setdefault("device", {})["port"] = port
    cfg = _load(config, overrides)
    from controller.runners.realtime import SessionError, run_session
    try:
        session_dir = run_session(cfg, console=console)
    except SessionError as exc:
        _fail(str(exc))
    _print_summary(session_dir)


def _print_summary(session_dir: Path) -> None:
    from controller.report import summary_table
    metrics = json.loads((session_dir / "metrics.json").read_text())
    console.print(summary_table(metrics))
    console.print(f"session folder: [bold]{session_dir}[/]")
    if (session_dir / "report.png").exists():
        console.print(f"report: {session_dir / 'report.png'}")


@app.command()
def report(session: Path = typer.Argument(..., help="session folder")):
    """Rebuild metrics.json and report.png from a session folder (also after a crash)."""
    if not session.is_dir():
        _fail(f"session folder {session} does not exist")
    from controller.report import build_report
    build_report(session)
    _print_summary(session)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
