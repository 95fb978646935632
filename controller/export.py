"""Export a session folder to EDF+ (signals in µV, events as annotations) with ``edfio``.

Reads what the acquisition process and the recorder wrote (see
``controller/acquisition.py`` and ``controller/recorder.py``)::

    SESSION/raw/samples.f32      float32 (n, ch) row-major, appended (a torn last row is ignored)
    SESSION/raw/timestamps.f64   float64 (n,), session clock
    SESSION/raw/meta.json        n_channels, fs_hz, source.channel_names, source.units, start_utc
                                 (the simulated runner's layout: channel_names at the top level, µV)
    SESSION/events.jsonl         one event per line (a torn last line is ignored)
    SESSION/session.json         started_utc: the EDF start when meta.json has no start_utc
                                 (whole seconds, taken before the processes start: seconds early)

Signals are written in µV whatever unit the source declared (V, mV, µV, nV are
converted); a channel whose unit is unknown or undeclared is refused, unless the
caller says which unit to assume for undeclared ones (``assume_unit``).

EDF+C is continuous: sample k sits at k / fs_hz. Event onsets are placed on that
timeline by interpolating their session-clock time against the sample
timestamps, so they stay aligned with the signal even after a gap (lost
samples); without gaps this is ``t - timestamps[0]``. Gaps are annotated.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from controller.recorder import read_json_object, read_jsonl
from controller.sources.base import GAP_FACTOR
from controller.units import KNOWN_UNITS, uv_factor

DEFAULT_EXCLUDE_KINDS: tuple[str, ...] = ("chunk",)  # one per chunk: too many to be useful annotations
_LABEL_CHARS = 16        # EDF header: signal label is 16 ASCII characters
_NUMBER_CHARS = 8        # EDF header: physical min/max are 8 ASCII characters
_MAX_ANNOTATION_CHARS = 120
# Stimulus fields first in a command's annotation: the text is cut at _MAX_ANNOTATION_CHARS.
_STIM_FIELDS_FIRST = ("amplitude_ua", "pulse_width_us", "frequency_hz", "n_pulses", "channel", "waveform")


@dataclass(frozen=True, slots=True)
class ExportSummary:
    """What :func:`export_edf` wrote."""

    out_path: Path
    n_samples: int
    n_channels: int
    fs_hz: float
    duration_s: float
    n_annotations: int
    padded_samples: int
    n_gaps: int
    n_nonfinite: int

    def describe(self) -> str:
        """One line for a person: what the file holds, and what was changed to fit EDF."""
        text = (f"{self.n_channels} channels × {self.duration_s:.1f} s at {self.fs_hz:g} Hz ({self.n_samples} samples) "
                f"in µV, {self.n_annotations} annotations")
        if self.n_gaps:
            text += f"; {self.n_gaps} timestamp gap(s) (lost samples), annotated where they fall"
        if self.n_nonfinite:
            text += f"; {self.n_nonfinite} NaN/inf samples written as 0 (annotated)"
        if self.padded_samples:
            text += f"; the last data record padded with {self.padded_samples} copies of the last sample"
        return text


def _read_raw(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole rows only: the acquisition process may have been killed mid-write."""
    meta_path = raw_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; expected a session folder with raw/meta.json")
    meta = read_json_object(meta_path)
    n_ch = meta.get("n_channels")
    fs_hz = meta.get("fs_hz")
    if not isinstance(n_ch, int) or n_ch < 1:
        raise ValueError(f"{meta_path}: n_channels={n_ch!r} is invalid; expected an integer >= 1")
    if not isinstance(fs_hz, (int, float)) or not (0 < fs_hz < 1e6):
        raise ValueError(f"{meta_path}: fs_hz={fs_hz!r} is invalid; expected 0 < fs_hz < 1e6")
    s_path, t_path = raw_dir / "samples.f32", raw_dir / "timestamps.f64"
    for p in (s_path, t_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; expected the raw recording written by acquisition")
    n = min(s_path.stat().st_size // (4 * n_ch), t_path.stat().st_size // 8)
    samples = np.fromfile(s_path, dtype="<f4", count=n * n_ch).reshape(n, n_ch)
    timestamps = np.fromfile(t_path, dtype="<f8", count=n)
    return samples, timestamps, meta


def read_events(path: Path) -> list[dict]:
    """The events of ``events.jsonl`` (``recorder.read_jsonl``: a torn or damaged line is skipped) that
    carry a time and a kind."""
    return [obj for obj in read_jsonl(path)
            if isinstance(obj, dict) and isinstance(obj.get("t"), (int, float)) and "kind" in obj]


def _fmt_bound(value: float, outward: int) -> float:
    """Round ``value`` away from the data (``outward`` -1 down, +1 up) to fit 8 header characters."""
    for decimals in range(6, -1, -1):
        scale = 10.0 ** decimals
        v = (math.floor(value * scale) if outward < 0 else math.ceil(value * scale)) / scale
        text = str(int(v)) if float(v).is_integer() else repr(v)
        # edfio writes str(value): exponent notation (1e-05) is no EDF number for many readers.
        if len(text) <= _NUMBER_CHARS and "e" not in text:
            return float(v)
    raise ValueError(f"EDF physical bound {value!r} µV does not fit 8 characters; expected |value| < 1e7 µV")


def _physical_range(x: np.ndarray) -> tuple[float, float]:
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if hi <= lo:
        # Flat channel: EDF needs physical_min < physical_max. Any margin represents one value
        # exactly enough; one scaled to the value keeps the step far below it.
        pad = abs(lo) * 1e-3 or 1.0
        lo, hi = lo - pad, hi + pad
    # A non-flat channel keeps its own range, however small: the 16-bit step is range / 65535.
    return _fmt_bound(lo, -1), _fmt_bound(hi, +1)


def source_fields(meta: dict) -> tuple[list | None, list | str | None, str]:
    """(channel_names, units, where): the acquisition nests them under "source"; the simulated
    runner writes names at the top level and no units (its patient is in µV)."""
    src = meta.get("source")
    if isinstance(src, dict) and ("channel_names" in src or "units" in src):
        return src.get("channel_names"), src.get("units"), "source."
    return meta.get("channel_names"), meta.get("units", "uV"), ""


def _unit_factors(meta: dict, names: list[str], assume_unit: str | None) -> list[float]:
    """Per channel, the factor that takes its samples to µV; unknown or undeclared units refused."""
    n_ch = len(names)
    if assume_unit is not None and uv_factor(assume_unit) is None:
        raise ValueError(f"assume_unit={assume_unit!r} is not a voltage unit the EDF export knows; "
                         f"expected one of {', '.join(KNOWN_UNITS)}")
    _, units, where = source_fields(meta)
    if isinstance(units, str):
        units = [units] * n_ch
    if not isinstance(units, list) or len(units) != n_ch:
        raise ValueError(f"raw/meta.json {where}units={units!r}; expected one unit per channel ({n_ch})")
    factors = []
    for i, (name, unit) in enumerate(zip(names, units)):
        declared = str(unit if unit is not None else "").strip()
        text = declared or (assume_unit or "").strip()
        factor = uv_factor(text)
        if factor is None:
            if not declared:
                raise ValueError(
                    f"channel {i} ({name!r}): the source declared no unit (raw/meta.json {where}units), so "
                    f"µV cannot be told from V; pass assume_unit (e.g. 'uV') to export_edf if you know it")
            raise ValueError(f"channel {i} ({name!r}): unit {declared!r} (raw/meta.json {where}units) is not a "
                             f"voltage unit the EDF export knows; expected one of {', '.join(KNOWN_UNITS)}")
        factors.append(factor)
    return factors


def _channel_names(meta: dict, n_ch: int) -> list[str]:
    names, _, where = source_fields(meta)
    names = names or [f"ch{i}" for i in range(n_ch)]
    if len(names) != n_ch:
        raise ValueError(f"raw/meta.json {where}channel_names has {len(names)} names; expected n_channels={n_ch}")
    return [str(x) for x in names]


def _labels(names: list[str]) -> list[str]:
    labels: list[str] = []
    for i, name in enumerate(names):
        label = "".join(c if 32 <= ord(c) < 127 else "_" for c in str(name))[:_LABEL_CHARS].strip() or f"ch{i}"
        if label in labels:  # truncation can collide; EDF readers key signals by label
            suffix = f"~{i}"
            label = label[:_LABEL_CHARS - len(suffix)] + suffix
        labels.append(label)
    return labels


def _annotation_text(event: dict) -> str:
    kind, source = str(event.get("kind")), str(event.get("source", ""))
    rest = {k: v for k, v in event.items() if k not in ("t", "kind", "source")}
    if kind == "mark" and "label" in rest:
        head = f"mark: {rest.pop('label')}"
    else:
        head = f"{kind}/{source}"
    params = rest.pop("params", None)
    if isinstance(params, dict):
        # The stimulus is what a reader of the EDF needs most; it goes first, so the cut at
        # _MAX_ANNOTATION_CHARS takes timing fields, not the stimulus.
        first = {k: params[k] for k in _STIM_FIELDS_FIRST if k in params}
        # The other StimParams fields are 0 when the waveform does not use them (ramp_s of a pulse train).
        first.update((k, v) for k, v in params.items() if k not in first and v not in (0, 0.0, None, ""))
        rest.pop("channel", None)  # the same as params' channel (one channel per command)
        rest = {**first, **rest}
    details = " ".join(f"{k}={v}" for k, v in rest.items() if isinstance(v, (str, int, float, bool)) or v is None)
    text = f"{head} {details}".strip() if details else head
    # \x14, \x15 and NUL delimit TALs in EDF+: never let them into the text.
    text = text.replace("\x14", " ").replace("\x15", " ").replace("\x00", " ")
    return text[:_MAX_ANNOTATION_CHARS]


def _burst(event: dict) -> tuple[float | None, float | None]:
    """(start on the session clock, duration) of a command's burst; (None, None) if not one.

    The burst starts when the device confirmed it (``start_t``; later than the event for a
    trigger scheduled ahead) and lasts ``StimParams.burst_duration_s``.
    """
    params = event.get("params")
    if str(event.get("kind")) != "command" or not isinstance(params, dict):
        return None, None
    from drivers.params import StimParams

    try:
        duration = StimParams.from_dict(params).burst_duration_s
    except (TypeError, ValueError):  # params from another version: keep the event, without a duration
        duration = None
    start = event.get("start_t")
    start = float(start) if isinstance(start, (int, float)) and math.isfinite(start) else None
    return start, (float(duration) if duration is not None and math.isfinite(duration) and duration > 0 else None)


def _edf_start(session_dir: Path, meta: dict) -> dt.datetime | None:
    """Wall-clock time of sample 0: raw/meta.json start_utc (sub-second), else session.json."""
    for value in (meta.get("start_utc"), _session_started(session_dir)):
        if isinstance(value, str):
            try:
                start = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            # Both fields are UTC by name: a value without an offset must not be read as local time.
            return start.replace(tzinfo=dt.timezone.utc) if start.tzinfo is None else start.astimezone(dt.timezone.utc)
    return None


def _session_started(session_dir: Path) -> str | None:
    p = session_dir / "session.json"
    try:
        return json.loads(p.read_text()).get("started_utc")
    except (OSError, ValueError, AttributeError):
        return None


def export_edf(session_dir: str | os.PathLike, out_path: str | os.PathLike,
               exclude_kinds: Iterable[str] = DEFAULT_EXCLUDE_KINDS,
               assume_unit: str | None = None) -> ExportSummary:
    """Write ``out_path`` (EDF+C) from ``session_dir``; return an :class:`ExportSummary`.

    Signals are in µV, converted from the unit each channel declared (V, mV, µV,
    nV); an unknown unit raises ``ValueError`` naming the channel, and so does an
    undeclared one unless ``assume_unit`` says what it is. One physical range per
    channel from that channel's data (16-bit quantization step = range / 65535).
    The tail is padded with the last value to a whole data record (EDF needs it);
    the real end is annotated. Non-finite samples are written as 0 and counted in
    an annotation. The start date/time is that of sample 0, to the microsecond
    (EDF+ subsecond start, in the first data record's time-keeping annotation).
    Stimulation commands are annotated from their burst's start, for its duration.
    """
    import edfio  # optional dependency (pyproject extra "edf"): import only when exporting

    session = Path(session_dir)
    if not session.is_dir():
        raise FileNotFoundError(f"session folder {str(session)!r} does not exist")
    samples, timestamps, meta = _read_raw(session / "raw")
    n, n_ch = samples.shape
    if n == 0:
        raise ValueError(f"{session / 'raw'} holds no whole sample; nothing to export")
    fs_hz = float(meta["fs_hz"])
    skip = {str(k) for k in exclude_kinds}
    events = [e for e in read_events(session / "events.jsonl") if str(e["kind"]) not in skip]

    # Data records: 1 s for integer rates, else the shortest duration holding a whole
    # number of samples (edfio's own rule); pad the tail to a whole record.
    record_s = _record_duration_s(fs_hz)
    per_record = int(round(record_s * fs_hz))
    n_padded = -(-n // per_record) * per_record
    pad = n_padded - n

    nonfinite = ~np.isfinite(samples)
    n_nonfinite = int(nonfinite.sum())
    signals = []
    names = _channel_names(meta, n_ch)
    to_uv = _unit_factors(meta, names, assume_unit)
    labels = _labels(names)
    for ch in range(n_ch):
        x = samples[:, ch].astype(np.float64) * to_uv[ch]
        if n_nonfinite:
            x[nonfinite[:, ch]] = 0.0
        lo, hi = _physical_range(x)
        if pad:
            x = np.concatenate([x, np.full(pad, x[-1])])
        signals.append(edfio.EdfSignal(x, fs_hz, label=labels[ch], physical_dimension="uV",
                                       physical_range=(lo, hi)))

    duration_s = n_padded / fs_hz
    bursts = [_burst(e) for e in events]
    onset_t = [b[0] if b[0] is not None else float(e["t"]) for e, b in zip(events, bursts)]
    onsets = _onsets_s(np.array(onset_t, dtype=np.float64), timestamps, fs_hz)
    annotations = []
    for event, onset, (_, burst_s) in zip(events, onsets, bursts):
        dur = event.get("duration_s") if burst_s is None else burst_s
        dur = float(dur) if isinstance(dur, (int, float)) and dur > 0 else None
        text = _annotation_text(event)
        if onset < 0 or onset > duration_s:
            text = f"[outside recording, t={event['t']}] {text}"[:_MAX_ANNOTATION_CHARS]
        annotations.append(edfio.EdfAnnotation(min(max(onset, 0.0), duration_s), dur, text))
    n_gaps = 0
    if n > 1:
        dts = np.diff(timestamps)
        # The source's own rule (SourceInfo.gap_factor: 1.5 periods, 2.5 for host-stamped BrainFlow
        # timestamps, whose jitter is no loss); sessions recorded before it was kept: 1.5.
        gap_factor = float((meta.get("source") or {}).get("gap_factor") or GAP_FACTOR)
        gap_idx = np.flatnonzero(dts > gap_factor / fs_hz)
        n_gaps = int(gap_idx.size)
        for i in gap_idx[:1000]:
            annotations.append(edfio.EdfAnnotation((i + 1) / fs_hz, None,
                                                   f"stimloop: gap of {dts[i]:.4f} s before this sample (samples lost)"))
    if pad:
        annotations.append(edfio.EdfAnnotation(n / fs_hz, pad / fs_hz, "stimloop: end of recording (padding follows)"))
    if n_nonfinite:
        annotations.append(edfio.EdfAnnotation(0.0, None, f"stimloop: {n_nonfinite} non-finite samples written as 0"))

    start = _edf_start(session, meta)
    recording = edfio.Recording(startdate=start.date(), equipment_code="stimloop") if start else \
        edfio.Recording(equipment_code="stimloop")
    # edfio writes the microseconds as the EDF+ subsecond start (onset of the first data record's
    # time-keeping TAL) and takes annotation onsets relative to that true start.
    starttime = start.time().replace(tzinfo=None) if start else None
    edf = edfio.Edf(signals, recording=recording, starttime=starttime, data_record_duration=record_s,
                    annotations=sorted(annotations, key=lambda a: a.onset))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    edf.write(tmp)
    os.replace(tmp, out)  # never leave a half-written EDF under the final name
    return ExportSummary(out, n, n_ch, fs_hz, n / fs_hz, len(annotations), pad, n_gaps, n_nonfinite)


def _record_duration_s(fs_hz: float) -> float:
    from fractions import Fraction

    return float(Fraction(fs_hz).limit_denominator(99_999_999).denominator)


def _onsets_s(t: np.ndarray, timestamps: np.ndarray, fs_hz: float) -> np.ndarray:
    """Event times on the EDF timeline (sample k at k/fs_hz)."""
    t0 = float(timestamps[0])
    if t.size == 0:
        return t
    if timestamps.size < 2 or np.any(np.diff(timestamps) <= 0):
        return t - t0  # unordered clock (no dejitter): plain offset
    grid = np.arange(timestamps.size, dtype=np.float64) / fs_hz
    onsets = np.interp(t, timestamps, grid)
    # Outside the recording, interp clamps: extrapolate at the nominal rate instead.
    before, after = t < timestamps[0], t > timestamps[-1]
    onsets[before] = t[before] - t0
    onsets[after] = grid[-1] + (t[after] - timestamps[-1])
    return onsets
