"""The ``stimloop`` command.

Heavy imports (onnxruntime, pylsl, matplotlib) happen inside the commands so
that ``stimloop --help`` and ``stimloop config show`` stay instant
(``config validate`` builds the policy, which takes about a second of imports).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from controller.cli_checks import output_file, within
from controller.config import ConfigError, load_config

app = typer.Typer(help="stimloop: closed-loop neurostimulation controller, HIL simulator and latency benchmarks.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)


def _print_error(msg: str) -> None:
    # Messages quote config sections ("[policy.adaptive]"), which rich would take for markup; soft_wrap
    # keeps each problem on one line in logs and pipes.
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, markup=True, soft_wrap=True)


def _fail(msg: str, code: int = 2) -> None:
    _print_error(msg)
    raise typer.Exit(code)


class _Problem(Exception):
    """A config refused by a start-up check; its message names the file, the setting and the rule."""


def _check_config(cfg, origin: str, collect: bool = False) -> list[str]:
    """The start-up checks a session runs before anything starts: the safety profile, the policy as
    it will be built, the simulator's settings. The first refusal exits (2), or with ``collect`` every
    check runs and their refusals are returned (each reads the config, none needs another to pass)."""
    problems = []
    for check in (_check_safety, _check_policy, _check_simulator):
        try:
            check(cfg, origin)
        except _Problem as exc:
            if not collect:
                _fail(str(exc))
            problems.append(str(exc))
    return problems


def _check_safety(cfg, origin: str) -> None:
    """Unsafe profiles and stimulation outside the profile are refused before anything starts."""
    from pydantic import ValidationError

    from controller.config import describe_errors
    from controller.safety import SafetyProfile, check_session_safety
    try:
        check_session_safety(cfg)
    except ValidationError as exc:  # an override the profile lacks or of the wrong type: name it in the file
        raise _Problem(describe_errors(exc, f"{origin}: safety", prefix=("safety", "overrides"), root=SafetyProfile,
                                       unknown_hint="the profile fields are those of SafetyProfile, "
                                                    "controller/safety/profiles.py")) from None
    except Exception as exc:  # UnsafeProfileError and the other start-up refusals name the field and the rule
        raise _Problem(f"{origin}: safety: {exc}") from None


#: Sections each policy kind is built from, so that a refusal points at the settings to change.
_POLICY_SECTIONS = {"responsive": "[policy] and [policy.stim]", "adaptive": "[policy.adaptive] and [policy.stim]",
                    "periodic": "[policy.open_loop] and [policy.stim]",
                    "poisson": "[policy.open_loop] and [policy.stim]",
                    "personalized": "[policy.personalized] and [policy.stim]",
                    "plasticity": "[policy.plasticity], [policy.stim] and the safety profile",
                    "ads": "[policy.ads] and [policy.stim]", "random": "[policy.ads] and [policy.stim]"}
#: Stand-in stream rate for an LSL/BrainFlow source, whose rate is known only once it is resolved: the
#: config's highest simulator rate, so that only the policy's own settings can fail here.
_STAND_IN_FS_HZ = 50_000.0


def _check_policy(cfg, origin: str) -> None:
    """Build the configured policy as the session will (``controller.policy_drive.build_drive``), so
    settings its constructor refuses fail here, as a config error, instead of mid-session.

    The built-in simulator's stream is known from ``[simulator]``, so it is checked against the model's
    contract as the session's ``SeizureDetectorStage`` checks it at start-up; an external stream's rate
    and channels are checked when the session starts.
    """
    from controller.config import SPIKE_POLICY_KINDS
    from controller.policy_drive import build_drive
    kind = cfg.policy.kind
    threshold, min_duration_s = float("nan"), 0.5
    if kind not in SPIKE_POLICY_KINDS:  # the session reads the model's contract for every other kind
        from controller.inference import ContractError, contract_min_duration_s, read_contract
        path = cfg.model_path()
        if not path.is_file():
            raise _Problem(f"{origin}: model {path} does not exist (model.path in the config)")
        try:
            contract = read_contract(path)
        except Exception as exc:  # ContractError, or protobuf's DecodeError for a file that is not ONNX
            raise _Problem(f"{origin}: model {path} (model.path): {exc}") from None
        threshold, min_duration_s = contract.threshold, contract_min_duration_s(contract)
        if cfg.source.kind == "hil":   # policy "none" too: the session still runs the model on the stream
            try:
                contract.check_stream(cfg.simulator.fs_hz, cfg.simulator.n_channels)
            except ContractError as exc:
                raise _Problem(f"{origin}: simulator.fs_hz = {cfg.simulator.fs_hz:g}, simulator.n_channels = "
                               f"{cfg.simulator.n_channels}: the simulated stream cannot feed model {path} "
                               f"(model.path), the session would refuse to start: {exc}") from None
    if kind == "none":
        return
    if cfg.source.kind == "hil":
        fs_hz, n_channels = cfg.simulator.fs_hz, cfg.simulator.n_channels
    else:
        fs_hz, n_channels = _STAND_IN_FS_HZ, max(cfg.policy.ads.trigger_channels) + 1
    from controller.safety.profiles import UnsafeProfileError
    try:
        build_drive(cfg, fs_hz, n_channels, threshold, min_duration_s)
    except (ValueError, UnsafeProfileError) as exc:   # the plasticity policy builds the safety profile
        raise _Problem(f'{origin}: policy.kind = "{kind}" cannot be built from '
                       f'{_POLICY_SECTIONS.get(kind, "[policy]")}: {exc}') from None


def _check_simulator(cfg, origin: str) -> None:
    """The simulated patient's settings, checked as the simulator will apply them (a seizure rate
    its seizures cannot fit fails here, naming the key, not in the simulator process)."""
    if cfg.source.kind != "hil" or cfg.simulator.model != "wendling":
        return
    from controller.runners.realtime import hil_spec
    from hil_sim.process import patient_params_for
    try:
        patient_params_for(hil_spec(cfg))
    except ValueError as exc:
        raise _Problem(f"{origin}: {exc}") from None


CONFIG_HELP = "TOML config file on top of the defaults; repeat to layer files, each on top of the one before"


def _load(config: list[Path] | Path | None, overrides: dict | None = None):
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))


def _origin(config: list[Path]) -> str:
    """How error messages name the configuration: its files, in order."""
    return " + ".join(map(str, config)) or "config"


@config_app.command("validate")
def config_validate(files: list[Path] = typer.Argument(..., help="TOML config file(s); several are layered in order, "
                                                                   "as repeated --config")):
    """Check a config file: every problem with its field, value and allowed range; the safety start-up
    check; and the policy, built as the session builds it."""
    from controller.config import load_config_leniently
    try:
        cfg, field_errors = load_config_leniently(files)
    except ConfigError as exc:   # a file missing or not TOML: nothing to check further
        _fail(str(exc))
    origin = _origin(files)
    # The start-up checks run also when fields failed (on the rest, the failed ones at their defaults),
    # so that one round of fixes is enough.
    later_problems = _check_config(cfg, origin, collect=True) if cfg is not None else []
    if field_errors is not None or later_problems:
        parts = ([str(field_errors)] if field_errors is not None else []) + later_problems
        if field_errors is not None and later_problems:
            parts[1] = "and, with those fields at their defaults, " + parts[1]
        _fail("\n".join(parts))
    later = "" if cfg.source.kind == "hil" else \
        f" (the {cfg.source.kind} stream's rate and channels are checked when the session starts)"
    console.print(f"[green]ok[/] {escape(origin)}{later}", highlight=False, soft_wrap=True)


@config_app.command("show")
def config_show(config: list[Path] = typer.Option([], "--config", "-c", help=CONFIG_HELP, metavar="<path>")):
    """Print the resolved configuration (defaults + file) as TOML."""
    cfg = _load(config)
    sys.stdout.write(cfg.to_toml())


@app.command()
def run(
    config: list[Path] = typer.Option([], "--config", "-c", help=CONFIG_HELP, metavar="<path>"),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", help="session length in seconds"),
    out: Optional[Path] = typer.Option(None, "--out", help="parent folder for the session folder"),
    source: Optional[str] = typer.Option(None, help="hil | lsl | brainflow"),
    stream: Optional[str] = typer.Option(None, help="LSL stream name (with --source lsl)"),
    source_id: Optional[str] = typer.Option(None, "--source-id",
                                            help="LSL source_id: which stream, when several share the name"),
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
    if source_id is not None:
        overrides.setdefault("source", {})["source_id"] = source_id
    if board_id is not None:
        overrides.setdefault("source", {})["board_id"] = board_id
    if device is not None:
        overrides.setdefault("device", {})["kind"] = device
    if port is not None:
        overrides.setdefault("device", {})["port"] = port
    cfg = _load(config, overrides)
    # An option of another source or device than the session's was ignored without a word.
    for given, option, section, wanted in ((stream, "--stream", "source", "lsl"),
                                           (source_id, "--source-id", "source", "lsl"),
                                           (board_id, "--board-id", "source", "brainflow"),
                                           (port, "--port", "device", "serial")):
        actual = getattr(cfg, section).kind
        if given is not None and actual != wanted:
            _fail(f"{option} is for --{section} {wanted}, and the session's {section} is {actual!r}: "
                  f"add --{section} {wanted} (or set it in the config)")
    origin = _origin(config)
    _check_config(cfg, origin)
    from controller.runners.realtime import SessionError, run_session
    try:
        session_dir = run_session(cfg, console=console)
    except SessionError as exc:
        _fail(str(exc))
    metrics = _print_summary(session_dir)
    stop = metrics.get("final_stop")
    if stop is not None and not stop["confirmed"]:
        # The same exit code as an unconfirmed `stimloop stop`: a burst may still be running.
        _fail("the stimulator did not confirm stimulation off when the session ended ("
              + "; ".join(dict.fromkeys(stop["errors"])) + "). A device that speaks drivers/PROTOCOL.md "
              "stops on its own once heartbeats cease (its watchdog); check the stimulator, and cut its "
              "output or power if unsure", code=3)


def _check_session_folder(session: Path) -> None:
    """A session folder, as every runner leaves one even after a crash: its append-only event log is there.
    Without it ``report`` would write empty metrics over the good ones, or into a folder of another tool."""
    if not session.is_dir():
        _fail(f"session folder {session} does not exist" + (" (it is a file)" if session.exists() else ""))
    if not (session / "events.jsonl").is_file():
        _fail(f"{session} has no events.jsonl: not a stimloop session folder, or its event log was lost; "
              "nothing was written")


def _print_summary(session_dir: Path) -> dict:
    from controller.report import summary_table
    metrics = json.loads((session_dir / "metrics.json").read_text())
    console.print(summary_table(metrics))
    console.print(f"session folder: [bold]{session_dir}[/]")
    if (session_dir / "report.png").exists():
        console.print(f"report: {session_dir / 'report.png'}")
    return metrics


@app.command()
def report(session: Path = typer.Argument(..., help="session folder")):
    """Rebuild metrics.json and report.png from a session folder (also after a crash)."""
    _check_session_folder(session)
    from controller.report import build_report
    try:
        build_report(session)
    except (ValueError, KeyError, TypeError) as exc:   # a file of the folder damaged (JSON that is not, …)
        _fail(f"session {session} is damaged, its report cannot be rebuilt: {type(exc).__name__}: {exc}")
    _print_summary(session)


def _overrides(**sections) -> dict:
    out: dict = {}
    for key, value in sections.items():
        if value is not None:
            section, field = key.split("__")
            out.setdefault(section, {})[field] = value
    return out


sim_app = typer.Typer(help="Closed-loop sessions and cohort comparisons in simulated time.",
                      invoke_without_command=True)
app.add_typer(sim_app, name="sim")


@sim_app.callback()
def sim(
    ctx: typer.Context,
    config: list[Path] = typer.Option([], "--config", "-c", help=CONFIG_HELP, metavar="<path>"),
    seed: Optional[int] = typer.Option(None, help="random seed (same seed, same session)"),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", help="simulated seconds"),
    patient: Optional[int] = typer.Option(None, help="virtual-cohort patient id"),
    out: Optional[Path] = typer.Option(None, "--out", help="parent folder for the session folder"),
):
    """Run a closed-loop session in simulated time (virtual clock, faster than real time)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.progress import BarColumn, Progress, TextColumn
    cfg = _load(config, _overrides(session__seed=seed, session__duration_s=duration, simulator__patient=patient,
                                   session__out_dir=str(out) if out else None))
    from controller.inference import ContractError
    from controller.runners.simulated import run_simulated
    from controller.safety import UnsafeProfileError
    from hil_sim.faults import FaultConfigError
    if cfg.simulator.model != "wendling":
        _fail(f"simulator.model={cfg.simulator.model!r}: `stimloop sim` runs the Wendling patient in simulated time; "
              "for ADS / random stimulation use `stimloop sim compare-ads` (simulated time) or `stimloop run` (real time)")
    _check_config(cfg, _origin(config))   # also refuses a missing or unreadable model
    with Progress(TextColumn("simulated time"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                  console=console, transient=True) as bar:
        task = bar.add_task("sim", total=cfg.session.duration_s)
        try:
            session_dir = run_simulated(cfg, progress=lambda t, total: bar.update(task, completed=t))
        except (ContractError, UnsafeProfileError) as exc:
            _fail(str(exc))
        except FaultConfigError as exc:   # stream and device-link faults need the real processes and port
            _fail(f"{_origin(config)}: [[faults]]: {exc}; the others need real time: `stimloop run`")
    _print_summary(session_dir)


@sim_app.command("compare")
def sim_compare(
    config: list[Path] = typer.Option([], "--config", "-c", help=CONFIG_HELP, metavar="<path>"),
    patients: int = typer.Option(20, help="virtual-cohort size (patients 0..N-1)", min=1, max=1000),
    duration: float = typer.Option(900.0, "--duration", "-d", help="simulated seconds per patient and arm",
                                   callback=within(0, 7 * 24 * 3600, lo_open=True)),
    rate: float = typer.Option(12.0, help="spontaneous seizures per hour (dense, so short runs see several)",
                               callback=within(0, 120, lo_open=True)),
    channels: int = typer.Option(4, help="channels per patient (fewer: faster)", min=1, max=256),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for the sessions and compare.json"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the result here", callback=output_file),
):
    """No stimulation vs responsive closed loop vs periodic open loop with the same total charge, over a cohort."""
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table
    from controller.runners.compare import ARMS, compare_cohort
    cfg = _load(config, {"simulator": {"spontaneous_seizures": True, "seizure_rate_per_hour": rate,
                                       "seizure_onsets_s": [], "n_channels": channels},
                         "session": {"duration_s": duration}})
    with Progress(TextColumn("patients"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, transient=True) as bar:
        task = bar.add_task("cohort", total=patients)
        res = compare_cohort(cfg, list(range(patients)), out, progress=lambda i, n: bar.update(task, completed=i))
    t = Table(title=f"{patients} virtual patients × {duration:g} s simulated, {rate:g} seizures/h")
    for col in ("arm", "seizure time (s)", "vs none", "seizures", "ended by stimulation", "charge (µC)"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    for arm in ARMS:
        a = res["summary"][arm]
        ratio = a["seizure_time_vs_none"]
        t.add_row(arm, f"{a['seizure_s_total']:.0f}", f"{ratio:.0%}" if ratio is not None else "-",
                  str(a["seizures_total"]), str(a["terminated_by_stim"]), f"{a['charge_uc_total']:.0f}")
    console.print(t)
    if res["summary"]["none"]["seizures_total"] == 0:
        # A table of zeros compares nothing: say why there was nothing to compare.
        from controller.runners.realtime import hil_spec
        from hil_sim.process import patient_params_for
        first = min(patient_params_for({**hil_spec(cfg), "patient": k}).min_interval_s for k in range(patients))
        console.print(f"[yellow]note:[/] no seizure in any patient's {duration:g} s, so the arms cannot be compared: "
                      f"a patient's first spontaneous seizure comes at least {first:g} s after the start "
                      f"(min_interval_s), and one every {3600 / rate:g} s on average at {rate:g}/h. Lengthen "
                      "--duration (the default 900 s sees several).", highlight=False)
    console.print(f"sessions and compare.json: {res['out_dir']}")
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))


