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


def closed_loop_rig(fs_hz: float, n_channels: int):
    """The session's chunk path (``ChunkStep``: default config, shipped model, governor, simulated
    device) in simulated time, as the tests that feed it chunks build it: ``(step, actuator, driver, clock)``."""
    from controller.closed_loop import ChunkStep, SeizureLoop
    from controller.config import load_config
    from controller.loop import make_actuator
    from controller.runners.simulated import VirtualClock
    from drivers.simulated import SimulatedStimulator

    cfg = load_config(None)
    clock = VirtualClock()
    drv = SimulatedStimulator(clock=clock)
    act = make_actuator(cfg, drv, clock)
    act.heartbeat()
    step = ChunkStep(SeizureLoop.from_config(cfg, fs_hz, n_channels), act, clock, modeled_latency_s=0.002, source="t")
    return step, act, drv, clock
