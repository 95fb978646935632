"""A raw pseudo-terminal pair: the slave path is a real serial device for pyserial.

REFERENCE.md §8: a pty pair (``os.openpty()``, ``tty.setraw``) gives a real
serial device path for a device emulator.
"""
from __future__ import annotations

import os
import tty


def open_pty_pair() -> tuple[int, str]:
    """Open a pty pair in raw mode; returns ``(master_fd, slave_path)``.

    The emulator reads/writes ``master_fd``; the driver opens ``slave_path``.
    Both ends are raw (no echo, no line editing, no CR/LF translation), which a
    binary protocol needs. The slave fd opened here is closed again: the driver
    opens the path itself, and keeping ours would hold the line open forever.
    """
    master_fd, slave_fd = os.openpty()
    try:
        tty.setraw(master_fd)
        tty.setraw(slave_fd)
        slave_path = os.ttyname(slave_fd)
    except BaseException:
        os.close(master_fd)
        os.close(slave_fd)
        raise
    # Raw mode is a property of the slave line discipline; it survives closing
    # this fd as long as the master stays open.
    os.close(slave_fd)
    return master_fd, slave_path


def close_pty(master_fd: int) -> None:
    """Close the master end (idempotent: an already closed fd is ignored)."""
    try:
        os.close(master_fd)
    except OSError:
        pass


def close_pty_pair(master_fd: int, slave_path: str | None = None) -> None:
    """Close a pair from :func:`open_pty_pair` (the slave path needs no closing: we hold no fd on it)."""
    close_pty(master_fd)
