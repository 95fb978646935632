"""The stimulator emulator in a process of its own, as a real stimulator is a device of its own.

In the simulator's process the emulator's reader thread would wait for the GIL
while the patient's next block is produced (a 30 kHz × 32-channel block every
1 ms for the spiking units), and its receipt stamp, the end of every latency the
project measures, would include that wait: in an ADS session the device-receive
stage reached 0.2–1.4 ms on the slowest commands (docs/performance_log.md, "The spike
fast path in a session"). :class:`EmulatorProcess` runs the
:class:`hil_sim.emulator.StimulatorEmulator` on the pty master in a child process
and keeps the emulator's interface for its owner: ``start``, ``stop``, the fault
knobs ``set_mute`` and ``corrupt_next``, and ``counters`` (each a request on a
control pipe). What the device does to the patient comes back on a second pipe:
each delivered burst, and each burst cut short, either to callbacks
(``on_deliver(t, params)``, ``on_stop(t, channels)``, called from a thread of this
process in the order the device acted) or, without callbacks, to
:meth:`EmulatorProcess.deliveries` (polled, as ``hil_sim.ads_sim`` does between blocks).

Start method: ``"forkserver"`` (default) forks the child from a clean
single-threaded server, so an emulator can be started while the simulator's
threads run (a replugged device); ``"fork"`` is for a parent that starts it
before any thread exists (``hil_sim.ads_sim``), so it stays that process's child.
The child stops when told, or when its owner dies (its control pipe's end).
"""
from __future__ import annotations

import os
import threading

from drivers.params import StimParams

__all__ = ["EmulatorProcess"]

#: what the forkserver imports once, so each emulator it forks starts in a few ms
_PRELOAD = ["hil_sim.emulator_process", "hil_sim.emulator"]


class _InheritedFd:
    """A file descriptor that goes to the child as its own duplicate, whatever the start method."""

    def __init__(self, fd: int) -> None:
        self.fd = int(fd)

    def __reduce__(self):
        # Pickled while the child is being started: DupFd then hands the fd to that child
        # (inherited with fork, passed over a socket to the forkserver), as Connection objects go.
        from multiprocessing.reduction import DupFd
        return _detach, (DupFd(self.fd),)


def _detach(dup) -> int:
    return dup.detach()