@sim_app.command("bench")
def sim_bench(
    duration: float = typer.Option(3600.0, "--duration", "-d", help="simulated seconds"),
    channels: int = typer.Option(16, help="channels of the simulated patient"),
    rate: float = typer.Option(6.0, help="spontaneous seizures per hour"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures here", callback=output_file),
):
    """How fast simulated time runs: a whole closed-loop session (patient, detector, policy, governor, recording)."""
    import platform
    import tempfile
    import time
    from controller.runners.simulated import run_simulated
    cfg = _load(None, {"session": {"duration_s": duration, "out_dir": tempfile.mkdtemp(prefix="stimloop-simbench-")},
                       "simulator": {"n_channels": channels, "spontaneous_seizures": True,
                                     "seizure_rate_per_hour": rate, "seizure_onsets_s": []}})
    t0 = time.perf_counter()
    session = run_simulated(cfg, write_report=False)
    wall = time.perf_counter() - t0
    res = {"simulated_s": duration, "wall_s": round(wall, 2), "speedup": round(duration / wall, 1),
           "wall_s_per_simulated_hour": round(wall * 3600 / duration, 1), "channels": channels,
           "fs_hz": cfg.simulator.fs_hz, "seizure_rate_per_hour": rate, "session": str(session),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "load_avg_1min": os.getloadavg()[0]}}
    console.print(f"{duration:g} s simulated in {wall:.1f} s wall: {res['speedup']}× real time, "
                  f"{res['wall_s_per_simulated_hour']} s per simulated hour ({channels} ch @ {cfg.simulator.fs_hz:g} Hz)")
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))


