"""Low-latency mode: keep the CPUs out of idle states while a session or benchmark runs (PM QoS).

An idle CPU halts (here a vCPU: the hypervisor deschedules it); waking it for the
next 1 ms chunk or command costs tens to hundreds of µs, every time, with cold
caches. Linux's PM QoS interface lets a process forbid that: write the largest
tolerable wake-up latency (0 µs) to ``/dev/cpu_dma_latency`` and keep the file
open; idle CPUs then poll instead of halting until it is closed (the kernel's
``Documentation/power/pm_qos_interface.rst``; ``cyclictest`` does the same).

On by default in sessions (``session.low_latency``) and benchmarks
(``--no-low-latency`` to turn it off), as ``cyclictest`` holds it by default.
Price: idle cores stay busy polling (power, and the host sees busy vCPUs), and
the device needs write access (root, or a udev rule for your user). Never
required: when the device cannot be written, the run goes on without it and
says so. Measured on the 2-core CI VM (``stimloop bench ads --duration 30``):
spike → command p50 0.39–0.49 ms, p99 0.90–1.09 ms without; p50 0.30 ms, p99
0.48–0.54 ms with.
"""
from __future__ import annotations

import os
import struct

__all__ = ["LowLatency", "PM_QOS_DEVICE"]

PM_QOS_DEVICE = "/dev/cpu_dma_latency"


class LowLatency:
    """Hold a PM QoS CPU wake-up latency request for as long as the object is entered.

    ``with LowLatency() as ll: ...``; ``ll.status`` says what was obtained
    (``"cpu_dma_latency 0 µs held"`` or ``"unavailable: <why>"``) for the record.
    ``enabled=False`` does nothing (status ``"off"``), so callers need no branch.
    """

    def __init__(self, enabled: bool = True, max_latency_us: int = 0, device: str = PM_QOS_DEVICE) -> None:
        if not (isinstance(max_latency_us, int) and 0 <= max_latency_us <= 1_000_000):
            raise ValueError(f"max_latency_us={max_latency_us!r} invalid, expected an integer 0..1000000 µs")
        self.enabled = bool(enabled)
        self.max_latency_us = max_latency_us
        self.device = device
        self.status = "off"
        self._fd: int | None = None

    def acquire(self) -> str:
        """Make the request (idempotent); returns and records the status. Never raises for an unwritable device."""
        if not self.enabled or self._fd is not None:
            return self.status
        try:
            fd = os.open(self.device, os.O_WRONLY)
        except OSError as exc:
            self.status = f"unavailable: {self.device}: {exc.strerror or exc}"
            return self.status
        try:
            os.write(fd, struct.pack("i", self.max_latency_us))   # the request lasts while fd is open
        except OSError as exc:
            os.close(fd)
            self.status = f"unavailable: writing {self.device}: {exc.strerror or exc}"
            return self.status
        self._fd = fd
        self.status = f"cpu_dma_latency {self.max_latency_us} µs held"
        return self.status

    def release(self) -> None:
        """Withdraw the request (closing the file is what withdraws it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.status = "released"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "LowLatency":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
