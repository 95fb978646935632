"""Fault specs, the pure schedule and the signal-fault applier; simulated-time helper."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DeviceTimeout
from drivers.simulated import SimulatedStimulator
from hil_sim.faults import (SIM_KINDS, FaultConfigError, FaultLog, FaultSchedule, FaultSpec, apply_sim_faults)

FS = 256.0


def _chunk(n=64, n_ch=4, t0=0.0, value=1000.0):
    x = np.full((n, n_ch), value, np.float32)
    x[:, 1] = -value
    ts = 100.0 + t0 + np.arange(n) / FS
    return x, ts


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("spec, match", [
    ({"kind": "nan_burst", "at_s": 1.0}, "missing duration_s"),
    ({"kind": "sample_gap", "at_s": 1.0}, "missing n_samples"),
    ({"kind": "saturation", "at_s": 1.0, "duration_s": 1.0}, "missing level_uv"),
    ({"kind": "clock_jump", "at_s": 1.0, "offset_s": 0.0}, "offset_s=0.0"),
    ({"kind": "corrupt_frames", "at_s": 1.0, "n": 0}, "n=0, expected 1..10000"),
    ({"kind": "device_mute", "at_s": 1.0, "duration_s": -2.0}, "duration_s=-2.0"),
    ({"kind": "device_mute", "at_s": -1.0, "duration_s": 2.0}, "at_s=-1.0"),
    ({"kind": "stream_loss", "at_s": 1.0, "duration_s": 1.0, "level_uv": 5.0}, "level_uv does not apply"),
    ({"kind": "stream_stall", "at_s": 1.0, "duration_s": 1.0, "resume": "later"}, "resume"),
    ({"kind": "nan_burst", "at_s": 1.0, "duration_s": 1.0, "channels": [1, 1]}, "distinct"),
    ({"kind": "meteor", "at_s": 1.0}, "kind"),
    ({"kind": "nan_burst", "at_s": 1.0, "duration_s": 1.0, "colour": "red"}, "colour"),
])
def test_bad_specs_name_field_value_and_range(spec, match):
    with pytest.raises(FaultConfigError, match=match) as ei:
        FaultSchedule([spec], fs_hz=FS, n_channels=4)
    assert "faults[0]" in str(ei.value)


def test_channel_out_of_range_and_kinds_not_supported():
    with pytest.raises(FaultConfigError, match=r"channels=\[4\], expected indices 0..3"):
        FaultSchedule([{"kind": "nan_burst", "at_s": 0, "duration_s": 1, "channels": [4]}], fs_hz=FS, n_channels=4)
    s = FaultSchedule([{"kind": "device_unplug", "at_s": 1, "duration_s": 1},
                       {"kind": "nan_burst", "at_s": 0, "duration_s": 1}], fs_hz=FS)
    with pytest.raises(FaultConfigError, match="simulated runner cannot inject fault kind.*device_unplug"):
        s.require_kinds(SIM_KINDS, "simulated runner")
    with pytest.raises(FaultConfigError, match="needs fs_hz"):
        FaultSchedule([{"kind": "sample_gap", "at_s": 0, "n_samples": 3}])


def test_spec_record_and_defaults():
    f = FaultSpec(kind="stream_stall", at_s=2.0, duration_s=1.0)
    assert f.resume_mode == "backlog"
    assert f.to_record() == {"kind": "stream_stall", "at_s": 2.0, "duration_s": 1.0}


# ---------------------------------------------------------------- schedule queries

def test_schedule_active_starting_ending_transitions():
    s = FaultSchedule([{"kind": "device_mute", "at_s": 2.0, "duration_s": 1.0},
                       {"kind": "clock_jump", "at_s": 1.0, "offset_s": 0.5},
                       {"kind": "clock_jump", "at_s": 5.0, "offset_s": -0.2},
                       {"kind": "corrupt_frames", "at_s": 2.5, "n": 3},
                       {"kind": "sample_gap", "at_s": 4.0, "n_samples": 128}], fs_hz=FS)
    assert [f.kind for f in s.specs] == ["clock_jump", "device_mute", "corrupt_frames", "sample_gap", "clock_jump"]
    assert [f.kind for f in s.active(2.6)] == ["clock_jump", "device_mute"]
    assert s.active(3.0, kinds=["device_mute"]) == []           # end is exclusive
    assert s.device_muted(2.0) and not s.device_muted(1.999)
    assert [f.kind for f in s.starting(2.0, 3.0)] == ["device_mute", "corrupt_frames"]
    assert [f.kind for f in s.ending(3.0, 4.6)] == ["device_mute", "sample_gap"]   # gap ends at 4.5
    tr = s.transitions(0.0, 10.0)
    assert [(t.t_s, t.edge, t.spec.kind) for t in tr] == [
        (1.0, "start", "clock_jump"), (2.0, "start", "device_mute"), (2.5, "start", "corrupt_frames"),
        (3.0, "end", "device_mute"), (4.0, "start", "sample_gap"), (4.5, "end", "sample_gap"),
        (5.0, "start", "clock_jump")]
    assert s.clock_offset_s(0.5) == 0.0 and s.clock_offset_s(3.0) == 0.5
    assert s.clock_offset_s(6.0) == pytest.approx(0.3)


# ---------------------------------------------------------------- signal faults

def test_no_fault_returns_inputs_without_copy():
    s = FaultSchedule([{"kind": "nan_burst", "at_s": 10.0, "duration_s": 1.0}], fs_hz=FS)
    x, ts = _chunk()
    x2, ts2 = s.apply_signal_faults(x, ts, 0.0)
    assert x2 is x and ts2 is ts


def test_nan_burst_on_channels_across_chunks_matches_one_block():
    s = FaultSchedule([{"kind": "nan_burst", "at_s": 0.1, "duration_s": 0.25, "channels": [0, 2]}],
                      fs_hz=FS, n_channels=4)
    x, ts = _chunk(n=256)
    whole, _ = s.apply_signal_faults(x, ts, 0.0)
    parts = [s.apply_signal_faults(x[i:i + 16], ts[i:i + 16], i / FS)[0] for i in range(0, 256, 16)]
    np.testing.assert_array_equal(np.vstack(parts), whole)
    bad = np.isnan(whole)
    start = math.ceil(0.1 * FS)
    assert bad[:, [1, 3]].sum() == 0
    np.testing.assert_array_equal(np.flatnonzero(bad[:, 0]), np.arange(start, start + 64))
    assert not np.isnan(x).any()   # input untouched


def test_saturation_clips_only_inside_window():
    s = FaultSchedule([{"kind": "saturation", "at_s": 0.5, "duration_s": 0.5, "level_uv": 200.0}], fs_hz=FS)
    x, ts = _chunk(n=512)
    y, _ = s.apply_signal_faults(x, ts, 0.0)
    inside = slice(128, 256)
    assert np.all(y[inside, 0] == 200.0) and np.all(y[inside, 1] == -200.0)
    np.testing.assert_array_equal(y[:128], x[:128])
    np.testing.assert_array_equal(y[256:], x[256:])


def test_sample_gap_and_clock_jump_timestamps():
    s = FaultSchedule([{"kind": "sample_gap", "at_s": 0.25, "n_samples": 10},
                       {"kind": "clock_jump", "at_s": 0.5, "offset_s": 2.0}], fs_hz=FS)
    x, ts = _chunk(n=256)
    x[:, 2] = np.arange(256)
    y, t = s.apply_signal_faults(x, ts, 0.0)
    assert y.shape == (246, 4) and t.shape == (246,)
    steps = np.diff(t)
    big = np.flatnonzero(steps > 1.5 / FS)
    assert len(big) == 2
    assert steps[big[0]] == pytest.approx(11 / FS)            # 10 samples missing
    assert steps[big[1]] == pytest.approx(2.0 + 1 / FS)       # the jump
    assert y[big[0] + 1, 2] == 64 + 10                        # the sample after the gap
    assert t[-1] == pytest.approx(ts[-1] + 2.0)


@settings(max_examples=60, deadline=None)
@given(at=st.integers(0, 400), n=st.integers(1, 200), chunk=st.integers(1, 97), off=st.integers(1, 3))
def test_chunking_never_changes_the_result(at, n, chunk, off):
    """Any chunking of the same stream gives the same faulted samples and timestamps."""
    s = FaultSchedule([{"kind": "sample_gap", "at_s": at / FS, "n_samples": n},
                       {"kind": "nan_burst", "at_s": (at + 7) / FS, "duration_s": n / FS, "channels": [1]},
                       {"kind": "clock_jump", "at_s": (at + 3) / FS, "offset_s": off * 0.25}], fs_hz=FS)
    x = np.arange(600 * 2, dtype=np.float32).reshape(600, 2)
    ts = np.arange(600) / FS
    y, t = s.apply_signal_faults(x, ts, 0.0)
    parts = [s.apply_signal_faults(x[i:i + chunk], ts[i:i + chunk], i / FS) for i in range(0, 600, chunk)]
    np.testing.assert_array_equal(np.vstack([p[0] for p in parts]), y)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), t)
    assert y.shape[0] == 600 - min(n, 600 - at)


def test_shape_mismatch_is_a_clear_error():
    s = FaultSchedule([{"kind": "nan_burst", "at_s": 0, "duration_s": 1}], fs_hz=FS, n_channels=4)
    x, ts = _chunk()
    with pytest.raises(ValueError, match=r"ts shape \(63,\), expected \(64,\)"):
        s.apply_signal_faults(x, ts[:-1], 0.0)
    with pytest.raises(ValueError, match=r"x shape \(64, 3\), expected \(n, 4\)"):
        s.apply_signal_faults(x[:, :3], ts, 0.0)


# ---------------------------------------------------------------- simulated time

def test_apply_sim_faults_mutes_simulated_stimulator_and_logs():
    s = FaultSchedule([{"kind": "device_mute", "at_s": 0.5, "duration_s": 0.5},
                       {"kind": "nan_burst", "at_s": 0.25, "duration_s": 0.125}], fs_hz=FS, n_channels=4)
    s.require_kinds(SIM_KINDS, "simulated runner")
    clock_now = [0.0]
    stim = SimulatedStimulator(clock=lambda: clock_now[0])
    stim.open()
    log = FaultLog()
    outcomes = []
    n = 32
    for k in range(0, 384, n):                         # 1.5 s in chunks of 1/8 s
        x, _ = _chunk(n=n)
        ts = (k + np.arange(n)) / FS
        y, t = apply_sim_faults(s, x, ts, k / FS, stimulator=stim, log=log)
        clock_now[0] = float(t[-1])
        try:
            stim.heartbeat()
            outcomes.append((k / FS, "ok"))
        except DeviceTimeout:
            outcomes.append((k / FS, "timeout"))
    muted = [t for t, o in outcomes if o == "timeout"]
    assert muted == [0.5, 0.625, 0.75, 0.875]
    recs = {r["kind"]: r for r in log.records()}
    assert recs["device_mute"]["t_start"] == 0.5 and recs["device_mute"]["t_end"] == 1.0
    assert recs["nan_burst"]["t_start"] == 0.25 and recs["nan_burst"]["t_end"] == 0.375
    # the safe state still works while muted: stop never raises
    stim.set_mute(True)
    assert stim.stop().ok is False


def test_an_unplug_during_corrupt_frames_leaves_the_injector_running_and_the_device_plugged_back(tmp_path):
    """Real emulator on a real pty, no host: the corrupted replies never come, then the device is
    unplugged and plugged again. The injector must carry on (it used to die reading the counters
    of the unplugged emulator, and never plug the device back in)."""
    import time

    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.faults import DeviceFaultInjector
    from hil_sim.process import EmulatedDevice

    device = EmulatedDevice(lambda fd: StimulatorEmulator(fd, clock=time.monotonic), tmp_path / "port")
    device.plug()
    sched = FaultSchedule([{"kind": "corrupt_frames", "at_s": 0.05, "n": 3},
                           {"kind": "device_unplug", "at_s": 0.10, "duration_s": 0.1},
                           {"kind": "corrupt_frames", "at_s": 0.15, "n": 1}])   # while unplugged
    log = FaultLog()
    inj = DeviceFaultInjector(sched, device, time.monotonic, time.monotonic(), log).start()
    try:
        deadline = time.monotonic() + 10.0
        while inj._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not inj._thread.is_alive(), "the injector should finish its plan"
        assert inj.errors == []
        assert device.emulator is not None          # plugged back in
        by_kind = {}
        for r in log.records():
            by_kind.setdefault(r["kind"], []).append(r)
        first, during = by_kind["corrupt_frames"]
        assert first.get("cut_short_by") == "device_unplug" and first["t_end"] is not None
        assert during.get("skipped") == "device unplugged"
        assert by_kind["device_unplug"][0]["t_end"] is not None
    finally:
        inj.stop()
        device.unplug()


def test_overlapping_mutes_keep_the_real_device_muted_until_the_last_ends(tmp_path):
    """Two device_mute faults that overlap: the first to end must not unmute the device while the
    second holds (the simulated-time runner asks the schedule; the real-time injector used to follow
    each edge)."""
    import time

    from hil_sim.emulator import StimulatorEmulator
    from hil_sim.faults import DeviceFaultInjector
    from hil_sim.process import EmulatedDevice

    device = EmulatedDevice(lambda fd: StimulatorEmulator(fd, clock=time.monotonic), tmp_path / "port")
    device.plug()
    sched = FaultSchedule([{"kind": "device_mute", "at_s": 0.05, "duration_s": 0.3},
                           {"kind": "device_mute", "at_s": 0.10, "duration_s": 0.1}])   # ends first, at 0.2
    t0 = time.monotonic()
    inj = DeviceFaultInjector(sched, device, time.monotonic, t0, FaultLog()).start()
    seen = []   # (patient time, muted) sampled between the inner mute's end and the outer one's
    try:
        while inj._thread.is_alive() and time.monotonic() - t0 < 10.0:   # until its plan is done
            seen.append((time.monotonic() - t0, device.emulator._mute))
            time.sleep(0.005)
        assert not inj._thread.is_alive() and inj.errors == []
        assert device.emulator._mute is False   # unmuted once both have ended
    finally:
        inj.stop()
        device.unplug()
    # The edges are at 0.05, 0.2 and 0.35 s; the outer mute cannot end early, whatever the wake-ups.
    between = [m for t, m in seen if 0.23 <= t <= 0.34]
    assert between and all(between)
