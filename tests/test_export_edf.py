"""EDF+ export from a session folder written like the acquisition process and recorder do."""
from __future__ import annotations

import json
from pathlib import Path

import edfio
import numpy as np
import pytest

from controller.events import Event, EventKind
from controller.export import _fmt_bound, _onsets_s, export_edf, read_events

FS_HZ = 250.0
T0 = 1234.5  # session clock (LSL local_clock) of the first sample


def make_session(root: Path, samples: np.ndarray, timestamps: np.ndarray, events: list, names=None,
                 torn_tail: bool = True, started_utc: str | None = "2025-03-04T05:06:07Z") -> Path:
    """A session folder as acquisition + recorder leave it after a kill (torn tails)."""
    raw = root / "raw"
    raw.mkdir(parents=True)
    n_ch = samples.shape[1]
    (raw / "meta.json").write_text(json.dumps({
        "format": "stimloop-raw-1", "n_channels": n_ch, "fs_hz": FS_HZ,
        "channel_names": names or [f"EEG {i}" for i in range(n_ch)], "units": "uV"}))
    s_bytes = samples.astype("<f4").tobytes()
    t_bytes = timestamps.astype("<f8").tobytes()
    if torn_tail:  # killed mid-write: half a row of samples, 3 bytes of a timestamp
        s_bytes += np.ones(n_ch, "<f4").tobytes()[: 4 * n_ch // 2 + 1]
        t_bytes += b"\x00\x01\x02"
    (raw / "samples.f32").write_bytes(s_bytes)
    (raw / "timestamps.f64").write_bytes(t_bytes)
    lines = [e.to_json() for e in events]
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"t": 1240.0, "kind": "mark", "source": "control", "lab'  # no newline: torn
    (root / "events.jsonl").write_text(text)
    if started_utc:
        (root / "session.json").write_text(json.dumps({"started_utc": started_utc}))
    return root


def synthetic(n: int, n_ch: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS_HZ
    x = np.empty((n, n_ch), np.float32)
    x[:, 0] = 80 * np.sin(2 * np.pi * 7 * t) + rng.normal(0, 5, n)        # EEG-like, ±100 µV
    if n_ch > 1:
        x[:, 1] = 1500 * np.sin(2 * np.pi * 0.5 * t) - 300                # large, offset (stim artifact scale)
    if n_ch > 2:
        x[:, 2] = 12.25                                                  # flat channel (disconnected electrode)
    return x


def test_round_trip_signals_annotations_and_torn_tails(tmp_path):
    n = 1003  # not a whole number of 1 s records: the tail is padded
    samples = synthetic(n)
    timestamps = T0 + np.arange(n) / FS_HZ
    events = [
        Event(T0 + 0.5, EventKind.MARK, "control", {"cmd": "mark", "label": "baseline start", "who": "local"}),
        Event(T0 + 1.204, EventKind.COMMAND, "actuator", {"seq": 7, "amplitude_ua": 500.0, "duration_s": 0.05}),
        Event(T0 + 1.3, EventKind.CHUNK, "acquisition", {"n": 10}),  # excluded by default
        Event(T0 + 2.0, EventKind.FAULT, "actuator", {"error": "DeviceTimeout"}),
    ]
    session = make_session(tmp_path / "s", samples, timestamps, events)
    summary = export_edf(session, tmp_path / "out" / "s.edf")
    assert (summary.n_samples, summary.n_channels, summary.padded_samples) == (n, 3, 1250 - n)
    assert summary.n_gaps == 0 and summary.n_nonfinite == 0

    edf = edfio.read_edf(tmp_path / "out" / "s.edf")
    assert edf.labels == ("EEG 0", "EEG 1", "EEG 2")
    assert (edf.startdate.isoformat(), edf.starttime.isoformat()) == ("2025-03-04", "05:06:07")
    for ch, sig in enumerate(edf.signals):
        assert sig.sampling_frequency == FS_HZ and sig.physical_dimension == "uV"
        data = sig.data
        assert data.shape == (1250,)
        step = (sig.physical_max - sig.physical_min) / (sig.digital_max - sig.digital_min)
        np.testing.assert_allclose(data[:n], samples[:, ch], atol=step, rtol=0)
        assert np.all(data[n:] == data[n - 1])  # padding repeats the last value
    # physical range from the data: tight, not a fixed ±32768 µV
    assert -130 < edf.signals[0].physical_min < -60 and 60 < edf.signals[0].physical_max < 130
    assert edf.signals[1].physical_min <= -1800 and edf.signals[1].physical_max >= 1200

    ann = {a.text.split(" ")[0]: a for a in edf.annotations}
    texts = [a.text for a in edf.annotations]
    mark = next(a for a in edf.annotations if a.text.startswith("mark: baseline start"))
    assert mark.onset == pytest.approx(0.5, abs=1e-6) and "who=local" in mark.text
    cmd = next(a for a in edf.annotations if a.text.startswith("command/actuator"))
    assert cmd.onset == pytest.approx(1.204, abs=1e-6) and cmd.duration == pytest.approx(0.05)
    assert "seq=7" in cmd.text and "amplitude_ua=500.0" in cmd.text
    fault = next(a for a in edf.annotations if a.text.startswith("fault/actuator"))
    assert fault.onset == pytest.approx(2.0, abs=1e-6) and "DeviceTimeout" in fault.text
    assert not any(t.startswith("chunk") for t in texts)
    end = next(a for a in edf.annotations if a.text.startswith("stimloop: end of recording"))
    assert end.onset == pytest.approx(n / FS_HZ, abs=1e-6)
    assert "lab" not in " ".join(texts), "the torn last event line must be skipped"
    assert len(ann) >= 4


def test_gap_in_timestamps_is_annotated_and_events_stay_on_their_samples(tmp_path):
    n = 1000
    samples = synthetic(n, n_ch=2)
    timestamps = T0 + np.arange(n) / FS_HZ
    timestamps[600:] += 0.2  # 50 samples lost before sample 600
    after_gap = float(timestamps[700])
    events = [Event(after_gap, EventKind.MARK, "control", {"label": "after gap"})]
    session = make_session(tmp_path / "s", samples, timestamps, events, torn_tail=False, started_utc=None)
    summary = export_edf(session, tmp_path / "g.edf")
    assert summary.n_gaps == 1
    edf = edfio.read_edf(tmp_path / "g.edf")
    gap = next(a for a in edf.annotations if a.text.startswith("stimloop: gap"))
    assert gap.onset == pytest.approx(600 / FS_HZ) and "0.2040 s" in gap.text
    mark = next(a for a in edf.annotations if a.text.startswith("mark: after gap"))
    # EDF+C is continuous: the mark lands on sample 700, not at 700/fs + 0.2 s.
    assert mark.onset == pytest.approx(700 / FS_HZ, abs=1e-6)


def test_nonfinite_samples_and_long_or_duplicate_labels(tmp_path):
    samples = synthetic(500, n_ch=2)
    samples[10:20, 0] = np.nan
    samples[30, 1] = np.inf
    names = ["a very long channel name 1", "a very long channel name 2"]
    session = make_session(tmp_path / "s", samples, T0 + np.arange(500) / FS_HZ, [], names=names, torn_tail=False)
    summary = export_edf(session, tmp_path / "n.edf")
    assert summary.n_nonfinite == 11
    edf = edfio.read_edf(tmp_path / "n.edf")
    assert len(set(edf.labels)) == 2 and all(len(label) <= 16 for label in edf.labels)
    assert np.all(np.isfinite(edf.signals[0].data))
    assert any("11 non-finite samples" in a.text for a in edf.annotations)


def test_events_outside_the_recording_are_kept_and_flagged(tmp_path):
    samples = synthetic(500, n_ch=1)
    events = [Event(T0 - 3.0, EventKind.STATUS, "runner", {"status": "started"})]
    session = make_session(tmp_path / "s", samples, T0 + np.arange(500) / FS_HZ, events, torn_tail=False)
    export_edf(session, tmp_path / "o.edf")
    edf = edfio.read_edf(tmp_path / "o.edf")
    early = next(a for a in edf.annotations if "status/runner" in a.text)
    assert early.onset == 0.0 and early.text.startswith("[outside recording")


def test_missing_or_bad_session_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="session folder"):
        export_edf(tmp_path / "nope", tmp_path / "x.edf")
    (tmp_path / "s" / "raw").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"raw/meta.json"):
        export_edf(tmp_path / "s", tmp_path / "x.edf")
    (tmp_path / "s" / "raw" / "meta.json").write_text(json.dumps({"n_channels": 2, "fs_hz": -5}))
    with pytest.raises(ValueError, match=r"fs_hz=-5 is invalid"):
        export_edf(tmp_path / "s", tmp_path / "x.edf")
    (tmp_path / "s" / "raw" / "meta.json").write_text(json.dumps({"n_channels": 2, "fs_hz": 250}))
    (tmp_path / "s" / "raw" / "samples.f32").write_bytes(b"\x00" * 7)  # less than one row
    (tmp_path / "s" / "raw" / "timestamps.f64").write_bytes(b"")
    with pytest.raises(ValueError, match="no whole sample"):
        export_edf(tmp_path / "s", tmp_path / "x.edf")
    assert not (tmp_path / "x.edf").exists()