@sim_app.command("compare-ads")
def sim_compare_ads(
    duration: float = typer.Option(60.0, "--duration", "-d", help="simulated seconds per arm (1 s to a day)",
                                   callback=within(1, 86_400)),
    seed: int = typer.Option(0, min=0),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the result here", callback=output_file),
):
    """Spike-triggered (ADS) vs random stimulation at the matched rate: trigger → target weight change."""
    from rich.table import Table
    from hil_sim.ads_sim import run_simulated as run_ads
    ads = run_ads("ads", duration_s=duration, seed=seed)
    rate = ads["n_pulses"] / duration
    rnd = run_ads("random", duration_s=duration, seed=seed, rate_hz=rate)
    none = run_ads("none", duration_s=duration, seed=seed)
    t = Table(title=f"activity-dependent vs random stimulation, {duration:g} s simulated, seed {seed}")
    for col in ("arm", "pulses", "rate (Hz)", "w start", "w end", "Δw"):
        t.add_column(col, justify="right" if col != "arm" else "left")
    res = {}
    for name, r in (("ads (spike-triggered)", ads), ("random (matched rate)", rnd), ("none", none)):
        dw = r["w_final"] - r["w_init"]
        res[name] = {"n_pulses": r["n_pulses"], "rate_hz": r["n_pulses"] / duration, "w_init": r["w_init"],
                     "w_final": r["w_final"], "delta_w": dw}
        t.add_row(name, str(r["n_pulses"]), f"{r['n_pulses'] / duration:.2f}", f"{r['w_init']:.3f}",
                  f"{r['w_final']:.3f}", f"{dw:+.3f}")
    console.print(t)
    if json_out:
        json_out.write_text(json.dumps(res, indent=1))


