"""Peers side by side: one stimulus stream, one machine, one clock, each peer in turn.

A pulse outlet (:mod:`controller.bench.outlet`) streams for the whole run.
Each peer runs as its own process for ``duration_s`` against that stream and
writes its output to a fresh pty; this process stamps every output on the LSL
clock as it arrives on the pty master (the stimloop peer talks the real
framed protocol, so there the stimulator emulator stamps the TRIGGER frame,
same clock, same place). Latency = output stamp − the outlet's real push of
the pulse sample (``pulse_push_t``: how late the outlet pushed is its own,
reported apart as ``stream_push_late_ms``); outputs are paired with pulses one
to one, in order (``match``). The stimloop
peer also reports its stages per command (``PEER_STAGES``: into the ring,
ring → decision, governor + framing, write → device receipt, joined with
the device log by sequence number), so the gap to the floor is explained,
not only measured.

The run is split into ``rounds``; each round runs every peer once, in an order
rotated from round to round, and a peer's figures pool its rounds. So a slow
drift of the machine's load (other processes, thermal state) falls on every
peer alike instead of on whichever ran last. Each peer sees ~10 pulses a
second: at the default 10 s that is ~100 latencies, whose p99 is nearly their
maximum, and a noisy spell of the machine raises a whole round. So every
stimloop / peer ratio at p50 and p99 comes with a 95 % interval that resamples
the rounds, then the pulses within them (``ratio_ci95``; at least
``MIN_ROUNDS`` rounds). ``rounds_for`` picks ~5 s rounds; a longer
``--duration`` gives more rounds and a narrower interval.

A peer that cannot run here (not installed) is ``skipped``; one that fails
(does not start, or raises) gets ``error``, and the other peers keep their
results. A peer that ran but exited with an error, or without its ``done``
line, in any round gets ``error`` too (its figures are kept beside it). Both
keep the ``end_to_end_ms`` key, with no figures. The stimloop
peers also report the governor's refusals of scored pulses (``refused``, by
rule in ``refused_rules``): a refused pulse is scored as missed, so a miss
count is read with it.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from controller.bench.common import (MIN_ROUND_S, MIN_ROUNDS, CpuMeter, check_duration, cpu_seconds, ratio_ci95,
                                     stats_ms, tree_pids)
from controller.low_latency import DEFAULT_NICE
from controller.lsl_config import ensure_lsl_config

PEERS = ("stimloop", "stimloop_busy_poll", "pylsl_floor", "pylsl_floor_busy_poll", "mne_lsl", "timeflux")
#: stimloop itself, as configured by default and with ``source.busy_poll``; every other peer is compared with each.
OURS = ("stimloop", "stimloop_busy_poll")
#: Python peers: module in this folder and its flags.
_PY_PEERS = {"stimloop": ("stimloop_peer", []), "stimloop_busy_poll": ("stimloop_peer", ["--busy-poll"]),
             "pylsl_floor": ("pylsl_floor", []), "pylsl_floor_busy_poll": ("pylsl_floor", ["--busy-poll"]),
             "mne_lsl": ("mne_lsl_peer", [])}
#: Pulses in a round's last 50 ms are not scored: their outputs may come after the peer stopped.
END_MARGIN_S = 0.05
#: A peer's stage row is joined with the pulse whose nominal time is within this of its sample time: the
#: ring's timestamps carry LslSource's time-correction offset (tens of µs), the stream's period is 1 ms.
PULSE_JOIN_S = 0.0004
PEER_DIR = Path(__file__).resolve().parent
ROOT = PEER_DIR.parent.parent.parent
TIMEFLUX_VENV_ENV = "STIMLOOP_TIMEFLUX_VENV"
#: What the Timeflux venv gets: the versions the documented peer figures were measured with
#: (docs/performance_log.md), so a fresh ``stimloop bench setup-timeflux`` measures the same Timeflux.
TIMEFLUX_PACKAGES = ("timeflux==0.17.2", "timeflux-dsp==0.3.4", "pylsl==1.16.2")
STREAM = {"fs_hz": 1000.0, "n_channels": 8, "chunk_n": 1, "pulse_rate_hz": 10.0, "pulse_uv": 1000.0,
          "noise_uv": 10.0}
THRESHOLD_UV = 500.0   # half the pulse height, 50 σ above the noise: no false crossings


def timeflux_venv() -> Path:
    """Where the Timeflux virtual environment lives (``$STIMLOOP_TIMEFLUX_VENV`` or the user cache)."""
    env = os.environ.get(TIMEFLUX_VENV_ENV)
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "stimloop" / "timeflux-venv"


class SetupError(RuntimeError):
    """Creating the Timeflux venv failed; the message is one line saying which step and why."""


def create_timeflux_venv(path: Path | None = None) -> Path:
    """Create the Timeflux venv (``python -m venv`` + ``pip install`` of ``TIMEFLUX_PACKAGES``); returns its path.

    Raises :class:`SetupError` with a one-line message when a step fails.
    """
    path = Path(path or timeflux_venv())
    if (path / "bin" / "timeflux").exists():
        return path
    try:
        # venv's own complaint is short and says why (permissions, a bad path): keep its last line.
        mk = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True)
    except OSError as exc:
        raise SetupError(f"could not create the Timeflux venv at {path}: {exc}") from None
    if mk.returncode != 0:
        why = (mk.stderr.strip().splitlines() or [f"exit code {mk.returncode}"])[-1]
        raise SetupError(f"could not create the Timeflux venv at {path} (set ${TIMEFLUX_VENV_ENV} or --path "
                         f"to another folder): {why}")
    # timeflux 0.17 imports pylsl.resolve_stream, which pylsl 1.18 removed: pin the last pylsl that has
    # it; that one carries no liblsl, hence PYLSL_LIB (REFERENCE.md §8). pip's progress stays on the
    # terminal: it takes a while, and on failure its own output above says what went wrong.
    try:
        pip = subprocess.run([str(path / "bin" / "pip"), "install", *TIMEFLUX_PACKAGES])
    except OSError as exc:
        raise SetupError(f"could not run pip in {path}: {exc}") from None
    if pip.returncode != 0:
        raise SetupError(f"pip install {' '.join(TIMEFLUX_PACKAGES)} into {path} failed "
                         f"(exit code {pip.returncode}; pip's output above says why)")
    return path


def project_liblsl() -> str:
    """The liblsl shipped inside the project venv's pylsl wheel (REFERENCE.md §8): Timeflux is pointed at it."""
    import pylsl
    lib_dir = Path(pylsl.__file__).resolve().parent / "lib"
    for name in ("liblsl.so", "liblsl.dylib", "lsl.dll"):
        if (lib_dir / name).exists():
            return str(lib_dir / name)
    raise FileNotFoundError(f"no liblsl in {lib_dir}: pylsl >= 1.18 ships it (REFERENCE.md §8)")


