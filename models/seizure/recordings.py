"""Annotated recordings for training and evaluation: EDF/EDF+, ``.npz``, the Delhi segments.

Every loader returns a ``Recording``: sample-major ``(n_samples, n_channels)``
float32 µV (docs/architecture.md conventions), the rate, and the seizures as
``[(onset_s, offset_s), ...]`` — or ``None`` when the file carries no
annotations at all (then "no seizure" is unknown, not zero).

* ``.npz``: ``data`` (channels × samples), ``fs`` (Hz), optional ``onsets`` and
  ``offsets`` (s, same length), optional ``channel_names``.
* Either, with a ``rec.seizures.csv`` beside ``rec.edf`` / ``rec.npz``: its
  ``onset_s,offset_s`` rows are the seizures (``seizures_sidecar``).
* Else, a CHB-MIT ``chbNN-summary.txt`` in the same folder that lists the file
  (``File Name: chb01_03.edf``) gives its seizures (``read_chbmit_summary``:
  ``Seizure Start Time: 2996 seconds``, numbered ``Seizure 1 Start Time``, or
  several unnumbered pairs as in chb24; the count must match ``Number of
  Seizures in File``). CHB-MIT's EDFs carry no annotations of their own.
* EDF/EDF+ (``edfio``): the signals at the most common rate are used (others,
  e.g. annotations or slow channels, are skipped and listed in ``notes``);
  physical units mV/V are converted to µV. A seizure is an annotation whose
  text matches ``SEIZURE_PATTERN`` (e.g. "seizure", "sz", "ictal"); its
  duration gives the offset, or a later "... end"/"... offset" annotation does.
* Delhi (``/work/shared/data/delhi``): 150 MAT segments, 200 Hz, 1 channel,
  5.12 s, labelled by folder (ictal / interictal / preictal).
* Class-labelled segments in that layout (``load_segments``): one subfolder per
  class of ``.mat``, ``.txt`` (Bonn) or ``.npy`` files, no sample rate in them.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Recording", "RecordingError", "load_recording", "check_recording_path", "load_npz", "load_edf",
           "load_delhi", "default_delhi_dir", "load_segments", "read_segment", "seizures_sidecar", "read_seizures_csv",
           "read_chbmit_summary", "SEIZURE_PATTERN", "DELHI_FS_HZ"]

SEIZURE_PATTERN = re.compile(r"\b(seizure|sz|ictal|electrographic)\b", re.IGNORECASE)
_END_PATTERN = re.compile(r"\b(end|offset|stop)\b", re.IGNORECASE)
_NOT_SEIZURE = re.compile(r"\b(inter-?ictal|pre-?ictal|post-?ictal|no seizure)\b", re.IGNORECASE)
DELHI_FS_HZ = 200.0  # /work/shared/data/README.md
_UNIT_TO_UV = {"uv": 1.0, "µv": 1.0, "μv": 1.0, "mv": 1e3, "v": 1e6, "nv": 1e-3}


class RecordingError(ValueError):
    """A recording cannot be read or is not usable; the message names the file and the problem."""


@dataclass
class Recording:
    """One annotated recording (``seizures=None``: not annotated)."""

    path: str
    data_uv: np.ndarray
    fs_hz: float
    seizures: list[tuple[float, float]] | None
    channel_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.data_uv.shape[0] / self.fs_hz

    @property
    def n_channels(self) -> int:
        return int(self.data_uv.shape[1])


def _check_seizures(path, onsets, offsets, duration_s: float) -> list[tuple[float, float]]:
    on = np.atleast_1d(np.asarray(onsets, dtype=np.float64))
    off = np.atleast_1d(np.asarray(offsets, dtype=np.float64))
    if on.shape != off.shape:
        raise RecordingError(f"{path}: onsets ({on.size}) and offsets ({off.size}) must have the same length")
    out = []
    for a, b in zip(on, off):
        if not (np.isfinite(a) and np.isfinite(b) and 0 <= a < b):
            raise RecordingError(f"{path}: seizure ({a}, {b}) s invalid, expected 0 <= onset < offset")
        if a > duration_s:
            raise RecordingError(f"{path}: seizure onset {a} s is after the end of the recording ({duration_s:.3f} s)")
        out.append((float(a), float(min(b, duration_s))))
    return sorted(out)


def load_npz(path: str | Path) -> Recording:
    """``.npz`` with ``data`` (channels × samples), ``fs``, optional ``onsets``/``offsets`` (s)."""
    path = Path(path)
    # np.load takes a file that is neither .npz nor .npy for a pickle and answers "use allow_pickle=True":
    # advice never to follow for a file of unknown origin.
    if not zipfile.is_zipfile(path):
        raise RecordingError(f"{path}: not a .npz file (no zip archive inside; expected numpy.savez output)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return _recording_from_npz(path, z)
    except RecordingError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure (an object array, a bad member) becomes a named error
        raise RecordingError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None


def _recording_from_npz(path: Path, z) -> Recording:
    if "data" not in z or "fs" not in z:
        raise RecordingError(f"{path}: .npz needs arrays 'data' (channels x samples) and 'fs' (Hz), "
                             f"has {sorted(z.files)}")
    data = np.asarray(z["data"], dtype=np.float32)
    if data.ndim == 1:
        data = data[None, :]
    if data.ndim != 2:
        raise RecordingError(f"{path}: 'data' must be channels x samples, got shape {data.shape}")
    fs = float(np.asarray(z["fs"]).reshape(-1)[0])
    if not (np.isfinite(fs) and fs > 0):
        raise RecordingError(f"{path}: fs={fs!r} invalid, expected a rate > 0 Hz")
    x = np.ascontiguousarray(data.T)
    has_on, has_off = "onsets" in z, "offsets" in z
    if has_on != has_off:
        raise RecordingError(f"{path}: 'onsets' and 'offsets' must be given together")
    seizures = _check_seizures(path, z["onsets"], z["offsets"], x.shape[0] / fs) if has_on else None
    names = [str(v) for v in z["channel_names"]] if "channel_names" in z else [f"ch{i}" for i in range(x.shape[1])]
    return Recording(str(path), x, fs, seizures, names)


def load_edf(path: str | Path) -> Recording:
    """EDF/EDF+ via ``edfio``; seizure annotations by ``SEIZURE_PATTERN`` (see module docstring)."""
    import edfio

    path = Path(path)
    try:
        edf = edfio.read_edf(path)
    except Exception as e:  # noqa: BLE001
        raise RecordingError(f"{path}: cannot read as EDF/EDF+ ({e})") from None
    sigs = list(edf.signals)
    if not sigs:
        raise RecordingError(f"{path}: no signals")
    rates = [float(s.sampling_frequency) for s in sigs]
    fs = max(set(rates), key=lambda r: (rates.count(r), r))
    use = [s for s in sigs if float(s.sampling_frequency) == fs]
    notes = [f"skipped signal {s.label!r} at {float(s.sampling_frequency):g} Hz (recording uses {fs:g} Hz)"
             for s in sigs if float(s.sampling_frequency) != fs]
    cols = []
    for s in use:
        unit = s.physical_dimension.strip().lower()
        scale = _UNIT_TO_UV.get(unit)
        if scale is None:
            scale = 1.0
            notes.append(f"signal {s.label!r} has unit {s.physical_dimension!r}; taken as µV")
        cols.append(np.asarray(s.data, dtype=np.float64) * scale)
    n = min(c.size for c in cols)
    x = np.ascontiguousarray(np.stack([c[:n] for c in cols], axis=1), dtype=np.float32)
    duration_s = n / fs
    anns = sorted(edf.annotations, key=lambda a: a.onset)
    seizures = None
    sz = [a for a in anns if SEIZURE_PATTERN.search(a.text) and not _NOT_SEIZURE.search(a.text)]
    if sz:
        onsets, offsets, pending = [], [], None
        for a in sz:
            if _END_PATTERN.search(a.text):
                if pending is not None:
                    onsets.append(pending)
                    offsets.append(float(a.onset))
                    pending = None
                continue
            if a.duration:
                onsets.append(float(a.onset))
                offsets.append(float(a.onset) + float(a.duration))
            else:
                pending = float(a.onset)
        if pending is not None:
            notes.append(f"seizure at {pending} s has no duration or end annotation: taken to last to the end")
            onsets.append(pending)
            offsets.append(duration_s)
        seizures = _check_seizures(path, onsets, offsets, duration_s)
    elif any(re.search(r"no seizure|seizure[- ]free", a.text, re.IGNORECASE) for a in anns):
        seizures = []
    return Recording(str(path), x, fs, seizures, [s.label for s in use], notes)


def seizures_sidecar(path: str | Path) -> Path:
    """``rec.edf`` → ``rec.seizures.csv``: the seizures of a recording whose file holds none (CHB-MIT
    keeps them in a summary text, many exports in a spreadsheet)."""
    path = Path(path)
    return path.with_name(path.stem + ".seizures.csv")


def read_seizures_csv(path: str | Path, duration_s: float) -> list[tuple[float, float]]:
    """``onset_s,offset_s`` per line (seconds from the recording's first sample); a header line, blank
    lines and ``#`` comments are skipped; a file with no rows means "annotated: no seizure"."""
    path = Path(path)
    onsets, offsets, header_seen = [], [], False
    for k, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cells = [c.strip() for c in line.replace(";", ",").split(",")]
        try:
            if len(cells) != 2:
                raise ValueError
            a, b = float(cells[0]), float(cells[1])
        except ValueError:
            if not onsets and not header_seen:   # a header (onset_s,offset_s), after comments if any
                header_seen = True
                continue
            raise RecordingError(f"{path}, line {k}: {line!r} is not 'onset_s,offset_s' (two numbers, seconds "
                                 "from the recording's first sample)") from None
        onsets.append(a)
        offsets.append(b)
    return _check_seizures(path, onsets, offsets, duration_s)


_CHB_FILE = re.compile(r"^File Name:\s*(\S+)\s*$", re.IGNORECASE)
_CHB_COUNT = re.compile(r"^Number of Seizures in File:\s*(\d+)\s*$", re.IGNORECASE)
_CHB_TIME = re.compile(r"^Seizure(?:\s+\d+)?\s+(Start|End)\s+Time\s*:\s*(.*?)\s*$", re.IGNORECASE)
_CHB_SECONDS = re.compile(r"^(\d+(?:\.\d*)?)\s*(?:s|sec|secs|seconds?)?$", re.IGNORECASE)


def read_chbmit_summary(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """CHB-MIT's ``chbNN-summary.txt``: ``{edf file name: [(onset_s, offset_s), ...]}``, seconds
    from the start of that file. Every file it lists is in the result, those without a seizure with
    ``[]``. Lines other than file names, seizure counts and seizure times (channel lists, clock
    times) are skipped; a seizure time that is not a number of seconds, an end without a start, or
    a count that does not match the times listed is an error naming the line."""
    path = Path(path)
    out: dict[str, list[tuple[float, float]]] = {}
    current, count, start, count_line = None, None, None, 0

    def close(k: int) -> None:
        if current is None:
            return
        if start is not None:
            raise RecordingError(f"{path}, line {k}: seizure starting at {start} s in {current} has no end time")
        if count is not None and count != len(out[current]):
            raise RecordingError(f"{path}, line {count_line}: {current} says {count} seizure(s) and lists "
                                 f"{len(out[current])}")

    lines = path.read_text(errors="replace").splitlines()
    for k, raw in enumerate(lines, 1):
        line = raw.strip()
        if m := _CHB_FILE.match(line):
            close(k)
            current, count, start = m.group(1), None, None
            if current in out:
                raise RecordingError(f"{path}, line {k}: {current} is listed twice")
            out[current] = []
        elif (m := _CHB_COUNT.match(line)) and current is not None:
            count, count_line = int(m.group(1)), k
        elif m := _CHB_TIME.match(line):
            t = _CHB_SECONDS.match(m.group(2))
            if current is None or t is None:
                raise RecordingError(f"{path}, line {k}: {line!r} is not a seizure time in seconds of a file "
                                     "named above (e.g. 'Seizure Start Time: 2996 seconds')")
            if m.group(1).lower() == "start":
                if start is not None:
                    raise RecordingError(f"{path}, line {k}: a second start before the end of the seizure at "
                                         f"{start} s in {current}")
                start = float(t.group(1))
            else:
                if start is None:
                    raise RecordingError(f"{path}, line {k}: a seizure end with no start in {current}")
                end = float(t.group(1))
                if not end > start:
                    raise RecordingError(f"{path}, line {k}: seizure ({start}, {end}) s in {current} invalid, "
                                         "expected start < end")
                out[current].append((start, end))
                start = None
    close(len(lines))
    return out


def chbmit_seizures(path: str | Path) -> tuple[Path, list[tuple[float, float]]] | None:
    """The seizures a ``*-summary.txt`` in ``path``'s folder lists for it, with that summary's path;
    ``None`` when no summary there names the file."""
    path = Path(path)
    for summary in sorted(path.parent.glob("*-summary.txt")):
        listed = read_chbmit_summary(summary)
        if path.name in listed:
            return summary, listed[path.name]
    return None


def check_recording_path(path: str | Path) -> Path:
    """``path`` if it is a file ``load_recording`` reads by its suffix, else ``RecordingError``: what
    can be told of a list of recordings before reading any."""
    path = Path(path)
    if not path.is_file():
        raise RecordingError(f"recording {path} does not exist")
    if path.suffix.lower() not in (".npz", ".edf", ".edf+"):
        raise RecordingError(f"recording {path}: unsupported file type {path.suffix.lower()!r}, "
                             "expected .edf (EDF/EDF+) or .npz")
    return path


def load_recording(path: str | Path) -> Recording:
    """Dispatch on the suffix: ``.npz`` or ``.edf``/``.bdf``-less EDF/EDF+. A ``rec.seizures.csv``
    beside the file (``seizures_sidecar``), or else a CHB-MIT summary in its folder that lists it,
    gives its seizures, in place of any the file carries."""
    path = check_recording_path(path)
    rec = load_npz(path) if path.suffix.lower() == ".npz" else load_edf(path)
    side = seizures_sidecar(path)
    found = (side, read_seizures_csv(side, rec.duration_s)) if side.is_file() else chbmit_seizures(path)
    if found is not None:
        side, seizures = found
        if rec.seizures:
            rec.notes.append(f"{len(rec.seizures)} seizure(s) annotated in the file replaced by {side.name}")
        rec.seizures = _check_seizures(side, [a for a, _ in seizures], [b for _, b in seizures], rec.duration_s)
        rec.notes.append(f"seizures from {side.name}: {len(rec.seizures)}")
    return rec


def default_delhi_dir(repo: Path | None = None) -> Path:
    """``<repo>/../shared/data/delhi`` (the shared data folder next to the repository)."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[2]
    return (repo / ".." / "shared" / "data" / "delhi").resolve()


SEGMENT_SUFFIXES = (".mat", ".txt", ".npy")


def read_segment(path: str | Path, variable: str | None = None) -> np.ndarray:
    """One unannotated EEG segment as ``(n_samples, n_channels)`` float32 µV: a MAT file (the
    variable named ``variable``, else its only variable), a text file of numbers (one sample per
    row, channels in columns: the Bonn layout), or a ``.npy`` array. A 2-D array with more columns
    than rows is taken as channels × samples and transposed."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".mat":
            from scipy.io import loadmat

            mat = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
            if variable in mat:
                x = mat[variable]
            elif len(mat) == 1:
                (x,) = mat.values()
            else:
                raise RecordingError(f"segment {path}: {len(mat)} variables {sorted(mat)} and none named "
                                     f"{variable!r}: which one holds the signal?")
        elif suffix == ".txt":
            x = np.loadtxt(path, ndmin=2)
        elif suffix == ".npy":
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":   # else np.load takes it for a pickle (see load_npz)
                    raise RecordingError(f"segment {path}: not a .npy file (no NumPy header; expected numpy.save output)")
            x = np.load(path, allow_pickle=False)
        else:
            raise RecordingError(f"segment {path}: unsupported file type {suffix!r}, expected one of {SEGMENT_SUFFIXES}")
    except RecordingError:
        raise
    except Exception as exc:   # scipy/numpy parse errors: say which file
        raise RecordingError(f"segment {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    x = np.asarray(x)
    if x.dtype.kind not in "fiu" or x.ndim not in (1, 2) or x.size == 0:
        raise RecordingError(f"segment {path}: expected a 1-D or 2-D numeric array, got {x.dtype} {x.shape}")
    x = x.reshape(-1, 1) if x.ndim == 1 else (x.T if x.shape[1] > x.shape[0] else x)
    return np.asarray(x, dtype=np.float32)


def load_segments(root: str | Path) -> list[tuple[str, str, np.ndarray]]:
    """Class-labelled segments, one subfolder per class (``ictal/``, ``interictal/``, …: the Delhi
    and Bonn layouts), as ``(class, file name, (n, ch) float32 µV)``, classes and files sorted.
    MAT variables are looked up by the folder's name first."""
    root = Path(root)
    if not root.is_dir():
        raise RecordingError(f"segments folder {root} does not exist")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):   # not .git & co
        for f in sorted(p for p in d.iterdir() if p.suffix.lower() in SEGMENT_SUFFIXES):
            out.append((d.name, f.name, read_segment(f, variable=d.name)))
    if not out:
        raise RecordingError(f"no segments under {root}: expected one subfolder per class (e.g. ictal/, "
                             f"interictal/) holding {', '.join(SEGMENT_SUFFIXES)} files")
    return out


def load_delhi(root: str | Path | None = None) -> list[tuple[str, str, np.ndarray]]:
    """All Delhi segments as ``(class, file name, (1024, 1) float32 µV)``; class in ictal/interictal/preictal."""
    root = Path(root) if root else default_delhi_dir()
    for cls in ("ictal", "interictal", "preictal"):
        if not (root / cls).is_dir():
            raise RecordingError(f"Delhi data folder {root / cls} does not exist "
                                 f"(expected {root}/ictal, interictal, preictal)")
    out = [s for s in load_segments(root) if s[0] in ("ictal", "interictal", "preictal")]
    if not out:
        raise RecordingError(f"no .mat segments under {root}")
    return out
