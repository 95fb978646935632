"""Waiting in tests for something another thread or process does (devices, emulators, the loop)."""
import time


def wait_until(cond, timeout_s: float = 1.0, poll_s: float = 0.002) -> bool:
    """Poll ``cond()`` until it is true or ``timeout_s`` passes; return its last value."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not cond():
        time.sleep(poll_s)
    return cond()