class _ByteStamper(threading.Thread):
    """Stamps every byte arriving on a pty master with ``pylsl.local_clock`` (one stamp per read)."""

    def __init__(self, master_fd: int, slave_path: str):
        super().__init__(daemon=True)
        import pylsl
        self.fd, self.clock = master_fd, pylsl.local_clock
        # Hold the slave open: with no slave opener the master reads EIO (hang-up) until the peer opens it.
        self._slave_fd = os.open(slave_path, os.O_RDWR | os.O_NOCTTY)
        self.stamps: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if r:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    return
                t = self.clock()
                self.stamps.extend([t] * len(data))

    def stop(self) -> list[float]:
        self._halt.set()
        self.join(2)
        if self._slave_fd is not None:
            os.close(self._slave_fd)
            self._slave_fd = None
        return self.stamps


def match(pulse_t, out_t, t_from: float, t_to: float) -> dict:
    """Outputs ``out_t`` paired one to one, in order, with the pulses ``pulse_t`` (their real push times);
    latencies of the pulses in [t_from, t_to], their misses, and the extra outputs there (pure).

    Peers answer pulses in the order they come, so the outputs that arrive between one pulse and the
    next can only answer that pulse or earlier unanswered ones: the k of them go to the latest k
    unanswered pulses, in order, and the earlier unanswered ones are missed. So a stall longer than
    the pulse spacing, after which the outputs of pulses A and B land together after B, scores A
    with its real (long) latency instead of pairing A's output with B, missing A and calling B's
    output extra. Outputs beyond the unanswered pulses are extras. Pulses outside the span are
    paired too (an output may answer one) but not scored.
    """
    import numpy as np
    p = np.sort(np.asarray(pulse_t, float))
    o = np.sort(np.asarray(out_t, float))
    owner = np.full(o.size, -1)
    after = np.searchsorted(p, o, side="right") - 1   # the latest pulse before each output
    k = next_p = 0
    while k < o.size:
        j = int(after[k])
        k_end = int(np.searchsorted(after, j, side="right"))
        if j >= 0:
            unanswered = np.arange(next_p, j + 1)
            next_p = j + 1
            batch = unanswered[-(k_end - k):]
            owner[k:k + batch.size] = batch
        k = k_end
    scored = (p >= t_from) & (p <= t_to)
    hit = np.zeros(p.size, bool)
    hit[owner[owner >= 0]] = True
    lat = [float(o[i] - p[owner[i]]) for i in range(o.size) if owner[i] >= 0 and scored[owner[i]]]
    extra = int(np.sum((owner < 0) & (o >= t_from) & (o <= t_to + END_MARGIN_S)))
    detected = int(np.sum(hit & scored))
    return {"latencies_s": lat, "pulses": int(scored.sum()), "detected": detected,
            "missed": int(scored.sum()) - detected, "extra_outputs": extra}


