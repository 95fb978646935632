"""Simulator-side processes (the ADS simulator's emulator, a benchmark's emulator) do not outlive their parent."""
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(60)

PARENT = """
import sys, threading, time
from hil_sim.pty_pair import open_pty_pair
from hil_sim.emulator_process import EmulatorProcess
if __name__ == "__main__":
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()   # a simulator has threads
    fd, path = open_pty_pair()
    ep = EmulatorProcess(fd, watchdog_s=1.0, start_method=sys.argv[1]).start()
    print(ep.pid, flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_emulator_process_stops_when_its_parent_dies(sig, start_method):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, start_method], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(sig)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"emulator process {child} outlived its parent (signal {sig.name})"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


EMULATOR_PARENT = """
import subprocess, sys, time
p = subprocess.Popen([sys.executable, "-m", "hil_sim.emulator", "--pty"], stdout=subprocess.PIPE, text=True)
p.stdout.readline(); p.stdout.readline()   # the pty path, "ready"
print(p.pid, flush=True)
time.sleep(60)
"""


def test_a_benchmarks_emulator_process_stops_when_the_benchmark_is_killed():
    """``python -m hil_sim.emulator`` (benchmarks run it as a process of its own) watches its parent."""
    parent = subprocess.Popen([sys.executable, "-c", EMULATOR_PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = None
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), f"emulator process {child} outlived the benchmark that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
