"""Real LSL stream from the simulated patient: pacing, timestamps, description."""
import threading

import numpy as np
import pytest

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import pylsl  # noqa: E402

from hil_sim.outlet import PatientOutlet  # noqa: E402
from hil_sim.patient import SimulatedPatient  # noqa: E402

pytestmark = pytest.mark.realtime


def test_outlet_paces_real_time_with_patient_timestamps():
    fs, n_ch = 256.0, 4
    patient = SimulatedPatient(fs_hz=fs, n_channels=n_ch, seed=9)
    source_id = f"test-hil-outlet-{id(patient)}"
    out = PatientOutlet(patient, stream_name="stimloop-sim-test", source_id=source_id, chunk_s=1 / 32)
    stop = threading.Event()
    th = threading.Thread(target=out.run, args=(stop,), daemon=True)
    th.start()
    try:
        assert out.started.wait(5.0)
        streams = pylsl.resolve_byprop("source_id", source_id, 1, 5.0)
        assert streams, "stream not found"
        inlet = pylsl.StreamInlet(streams[0], max_buflen=5)
        info = inlet.info(timeout=5.0)
        assert info.type() == "EEG" and info.channel_count() == n_ch
        assert info.nominal_srate() == fs and info.channel_format() == pylsl.cf_float32
        ch = info.desc().child("channels").child("channel")
        labels, units = [], []
        for _ in range(n_ch):
            labels.append(ch.child_value("label"))
            units.append(ch.child_value("unit"))
            ch = ch.next_sibling()
        assert labels == patient.channel_names and set(units) == {"microvolts"}
        inlet.open_stream(timeout=5.0)
        buf = np.empty((int(fs), n_ch), dtype=np.float32)
        ts_all, got_t, n_got = [], [], 0
        t_start = pylsl.local_clock()
        inlet.pull_chunk(timeout=1.0, max_samples=int(fs), dest_obj=buf)  # drop what was queued on connect
        t_start = pylsl.local_clock()
        while pylsl.local_clock() - t_start < 2.0:
            _, ts = inlet.pull_chunk(timeout=0.2, max_samples=int(fs), dest_obj=buf)
            n_got += len(ts)
            ts_all.extend(ts)
            got_t.extend([pylsl.local_clock()] * len(ts))
    finally:
        stop.set()
        th.join(5.0)
    assert not th.is_alive()
    # Paced, not measured: samples kept coming (liveness), none arrived before its own time (the
    # outlet never runs ahead of the clock), none missing or repeated. How close to real time it
    # keeps is a benchmark figure (`stimloop bench`, throughput: outlet_max_behind_ms), not a test.
    assert n_got >= out.chunk_n
    ts = np.asarray(ts_all)
    assert np.all(ts <= np.asarray(got_t))
    np.testing.assert_allclose(np.diff(ts), 1 / fs, atol=1e-6)    # patient time, no jitter, no gaps
    # Timestamps are t0 + patient time, and each sample leaves after its own time.
    k = np.rint((ts - out.t0) * fs)
    np.testing.assert_allclose(ts, out.t0 + k / fs, atol=1e-6)
    assert out.patient_time(out.lsl_time(1.25)) == pytest.approx(1.25)
    # Push times: one per chunk, in order, none before the chunk's last sample existed.
    push = out.push_times()
    assert push.size * out.chunk_n == out.n_pushed and np.all(np.diff(push) > 0)
    last_sample_t = out.t0 + (out.push_first_sample + (np.arange(push.size) + 1) * out.chunk_n - 1) / fs
    assert np.all(push >= last_sample_t)
    # ... and none after the reader had it (the stamp is taken as the chunk is handed to liblsl).
    chunk = ((np.rint((ts - out.t0) * fs) - out.push_first_sample) // out.chunk_n).astype(int)
    assert chunk.min() >= 0 and chunk.max() < push.size
    assert np.all(push[chunk] <= np.asarray(got_t))


def test_a_pulse_delivered_while_the_outlet_waits_shows_in_the_chunk_it_falls_in():
    """The controller reacts to a chunk and the stimulator delivers a burst at once: its artifact
    must be in the very next samples (the outlet used to compute each chunk before waiting for its
    time, so a burst starting within one chunk of a push never showed in the signal)."""
    from drivers.params import StimParams
    from hil_sim.patient import PatientParams

    fs, n_ch = 512.0, 4
    patient = SimulatedPatient(fs_hz=fs, n_channels=n_ch, seed=1,
                               params=PatientParams(interictal_spike_rate_per_min=0.0, seizure_rate_per_hour=0.0))
    source_id = f"test-hil-outlet-pulse-{id(patient)}"
    out = PatientOutlet(patient, stream_name="stimloop-sim-test", source_id=source_id, chunk_s=1 / 32)
    burst = StimParams(channel=0, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=150.0, n_pulses=3)
    stop = threading.Event()
    th = threading.Thread(target=out.run, args=(stop,), daemon=True)
    th.start()
    xs, tss, t_deliver = [], [], None
    try:
        assert out.started.wait(5.0)
        inlet = pylsl.StreamInlet(pylsl.resolve_byprop("source_id", source_id, 1, 5.0)[0], max_buflen=5)
        inlet.open_stream(timeout=5.0)
        buf = np.empty((512, n_ch), dtype=np.float32)
        t_give_up = pylsl.local_clock() + 10.0
        while pylsl.local_clock() < t_give_up:
            _, ts = inlet.pull_chunk(timeout=0.2, max_samples=512, dest_obj=buf)
            if len(ts):
                xs.append(buf[:len(ts)].copy())
                tss.append(np.asarray(ts))
                if t_deliver is None and ts[-1] - out.t0 > 1.0:
                    t_deliver = pylsl.local_clock()        # as hil_sim.process delivers a TRIGGER
                    with out.lock:
                        patient.stimulate(out.patient_time(t_deliver), burst)
                elif t_deliver is not None and ts[-1] > t_deliver + 0.1:
                    break
    finally:
        stop.set()
        th.join(5.0)
    assert t_deliver is not None
    x, ts = np.concatenate(xs), np.concatenate(tss)
    before = np.abs(x[ts < t_deliver]).max()
    first = (ts >= t_deliver) & (ts < t_deliver + 3 / fs)       # the samples at the first pulse
    assert first.any()
    assert np.abs(x[first]).max() > 5 * before, (np.abs(x[first]).max(), before)


def test_outlet_bad_chunk():
    with pytest.raises(ValueError, match="chunk_s"):
        PatientOutlet(SimulatedPatient(256.0, 2), chunk_s=0.0)


def _run_outlet_with_faults(faults, duration_s, paced_from_s, fs=256.0, chunk_s=1 / 16):
    """Run a PatientOutlet with ``faults`` for ``duration_s`` of patient time; unpaced (t0 in the past)
    until patient time ``paced_from_s``, real time after it."""
    from hil_sim.faults import FaultLog, FaultSchedule
    patient = SimulatedPatient(fs_hz=fs, n_channels=2, seed=4)
    log = FaultLog()
    out = PatientOutlet(patient, stream_name="stimloop-sim-test-push", chunk_s=chunk_s,
                        source_id=f"test-hil-outlet-push-{id(patient)}", t0=pylsl.local_clock() - paced_from_s,
                        faults=FaultSchedule(faults, fs_hz=fs, n_channels=2), fault_log=log)
    out.run(threading.Event(), duration_s=duration_s)
    return out, {r["kind"] + (r.get("resume") or ""): r for r in log.records()}


def test_push_times_are_recorded_for_every_chunk_that_leaves_whole_under_faults():
    """A chunk that leaves whole, in one push and with its own timestamps has its push time (signal
    faults that only change values included); one dropped, shortened or re-stamped has NaN in its place,
    so chunk k still maps to samples push_first_sample + k * chunk_n."""
    fs, chunk_n = 256.0, 16                       # 62.5 ms chunks: fault edges on chunk boundaries
    faults = [{"kind": "nan_burst", "at_s": 0.25, "duration_s": 0.25},                          # chunks 4-7
              {"kind": "saturation", "at_s": 0.5, "duration_s": 0.25, "level_uv": 5.0},         # 8-11
              {"kind": "stream_stall", "at_s": 1.0, "duration_s": 0.25, "resume": "backlog"},  # 16-19 held
              {"kind": "stream_stall", "at_s": 1.5, "duration_s": 0.25, "resume": "skip"},     # 24-27 dropped
              {"kind": "stream_loss", "at_s": 2.0, "duration_s": 0.25},                         # 32-35 dropped
              {"kind": "sample_gap", "at_s": 2.5, "n_samples": 8},                              # 40 shortened
              {"kind": "clock_jump", "at_s": 2.75, "offset_s": 0.5}]                            # 44- re-stamped
    out, rec = _run_outlet_with_faults(faults, 3.0, paced_from_s=0.9, fs=fs)
    assert out.chunk_n == chunk_n and out.push_first_sample == 0
    push = out.push_times()
    assert push.size == 48                                        # one slot per chunk produced
    lost = np.zeros(48, bool)
    lost[[*range(24, 28), *range(32, 36), 40, *range(44, 48)]] = True
    assert np.array_equal(np.isnan(push), lost), np.flatnonzero(np.isnan(push))
    # Each recorded chunk left after its last sample existed, and in chunk order.
    k = np.flatnonzero(~lost)
    assert np.all(push[k] >= out.t0 + ((k + 1) * chunk_n - 1) / fs)
    assert np.all(np.diff(push[k]) >= 0)
    # The held chunks have the time they really left: once the stall was over (paced from 0.9 s),
    # together with the first chunk after it (20), not when they were computed.
    stall = rec["stream_stallbacklog"]
    assert np.all(push[16:20] >= out.t0 + (21 * chunk_n - 1) / fs) and np.all(push[16:20] <= push[20])
    assert stall["t_start"] <= push[16] and np.all(push[16:20] <= stall["t_end"])


def test_a_nan_burst_alone_keeps_every_push_time():
    out, _ = _run_outlet_with_faults([{"kind": "nan_burst", "at_s": 0.1, "duration_s": 0.05}], 0.5, paced_from_s=1.0)
    plain, _ = _run_outlet_with_faults([], 0.5, paced_from_s=1.0)
    assert out.faults is not None and plain.faults is None       # the fault path ran, and the plain one
    for o in (out, plain):
        push = o.push_times()
        assert push.size == 8 and np.isfinite(push).all() and o.n_pushed == 8 * o.chunk_n