def _peer_command(name: str, source_id: str, port: str, duration_s: float, workdir: Path) -> tuple[list[str], dict]:
    env = dict(os.environ)
    common = ["--source-id", source_id, "--port", port, "--channel", "0", "--threshold", str(THRESHOLD_UV),
              "--duration", str(duration_s)]
    if name in _PY_PEERS:
        mod, flags = _PY_PEERS[name]
        return [sys.executable, "-m", f"controller.bench.peers.{mod}", *common, *flags], env
    if name == "timeflux":
        venv = timeflux_venv()
        exe = venv / "bin" / "timeflux"
        if not exe.exists():
            raise _Skip(f"Timeflux venv not found at {venv} (create it: stimloop bench setup-timeflux, "
                        f"or set ${TIMEFLUX_VENV_ENV})")
        text = (PEER_DIR / "timeflux_graph.yaml").read_text()
        chans = "[" + ", ".join(f"c{i}" for i in range(int(STREAM["n_channels"]))) + "]"
        for key, val in (("SOURCE_ID", source_id), ("CHANNELS", chans), ("PORT", port), ("CHANNEL", "0"),
                         ("THRESHOLD", str(THRESHOLD_UV)), ("RATE", "1000")):
            text = text.replace(f"@{key}@", val)
        graph = workdir / "timeflux_graph.yaml"
        graph.write_text(text)
        env.update(PYLSL_LIB=project_liblsl(), PYTHONPATH=str(PEER_DIR))   # REFERENCE.md §8
        return [str(exe), str(graph)], env
    raise ValueError(f"peer {name!r} unknown, expected one of {PEERS}")


class _Skip(Exception):
    pass