def test_read_events_skips_torn_and_damaged_lines(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_text('{"t": 1, "kind": "mark", "source": "a"}\nnot json\n{"kind": "mark"}\n'
                 '{"t": 2, "kind": "fault", "source": "b"}\n{"t": 3, "ki')
    assert [e["t"] for e in read_events(p)] == [1, 2]
    assert read_events(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("value, outward, expected", [
    (-123.4562, -1, -123.457), (123.4562, 1, 123.4563), (-1234567.4, -1, -1234568.0),
    (0.0, -1, 0.0), (99.99999999, 1, 100.0),
])
def test_physical_bounds_round_outward_to_8_characters(value, outward, expected):
    got = _fmt_bound(value, outward)
    assert got == pytest.approx(expected) and len(repr(got).removesuffix(".0")) <= 8
    assert (got <= value) if outward < 0 else (got >= value)


def test_onsets_without_gaps_equal_offset_from_first_sample():
    ts = T0 + np.arange(100) / FS_HZ
    t = np.array([T0 - 1.0, T0 + 0.123, T0 + 5.0])
    np.testing.assert_allclose(_onsets_s(t, ts, FS_HZ), t - T0, atol=1e-9)


def test_real_eeg_segment_at_200_hz_round_trips(tmp_path):
    """A real ictal scalp-EEG segment (New Delhi set, 200 Hz, µV) survives export within quantization."""
    scipy_io = pytest.importorskip("scipy.io")
    from shared_data import DELHI
    path = DELHI / "ictal" / "ictal1.mat"
    if not path.exists():
        pytest.skip(f"{path} not available")
    x = scipy_io.loadmat(path)["ictal"].ravel().astype(np.float32)[:, None]  # 1024 samples, 5.12 s
    fs_hz = 200.0
    raw = tmp_path / "s" / "raw"
    raw.mkdir(parents=True)
    (raw / "meta.json").write_text(json.dumps({"n_channels": 1, "fs_hz": fs_hz, "channel_names": ["scalp"]}))
    (raw / "samples.f32").write_bytes(x.astype("<f4").tobytes())
    (raw / "timestamps.f64").write_bytes((50.0 + np.arange(x.shape[0]) / fs_hz).astype("<f8").tobytes())
    summary = export_edf(tmp_path / "s", tmp_path / "real.edf")
    assert summary.duration_s == pytest.approx(5.12) and summary.padded_samples == 1200 - 1024
    sig = edfio.read_edf(tmp_path / "real.edf").signals[0]
    step = (sig.physical_max - sig.physical_min) / 65535
    assert sig.physical_min <= x.min() and sig.physical_max >= x.max()
    np.testing.assert_allclose(sig.data[:1024], x[:, 0], atol=step, rtol=0)
