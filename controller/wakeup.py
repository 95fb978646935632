"""Wake the loop process the moment new samples are in the ring (instead of sleep-polling).

A named pipe: the acquisition process writes one byte after each ring write
(non-blocking; a full pipe already means "wake up"), the loop waits on it with
``select`` and a timeout. Waking through the kernel takes tens of µs; a
``time.sleep`` poll adds its period plus sleep lateness (p99 ≈ 180 µs on this
class of machine, REFERENCE.md §1) to every sample's latency.
"""
from __future__ import annotations

import errno
import os
import select
import stat
from pathlib import Path


def make_wakeup(path: str | Path) -> Path:
    p = Path(path)
    if p.exists() and not stat.S_ISFIFO(p.stat().st_mode):
        raise FileExistsError(f"{p} exists and is not a named pipe")
    if not p.exists():
        os.mkfifo(p, 0o600)
    return p


class WakeupReader:
    """The waiting side (the loop). Open it before the writer starts writing."""

    def __init__(self, path: str | Path):
        # O_RDWR keeps the pipe open even while no writer is connected (no EOF spin).
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self.path = Path(path)

    def wait(self, timeout_s: float) -> bool:
        """Block until woken or ``timeout_s``; drain the pipe. True if woken."""
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if not ready:
            return False
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        """Close and remove the pipe's name.

        The runner removes it too, but a runner that was killed cannot; the loop
        process outlives it (it stops when it sees its parent gone) and so cleans up.
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


class WakeupWriter:
    """The notifying side (the acquisition process)."""

    def __init__(self, path: str | Path):
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def notify(self) -> None:
        try:
            os.write(self.fd, b"\x01")
        except OSError as exc:  # a full pipe already holds a wake-up
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
