"""Export a session folder to EDF+ (signals in µV, events as annotations) with ``edfio``.

Reads what the acquisition process and the recorder wrote (see
``controller/acquisition.py`` and ``controller/recorder.py``)::

    SESSION/raw/samples.f32      float32 (n, ch) row-major, appended (a torn last row is ignored)
    SESSION/raw/timestamps.f64   float64 (n,), session clock
    SESSION/raw/meta.json        n_channels, fs_hz, channel_names
    SESSION/events.jsonl         one event per line (a torn last line is ignored)
    SESSION/session.json         optional: started_utc, used as the EDF start date/time

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

DEFAULT_EXCLUDE_KINDS: tuple[str, ...] = ("chunk",)  # one per chunk: too many to be useful annotations
_LABEL_CHARS = 16        # EDF header: signal label is 16 ASCII characters
_NUMBER_CHARS = 8        # EDF header: physical min/max are 8 ASCII characters
_MAX_ANNOTATION_CHARS = 120


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


def _read_raw(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Whole rows only: the acquisition process may have been killed mid-write."""
    meta_path = raw_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; expected a session folder with raw/meta.json")
    meta = json.loads(meta_path.read_text())
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
    """Complete JSON lines of ``events.jsonl``; a torn last line (no newline) is skipped."""
    if not path.is_file():
        return []
    out = []
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a damaged line must not lose the rest of the session
            if isinstance(obj, dict) and isinstance(obj.get("t"), (int, float)) and "kind" in obj:
                out.append(obj)
    return out


def _fmt_bound(value: float, outward: int) -> float:
    """Round ``value`` away from the data (``outward`` -1 down, +1 up) to fit 8 header characters."""
    for decimals in range(6, -1, -1):
        scale = 10.0 ** decimals
        v = (math.floor(value * scale) if outward < 0 else math.ceil(value * scale)) / scale
        text = str(int(v)) if float(v).is_integer() else repr(v)
        if len(text) <= _NUMBER_CHARS:
            return float(v)
    raise ValueError(f"EDF physical bound {value!r} µV does not fit 8 characters; expected |value| < 1e7 µV")


def _physical_range(x: np.ndarray) -> tuple[float, float]:
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if hi - lo < 1e-3:  # flat channel: EDF needs physical_min < physical_max
        lo, hi = lo - 1.0, hi + 1.0
    return _fmt_bound(lo, -1), _fmt_bound(hi, +1)


def _labels(meta: dict, n_ch: int) -> list[str]:
    names = meta.get("channel_names") or [f"ch{i}" for i in range(n_ch)]
    if len(names) != n_ch:
        raise ValueError(f"raw/meta.json channel_names has {len(names)} names; expected n_channels={n_ch}")
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
    details = " ".join(f"{k}={v}" for k, v in rest.items() if isinstance(v, (str, int, float, bool)) or v is None)
    text = f"{head} {details}".strip() if details else head
    # \x14, \x15 and NUL delimit TALs in EDF+: never let them into the text.
    text = text.replace("\x14", " ").replace("\x15", " ").replace("\x00", " ")
    return text[:_MAX_ANNOTATION_CHARS]


def _edf_start(session_dir: Path, meta: dict) -> dt.datetime | None:
    for value in (meta.get("start_utc"), _session_started(session_dir)):
        if isinstance(value, str):
            try:
                return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


def _session_started(session_dir: Path) -> str | None:
    p = session_dir / "session.json"
    try:
        return json.loads(p.read_text()).get("started_utc")
    except (OSError, ValueError, AttributeError):
        return None


def export_edf(session_dir: str | os.PathLike, out_path: str | os.PathLike,
               exclude_kinds: Iterable[str] = DEFAULT_EXCLUDE_KINDS) -> ExportSummary:
    """Write ``out_path`` (EDF+C) from ``session_dir``; return an :class:`ExportSummary`.

    Signals are in µV, one physical range per channel from that channel's data
    (16-bit quantization step = range / 65535). The tail is padded with the last
    value to a whole data record (EDF needs it); the real end is annotated.
    Non-finite samples are written as 0 and counted in an annotation.
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
    labels = _labels(meta, n_ch)
    for ch in range(n_ch):
        x = samples[:, ch].astype(np.float64)
        if n_nonfinite:
            x[nonfinite[:, ch]] = 0.0
        lo, hi = _physical_range(x)
        if pad:
            x = np.concatenate([x, np.full(pad, x[-1])])
        signals.append(edfio.EdfSignal(x, fs_hz, label=labels[ch], physical_dimension="uV",
                                       physical_range=(lo, hi)))

    duration_s = n_padded / fs_hz
    onsets = _onsets_s(np.array([float(e["t"]) for e in events], dtype=np.float64), timestamps, fs_hz)
    annotations = []
    for event, onset in zip(events, onsets):
        dur = event.get("duration_s")
        dur = float(dur) if isinstance(dur, (int, float)) and dur > 0 else None
        text = _annotation_text(event)
        if onset < 0 or onset > duration_s:
            text = f"[outside recording, t={event['t']}] {text}"[:_MAX_ANNOTATION_CHARS]
        annotations.append(edfio.EdfAnnotation(min(max(onset, 0.0), duration_s), dur, text))
    n_gaps = 0
    if n > 1:
        dts = np.diff(timestamps)
        gap_idx = np.flatnonzero(dts > 1.5 / fs_hz)  # more than half a sample late: samples were lost
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
    starttime = start.time().replace(microsecond=0, tzinfo=None) if start else None
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