def run_peer(name: str, source_id: str, duration_s: float, workdir: Path, ready_timeout_s: float = 60.0,
             nice: int | None = DEFAULT_NICE) -> dict:
    """Run one peer against the streaming outlet; returns output stamps and process facts (or ``skipped``).

    ``nice``: the stimloop peers are given that nice value, as a session's controller processes are
    (``session.nice``; the busy-polling one keeps its own, ``controller.low_latency.nice_for``); the
    other peers, plain loops as their users run them, keep the default.
    """
    import pylsl

    from hil_sim.pty_pair import close_pty, open_pty_pair
    # {"skipped": why}: the peer cannot run on this machine (not installed); {"error": why}: it should
    # have run and did not. Exceptions are left to the caller (run_peers), which records them per peer.
    if name == "mne_lsl":
        try:
            import mne_lsl  # noqa: F401
        except ImportError as exc:
            return {"skipped": f"mne-lsl not installed in the project venv ({exc}); pip install 'stimloop[bench]'"}
    master, slave = open_pty_pair()
    stamper = emu = None
    tag = f"{name}_{time.monotonic_ns()}"   # one device log and stage file per round
    log = workdir / f"device_log_{tag}.jsonl"
    stages_path = workdir / f"stages_{tag}.json"
    proc = None
    try:
        try:
            cmd, env = _peer_command(name, source_id, slave, duration_s, workdir)
        except _Skip as exc:
            return {"skipped": str(exc)}
        if name in OURS:
            cmd += ["--stages", str(stages_path)] + ([] if nice is None else ["--nice", str(nice)])
            emu = subprocess.Popen([sys.executable, "-m", "hil_sim.emulator", "--fd", str(master), "--log", str(log),
                                    "--watchdog-s", "1.0"], pass_fds=(master,), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, cwd=str(ROOT))
            if emu.stdout.readline().strip() != "ready":
                return {"error": f"stimulator emulator did not start (exit code {emu.poll()})"}
        else:
            stamper = _ByteStamper(master, slave)
            stamper.start()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
                                env=env, start_new_session=True)
        # Readiness: the peer prints "ready" once its inlet is connected (Timeflux: on its first data).
        line = _readline(proc, ready_timeout_s)
        if line is None or line.strip() != "ready":
            err = _kill(proc)
            return {"error": f"{name} did not start: said {line!r}, exit code {proc.returncode}; "
                             f"stderr: {err[-400:].strip()!r}"}
        t_start = pylsl.local_clock()
        pids = tree_pids(proc.pid)
        cpu = CpuMeter({f"{name}:{p}": p for p in pids}).start()
        if name == "timeflux":
            time.sleep(duration_s)
            cpu_pct = cpu.stop()
            _signal_group(proc, signal.SIGINT)   # Timeflux stops its graph (and its worker processes) on SIGINT
        else:
            # The peer stops itself after duration_s; CPU is measured while it runs.
            while proc.poll() is None and pylsl.local_clock() < t_start + duration_s - 0.05:
                time.sleep(0.05)
            cpu_pct = cpu.stop()
        t_stop = min(pylsl.local_clock(), t_start + duration_s)
        out, err = _finish(proc)
        done = [ln for ln in out.splitlines() if ln.startswith("done")]
        if name in OURS:
            emu.send_signal(signal.SIGTERM)
            emu.wait(5)
            from controller.recorder import read_jsonl
            recs = read_jsonl(log) if log.exists() else []
            trig = [r for r in recs if r.get("type") in ("trigger", "TRIGGER") and r.get("ok", True)]
            stamps = [r["t_received"] for r in trig]
            stage_rows, refusals = _stage_rows(stages_path, {r["seq"]: r["t_received"] for r in trig})
            nice_status = json.loads(stages_path.read_text()).get("nice") if stages_path.exists() else None
        else:
            time.sleep(0.05)   # the last byte in flight
            stamps = stamper.stop()
            stage_rows = refusals = None   # a byte-writing peer has no stages and no governor to report
            nice_status = "unchanged"
        total_cpu = {k.split(":")[0] + ("" if i == 0 else f"_child{i}"): v for i, (k, v) in enumerate(cpu_pct.items())}
        return {"stamps": stamps, "stage_rows": stage_rows, "refusals": refusals, "nice": nice_status,
                "t_start": t_start, "t_stop": t_stop, "exit_code": proc.returncode,
                "peer_said": done[-1] if done else None, "cpu_percent": total_cpu,
                "host_steal_ms": (cpu.host_steal_ms or {}).get("total"),
                "peer_counts": parse_done(done[-1]) if done else {},
                "stderr_tail": err.strip()[-300:] if proc.returncode not in (0, -signal.SIGINT) else ""}
    finally:
        if proc is not None:
            if proc.poll() is None:
                _kill(proc)
            _signal_group(proc, signal.SIGKILL)   # no worker of the peer outlives the run
        if stamper is not None and not stamper._halt.is_set():
            stamper.stop()
        if emu is not None and emu.poll() is None:
            emu.kill()
            emu.wait()
        close_pty(master)


