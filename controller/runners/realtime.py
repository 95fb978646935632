"""Real-time session: simulator, acquisition, inference loop and actuator as processes.

Process layout (all spawned; the parent only orchestrates and shows progress)::

    hil      simulated patient: LSL outlet + stimulator emulator on a pty   (source.kind = hil)
    acq      source -> SharedRing, raw recording                            (controller.acquisition)
    loop     ring -> features -> ONNX -> policy -> governor -> driver        (controller.loop)

With a spike policy (``SPIKE_POLICY_KINDS``: the fast path of ARCHITECTURE.md) the loop
pulls the source into the ring itself and decides on each chunk in the process that
received it; ``acq`` then only records the ring (``run_acquisition(follow=...)``)::

    loop     source -> SharedRing -> spike detector -> policy -> governor -> driver
    acq      SharedRing -> raw recording

Shutdown on Ctrl-C, SIGTERM or the end of the session, in this order:
stimulation off (loop), sources (acq), simulator, then the report.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from controller.config import Config
from controller.recorder import EventLog, new_session_dir, write_json


class SessionError(RuntimeError):
    """The session could not start or ended on a fault; the message says what to fix."""


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # SIGTERM -> same orderly path as Ctrl-C
    raise _Stop(signal.Signals(signum).name)


def hil_spec(cfg: Config, stream: str | None = None) -> dict:
    """Settings of the simulator process (``hil_sim.process.run_hil``) for ``cfg``.

    ``stream``: the LSL name it publishes under (default ``cfg.source.stream``).
    """
    sim = cfg.simulator
    return {"fs_hz": sim.fs_hz, "n_channels": sim.n_channels, "patient": sim.patient,
            "seed": cfg.session.seed, "seizure_onsets_s": sim.seizure_onsets_s,
            "spontaneous_seizures": sim.spontaneous_seizures,
            "seizure_rate_per_hour": sim.seizure_rate_per_hour, "alpha_uv": sim.alpha_uv, "alpha_hz": sim.alpha_hz,
            "stream": stream if stream is not None else cfg.source.stream,
            # Its own source_id (this process runs one simulator at a time): two simulators on one
            # machine both publish "stimloop-sim", and by name alone a client could take either.
            "source_id": f"stimloop-hil-{sim.patient}-{os.getpid()}",
            "chunk_s": sim.chunk_s, "watchdog_s": cfg.device.watchdog_s,
            "model": sim.model, "trigger_channels": list(cfg.policy.ads.trigger_channels),
            "faults": [f.model_dump(mode="json", exclude_none=True) for f in cfg.faults]}


def source_spec(cfg: Config, hil_stream: str | None = None, hil_source_id: str | None = None) -> dict:
    s = cfg.source
    if s.kind in ("hil", "lsl"):
        return {"kind": "lsl", "name": hil_stream or s.stream, "type": s.stream_type or None,
                "source_id": hil_source_id or s.source_id or None, "resolve_timeout_s": s.resolve_timeout_s,
                "max_buflen_s": s.max_buflen_s, "stall_timeout_s": s.stall_timeout_s, "busy_poll": s.busy_poll,
                # The built-in simulator stamps with this machine's local_clock: its offset is 0, and
                # an estimate would only add its error (controller/sources/lsl.py).
                "time_correction": s.kind != "hil", "units": s.units or None}
    return {"kind": "brainflow", "board_id": s.board_id, "params": dict(s.board_params), "busy_poll": s.busy_poll,
            "stall_timeout_s": s.stall_timeout_s}


def stop_processes(stops: dict, procs: dict, order=("loop", "acq", "hil")) -> set[str]:
    """Stop the session's processes in order — the loop (stimulation off) first — terminating stragglers.

    Returns the names of the processes it had to terminate (or then kill), so that a -SIGTERM
    exit code sent from here can be told from one sent from outside.
    """
    forced: set[str] = set()
    for name in order:
        stops[name].set()
        p = procs.get(name)
        # pid is None: its start() raised (e.g. spawn refused it); joining it would raise over that error.
        if p is not None and p.pid is not None:
            p.join(10)
            if p.is_alive():
                forced.add(name)
                p.terminate()
                p.join(2)
            if p.is_alive():  # a child's SIGTERM handler only sets the stop event it already ignores
                p.kill()
                p.join(2)
    return forced


def unguarded_main_script() -> str | None:
    """The main script's path when it is a ``.py`` file with no ``if __name__ == "__main__":`` block.

    A session's processes start with ``spawn``, which imports the main module in each child: a
    script that calls ``run_session`` at its top level starts it again there, and multiprocessing
    stops that child with a RuntimeError on its stderr. The parent only sees the child exit;
    this lets its error say why. ``None`` for anything else (the ``stimloop`` command, ``-c``,
    a guarded script, a file that cannot be read or parsed).
    """
    import ast
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test):
            return None
    return str(path)


def wait_ready(q, proc, timeout_s: float, what: str) -> dict:
    """The first message a starting process puts on ``q``; a clear ``SessionError`` if it fails or dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            msg = q.get(timeout=0.1)
        except Exception:
            if not proc.is_alive():
                script = unguarded_main_script()
                hint = "" if script is None else (
                    f"; {script} has no `if __name__ == \"__main__\":` block: a session's processes import the "
                    "main script when they start (multiprocessing's spawn), so its top-level code must not start "
                    "a session itself: put that code under the guard")
                raise SessionError(f"{what} process exited during start-up (exit code {proc.exitcode}){hint}") from None
            continue
        if "error" in msg:
            raise SessionError(f"{what}: {msg['error']}")
        return msg
    raise SessionError(f"{what} did not start within {timeout_s:.0f} s")