@app.command()
def hil(
    config: list[Path] = typer.Option([], "--config", "-c", help=CONFIG_HELP, metavar="<path>"),
    duration: Optional[float] = typer.Option(None, "--duration", "-d", help="seconds (default: until Ctrl-C)",
                                             callback=within(0, 7 * 24 * 3600, lo_open=True)),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for ground truth and the device log"),
):
    """Run the simulated patient alone: an LSL stream and a stimulator on a serial port, for other tools."""
    import multiprocessing as mp
    import time
    cfg = _load(config)
    from controller.runners.realtime import hil_spec
    from hil_sim.process import run_hil
    sim_cfg = cfg.simulator
    spec = hil_spec(cfg)  # the same simulator as `stimloop run` (model, trigger channels, [[faults]], source_id)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_hil, args=(spec, q, stop, str(out) if out else None), name="stimloop-hil")
    proc.start()
    info = q.get(timeout=60)
    if "error" in info:
        _fail(f"simulator: {info['error']}")
    console.print(f"LSL stream: [bold]{info['stream']}[/], source_id {info['source_id']}  "
                  f"({sim_cfg.n_channels} ch @ {sim_cfg.fs_hz:g} Hz)")
    console.print(f"stimulator: [bold]{info['port']}[/]  (protocol: drivers/PROTOCOL.md)")
    console.print("Ctrl-C to stop." if duration is None else f"running for {duration:g} s")
    try:
        t_end = time.monotonic() + (duration if duration is not None else float("inf"))
        while time.monotonic() < t_end and proc.is_alive():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        proc.join(10)
    if out is not None:
        console.print(f"ground truth: {out / 'ground_truth.json'}")


