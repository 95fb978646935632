"""Session folder and crash-safe event log.

Layout of ``sessions/<UTC timestamp>/`` (ARCHITECTURE.md "Session folder"):

- ``config.toml``          the resolved configuration
- ``session.json``         start time, command line, versions, real-time options
- ``models.json``          sha256 of every model used
- ``events.jsonl``         every event of every process, one JSON object a line
- ``ground_truth.json``    what the simulator knows: seizures, injected faults (``push_t.f64`` beside it)
- ``device_log.jsonl``     every frame the simulated device received
- ``raw/``                 samples (float32) and timestamps (float64), appended as they arrive
- ``metrics.json``, ``report.png``  rebuilt at any time by ``stimloop report``

Several processes append to ``events.jsonl`` at once: each flush is a single
``os.write`` on an ``O_APPEND`` descriptor, which Linux keeps whole for regular
files, so lines never interleave. A crash loses at most the unflushed buffer
(flushed at least every ``flush_interval_s``).
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from controller.events import Event


class EventLog:
    """Buffered, append-only JSON-lines writer. ``maybe_flush(now)`` off the critical path."""

    def __init__(self, path: str | Path, flush_interval_s: float = 0.5):
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lines: list[str] = []
        self._torn = False   # the last flush failed partway through a line
        self._last_flush = float("-inf")

    def append(self, event: Event | dict) -> None:
        self._lines.append(event.to_json() if isinstance(event, Event) else json.dumps(event, separators=(",", ":")))

    def extend(self, events: Iterable[Event | dict]) -> None:
        for e in events:
            self.append(e)

    def maybe_flush(self, now: float) -> None:
        if self._lines and now - self._last_flush >= self.flush_interval_s:
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        """Write the buffered lines. On an error (disk full) the lines not wholly written stay
        buffered for the next flush and the error is raised: nothing is dropped. A line torn by a
        partial write is left as it is (the file is shared with other processes, so it is not cut
        back) and the retry starts on a fresh line; ``read_jsonl`` skips the torn fragment."""
        if not self._lines:
            return
        prefix = b"\n" if self._torn else b""
        data = prefix + ("\n".join(self._lines) + "\n").encode()
        written = 0
        try:
            while written < len(data):   # a regular file takes it whole; loop only for safety
                written += os.write(self._fd, data[written:])
        except OSError:
            if written > len(prefix):
                done = data[len(prefix):written]
                del self._lines[:done.count(b"\n")]
                self._torn = not done.endswith(b"\n")
            raise
        self._lines.clear()
        self._torn = False

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete lines of a JSON-lines file; a torn last line (after a kill) or a damaged one is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with p.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn tail
            try:
                out.append(json.loads(raw))
            except ValueError:   # a damaged line (not JSON, not UTF-8) is skipped like a torn one
                continue
    return out


def new_session_dir(out_dir: str | Path, now_utc: datetime | None = None) -> Path:
    """Create ``out_dir/<UTC timestamp>`` (unique even when two start in the same second)."""
    stamp = (now_utc or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        (d / "raw").mkdir()
        return d
    raise RuntimeError(f"could not create a session folder in {base}")


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding one object (``meta.json``, ``ground_truth.json``); anything else is a
    ``ValueError`` naming the file (a damaged session folder says which of its files is damaged)."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except ValueError as exc:   # not JSON, not UTF-8
        raise ValueError(f"{p}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(obj).__name__}")
    return obj


def write_json(path: str | Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename) so a kill never leaves half a file."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=str))
    os.replace(tmp, p)
