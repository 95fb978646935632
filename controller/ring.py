"""Shared-memory ring buffer: one producer process, any number of reader processes.

Layout of the segment (little-endian, offsets in bytes)::

    0    magic      8 s    b"STMRING\\0"
    8    version    u32
    12   n_channels u32
    16   capacity   u64    samples (rows)
    24   fs_hz      f64
    64   claimed    i64    counter the writer is about to reach (written BEFORE the data)
    72   committed  i64    counter of samples fully written (written AFTER the data)
    128  samples    float32[capacity, n_channels]
    ...  timestamps float64[capacity]          (8-byte aligned)

Counters are absolute sample counts since the ring was created and never wrap
(int64 at 1 MHz lasts ~290 000 years). Sample number ``k`` lives in slot
``k % capacity``.

Memory-ordering assumption (seqlock style). The writer stores ``claimed``,
then the data, then ``committed``; readers load ``committed``, copy/view the
data, then load ``claimed``. This is correct on x86-64, whose total-store-order
model keeps stores in program order and loads in program order, given that
CPython/NumPy perform each of these steps as separate opaque C calls (the C
compiler cannot move stores across them) and that an aligned int64 store is a
single, untorn ``mov``. Data read for sample ``k`` is trustworthy iff
``k >= claimed_after_read - capacity``: anything older may have been
overwritten while it was being read. On weakly ordered CPUs (ARM) this needs
explicit fences, which Python cannot issue: not supported.

``multiprocessing.shared_memory`` on Python < 3.13 registers every segment
with the resource tracker, even in processes that only attach, and the tracker
then unlinks the segment when that process exits (REFERENCE.md §8,
cpython#82300). :meth:`SharedRing.attach` therefore opens the segment without
registering it; only the creator owns (and unlinks) it.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAGIC = b"STMRING\0"
VERSION = 1
_HEADER_BYTES = 128
_OFF_CLAIMED = 64
_OFF_COMMITTED = 72

_REGISTER_LOCK = threading.Lock()


class RingError(RuntimeError):
    """The segment is not a stimloop ring, or the ring is used incorrectly."""


class Overrun(RuntimeError):
    """The writer overwrote samples a reader had not consumed (or was reading).

    ``lost`` is the number of samples the reader will never see;
    ``resume_counter`` is the counter the reader continues from.
    """

    def __init__(self, lost: int, resume_counter: int, where: str = ""):
        self.lost = int(lost)
        self.resume_counter = int(resume_counter)
        super().__init__(f"ring overrun{(' in ' + where) if where else ''}: {self.lost} samples lost, "
                         f"resuming at counter {self.resume_counter}")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _segment_bytes(n_channels: int, capacity: int) -> int:
    return _HEADER_BYTES + _align8(capacity * n_channels * 4) + capacity * 8


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach to an existing segment without registering it with the resource tracker."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=False, track=False)
    # Python 3.11/3.12 always register; skipping the registration (as 3.13's
    # track=False does) is safer than register+unregister, which would also
    # drop the creator's registration when both share one tracker (spawned children).
    with _REGISTER_LOCK:
        original = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return shared_memory.SharedMemory(name=name, create=False)
        finally:
            resource_tracker.register = original


class SharedRing:
    """A ring of ``float32[capacity, n_channels]`` samples + ``float64`` timestamps in shared memory.

    Create it once (the owner unlinks it), attach from other processes by name.
    Exactly one process may call :meth:`write`. Read with :meth:`reader`.
    """

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm = shm
        self._owner = owner
        self._name = shm.name
        self._unlinked = False
        buf = shm.buf
        if len(buf) < _HEADER_BYTES or bytes(buf[0:8]) != MAGIC:
            raise RingError(f"shared memory {shm.name!r} is not a stimloop ring (bad magic {bytes(buf[0:8])!r}, "
                            f"expected {MAGIC!r})")
        hdr = np.ndarray((1,), dtype=np.dtype([("magic", "S8"), ("version", "<u4"), ("n_channels", "<u4"),
                                               ("capacity", "<u8"), ("fs_hz", "<f8")]), buffer=buf, offset=0)
        version = int(hdr["version"][0])
        if version != VERSION:
            raise RingError(f"ring {shm.name!r} has layout version {version}, expected {VERSION}")
        self.n_channels = int(hdr["n_channels"][0])
        self.capacity = int(hdr["capacity"][0])
        self.fs_hz = float(hdr["fs_hz"][0])
        need = _segment_bytes(self.n_channels, self.capacity)
        if len(buf) < need:
            raise RingError(f"ring {shm.name!r} segment is {len(buf)} bytes, expected at least {need}")
        self._claimed = np.ndarray((1,), dtype="<i8", buffer=buf, offset=_OFF_CLAIMED)
        self._committed = np.ndarray((1,), dtype="<i8", buffer=buf, offset=_OFF_COMMITTED)
        self.samples = np.ndarray((self.capacity, self.n_channels), dtype="<f4", buffer=buf, offset=_HEADER_BYTES)
        self.timestamps = np.ndarray((self.capacity,), dtype="<f8", buffer=buf,
                                     offset=_HEADER_BYTES + _align8(self.capacity * self.n_channels * 4))

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, name: str | None, n_channels: int, capacity: int, fs_hz: float) -> "SharedRing":
        """Create a new ring segment (``name=None`` picks a unique name). The caller owns it."""
        if not isinstance(n_channels, (int, np.integer)) or not 1 <= n_channels <= 65_535:
            raise ValueError(f"n_channels={n_channels!r}: expected an integer in [1, 65535]")
        if not isinstance(capacity, (int, np.integer)) or not 2 <= capacity <= 2**31:
            raise ValueError(f"capacity={capacity!r}: expected an integer number of samples in [2, 2**31]")
        if not (fs_hz >= 0.0 and np.isfinite(fs_hz)):
            raise ValueError(f"fs_hz={fs_hz!r}: expected a finite rate >= 0 (0 = irregular)")
        size = _segment_bytes(int(n_channels), int(capacity))
        shm = shared_memory.SharedMemory(name=name, create=True, size=size)
        hdr = np.ndarray((1,), dtype=np.dtype([("magic", "S8"), ("version", "<u4"), ("n_channels", "<u4"),
                                               ("capacity", "<u8"), ("fs_hz", "<f8")]), buffer=shm.buf, offset=0)
        hdr["version"] = VERSION
        hdr["n_channels"] = n_channels
        hdr["capacity"] = capacity
        hdr["fs_hz"] = fs_hz
        np.ndarray((2,), dtype="<i8", buffer=shm.buf, offset=_OFF_CLAIMED)[:] = 0
        hdr["magic"] = MAGIC  # last: a half-initialized segment never looks valid
        del hdr
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "SharedRing":
        """Attach to an existing ring by name (not registered with this process's resource tracker)."""
        try:
            shm = _open_untracked(name)
        except FileNotFoundError:
            raise RingError(f"no shared-memory ring named {name!r} (was it created and not yet unlinked?)") from None
        try:
            return cls(shm, owner=False)
        except Exception:
            shm.close()
            raise

    @property
    def name(self) -> str:
        """Segment name to pass to :meth:`attach` in another process."""
        return self._name

    def close(self) -> None:
        """Unmap this process's view. Views handed out earlier become invalid.

        If arrays returned by a reader are still alive the mapping stays until
        they are garbage collected (closing would crash them).
        """
        if self._shm is None:
            return
        self.samples = self.timestamps = self._claimed = self._committed = None
        shm, self._shm = self._shm, None
        try:
            shm.close()
        except BufferError:
            pass  # outstanding views keep the mmap alive; it is released with them

    def unlink(self) -> None:
        """Remove the segment name (owner only); attached processes keep their mapping."""
        if not self._owner:
            raise RingError(f"ring {self._name!r}: only the creating process unlinks it")
        if self._unlinked:
            return
        self._unlinked = True
        if self._shm is not None:
            self._shm.unlink()
        else:  # closed already: unlink by name (shm_unlink also unregisters from the tracker)
            shm = shared_memory.SharedMemory(name=self._name)
            shm.close()
            shm.unlink()

    def __enter__(self) -> "SharedRing":
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            self.unlink()
        self.close()

    # ---------------------------------------------------------------- counters
    @property
    def counter(self) -> int:
        """Number of samples committed so far (the commit point)."""
        return int(self._committed[0])

    def claimed(self) -> int:
        """Counter the writer may already be writing up to (>= :attr:`counter`)."""
        return int(self._claimed[0])

    def oldest_valid(self) -> int:
        """Smallest counter whose slot cannot be being overwritten right now."""
        return max(0, int(self._claimed[0]) - self.capacity)

    # ---------------------------------------------------------------- producer
    def write(self, samples: np.ndarray, timestamps: np.ndarray) -> int:
        """Append ``samples (n, n_channels)`` and ``timestamps (n,)``; return the new counter.

        Only one process may write. ``n`` must not exceed the capacity.
        """
        n = samples.shape[0]
        if samples.ndim != 2 or samples.shape[1] != self.n_channels:
            raise ValueError(f"samples shape {samples.shape}: expected (n, {self.n_channels})")
        if timestamps.shape != (n,):
            raise ValueError(f"timestamps shape {timestamps.shape}: expected ({n},) to match samples")
        if n > self.capacity:
            raise ValueError(f"chunk of {n} samples exceeds ring capacity {self.capacity}; "
                             f"write it in pieces or make the ring larger")
        c = int(self._committed[0])
        if n == 0:
            return c
        end = c + n
        self._claimed[0] = end
        i = c % self.capacity
        first = min(n, self.capacity - i)
        self.samples[i:i + first] = samples[:first]
        self.timestamps[i:i + first] = timestamps[:first]
        if first < n:
            self.samples[:n - first] = samples[first:]
            self.timestamps[:n - first] = timestamps[first:]
        self._committed[0] = end  # commit point: readers see the data only now
        return end

    # ---------------------------------------------------------------- readers
    def reader(self, start: str | int = "now", max_read: int | None = None) -> "RingReader":
        """A reader with its own cursor. ``start``: ``"now"``, ``"oldest"`` or a counter."""
        return RingReader(self, start=start, max_read=max_read)


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Samples ``(n, ch)`` and timestamps ``(n,)`` for counters ``[start, start + n)``.

    ``is_view`` tells whether the arrays point into shared memory: such views
    stay trustworthy only while ``reader.valid(start)`` is True.
    """

    samples: np.ndarray
    timestamps: np.ndarray
    start: int
    is_view: bool

    @property
    def end(self) -> int:
        return self.start + self.samples.shape[0]

    def __iter__(self):  # allows ``samples, timestamps, start = reader.read_new(...)``
        return iter((self.samples, self.timestamps, self.start))


class RingReader:
    """One consumer's cursor on a :class:`SharedRing` (any process, any number of them).

    Reads never block. A read checks, after taking the data, that the writer has
    not overwritten it and raises :class:`Overrun` with the number of samples
    lost otherwise: a copy (``copy=True``, or a read across the ring's end) is
    therefore never torn. A zero-copy view (the default where the data is
    contiguous) is checked only up to the moment it is returned; the writer can
    overwrite it while you use it, so call :meth:`valid` after using it, or ask
    for a copy. Copies go into buffers preallocated here (``max_read`` rows),
    which the next read overwrites: copy them yourself if you keep them.
    """

    def __init__(self, ring: SharedRing, start: str | int = "now", max_read: int | None = None):
        self.ring = ring
        cap = ring.capacity
        self.max_read = cap if max_read is None else int(max_read)
        if not 1 <= self.max_read <= cap:
            raise ValueError(f"max_read={max_read!r}: expected 1..{cap} (ring capacity)")
        if start == "now":
            self.cursor = ring.counter
        elif start == "oldest":
            self.cursor = ring.oldest_valid()
        elif isinstance(start, (int, np.integer)) and start >= 0:
            self.cursor = int(start)
        else:
            raise ValueError(f"start={start!r}: expected 'now', 'oldest' or a counter >= 0")
        self._buf = np.empty((self.max_read, ring.n_channels), dtype=np.float32)
        self._ts_buf = np.empty((self.max_read,), dtype=np.float64)

    def valid(self, start: int) -> bool:
        """True if data read for counters ``>= start`` has not been (and is not being) overwritten.

        Call it after using a zero-copy view to confirm what you computed on was intact.
        """
        return start >= int(self.ring._claimed[0]) - self.ring.capacity

    valid_after_read = valid

    def available(self) -> int:
        """Samples committed but not yet consumed by this reader."""
        return self.ring.counter - self.cursor

    def _slice(self, start: int, n: int, copy: bool, out: np.ndarray | None,
               ts_out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, bool]:
        ring = self.ring
        cap = ring.capacity
        i = start % cap
        if i + n <= cap and not copy and out is None:
            return ring.samples[i:i + n], ring.timestamps[i:i + n], True
        dst = self._buf if out is None else out
        tdst = self._ts_buf if ts_out is None else ts_out
        if dst.shape[0] < n or tdst.shape[0] < n:
            raise ValueError(f"output buffer holds {min(dst.shape[0], tdst.shape[0])} rows, {n} needed")
        first = min(n, cap - i)
        dst[:first] = ring.samples[i:i + first]
        tdst[:first] = ring.timestamps[i:i + first]
        if first < n:
            dst[first:n] = ring.samples[:n - first]
            tdst[first:n] = ring.timestamps[:n - first]
        return dst[:n], tdst[:n], False

    def read_new(self, max_n: int | None = None, copy: bool = False) -> ReadResult:
        """Consume up to ``max_n`` samples after the cursor (possibly 0).

        Raises :class:`Overrun` (and moves the cursor past the lost samples)
        when the writer lapped this reader; the next call continues from there.
        """
        ring = self.ring
        max_n = self.max_read if max_n is None else min(int(max_n), self.max_read)
        committed = int(ring._committed[0])
        start = self.cursor
        oldest = int(ring._claimed[0]) - ring.capacity
        if start < oldest:
            self.cursor = max(oldest, 0)
            raise Overrun(self.cursor - start, self.cursor, "read_new")
        n = min(committed - start, max_n)
        if n <= 0:
            return ReadResult(self._buf[:0], self._ts_buf[:0], start, False)
        samples, ts, is_view = self._slice(start, n, copy, None, None)
        oldest = int(ring._claimed[0]) - ring.capacity  # re-check: was it overwritten while we read?
        if start < oldest:
            self.cursor = oldest
            raise Overrun(oldest - start, oldest, "read_new (overwritten during copy)")
        self.cursor = start + n
        return ReadResult(samples, ts, start, is_view)

    def latest(self, n: int, out: np.ndarray | None = None, ts_out: np.ndarray | None = None,
               copy: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """The most recent ``n`` committed samples ``-> (samples, timestamps, end_counter)``.

        Returns fewer rows if fewer were ever written. Zero-copy views when the
        window is contiguous (check ``valid(end_counter - len)`` after use);
        otherwise (or with ``copy=True`` / ``out``) a copy into ``out`` or the
        reader's preallocated buffer. Does not move the cursor.
        """
        ring = self.ring
        if not 1 <= n <= ring.capacity:
            raise ValueError(f"n={n!r}: expected 1..{ring.capacity} (ring capacity)")
        end = int(ring._committed[0])
        n = min(n, end)
        start = end - n
        samples, ts, _ = self._slice(start, n, copy, out, ts_out)
        oldest = int(ring._claimed[0]) - ring.capacity
        if start < oldest:
            raise Overrun(oldest - start, oldest, "latest")
        return samples, ts, end