def _session_ended(session: Path) -> str | None:
    """Why ``session`` is over, from the runner's own final record; ``None`` while it may run.

    Not from metrics.json: ``stimloop report`` writes one for a session still running, and a stop
    must never be refused on a guess (the session id the server checks tells sessions apart).
    """
    log = session / "events.jsonl"
    if log.exists():
        # The runner's last record is its final status (with the children's exit codes): the tail suffices.
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            tail = f.read().split(b"\n")
        for raw in reversed(tail):
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("source") == "runner" and "exit_codes" in rec:
                return f"the runner recorded its end: {rec.get('status')}"
    return None


def _session_endpoint(session: Optional[Path], which: str, default: str) -> tuple[str, str | None]:
    """``(address, session id)``: the default address without ``--session``, else the folder's own.

    A finished session's endpoints.json is refused: its port may belong to another session by now.
    """
    if session is None:
        return default, None
    p = session / "endpoints.json"
    if not p.exists():
        _fail(f"{p} not found: is {session} a session folder of a running session?")
    ended = _session_ended(session)
    if ended:
        _fail(f"session {session} has ended ({ended}): nothing to connect to, and its port may belong "
              "to another session now")
    endpoints = json.loads(p.read_text())
    address = endpoints.get(which)
    if not address:
        _fail(f"session {session} runs with {which} disabled ({which}: null in {p}): nothing to connect to")
    return address, endpoints.get("session_id")


