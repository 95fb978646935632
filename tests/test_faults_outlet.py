"""``PatientOutlet`` fault path on its own: a stall in ``skip`` mode, read by a real LSL inlet."""
import threading

import numpy as np
import pytest

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
import pylsl  # noqa: E402

from hil_sim.faults import FaultLog, FaultSchedule  # noqa: E402
from hil_sim.outlet import PatientOutlet  # noqa: E402
from hil_sim.patient import SimulatedPatient  # noqa: E402

pytestmark = [pytest.mark.realtime, pytest.mark.timeout(60)]


def test_stall_skip_discards_held_samples_and_gap_inside_a_chunk_is_exact():
    fs = 256.0
    patient = SimulatedPatient(fs_hz=fs, n_channels=2, seed=5)
    # chunk of 16 samples; the 5-sample gap starts mid-chunk (sample 0.6 * 256 = 153.6 -> 154).
    sched = FaultSchedule([{"kind": "stream_stall", "at_s": 1.0, "duration_s": 0.25, "resume": "skip"},
                           {"kind": "sample_gap", "at_s": 0.6, "n_samples": 5}], fs_hz=fs, n_channels=2)
    log = FaultLog()
    sid = f"test-faults-outlet-{id(patient)}"
    out = PatientOutlet(patient, "stimloop-faults-outlet-test", sid, chunk_s=1 / 16,
                        t0=pylsl.local_clock() + 1.0, faults=sched, fault_log=log)
    streams = pylsl.resolve_byprop("source_id", sid, 1, 5.0)
    assert streams
    inlet = pylsl.StreamInlet(streams[0], max_buflen=5)
    inlet.open_stream(timeout=5.0)
    stop = threading.Event()
    th = threading.Thread(target=out.run, args=(stop, 1.75), daemon=True)
    th.start()
    buf = np.empty((512, 2), np.float32)
    ts_all = []
    try:
        th.join(10.0)
        assert not th.is_alive()
        while True:
            _, ts = inlet.pull_chunk(timeout=0.5, max_samples=512, dest_obj=buf)
            if not len(ts):
                break
            ts_all.extend(ts)
    finally:
        stop.set()
        th.join(2.0)
    ts = np.asarray(ts_all) - out.t0
    k = np.rint(ts * fs).astype(int)
    np.testing.assert_allclose(ts, k / fs, atol=1e-6)       # every sample keeps its own patient time
    missing = sorted(set(range(k[0], 448)) - set(k.tolist()))
    assert missing == list(range(154, 159)) + list(range(256, 320))   # the gap, then the skipped stall
    assert out.n_pushed == len(k) + k[0]                               # nothing else lost
    recs = {r["kind"]: r for r in log.records()}
    assert recs["stream_stall"]["n_backlog"] == 0 and recs["stream_stall"]["t_end"] > recs["stream_stall"]["t_start"]
    assert recs["sample_gap"]["t_start"] == pytest.approx(out.t0 + 154 / fs, abs=1e-9)
