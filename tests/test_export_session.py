"""EDF export of what the acquisition process really records: names and units under "source",
the wall-clock start of sample 0 (start_utc) in raw/meta.json."""
from __future__ import annotations

import datetime as dt
import json
import time

import edfio
import numpy as np
import pytest

from controller.acquisition import RawRecorder, load_raw, load_raw_meta, start_acquisition
from controller.export import export_edf
from controller.ring import SharedRing

FS = 250.0


def _utc(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.mark.realtime
def test_acquisition_records_start_utc_of_sample_0_and_export_uses_it(tmp_path):
    data = np.random.default_rng(0).normal(0, 40, (int(FS * 1.5), 3)).astype(np.float32)
    ring = SharedRing.create(None, 3, 4096, FS)
    spec = {"kind": "array", "data": data, "fs_hz": FS, "chunk": 16, "name": "amp",
            "channel_names": ["Fp1", "Cz", "O2"]}
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()  # before pylsl loads, as the acquisition does
    import pylsl
    proc, stop_event = start_acquisition(spec, ring.name, tmp_path / "events.jsonl", tmp_path / "raw")
    try:
        deadline = time.monotonic() + 10
        while ring.counter < data.shape[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ring.counter == data.shape[0]
    finally:
        stop_event.set()
        proc.join(10)
        ring.close()
        ring.unlink()
    assert proc.exitcode == 0
    # Same host, same clocks: the offset the test reads maps sample 0 to the wall clock as the
    # acquisition did (up to the reads' own cost and any NTP slew in between).
    offset = time.time() - pylsl.local_clock()
    _, timestamps = load_raw(tmp_path / "raw")
    meta = load_raw_meta(tmp_path / "raw")
    assert meta["source"]["channel_names"] == ["Fp1", "Cz", "O2"]
    assert _utc(meta["start_utc"]) == pytest.approx(timestamps[0] + offset, abs=0.005)
    assert "." in meta["start_utc"] and meta["start_utc"].endswith("Z")

    edf = edfio.read_edf(export_edf(tmp_path, tmp_path / "s.edf").out_path)
    assert edf.labels == ("Fp1", "Cz", "O2") and all(s.physical_dimension == "uV" for s in edf.signals)
    start = dt.datetime.combine(edf.startdate, edf.starttime, tzinfo=dt.timezone.utc).timestamp()
    assert start == pytest.approx(_utc(meta["start_utc"]), abs=1e-6)  # sub-second start kept


class Clocks:
    def __init__(self, session: float, wall: float):
        self.session_t, self.wall_t = session, wall

    def session(self) -> float:
        return self.session_t

    def wall(self) -> float:
        return self.wall_t


def test_start_utc_is_sample_0_mapped_by_the_clock_offset_when_it_arrived(tmp_path):
    wall_0 = dt.datetime(2026, 12, 7, 6, 19, 2, 310000, tzinfo=dt.timezone.utc).timestamp()
    clocks = Clocks(session=1000.05, wall=wall_0 + 0.05)  # the first chunk is read 50 ms after its first sample
    rec = RawRecorder(tmp_path, 2, FS, session_clock=clocks.session, wall_clock=clocks.wall)
    assert "start_utc" not in load_raw_meta(tmp_path)
    rec.append(np.zeros((10, 2), np.float32), 1000.0 + np.arange(10) / FS)
    clocks.wall_t += 3600.0  # wall clock stepped later: the start was fixed when sample 0 came
    rec.append(np.zeros((10, 2), np.float32), 1000.04 + np.arange(10) / FS)
    rec.flush()
    assert load_raw_meta(tmp_path)["start_utc"] == "2026-12-07T06:19:02.310000Z"
    rec.close()

    # Appending to the recording (the same raw_dir reopened): its sample 0, so its start, stay.
    rec = RawRecorder(tmp_path, 2, FS, session_clock=clocks.session, wall_clock=clocks.wall)
    rec.append(np.zeros((5, 2), np.float32), 2000.0 + np.arange(5) / FS)
    rec.close()
    assert load_raw_meta(tmp_path)["start_utc"] == "2026-12-07T06:19:02.310000Z"
    assert load_raw(tmp_path)[0].shape == (25, 2)


def test_without_a_session_clock_no_start_utc_is_claimed(tmp_path):
    """The simulated runner's timestamps are virtual: no wall-clock time to derive."""
    rec = RawRecorder(tmp_path, 1, FS, meta={"clock": "virtual"})
    rec.append(np.zeros((10, 1), np.float32), np.arange(10) / FS)
    rec.close()
    assert "start_utc" not in json.loads((tmp_path / "meta.json").read_text())