@app.command()
def monitor(
    address: Optional[str] = typer.Option(None, help="telemetry endpoint, e.g. tcp://host:5556"),
    session: Optional[Path] = typer.Option(None, help="read the endpoint from this running session's folder"),
    duration: Optional[float] = typer.Option(None, help="seconds (default: until Ctrl-C)",
                                             callback=within(0, 7 * 24 * 3600, lo_open=True)),
):
    """Live terminal view of a running session (signal, prediction, stimulation, latency)."""
    from controller.monitor import run_monitor
    addr = address or _session_endpoint(session, "telemetry", "tcp://127.0.0.1:5556")[0]
    try:
        run_monitor(addr, duration_s=duration, console=console)
    except KeyboardInterrupt:
        pass


def _control(cmd: dict, address: Optional[str], session: Optional[Path], keys: Optional[Path],
             server_key: Optional[Path], unanswered: str = "") -> dict:
    from controller.control import ControlClient
    if address:
        addr, session_id = address, None
    else:
        addr, session_id = _session_endpoint(session, "control", "tcp://127.0.0.1:5557")
    import zmq
    try:
        client = ControlClient(addr, client_keys=keys, server_public_key=server_key, timeout_ms=2000,
                               session=session_id)
    except zmq.ZMQError as exc:   # an address ZeroMQ cannot parse: nothing was sent
        _fail(f"cannot use the control address {addr!r}: {exc} (expected e.g. tcp://127.0.0.1:5557){unanswered}")
    except (OSError, ValueError) as exc:   # a key file missing, empty, of the wrong kind, or one of the pair
        _fail(f"control keys (--keys {keys}, --server-key {server_key}): {exc}{unanswered}")
    with client:
        try:
            reply = client.request(cmd)
        except TimeoutError as exc:
            _fail(f"no answer from {addr}: {exc}{unanswered}")
    if not reply.get("ok", False):
        if "stop_errors" in reply:   # a pause or stop the device did not confirm: not a refusal, worse
            _fail(str(reply.get("error", reply)), code=3)
        _fail(f"refused: {reply.get('error', reply)}")
    return reply


