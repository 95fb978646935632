"""Timeflux node for the peer benchmark (runs inside the Timeflux virtual environment, not the project's).

``ThresholdToPort``: rising-edge threshold on one column of its input
DataFrame; writes one byte per edge to a serial device (pty). Prints
``ready`` on the first data it sees, so the harness knows the graph runs.
Imports nothing from stimloop: the Timeflux venv does not have it.
"""
import os
import sys

import numpy as np
from timeflux.core.node import Node


class ThresholdToPort(Node):
    """Input DataFrame column ``channel`` (index) > ``threshold`` rising edges → one byte each to ``port``."""

    def __init__(self, port, channel=0, threshold=500.0):
        self._fd = os.open(port, os.O_WRONLY | os.O_NOCTTY)
        self._ch = int(channel)
        self._thr = float(threshold)
        self._above = False
        self._ready = False

    def update(self):
        if not self.i.ready():
            return
        if not self._ready:
            self._ready = True
            print("ready", flush=True)
            sys.stdout.flush()
        above = self.i.data.iloc[:, self._ch].to_numpy() > self._thr
        n = int(np.count_nonzero(above[1:] & ~above[:-1])) + int(bool(above[0]) and not self._above)
        self._above = bool(above[-1])
        if n:
            os.write(self._fd, b"\x01" * n)

    def terminate(self):
        os.close(self._fd)