def parse_done(line: str) -> dict:
    """Counts from a peer's last line: ``done N`` (outputs) or, from the stimloop peer,
    ``done N refused=R faults=F`` (commands, governor refusals, faults); ``{}`` if unreadable (pure)."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "done" or not parts[1].isdigit():
        return {}
    out = {"outputs": int(parts[1])}
    for p in parts[2:]:
        k, _, v = p.partition("=")
        if v.isdigit():
            out[k] = int(v)
    return out


# The stimloop peer's path in stages (names as in bench ads' breakdown where they mean the same).
PEER_STAGES = ("lsl_to_ring", "ring_to_decision", "governor_and_framing", "write_to_device_receipt")


def _stage_rows(path: Path, received_by_seq: dict) -> tuple[list[list[float]], list[list]]:
    """The stimloop peer's per-command stage times joined with the device's receipt of the same seq,
    and its governor refusals.

    Rows: ``[sample_t, pulled_t, submit_t, sent_t, device_t]`` (LSL clock, s); commands the device log
    does not show are left out (the end-to-end figure counts them as missed anyway). Refusals:
    ``[sample_t, rule]``.
    """
    if not path.exists():
        return [], []
    doc = json.loads(path.read_text())
    rows = [[*r[:4], received_by_seq[r[4]]] for r in doc["commands"] if r[4] in received_by_seq]
    return rows, [list(r) for r in doc["refusals"]]


def stage_stats(rows) -> tuple[dict, dict]:
    """``(stages_ms, raw_s)`` of ``_stage_rows`` rows: each stage is the step between two stamps."""
    import numpy as np
    a = np.asarray(rows, float).reshape(-1, 5)
    raw = {name: (a[:, k + 1] - a[:, k]).tolist() for k, name in enumerate(PEER_STAGES)}
    return {k: stats_ms(v) for k, v in raw.items()}, raw


def _readline(proc: subprocess.Popen, timeout_s: float) -> str | None:
    """The first line that says ``ready`` or an error (log lines, e.g. Timeflux's, are skipped)."""
    deadline = time.monotonic() + timeout_s
    line = None
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([proc.stdout], [], [], left)
        if not r:
            return line
        line = proc.stdout.readline()
        if not line or line.strip() == "ready" or line.startswith("error"):
            return line
    return line


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the peer's own process group (it was started in a new session), so its workers get it too."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen, timeout_s: float = 15.0) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        return proc.communicate()


def _kill(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
    try:
        return proc.communicate(timeout=5)[1] or ""
    except Exception:
        return ""


def rounds_for(duration_s: float) -> int:
    """Rounds for a peer run of ``duration_s``: ~5 s each, at least ``MIN_ROUNDS`` (1 under 3 s), at most 20."""
    if duration_s < MIN_ROUNDS * MIN_ROUND_S:
        return 1
    return int(min(20, max(MIN_ROUNDS, duration_s // 5)))


def run_peers(duration_s: float = 10.0, peers=PEERS, rounds: int | None = None,
              nice: int | None = DEFAULT_NICE) -> dict:
    """All ``peers`` on one pulse stream, ``duration_s`` each, interleaved in ``rounds`` (rotated order).

    ``rounds`` defaults to ``rounds_for(duration_s)``; ``nice``: see :func:`run_peer`. Returns ``{"stream", "peers": {peer:
    {end_to_end_ms, detected, missed, ...} | {end_to_end_ms, skipped} | {end_to_end_ms, error}},
    "ratios", "ratio_ci95"}``. One peer's failure (an exception included) is that peer's ``error``.
    """
    ensure_lsl_config()
    from controller.bench.outlet import OutletProcess
    check_duration("duration_s", duration_s, 1.0)
    rounds = rounds_for(duration_s) if rounds is None else rounds
    if not (isinstance(rounds, int) and 1 <= rounds <= 20 and duration_s / rounds >= MIN_ROUND_S):
        raise ValueError(f"rounds={rounds!r} invalid, expected an integer 1..20 with duration_s/rounds >= 1 s")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"peer(s) {unknown} unknown, expected some of {list(PEERS)}")
    peers = list(peers)
    raw: dict[str, list[dict]] = {name: [] for name in peers}
    with tempfile.TemporaryDirectory(prefix="stimloop_bench_peers_") as tmp, \
            OutletProcess({**STREAM, "name": f"stimloop-bench-peers-{os.getpid()}"}) as out:
        out.start()
        c0 = cpu_seconds(out.pid)
        t0 = time.monotonic()
        for r in range(rounds):
            for name in peers[r % len(peers):] + peers[:r % len(peers)]:
                if raw[name] and ("skipped" in raw[name][-1] or "error" in raw[name][-1]):
                    continue   # a peer that cannot run here, or failed, does not get another try
                try:
                    raw[name].append(run_peer(name, out.source_id, duration_s / rounds, Path(tmp), nice=nice))
                except Exception as exc:   # this peer's failure; the others keep their results
                    raw[name].append({"error": f"{type(exc).__name__}: {exc}"})
        c1 = cpu_seconds(out.pid)
        summary = out.stop()
    outlet_cpu = None if c0 is None or c1 is None else round(100 * (c1 - c0) / (time.monotonic() - t0), 1)
    results: dict = {}
    for name, runs in raw.items():
        try:
            results[name] = peer_result(name, runs, summary["pulse_t"], summary["pulse_push_t"])
        except Exception as exc:   # scoring one peer's output must not lose the others'
            results[name] = {"error": f"scoring failed: {type(exc).__name__}: {exc}"}
        results[name].setdefault("end_to_end_ms", stats_ms([]))   # the required keys, with no figures
        results[name].setdefault("host_steal_ms", None)
        results[name].setdefault("stream_push_late_ms", stats_ms([]))
    return {"stream": {**STREAM, "threshold_uv": THRESHOLD_UV, "rounds": rounds, "outlet_max_behind_ms":
                       round(summary["max_behind_s"] * 1e3, 3), "outlet_cpu_percent": outlet_cpu},
            "peers": results, "ratios": ratio_table(results), "ratio_ci95": ratio_ci_table(results)}


def round_error(name: str, r: dict) -> str | None:
    """Why one of a peer's rounds did not end as it should, or None (pure).

    A peer stops itself after its duration, exits 0 and says ``done``; Timeflux says nothing at the
    end and is stopped by the harness's SIGINT. Anything else (a traceback, a kill, a missing
    ``done``) means it stopped part-way: its figures cover only the time before, and its misses
    would read as a slow peer instead of a broken one.
    """
    code = r.get("exit_code")
    ok_codes = (0, -signal.SIGINT) if name == "timeflux" else (0,)
    if code not in ok_codes:
        tail = (r.get("stderr_tail") or "").strip().splitlines()
        return f"exit code {code}" + (f": {tail[-1]}" if tail else "")
    if name != "timeflux" and not r.get("peer_said"):
        return "ended without its done line"
    return None


def peer_result(name: str, runs: list[dict], pulse_t, pulse_push_t) -> dict:
    """One peer's entry from its rounds (``run_peer`` results) and the stream's pulses (pure).

    ``pulse_t``: each pulse sample's nominal LSL time; ``pulse_push_t``: when the outlet really pushed
    it. Latencies start from the push; push − nominal is the outlet's lateness, reported apart.
    """
    import numpy as np
    for key in ("error", "skipped"):
        if any(key in r for r in runs):
            return {key: next(r[key] for r in runs if key in r)}
    nominal = np.asarray(pulse_t, float)
    push = np.asarray(pulse_push_t, float)
    if nominal.shape != push.shape:
        raise ValueError(f"{nominal.size} pulse times but {push.size} push times: the outlet's summary is inconsistent")
    order = np.argsort(nominal)
    nominal, push = nominal[order], push[order]

    def scored_span(r, t) -> bool:   # from 0.2 s after the peer was ready to just before it stopped
        return r["t_start"] + 0.2 <= t <= r["t_stop"] - END_MARGIN_S

    def to_push(t: float) -> float | None:
        """The real push time of the pulse whose sample stamp is ``t`` (None: no pulse there)."""
        j = int(np.searchsorted(nominal, t))
        near = [i for i in (j - 1, j) if 0 <= i < nominal.size and abs(nominal[i] - t) <= PULSE_JOIN_S]
        return float(push[near[0]]) if near else None

    scored = [match(push, r["stamps"], r["t_start"] + 0.2, r["t_stop"] - END_MARGIN_S) for r in runs]
    lat = [x for m in scored for x in m["latencies_s"]]
    counts = {k: sum(m[k] for m in scored) for k in ("pulses", "detected", "missed", "extra_outputs")}
    # The outlet's lateness over the pulses this peer was scored on: the stream's, not the peer's.
    late = [float(pu - no) for r in runs for no, pu in zip(nominal, push) if scored_span(r, pu)]
    cpu = {}
    for r in runs:
        for k, v in (r["cpu_percent"] or {}).items():
            cpu[k] = cpu.get(k, 0.0) + (v or 0.0) / len(runs)
    last = runs[-1]
    own, raw = {}, {}
    if name in OURS:   # scored over the same span as the end-to-end figure
        # Each command's first stamp becomes its pulse's real push, so lsl_to_ring starts where the
        # end to end does and the stages add up to it; a row with no pulse is not a scored command.
        rows = []
        for r in runs:
            for row in r.get("stage_rows") or []:
                t_push = to_push(row[0])
                if t_push is not None and scored_span(r, t_push):
                    rows.append([t_push, *row[1:]])
        st, raw = stage_stats(rows)
        # The governor's refusals of scored pulses: pulses it did not send, so counted in "missed";
        # by rule, so a rate limit shows as one. (Pulses before the span, e.g. a backlog pulled at
        # start-up and refused by min_interval, are not scored either way.)
        rules: dict[str, int] = {}
        for r in runs:
            for t, rule in r.get("refusals") or []:
                t_push = to_push(t)
                if t_push is not None and scored_span(r, t_push):
                    rules[rule] = rules.get(rule, 0) + 1
        said = [r.get("peer_counts") or {} for r in runs]
        own = {"stages_ms": st, "refused": sum(rules.values()), "refused_rules": rules,
               "faults": sum(c["faults"] for c in said) if all("faults" in c for c in said) else None}
    steal = [r.get("host_steal_ms") for r in runs]
    problems = [f"round {i + 1}: {why}" for i, r in enumerate(runs) if (why := round_error(name, r))]
    if own.get("faults"):
        problems.append(f"{own['faults']} command(s) faulted (the driver or the device failed)")
    tails = [r["stderr_tail"] for r in runs if r.get("stderr_tail")]
    return {"end_to_end_ms": stats_ms(lat), **counts, "rounds": len(runs), **own,
            "stream_push_late_ms": stats_ms(late),
            # What the hypervisor took over this peer's rounds (all CPUs, 10 ms resolution; None: not said).
            "host_steal_ms": round(sum(steal), 1) if steal and None not in steal else None,
            "per_round_p99_ms": [stats_ms(m["latencies_s"])["p99"] for m in scored],
            "_raw_s": {"end_to_end": lat, **raw},
            "_rounds_s": [m["latencies_s"] for m in scored],   # for the intervals over rounds
            "cpu_percent": {k: round(v, 1) for k, v in cpu.items()}, "exit_code": last["exit_code"],
            "exit_codes": [r.get("exit_code") for r in runs],
            "peer_said": last["peer_said"], "nice": last.get("nice"),
            **({"stderr_tail": tails[-1]} if tails else {}),
            **({"error": "; ".join(problems)} if problems else {})}


def _pairs(results: dict, key: str):
    """``(ours, peer, our_value, peer_value)`` for every stimloop variant and every other peer that has ``key``."""
    def usable(r) -> bool:   # a failed or skipped peer keeps its keys, with no figures to compare
        return isinstance(r, dict) and r.get(key) is not None and "error" not in r and "skipped" not in r

    for ref in OURS:
        if not usable(results.get(ref)):
            continue
        base = results[ref][key]
        for name, r in results.items():
            if name not in OURS and usable(r):
                yield ref, name, base, r[key]


def ratio_table(results: dict) -> dict:
    """``{ours: {peer: {p50: ours/peer, ...}}}`` per percentile, for each of ``OURS`` that ran (None: no figure)."""
    out: dict = {}
    for ref, name, base, other in _pairs(results, "end_to_end_ms"):
        out.setdefault(ref, {})[name] = {k: (round(base[k] / other[k], 3) if base.get(k) and other.get(k) else None)
                                         for k in ("p50", "p90", "p99", "p999", "max")}
    return out


def ratio_ci_table(results: dict, seed: int = 0) -> dict:
    """``{ours: {peer: {"p50": [lo, hi], "p99": [lo, hi]}}}``: 95 % intervals of ours/peer over rounds (None if too few)."""
    out: dict = {}
    for ref, name, base, other in _pairs(results, "_rounds_s"):
        out.setdefault(ref, {})[name] = {k: ratio_ci95(base, other, q, seed) for k, q in (("p50", 50.0), ("p99", 99.0))}
    return out


if __name__ == "__main__":
    print(json.dumps(run_peers(float(sys.argv[1]) if len(sys.argv) > 1 else 3.0,
                               sys.argv[2].split(",") if len(sys.argv) > 2 else PEERS), indent=1))