_ADDR = typer.Option(None, "--address", help="control endpoint (default tcp://127.0.0.1:5557)")
_SESSION = typer.Option(None, "--session", help="read the endpoint from this running session's folder")
_KEYS = typer.Option(None, "--keys", help="client secret key file (remote control with CURVE)")
_SKEY = typer.Option(None, "--server-key", help="server public key file (remote control with CURVE)")


@app.command()
def stop(address: Optional[str] = _ADDR, session: Optional[Path] = _SESSION,
         keys: Optional[Path] = _KEYS, server_key: Optional[Path] = _SKEY):
    """Emergency stop: stimulation off now in a running session (stays off until `ctl resume`).

    Exits non-zero unless the device confirmed the stop."""
    reply = _control({"cmd": "emergency_stop"}, address, session, keys, server_key,
                     unanswered="\nSTIMULATION STATE UNKNOWN: use the stimulator's hardware stop now.")
    console.print(f"[bold green]stimulation off[/] {escape(str(reply))}")


_CTL_COMMANDS = ("status", "pause", "resume", "emergency_stop", "set_param", "mark")


# Unknown options pass through so that a negative value reaches the governor, which says what range it
# allows: `set_param amplitude_ua -5` was "No such option: -5". A misspelt --option is caught below.
@app.command(context_settings={"ignore_unknown_options": True})
def ctl(
    command: str = typer.Argument(..., help="status | pause | resume | emergency_stop | set_param | mark"),
    args: list[str] = typer.Argument(None, help="set_param NAME VALUE; mark LABEL"),
    address: Optional[str] = _ADDR, session: Optional[Path] = _SESSION,
    keys: Optional[Path] = _KEYS, server_key: Optional[Path] = _SKEY,
):
    """Send one control command to a running session and print the reply."""
    if command not in _CTL_COMMANDS:   # else sent, and a server that is not there answers nothing about it
        _fail(f"unknown command {command!r}; expected one of {', '.join(_CTL_COMMANDS)}")
    cmd: dict = {"cmd": command}
    args = args or []
    for a in args:
        if a.startswith("--"):
            _fail(f"no such option: {a} (see `stimloop ctl --help`)")
    if command == "set_param":
        if len(args) != 2:
            _fail("set_param needs NAME VALUE, e.g. `stimloop ctl set_param amplitude_ua 2500`")
        try:
            value = json.loads(args[1])
        except json.JSONDecodeError:
            value = args[1]
        cmd.update(name=args[0], value=value)
    elif command == "mark":
        cmd["label"] = " ".join(args) or "mark"
    elif args:
        _fail(f"{command} takes no arguments")
    console.print_json(data=_control(cmd, address, session, keys, server_key))


@app.command()
def keys(dir: Path = typer.Option(Path("keys"), "--dir", help="folder for the key files"),
         name: str = typer.Option("client", "--name", help="key name (server, or a client's name)"),
         overwrite: bool = typer.Option(False, help="replace existing keys")):
    """Make a CURVE key pair for authenticated remote control."""
    from controller.keys import KeyPairExists, make_keys
    try:
        public, secret = make_keys(dir, name, overwrite=overwrite)
    except KeyPairExists as exc:
        _fail(f"key pair {exc.name!r} already exists in {exc.folder}; use --overwrite to replace it "
              "(whoever holds the old key is locked out)")
    except (ValueError, RuntimeError) as exc:  # a name that is not a file name; a libzmq without CURVE
        _fail(str(exc))
    console.print(f"public key: {public}\nsecret key: {secret} (keep it private)")


@app.command()
def export(session: Path = typer.Argument(..., help="session folder"),
           format: str = typer.Option("edf", "--format", help="edf (EDF+ with events as annotations)"),
           out: Optional[Path] = typer.Option(None, "--out", help="output file (default: SESSION/session.edf)",
                                               callback=output_file),
           assume_unit: Optional[str] = typer.Option(
               None, "--assume-unit",
               help="unit of channels whose source declared none (e.g. uV, mV, V); declared units are never overridden")):
    """Export a session's raw data and events to a standard format (EDF+)."""
    if format != "edf":
        _fail(f"--format {format!r}: only 'edf' is supported")
    _check_session_folder(session)
    from controller.export import export_edf
    target = out or session / "session.edf"
    inside = target.resolve().is_relative_to(session.resolve())
    if inside and target.exists() and target.suffix.lower() != ".edf":
        _fail(f"--out {target} is the session's own {target.resolve().relative_to(session.resolve())}: "
              "the export would overwrite the recording; give a new .edf file")
    try:
        summary = export_edf(session, target, assume_unit=assume_unit)
    except (ValueError, FileNotFoundError) as exc:   # a unit unknown or undeclared, no raw data, a damaged meta.json
        _fail(f"export of {session}: {exc}")
    console.print(f"wrote {target}: {escape(summary.describe())}")