class EmulatorProcess:
    """A :class:`~hil_sim.emulator.StimulatorEmulator` on ``master_fd`` in a child process.

    ``watchdog_s``, ``log_path``: as the emulator's (the JSONL device log is appended
    by the child). ``on_deliver(t_lsl, params)`` / ``on_stop(t_lsl, channels)``:
    the emulator's callbacks, run here by a reader thread; without them the
    deliveries queue up for :meth:`deliveries`. Not started by the constructor.
    """

    def __init__(self, master_fd: int, watchdog_s: float = 0.5, log_path: str | os.PathLike | None = None,
                 on_deliver=None, on_stop=None, start_method: str = "forkserver") -> None:
        if start_method not in ("forkserver", "fork"):
            raise ValueError(f"EmulatorProcess start_method={start_method!r} invalid, expected 'forkserver' or 'fork'")
        self.master_fd = int(master_fd)
        self.watchdog_s = float(watchdog_s)
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self.on_deliver = on_deliver
        self.on_stop = on_stop
        self.start_method = start_method
        self._muted = False
        self._proc = None
        self._ctl = None
        self._out = None
        self._ctl_lock = threading.Lock()   # one request and its reply at a time (injector and owner threads)
        self._reader: threading.Thread | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "EmulatorProcess":
        """Start the child and wait (10 s at most) until its emulator reads the pty."""
        import multiprocessing as mp

        if self._proc is not None:
            raise RuntimeError("EmulatorProcess already started")
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        self._ctl, ctl_child = ctx.Pipe()
        self._out, out_child = ctx.Pipe(duplex=False)
        fd = self.master_fd if self.start_method == "fork" else _InheritedFd(self.master_fd)
        # A forked child also gets this side's pipe ends, which it closes first (see _emulator_main).
        own_ends = (self._ctl, self._out) if self.start_method == "fork" else ()
        self._proc = ctx.Process(target=_emulator_main, name="stimulator-emulator", daemon=True,
                                 args=(fd, self.watchdog_s, self.log_path, self._muted, ctl_child, out_child, own_ends))
        self._proc.start()
        ctl_child.close()
        out_child.close()
        self.pid = self._proc.pid
        reply = self._ctl.recv() if self._ctl.poll(10.0) else None
        if reply != "ready":
            self._kill()
            self._proc = None
            why = reply[1] if isinstance(reply, tuple) else "it did not answer within 10 s"
            raise RuntimeError(f"stimulator emulator process did not start: {why}")
        if self.on_deliver is not None or self.on_stop is not None:
            self._reader = threading.Thread(target=self._dispatch, name="emulator-events", daemon=True)
            self._reader.start()
        return self

    def stop(self) -> dict:
        """Stop the emulator (the device goes off, as ``StimulatorEmulator.stop``).

        Returns ``{"records", "counters"}``. With callbacks, every delivery and cut burst the
        device reported, up to its stop, has been passed on when this returns.
        """
        got = {"records": [], "counters": {}}
        if self._proc is None:
            return got
        with self._ctl_lock:
            try:
                self._ctl.send(("stop",))
                if self._ctl.poll(10.0):
                    got = self._ctl.recv()
            except (EOFError, OSError):
                pass   # the child is gone already: nothing more to get from it
        if self._reader is not None:
            self._reader.join(5.0)   # the child closed its end after its last report: EOF ends it
        self._proc.join(timeout=5.0)
        self._kill()
        for conn in (self._ctl, self._out):
            conn.close()
        self._proc = None
        return got

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2.0)

    # ------------------------------------------------------------ the emulator's knobs

    def set_mute(self, mute: bool) -> None:
        """As ``StimulatorEmulator.set_mute``; before ``start`` it is the state the emulator starts in."""
        self._muted = bool(mute)
        if self._proc is not None:
            self._request("mute", self._muted)

    def corrupt_next(self, n: int = 1) -> None:
        """As ``StimulatorEmulator.corrupt_next``."""
        self._request("corrupt", int(n))

    @property
    def counters(self) -> dict[str, int]:
        """The emulator's protocol counters, now (a copy)."""
        return self._request("counters")

    def _request(self, op: str, *args):
        if self._proc is None:
            raise RuntimeError(f"EmulatorProcess.{op}: not started")
        with self._ctl_lock:
            self._ctl.send((op, *args))
            if not self._ctl.poll(5.0):
                raise TimeoutError(f"stimulator emulator process did not answer {op!r} within 5 s")
            reply = self._ctl.recv()
        if isinstance(reply, Exception):
            raise reply
        return reply

    # ------------------------------------------------------------ what the device did

    def deliveries(self) -> list[tuple[float, StimParams]]:
        """Deliveries reported since the last call: ``(t_lsl delivered, params)`` (never blocks; no callbacks)."""
        out = []
        while self._out is not None and not self._out.closed and self._out.poll():
            try:
                kind, t, payload = self._out.recv()
            except EOFError:
                break
            if kind == "deliver":
                out.append((t, StimParams.from_dict(payload)))
        return out

    def _dispatch(self) -> None:
        while True:
            try:
                kind, t, payload = self._out.recv()
            except (EOFError, OSError):
                return
            if kind == "deliver" and self.on_deliver is not None:
                self.on_deliver(t, StimParams.from_dict(payload))
            elif kind == "stop" and self.on_stop is not None:
                self.on_stop(t, payload)


def _emulator_main(master_fd, watchdog_s: float, log_path: str | None, muted: bool, ctl, out, own_ends=()) -> None:
    """Child body: run the emulator until told to stop (or the owner is gone), then send back its ground truth."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the owner orders the shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a group SIGTERM: the owner stops us in order
    # Forked with the owner's ends of both pipes: while we hold them, the owner's death never
    # shows here as EOF, and we would outlive it holding the pty (orphaned, PPID 1).
    for end in own_ends:
        end.close()
    from hil_sim.emulator import StimulatorEmulator

    out_lock = threading.Lock()   # the emulator's reader and scheduler threads both report

    def report(kind: str, t: float, payload) -> None:
        with out_lock:
            out.send((kind, float(t), payload))

    try:
        emu = StimulatorEmulator(master_fd, watchdog_s=watchdog_s, log_path=log_path,
                                 on_deliver=lambda t, params: report("deliver", t, params.to_dict()),
                                 on_stop=lambda t, channels: report("stop", t, list(channels)))
        emu.set_mute(muted)
        emu.start()
    except Exception as exc:   # the owner raises it with this text
        ctl.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    ctl.send("ready")
    while True:
        try:
            op, *args = ctl.recv()
        except EOFError:   # the owner died
            op, args = "stop", []
        if op == "stop":
            break
        if op == "mute":
            emu.set_mute(args[0])
            ctl.send(None)
        elif op == "corrupt":
            emu.corrupt_next(args[0])
            ctl.send(None)
        elif op == "counters":
            ctl.send(dict(emu.counters))
        else:
            ctl.send(ValueError(f"unknown request {op!r}"))
    emu.stop()
    out.close()   # after the stop's own reports: the owner's reader ends at EOF with all of them
    try:
        ctl.send({"records": list(emu.records), "counters": dict(emu.counters)})
    except (BrokenPipeError, OSError):
        pass