def run_session(cfg: Config, console=None, session_dir: Path | None = None) -> Path:
    """Run one session to the end and return its folder (metrics and report written)."""
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    from controller.inference import ContractError, read_contract
    from controller.sources import probe_source

    from controller.safety import UnsafeProfileError, check_session_safety
    try:
        check_session_safety(cfg)  # an unsafe profile or stimulation never starts anything
    except (UnsafeProfileError, ValueError) as exc:
        raise SessionError(f"safety profile refused: {exc}") from None
    model_path = cfg.model_path()
    try:
        contract = read_contract(model_path)
    except (ContractError, FileNotFoundError) as exc:
        raise SessionError(f"model {model_path}: {exc}") from None
    if cfg.device.kind == "serial":   # before the simulator, the folder and the source: nothing to stop yet
        if not cfg.device.port:
            raise SessionError("device.kind = serial needs device.port (or --port PATH)")
        if "://" not in cfg.device.port and not os.path.exists(cfg.device.port):
            raise SessionError(f"device.port {cfg.device.port} not found: expected an existing serial device "
                               "path (e.g. /dev/ttyUSB0, /dev/ttyACM0; is the stimulator plugged in?)")

    session_dir = Path(session_dir) if session_dir else new_session_dir(cfg.session.out_dir)
    (session_dir / "config.toml").write_text(cfg.to_toml())
    write_json(session_dir / "session.json", {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv, "python": sys.version, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "runner": "realtime",
    })
    log = EventLog(session_dir / "events.jsonl")
    ctx = mp.get_context("spawn")
    stops = {k: ctx.Event() for k in ("hil", "acq", "loop")}
    procs: dict[str, mp.Process] = {}
    ring = None
    wakeup = None
    # Signals can only be handled in the main thread; embedded callers (tests, notebooks) stop via Ctrl-C there.
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
    status = "completed"
    failure: SessionError | None = None
    from controller.events import Event, EventKind
    from controller.low_latency import CpuMeter, LowLatency, steal_ms, steal_since
    qos = LowLatency(cfg.session.low_latency)   # PM QoS for the session's length (controller/low_latency.py)
    steal0 = steal_ms()   # what the hypervisor takes over the session, recorded with its end
    from pylsl import local_clock
    forced: set[str] = set()
    cpu: CpuMeter | None = None   # each process's CPU use while the loop runs
    emulator_pid = None           # the simulator's stimulator runs in a process of its own
    try:
        if qos.enabled:
            log.append(Event(local_clock(), EventKind.STATUS, "runner", {"low_latency": qos.acquire()}))
        stream_name, stream_source_id, port = None, None, cfg.device.port
        if cfg.source.kind == "hil" or cfg.device.kind == "hil":
            from hil_sim.process import run_hil
            q = ctx.Queue()
            # Started only for its stimulator, the simulator must not publish under the name the
            # user asked for: the controller would silently record the simulator instead of a
            # missing stream, or meet two streams of that name.
            sim_stream = None if cfg.source.kind == "hil" else f"stimloop-hil-unused-{session_dir.name}-{os.getpid()}"
            spec = hil_spec(cfg, sim_stream)
            spec["stimulator_only"] = sim_stream is not None   # its patient is not what is recorded
            procs["hil"] = ctx.Process(target=run_hil, args=(spec, q, stops["hil"], str(session_dir)), name="stimloop-hil")
            procs["hil"].start()
            info = wait_ready(q, procs["hil"], 60, "simulator")
            emulator_pid = info.get("emulator_pid")
            if cfg.source.kind == "hil":
                stream_name, stream_source_id = info["stream"], info["source_id"]
            if cfg.device.kind == "hil":
                port = info["port"]
            _say(console, f"simulator: stimulator on [bold]{info['port']}[/]" if sim_stream else
                 f"simulator: LSL stream [bold]{info['stream']}[/], stimulator on [bold]{info['port']}[/]")

        spec_src = source_spec(cfg, stream_name, stream_source_id)
        try:
            src_info = probe_source(spec_src)
        except Exception as exc:
            raise SessionError(f"source: {exc}") from None
        from controller.config import SPIKE_POLICY_KINDS
        try:
            if cfg.policy.kind not in SPIKE_POLICY_KINDS:  # spike policies run no seizure model
                contract.check_stream(src_info.fs_hz, src_info.n_channels)
        except ContractError as exc:
            raise SessionError(f"model {model_path.name} does not fit the stream: {exc}") from None
        _say(console, f"source: {src_info.name} — {src_info.n_channels} ch @ {src_info.fs_hz:g} Hz, "
                      f"{src_info.describe_units()}")

        from controller.ring import SharedRing
        capacity = int(cfg.ring.capacity_s * src_info.fs_hz)
        ring = SharedRing.create(None, src_info.n_channels, capacity, src_info.fs_hz)

        from controller.acquisition import run_acquisition
        from controller.wakeup import make_wakeup
        wakeup = str(make_wakeup(Path(tempfile.gettempdir()) / f"stimloop-wakeup-{ring.name}"))
        # The spike fast path: the loop pulls the source, the acquisition process records (module doc).
        fast_path = cfg.policy.kind in SPIKE_POLICY_KINDS
        acq_kw = ({"follow": src_info} if fast_path else {"nice": cfg.session.nice})   # recording waits for no one
        procs["acq"] = ctx.Process(target=run_acquisition, name="stimloop-acq",
                                   args=(None if fast_path else spec_src, ring.name, stops["acq"],
                                         str(session_dir / "events.jsonl"), str(session_dir / "raw")),
                                   kwargs={"wakeup_path": wakeup, **acq_kw})
        procs["acq"].start()

        from controller.loop import run_loop
        q_loop = ctx.Queue()
        procs["loop"] = ctx.Process(target=run_loop, name="stimloop-loop",
                                    args=(cfg.model_dump_json(), ring.name, port, str(session_dir), stops["loop"], q_loop),
                                    kwargs={"wakeup_path": wakeup, **({"source_spec": spec_src} if fast_path else {})})
        procs["loop"].start()
        wait_ready(q_loop, procs["loop"], 60, "control loop")
        cpu = CpuMeter({**{k: p.pid for k, p in procs.items()}, "emulator": emulator_pid}).start()

        _progress(cfg.session.duration_s, procs, console)
    except (KeyboardInterrupt, _Stop) as exc:
        status = f"stopped by {str(exc) or 'SIGINT'}"  # KeyboardInterrupt() carries no text
        _say(console, f"[yellow]{status}: stimulation off, then sources, then recorder[/]")
    except SessionError as exc:
        status, failure = "failed", exc
    finally:
        if in_main:
            # A second Ctrl-C or SIGTERM must not cut the orderly shutdown (children left running,
            # shared memory and the wake-up FIFO leaked).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            cpu_percent = cpu.stop() if cpu is not None else None   # before the loop stops
            forced = stop_processes(stops, procs)
            if ring is not None:
                ring.close()
                ring.unlink()
            if wakeup is not None:
                Path(wakeup).unlink(missing_ok=True)
            qos.release()
            log.append(Event(local_clock(), EventKind.STATUS, "runner", {"status": status,
                             "exit_codes": {k: p.exitcode for k, p in procs.items()},
                             "forced_stop": sorted(forced), "host_steal_ms": steal_since(steal0),
                             "cpu_percent": cpu_percent,
                             "pids": {**{k: p.pid for k, p in procs.items()},   # for a scheduler trace
                                      **({"emulator": emulator_pid} if emulator_pid else {})}}))
            log.close()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, old_term)
    # -SIGTERM is a clean end only when this runner sent it (a straggler); from outside it killed
    # the child before its cleanup.
    crashed = {k: p.exitcode for k, p in procs.items()
               if p.exitcode not in (0, None) and not (k in forced and p.exitcode == -signal.SIGTERM)}
    from controller.report import build_report
    build_report(session_dir)  # also after a failure: whatever was recorded is kept and shown
    if failure is not None:
        raise SessionError(f"{failure} (session folder: {session_dir})")
    if crashed:
        raise SessionError(f"process(es) ended with an error {crashed}; data kept in {session_dir}")
    return session_dir


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def _progress(duration_s: float, procs: dict, console) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    t_end = time.monotonic() + duration_s
    with Progress(TextColumn("closed loop"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                  TimeRemainingColumn(), console=console, disable=console is None, transient=True) as bar:
        task = bar.add_task("session", total=duration_s)
        while (left := t_end - time.monotonic()) > 0:
            dead = [k for k, p in procs.items() if not p.is_alive()]
            if dead:
                raise SessionError(f"{', '.join(dead)} process stopped unexpectedly (exit codes "
                                   f"{ {k: procs[k].exitcode for k in dead} }); see events.jsonl")
            time.sleep(min(0.2, left))
            bar.update(task, completed=duration_s - max(0.0, t_end - time.monotonic()))