def _mount_optional() -> None:
    """Sub-commands of other parts (each its own typer app)."""
    from controller.bench.cli import app as bench_app
    from models.plasticity.cli import app as plasticity_app
    from models.plasticity.cli import train as plasticity_train_cmd
    from models.seizure.cli import evaluate as evaluate_cmd
    from models.seizure.cli import train_app
    app.add_typer(plasticity_app, name="plasticity")
    train_app.command("plasticity")(plasticity_train_cmd)
    app.add_typer(train_app, name="train")
    app.command("evaluate")(evaluate_cmd)
    app.add_typer(bench_app, name="bench")

    # These two forward every argument, --help included, to their argparse parser: it is the one list of
    # their options, so the help cannot fall behind it.
    passthrough = {"allow_extra_args": True, "ignore_unknown_options": True}

    @bench_app.command("ads", context_settings=passthrough, add_help_option=False)
    def bench_ads(ctx: typer.Context):
        """Spike-triggered stimulation in real time: 30 kHz × 32 ch simulator, spike → command and delay error.

        Options: `stimloop bench ads --help`."""
        from controller.bench_ads import main as ads_main
        raise typer.Exit(ads_main(ctx.args))

    @bench_app.command("telemetry", context_settings=passthrough, add_help_option=False)
    def bench_telemetry(ctx: typer.Context):
        """What telemetry costs the spike-triggered path: off vs on without and with subscribers.

        Options: `stimloop bench telemetry --help`."""
        from controller.bench_telemetry import main as telemetry_main
        raise typer.Exit(telemetry_main(ctx.args))

    @bench_app.command("inference")
    def bench_inference(n_calls: int = typer.Option(20000, "--n-calls", help="calls per model"),
                        json_out: Optional[Path] = typer.Option(None, "--json", help="write the figures here",
                                                                 callback=output_file)):
        """Per-call latency of the shipped ONNX models (seizure and plasticity): p50/p99/max in µs."""
        from rich.table import Table
        from controller.bench_inference import bench_shipped_models
        res = bench_shipped_models(n_calls)
        t = Table(title=f"inference per call, {n_calls} calls, 1 thread")
        for col in ("model", "p50 (µs)", "p99 (µs)", "max (µs)"):
            t.add_column(col, justify="right" if col != "model" else "left")
        for name, r in res.items():
            t.add_row(name, f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['max_us']:.1f}")
        console.print(t)
        if json_out:
            json_out.write_text(json.dumps(res, indent=1))


_mount_optional()


def main() -> None:
    """The ``stimloop`` command: the app, with what the system refuses (a path that is a folder, a file
    where a folder must go, no permission, a file that is not text, an address ZeroMQ cannot parse) said
    in one line instead of a traceback. Bugs still show theirs."""
    import zmq
    try:
        app()
    except OSError as exc:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        msg = f"{where}: {exc.strerror}" if where and exc.strerror else str(exc)
        if isinstance(exc, NotADirectoryError) or (isinstance(exc, FileExistsError) and exc.filename
                                                   and Path(exc.filename).is_file()):
            msg += " (a file stands where a folder must go)"
        elif isinstance(exc, IsADirectoryError):
            msg += " (a folder stands where a file must go)"
        _error_exit(msg)
    except UnicodeDecodeError as exc:
        _error_exit(f"a file given is not UTF-8 text ({exc.reason} at byte {exc.start})")
    except zmq.ZMQError as exc:
        _error_exit(f"ZeroMQ refused the address: {exc} (expected e.g. tcp://127.0.0.1:5557)")


def _error_exit(msg: str) -> None:
    """``_fail`` outside the command line's context (its ``typer.Exit`` is handled only inside it)."""
    _print_error(msg)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
