"""Child processes end cleanly: with their parent (a killed runner must not leave orphans stimulating or
recording), and through their own ordered shutdown on Ctrl-C or SIGTERM."""
from __future__ import annotations

import os
import signal
import threading
import time


def stop_when_parent_dies(stop_event, interval_s: float = 0.25) -> threading.Thread | None:
    """Set ``stop_event`` once the parent process is gone (reparented), so the child shuts down cleanly.

    A daemon thread polling ``os.getppid()``: portable, and the child still runs its own orderly
    shutdown (stimulation off, files flushed) instead of being killed outright. It touches the
    (cross-process, lock-protected) event only once the parent is gone: a daemon thread that dies
    inside ``Event.wait`` at process exit would leave the event's lock taken and deadlock the parent.

    The parent is the process that started this one (``multiprocessing.parent_process()``), not
    whoever is the parent when this is called: a runner killed during the child's start-up (spawn,
    imports: about a second) has already left it with init, which would then be watched forever.
    Returns ``None`` (and has set ``stop_event``) when the parent is gone already.
    """
    import multiprocessing as mp
    creator = mp.parent_process()
    parent = creator.pid if creator is not None else os.getppid()
    if os.getppid() != parent:
        stop_event.set()
        return None

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                stop_event.set()
                return

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


def stop_on_signals(stop_event, sigterm_grace_s: float = 0.0) -> None:
    """In a session child process: leave Ctrl-C and SIGTERM to the ordered shutdown.

    Ctrl-C reaches the whole foreground group and ``systemctl stop`` / ``docker stop``
    SIGTERM the whole group: a child dying there would skip its own cleanup (stimulation
    off, recording flushed, ground truth written). SIGINT is ignored (the runner orders
    the stop); SIGTERM sets ``stop_event``, after ``sigterm_grace_s`` so that a process
    others still need (the simulated device until the loop has sent STOP) outlives them
    when the runner orders the stop itself in time. Only in the main thread of a child
    process: a test calling a process body in-process keeps its own handlers.
    """
    import multiprocessing as mp
    if mp.parent_process() is None or threading.current_thread() is not threading.main_thread():
        return

    def setter() -> None:
        if sigterm_grace_s > 0:
            time.sleep(sigterm_grace_s)
        stop_event.set()

    def on_term(signum, frame) -> None:
        # Not stop_event.set() here: the main thread may hold the event's (non-reentrant) lock
        # inside is_set() when the signal lands, and the handler runs on that same thread.
        threading.Thread(target=setter, name="sigterm-stop", daemon=True).start()

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_term)
