"""``ArraySource``: replay an array or a file (``.npy``, ``.mat``) as a live source.

Pacing is up to the caller: ``pace="realtime"`` releases samples as the
session clock passes their time (for the acquisition process), ``pace="none"``
releases ``chunk`` samples per ``read_into`` call (for tests and offline runs).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from controller.sources.base import Source, SourceError, SourceInfo


class ArraySource(Source):
    """Replays ``data (n_samples, n_channels)`` µV at ``fs_hz``; timestamps ``t0 + k / fs_hz``.

    ``t0=None`` starts the timeline at the session clock when opened.
    ``loop`` restarts from the first sample (timestamps keep increasing).
    """

    event_source = "replay"

    def __init__(self, data: np.ndarray, fs_hz: float, chunk: int = 32, pace: str = "realtime",
                 t0: float | None = None, loop: bool = False, name: str = "replay",
                 channel_names: list[str] | None = None, wait_s: float = 0.002, clock=None):
        super().__init__()
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 1:
            data = data[:, None]
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"ArraySource data shape {data.shape}: expected (n_samples > 0, n_channels)")
        if not (fs_hz > 0 and np.isfinite(fs_hz)):
            raise ValueError(f"ArraySource fs_hz={fs_hz!r}: expected a finite rate > 0")
        if pace not in ("realtime", "none"):
            raise ValueError(f"ArraySource pace={pace!r}: expected 'realtime' or 'none'")
        if chunk < 1:
            raise ValueError(f"ArraySource chunk={chunk!r}: expected >= 1")
        self.data = np.ascontiguousarray(data)
        self.fs_hz = float(fs_hz)
        self.chunk = int(chunk)
        self.pace = pace
        self.t0 = t0
        self.loop = loop
        self.wait_s = wait_s
        n_ch = data.shape[1]
        names = tuple(channel_names) if channel_names else tuple(f"ch{i}" for i in range(n_ch))
        if len(names) != n_ch:
            raise ValueError(f"ArraySource channel_names has {len(names)} names, data has {n_ch} channels")
        self._name = name
        self._names = names
        if clock is None:
            from controller.lsl_config import ensure_lsl_config
            ensure_lsl_config()
            import pylsl
            clock = pylsl.local_clock
        self._clock = clock
        self._k = 0  # samples released so far
        self._ts = np.empty(max(self.chunk, 1), dtype=np.float64)

    @classmethod
    def from_file(cls, path: str | Path, fs_hz: float, key: str | None = None, **kw) -> "ArraySource":
        """Load ``.npy`` (n, ch) or a MATLAB ``.mat`` variable ``key`` (default: the only variable)."""
        path = Path(path)
        if path.suffix == ".npy":
            data = np.load(path)
        elif path.suffix == ".mat":
            from scipy.io import loadmat
            mat = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
            if key is None:
                if len(mat) != 1:
                    raise SourceError(f"{path}: holds variables {sorted(mat)}; pass key= to choose one")
                key = next(iter(mat))
            if key not in mat:
                raise SourceError(f"{path}: no variable {key!r}; it holds {sorted(mat)}")
            data = mat[key]
        else:
            raise SourceError(f"{path}: unsupported suffix {path.suffix!r}; expected .npy or .mat")
        return cls(np.asarray(data, dtype=np.float32), fs_hz, name=kw.pop("name", path.stem), **kw)

    def open(self) -> SourceInfo:
        if self.t0 is None:
            self.t0 = float(self._clock())
        self.info = SourceInfo(name=self._name, type="replay", source_id=f"replay:{self._name}",
                               n_channels=self.data.shape[1], channel_names=self._names,
                               units=tuple("uV" for _ in self._names), fs_hz=self.fs_hz)
        return self.info

    @property
    def exhausted(self) -> bool:
        """True when every sample was released and ``loop`` is off."""
        return not self.loop and self._k >= self.data.shape[0]

    def read_into(self, ring) -> int:
        """Release the next samples (see the module doc for pacing); return samples written."""
        if self.info is None:
            raise SourceError("ArraySource: open() before read_into()")
        self.check_ring(ring)
        n_total = self.data.shape[0]
        if self.pace == "realtime":
            due = int((self._clock() - self.t0) * self.fs_hz) + 1 - self._k
        else:
            due = self.chunk
        n = min(due, self.chunk, ring.capacity)
        if not self.loop:
            n = min(n, n_total - self._k)
        if n <= 0:
            time.sleep(self.wait_s)
            return 0
        i = self._k % n_total
        ts = self._ts[:n]
        ts[:] = np.arange(self._k, self._k + n) / self.fs_hz + self.t0
        if i + n <= n_total:
            rows = self.data[i:i + n]
        else:
            # Wrapping (looped replay), possibly more than once when the chunk is longer than the data:
            # one gathered block and one write, so the ring never holds half a chunk.
            rows = self.data[np.arange(i, i + n) % n_total]
        ring.write(rows, ts)
        self._k += n
        return n

    def close(self) -> None:
        pass
