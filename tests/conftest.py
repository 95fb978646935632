"""Test-session setup: loopback-only LSL discovery before anything imports pylsl."""
from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()


def wait_until(cond, timeout_s: float = 1.0, poll_s: float = 0.002) -> bool:
    """Poll ``cond()`` until it is true or ``timeout_s`` passes; return its last value (tests that
    wait for a device, an emulator or the loop: ``from conftest import wait_until``)."""
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not cond():
        time.sleep(poll_s)
    return cond()
