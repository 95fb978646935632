"""Session children stop with their runner, also when it dies while they are still starting (real processes)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from controller.process_watch import stop_when_parent_dies
from controller.ring import SharedRing


def _slow_starting_child(result_path: str) -> None:
    creator = mp.parent_process().pid
    deadline = time.monotonic() + 10
    while os.getppid() == creator and time.monotonic() < deadline:   # start-up outlasts the runner
        time.sleep(0.01)
    stop = threading.Event()
    stop_when_parent_dies(stop, interval_s=0.05)
    Path(result_path).write_text("stopped" if stop.wait(2.0) else "still running")


def _runner_dying_at_once(target, args, pid_path: str) -> None:
    child = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    child.start()
    Path(pid_path).write_text(str(child.pid))
    os._exit(0)   # killed right after starting its child: no atexit, no join


def _wait_for(path: Path, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not (path.exists() and path.stat().st_size):
        time.sleep(0.02)
    return path.exists() and path.stat().st_size > 0


def _kill_if_left(pid_path: Path) -> None:
    """Our own grandchild, by its id, if the behaviour under test left it running."""
    if pid_path.exists():
        try:
            os.kill(int(pid_path.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_child_whose_runner_died_before_it_watched_stops_at_once(tmp_path):
    result, pid_path = tmp_path / "result", tmp_path / "child.pid"
    runner = mp.get_context("spawn").Process(target=_runner_dying_at_once,
                                             args=(_slow_starting_child, (str(result),), str(pid_path)))
    runner.start()
    runner.join(30)
    try:
        assert runner.exitcode == 0
        assert _wait_for(result, 20.0)
        assert result.read_text() == "stopped"
    finally:
        _kill_if_left(pid_path)


class _NeverSet:
    """Picklable stop event nobody sets: only the parent watch can end the acquisition."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self._event = threading.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()


def test_an_acquisition_orphaned_during_start_up_stops_and_says_so(tmp_path):
    """The runner dies while its acquisition child is still importing: the child must not record forever."""
    from controller.acquisition import run_acquisition
    ring = SharedRing.create(None, 1, 1024, 100.0)
    events_path, pid_path = tmp_path / "events.jsonl", tmp_path / "child.pid"
    spec = {"kind": "array", "data": np.zeros((100, 1), np.float32), "fs_hz": 100.0, "loop": True}
    runner = mp.get_context("spawn").Process(
        target=_runner_dying_at_once,
        args=(run_acquisition, (spec, ring.name, _NeverSet(), str(events_path), str(tmp_path / "raw")), str(pid_path)))
    runner.start()
    runner.join(30)
    try:
        assert runner.exitcode == 0
        stopped = False
        end = time.monotonic() + 20
        while not stopped and time.monotonic() < end:
            time.sleep(0.1)
            if events_path.exists():
                stopped = any(json.loads(line).get("what") == "acquisition_stopped"
                              for line in events_path.read_text().splitlines())
        assert stopped
    finally:
        _kill_if_left(pid_path)
        ring.close()
        ring.unlink()
