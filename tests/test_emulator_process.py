"""The stimulator emulator in a process of its own (hil_sim.emulator_process): real pty, real SerialStimulator."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from drivers.base import DeviceTimeout
from drivers.params import StimParams, Waveform
from drivers.serial_stimulator import SerialStimulator
from hil_sim.emulator_process import EmulatorProcess
from hil_sim.pty_pair import close_pty, open_pty_pair
from conftest import wait_until

pytestmark = pytest.mark.realtime

LONG = StimParams(channel=1, waveform=Waveform.BIPHASIC, amplitude_ua=1500.0, pulse_width_us=100.0,
                  frequency_hz=50.0, n_pulses=100)   # 2 s burst: still running when it is stopped


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_commands_reach_the_child_and_what_it_does_comes_back_in_order(tmp_path, start_method):
    master_fd, slave = open_pty_pair()
    seen: list[tuple] = []
    lock = threading.Lock()

    def on_deliver(t, params):
        with lock:
            seen.append(("deliver", t, params))

    def on_stop(t, channels):
        with lock:
            seen.append(("stop", t, channels))
    log = tmp_path / "device_log.jsonl"
    emu = EmulatorProcess(master_fd, watchdog_s=0.5, log_path=log, on_deliver=on_deliver, on_stop=on_stop,
                          start_method=start_method)
    stim = None
    try:
        emu.start()
        assert emu.pid != os.getpid()
        stim = SerialStimulator(slave, timeout_s=0.05, retries=3)
        stim.open()
        stim.configure(LONG)
        rt = stim.trigger(1)
        assert wait_until(lambda: len(seen) == 1)
        kind, t, params = seen[0]
        assert kind == "deliver" and params == LONG and rt.sent_t <= t < rt.acked_t + 0.05
        assert emu.counters["deliveries"] == 1
        stim.stop()                                  # the burst is cut short: the owner hears of it
        assert wait_until(lambda: len(seen) == 2)
        assert seen[1][0] == "stop" and seen[1][2] == [1]
        emu.corrupt_next(2)                          # the knobs turn the child's emulator
        stim.heartbeat()
        assert emu.counters["replies_corrupted"] >= 1
        emu.set_mute(True)
        with pytest.raises(DeviceTimeout):
            stim.configure(LONG)
        emu.set_mute(False)
        stim.configure(LONG)
        stim.trigger(1)
        assert wait_until(lambda: len(seen) == 3)
    finally:
        if stim is not None:
            stim.close()                             # its STOP may cut the last burst (a 4th report)
        got = emu.stop()
        close_pty(master_fd)
    # Every report is passed on by the time stop() returns, the burst's cut included.
    kinds = [k for k, *_ in seen]
    assert kinds[:3] == ["deliver", "stop", "deliver"] and kinds.count("stop") >= 2
    assert [t for _, t, _ in seen] == sorted(t for _, t, _ in seen)
    assert got["counters"]["deliveries"] == 2
    assert sum(r.get("type") == "TRIGGER" for r in got["records"]) == 2
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(r.get("type") == "TRIGGER" for r in logged) == 2


def test_mute_set_before_start_is_the_state_it_starts_in_and_deliveries_can_be_polled():
    master_fd, slave = open_pty_pair()
    emu = EmulatorProcess(master_fd, watchdog_s=0.5)   # no callbacks: deliveries() polls
    emu.set_mute(True)
    emu.start()
    stim = SerialStimulator(slave, timeout_s=0.05, retries=1, connect_timeout_s=0.3)
    try:
        with pytest.raises(DeviceTimeout):
            stim.open()                             # a muted device does not answer its HELLO
        emu.set_mute(False)
        stim.open()
        stim.configure(LONG)
        stim.trigger(1)
        got: list = []
        assert wait_until(lambda: got.extend(emu.deliveries()) or got)
        assert got[0][1] == LONG
    finally:
        stim.close()
        emu.stop()
        close_pty(master_fd)


def test_an_emulator_that_cannot_start_says_why():
    master_fd, _ = open_pty_pair()
    emu = EmulatorProcess(master_fd, watchdog_s=0.0)    # refused by the emulator itself
    t = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="watchdog_s"):
            emu.start()
        assert time.monotonic() - t < 5                  # said at once, not after the start timeout
    finally:
        close_pty(master_fd)
