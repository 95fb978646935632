"""EDF+ export from a session folder written like the acquisition process and recorder do."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import edfio
import numpy as np
import pytest

from controller.acquisition import RawRecorder, source_meta
from controller.actuator import Actuator
from controller.events import Event, EventKind
from controller.export import _fmt_bound, _onsets_s, export_edf, read_events
from controller.safety import MACRO_RNS, TES, SafetyGovernor, StimRequest
from controller.sources.base import SourceInfo
from drivers.params import StimParams, Waveform
from drivers.simulated import SimulatedStimulator

FS_HZ = 250.0
T0 = 1234.5  # session clock (LSL local_clock) of the first sample
# Wall-clock time at which sample 0 was recorded: sub-second, later than session.json's started_utc.
WALL_T0 = dt.datetime(2025, 3, 4, 5, 6, 9, 250000, tzinfo=dt.timezone.utc)
BURST = StimParams(channel=1, amplitude_ua=1500.0, pulse_width_us=160.0, frequency_hz=200.0, n_pulses=20)  # 0.1 s


def make_session(root: Path, samples: np.ndarray, timestamps: np.ndarray, events: list, names=None,
                 units="uV", torn_tail: bool = True, started_utc: str | None = "2025-03-04T05:06:07Z",
                 wall_t0: dt.datetime | None = WALL_T0, gap_factor: float = 1.5) -> Path:
    """A session folder as acquisition + recorder leave it after a kill (torn tails).

    raw/ is written by the acquisition's own RawRecorder with the acquisition's meta, from a
    SourceInfo as a source reports it; its clocks are pinned so that sample 0 was recorded
    at ``wall_t0`` (None: a recorder without a session clock, so no start_utc).
    """
    raw = root / "raw"
    n_ch = samples.shape[1]
    names = names or [f"EEG {i}" for i in range(n_ch)]
    units = [units] * n_ch if isinstance(units, str) else units
    info = SourceInfo(name="amp", type="EEG", source_id="amp-1", n_channels=n_ch, channel_names=tuple(names),
                      units=tuple(units), fs_hz=FS_HZ, gap_factor=gap_factor)
    clocks = {} if wall_t0 is None else {"session_clock": lambda: float(timestamps[0]) + 0.01,
                                         "wall_clock": lambda: wall_t0.timestamp() + 0.01}
    rec = RawRecorder(raw, n_ch, FS_HZ, meta=source_meta(info), **clocks)
    rec.append(samples, timestamps)
    rec.close()
    if torn_tail:  # killed mid-write: half a row of samples, 3 bytes of a timestamp
        with (raw / "samples.f32").open("ab") as f:
            f.write(np.ones(n_ch, "<f4").tobytes()[: 4 * n_ch // 2 + 1])
        with (raw / "timestamps.f64").open("ab") as f:
            f.write(b"\x00\x01\x02")
    lines = [e.to_json() for e in events]
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"t": 1240.0, "kind": "mark", "source": "control", "lab'  # no newline: torn
    (root / "events.jsonl").write_text(text)
    if started_utc:
        (root / "session.json").write_text(json.dumps({"started_utc": started_utc}))
    return root


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def command_event(t: float, params: StimParams = BURST, at: float | None = None, profile=MACRO_RNS) -> Event:
    """The COMMAND event the actuator emits for ``params`` requested at ``t`` (governor and simulated device)."""
    clock = Clock(t)
    driver = SimulatedStimulator(clock=clock)
    actuator = Actuator(SafetyGovernor(profile, driver.capabilities), driver, clock)
    actuator.open()
    if profile.require_impedance_check:
        actuator.set_impedance(1000.0)
    actuator.heartbeat()
    events = actuator.submit(StimRequest(t, "policy.responsive", params, at=at, meta={"window_end_t": t - 0.004}))
    (command,) = [e for e in events if e.kind is EventKind.COMMAND]
    return command


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
        command_event(T0 + 1.204),
        command_event(T0 + 2.5, at=T0 + 2.8),  # scheduled ahead: the burst starts at 2.8 s
        Event(T0 + 1.3, EventKind.CHUNK, "acquisition", {"n": 10}),  # excluded by default
        Event(T0 + 2.0, EventKind.FAULT, "actuator", {"error": "DeviceTimeout"}),
    ]
    session = make_session(tmp_path / "s", samples, timestamps, events)
    summary = export_edf(session, tmp_path / "out" / "s.edf")
    assert (summary.n_samples, summary.n_channels, summary.padded_samples) == (n, 3, 1250 - n)
    assert summary.n_gaps == 0 and summary.n_nonfinite == 0

    edf = edfio.read_edf(tmp_path / "out" / "s.edf")
    assert edf.labels == ("EEG 0", "EEG 1", "EEG 2")
    # The start is sample 0's wall-clock time from raw/meta.json, to the microsecond, not
    # session.json's started_utc (whole seconds, before the processes started).
    assert (edf.startdate.isoformat(), edf.starttime.isoformat()) == ("2025-03-04", "05:06:09.250000")
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
    cmd, scheduled = [a for a in edf.annotations if a.text.startswith("command/actuator")]
    # The stimulus first (the text is cut at 120 characters), the burst's duration (20 pulses at 200 Hz).
    assert cmd.text.startswith("command/actuator amplitude_ua=1500.0 pulse_width_us=160.0 frequency_hz=200.0 "
                               "n_pulses=20 channel=1 waveform=biphasic ")
    assert cmd.onset == pytest.approx(1.204, abs=1e-6) and cmd.duration == pytest.approx(0.1)
    assert scheduled.onset == pytest.approx(2.8, abs=1e-6) and scheduled.duration == pytest.approx(0.1)
    fault = next(a for a in edf.annotations if a.text.startswith("fault/actuator"))
    assert fault.onset == pytest.approx(2.0, abs=1e-6) and "DeviceTimeout" in fault.text
    assert not any(t.startswith("chunk") for t in texts)
    end = next(a for a in edf.annotations if a.text.startswith("stimloop: end of recording"))
    assert end.onset == pytest.approx(n / FS_HZ, abs=1e-6)
    assert "lab" not in " ".join(texts), "the torn last event line must be skipped"
    assert len(ann) >= 4


def test_a_continuous_waveforms_annotation_lasts_its_duration(tmp_path):
    sine = StimParams(channel=0, waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=30.0,
                      ramp_s=10.0)  # tACS
    n = int(40 * FS_HZ)
    events = [command_event(T0 + 0.5, sine, profile=TES)]
    session = make_session(tmp_path / "s", synthetic(n, n_ch=1), T0 + np.arange(n) / FS_HZ, events, torn_tail=False)
    export_edf(session, tmp_path / "c.edf")
    (cmd,) = [a for a in edfio.read_edf(tmp_path / "c.edf").annotations if a.text.startswith("command/")]
    assert cmd.duration == pytest.approx(30.0) and "amplitude_ua=1000.0" in cmd.text and "waveform=sine" in cmd.text


def test_without_start_utc_the_start_is_session_jsons(tmp_path):
    """Sessions recorded before raw/meta.json had start_utc (and the simulated runner's) keep session.json's."""
    session = make_session(tmp_path / "s", synthetic(500, n_ch=1), T0 + np.arange(500) / FS_HZ, [],
                           torn_tail=False, wall_t0=None)
    assert "start_utc" not in json.loads((session / "raw" / "meta.json").read_text())
    edf = edfio.read_edf(export_edf(session, tmp_path / "o.edf").out_path)
    assert edf.starttime.isoformat() == "05:06:07"


ALPHA_UV = 50 * np.sin(2 * np.pi * 10 * np.arange(2500) / FS_HZ)  # a 50 µV alpha wave


@pytest.mark.parametrize("unit, per_uv", [("V", 1e-6), ("mV", 1e-3), ("uV", 1.0), ("µV", 1.0),
                                          ("microvolts", 1.0), ("nV", 1e3)])
def test_declared_units_are_converted_to_microvolts(tmp_path, unit, per_uv):
    samples = (ALPHA_UV * per_uv)[:, None]
    session = make_session(tmp_path / "s", samples, T0 + np.arange(2500) / FS_HZ, [], names=["Cz"], units=unit,
                           torn_tail=False)
    sig = edfio.read_edf(export_edf(session, tmp_path / "u.edf").out_path).signals[0]
    assert sig.label == "Cz" and sig.physical_dimension == "uV"
    assert -51 < sig.physical_min < -49 and 49 < sig.physical_max < 51
    np.testing.assert_allclose(sig.data, ALPHA_UV, atol=1e-3 + 1e-6 * 50, rtol=0)  # float32 storage + 16 bits


@pytest.mark.parametrize("units, match", [
    (["uV", "furlongs"], r"channel 1 \('EEG 1'\): unit 'furlongs'"),
    (["uV", "MV"], r"channel 1 \('EEG 1'\): unit 'MV'"),  # megavolts: not millivolts
    (["", "uV"], r"channel 0 \('EEG 0'\): the source declared no unit"),
])
def test_unknown_or_undeclared_units_are_refused_naming_the_channel(tmp_path, units, match):
    session = make_session(tmp_path / "s", synthetic(500, n_ch=2), T0 + np.arange(500) / FS_HZ, [], units=units,
                           torn_tail=False)
    with pytest.raises(ValueError, match=match):
        export_edf(session, tmp_path / "x.edf")
    assert not (tmp_path / "x.edf").exists()


def test_an_undeclared_unit_is_exported_as_the_one_the_caller_assumes(tmp_path):
    samples = np.stack([ALPHA_UV * 1e-3, ALPHA_UV], axis=1)
    session = make_session(tmp_path / "s", samples, T0 + np.arange(2500) / FS_HZ, [], units=["", "uV"],
                           torn_tail=False)
    edf = edfio.read_edf(export_edf(session, tmp_path / "a.edf", assume_unit="mV").out_path)
    for sig in edf.signals:  # the assumed unit applies to the undeclared channel only
        np.testing.assert_allclose(sig.data, ALPHA_UV, atol=2e-3, rtol=0)


def test_the_simulated_runners_layout_keeps_its_channel_names_in_microvolts(tmp_path):
    """The simulated runner records with top-level channel_names and no units (its patient is in µV)."""
    raw = tmp_path / "s" / "raw"
    samples = synthetic(500, n_ch=2)
    rec = RawRecorder(raw, 2, FS_HZ, meta={"channel_names": ["E01", "E02"], "clock": "virtual"})
    rec.append(samples, np.arange(500) / FS_HZ)
    rec.close()
    edf = edfio.read_edf(export_edf(tmp_path / "s", tmp_path / "sim.edf").out_path)
    assert edf.labels == ("E01", "E02") and all(s.physical_dimension == "uV" for s in edf.signals)
    step = (edf.signals[0].physical_max - edf.signals[0].physical_min) / 65535
    np.testing.assert_allclose(edf.signals[0].data[:500], samples[:, 0], atol=step, rtol=0)


def test_a_small_signal_keeps_its_resolution(tmp_path):
    """A range well under 1e-3 µV is not widened to ±1 µV (which left a handful of digital values)."""
    x = (0.5 + np.random.default_rng(3).uniform(-2e-4, 2e-4, 2500)).astype(np.float32)
    session = make_session(tmp_path / "s", x[:, None], T0 + np.arange(2500) / FS_HZ, [], torn_tail=False)
    sig = edfio.read_edf(export_edf(session, tmp_path / "r.edf").out_path).signals[0]
    assert sig.physical_max - sig.physical_min < 1e-3
    assert np.unique(sig.digital).size > 1000
    np.testing.assert_allclose(sig.data, x, atol=1e-7, rtol=0)


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


def test_a_jitter_the_source_tolerates_is_not_exported_as_a_gap(tmp_path):
    """A host-stamped source (BrainFlow, gap_factor 2.5 in meta.json) stamps one sample early and the next
    late (a 2.2-period step, nothing lost): no gap annotation. Under the LSL rule (1.5) the same step
    is one."""
    n = 1000
    timestamps = T0 + np.arange(n) / FS_HZ
    timestamps[599] -= 0.6 / FS_HZ
    timestamps[600] += 0.6 / FS_HZ
    for factor, gaps in ((2.5, 0), (1.5, 1)):
        session = make_session(tmp_path / f"s{factor}", synthetic(n, n_ch=2), timestamps, [], torn_tail=False,
                               started_utc=None, gap_factor=factor)
        assert export_edf(session, tmp_path / f"j{factor}.edf").n_gaps == gaps
    assert "timestamp gap" not in export_edf(tmp_path / "s2.5", tmp_path / "j.edf").describe()


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
    (-5e-7, -1, -1e-4), (3e-5, 1, 1e-4),  # not -1e-06 / 3e-05: exponent notation is no EDF number
])
def test_physical_bounds_round_outward_to_8_characters(value, outward, expected):
    got = _fmt_bound(value, outward)
    assert got == pytest.approx(expected) and len(repr(got).removesuffix(".0")) <= 8
    assert "e" not in str(got)  # what edfio writes into the header
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


def test_the_export_command_says_what_is_wrong_and_takes_the_unit_to_assume(tmp_path):
    """`stimloop export` on a session whose source declared no unit: a one-line error naming the
    channel and the way out (--assume-unit), not a traceback; with the option it writes the file."""
    from typer.testing import CliRunner

    from controller.cli import app
    session = make_session(tmp_path / "s", synthetic(500, n_ch=2), T0 + np.arange(500) / FS_HZ, [], units=["", ""],
                           torn_tail=False)
    r = CliRunner().invoke(app, ["export", str(session)])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output   # _fail: a usage error, no traceback
    assert "declared no unit" in r.output and "Traceback" not in r.output
    assert not (session / "session.edf").exists()
    r = CliRunner().invoke(app, ["export", str(session), "--assume-unit", "uV"])
    assert r.exit_code == 0, r.output
    assert "2 channels × 2.0 s at 250 Hz (500 samples) in µV" in " ".join(r.output.split())
    assert "ExportSummary(" not in r.output
    assert edfio.read_edf(session / "session.edf").labels == ("EEG 0", "EEG 1")
