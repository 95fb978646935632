"""The ``Source`` interface: something that delivers multichannel samples into a ring.

A source is imperative shell (it does I/O and may read the session clock).
Faults it can survive (dropped samples, a stream that stalls and comes back)
become :class:`controller.events.Event` objects collected with
:meth:`Source.drain_events`; faults it cannot survive raise :class:`SourceError`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from controller.events import Event, EventKind


class SourceError(RuntimeError):
    """The source cannot be opened or read (bad spec, stream not found, device error)."""


class StreamLost(SourceError):
    """The stream went away and the source was asked not to wait for it."""


class StreamIncompatible(SourceError):
    """The stream can never feed this ring (channel count, rate or format): retrying cannot help.

    Other :class:`SourceError` s while reconnecting (a stream found but not answering in time)
    may pass, so a source retries those and refuses only this one for good.
    """


#: Timestamp step (sample periods) above which samples count as lost, for sources whose samples carry
#: their sender's timestamps (LSL, replay): half a period late is already a lost sample.
GAP_FACTOR = 1.5
#: The same for host-stamped sources (BrainFlow: its reader thread stamps with the wall clock): the
#: synthetic board steps up to 2.25 periods without any loss (controller/sources/brainflow_source.py).
HOST_STAMPED_GAP_FACTOR = 2.5


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source delivers. ``fs_hz = 0`` means an irregular rate. ``gap_factor``: the timestamp
    step, in sample periods, above which this source counts samples as lost (``count_gaps``); the
    loop's data-quality check and the EDF export use the same, so a jitter the source tolerates is
    not taken for a gap downstream. ``units``: what the samples delivered are in ("uV"; "" where the
    stream declared none, and they are taken as µV); ``declared_units``: what the stream said, when
    the source converted (an LSL stream in V), else None."""

    name: str
    type: str
    source_id: str
    n_channels: int
    channel_names: tuple[str, ...]
    units: tuple[str, ...]
    fs_hz: float
    gap_factor: float = GAP_FACTOR
    declared_units: tuple[str, ...] | None = None
    #: the unit the config said every channel is in (``source.units``), over what the stream declared
    unit_override: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "source_id": self.source_id,
                "n_channels": self.n_channels, "channel_names": list(self.channel_names),
                "units": list(self.units), "fs_hz": self.fs_hz, "gap_factor": self.gap_factor,
                **({"declared_units": list(self.declared_units)} if self.declared_units is not None else {}),
                **({"unit_override": self.unit_override} if self.unit_override is not None else {})}

    def describe_units(self) -> str:
        """One line for the operator: in µV as declared, converted, or undeclared and assumed."""
        from controller.units import uv_factor
        if self.unit_override is not None:
            said = sorted({u for u in (self.declared_units or self.units) if u.strip()}) or ["no unit"]
            said = f"; the stream declares {', '.join(said)}"
            return (f"taken as {self.unit_override} (source.units{said})" if uv_factor(self.unit_override) == 1.0
                    else f"converted to µV from {self.unit_override} (source.units{said})")
        undeclared = sum(1 for u in self.units if not u.strip())
        if undeclared:
            return (f"{undeclared} of {self.n_channels} channel(s) declare no unit: taken as µV "
                    "(set source.units if they are not)")
        scaled = sorted({u for u in self.declared_units or () if uv_factor(u) not in (None, 1.0)})
        return f"converted to µV from {', '.join(scaled)}" if scaled else "in µV"


class Source(ABC):
    """Delivers samples into a :class:`controller.ring.SharedRing`.

    Lifecycle: ``open()`` (returns and stores :attr:`info`), repeated
    ``read_into(ring)`` (waits at most a short time, returns the number of
    samples written, possibly 0), ``close()`` (idempotent).
    """

    info: SourceInfo | None = None
    #: ``source`` field of emitted events
    event_source: str = "source"

    def __init__(self) -> None:
        self._events: list[Event] = []

    @abstractmethod
    def open(self) -> SourceInfo: ...

    @abstractmethod
    def read_into(self, ring) -> int:
        """Move whatever is available (waiting briefly) into ``ring``; return samples written."""

    @abstractmethod
    def close(self) -> None: ...

    def drain_events(self) -> list[Event]:
        """Events produced since the last call (dropped samples, stream lost/recovered...)."""
        ev, self._events = self._events, []
        return ev

    def _emit(self, t: float, kind: EventKind, **data) -> None:
        self._events.append(Event(t=t, kind=kind, source=self.event_source, data=data))

    def check_ring(self, ring) -> None:
        """Raise a clear error if ``ring`` cannot hold this source's samples."""
        if self.info is None:
            raise SourceError(f"{type(self).__name__}: open() the source before reading")
        if ring.n_channels != self.info.n_channels:
            raise SourceError(f"ring {ring.name!r} has n_channels={ring.n_channels}, source "
                              f"{self.info.name!r} delivers {self.info.n_channels}: create the ring to match")
        # The runner sizes the ring from a probe of the source, and the acquisition process opens it
        # again: with two streams of one name (a second amplifier app, a stale outlet) they can be
        # different streams. Channels may agree where rates do not; every time in the loop hangs on it.
        if ring.fs_hz > 0 and self.info.fs_hz > 0 and abs(ring.fs_hz - self.info.fs_hz) > 1e-9 * ring.fs_hz:
            raise SourceError(f"ring {ring.name!r} is for {ring.fs_hz:g} Hz, source {self.info.name!r} "
                              f"(source_id {self.info.source_id!r}) delivers {self.info.fs_hz:g} Hz: if two "
                              f"streams share its name, choose one with source.source_id or source.stream_type")

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gap_factor_for(source_kind: str) -> float:
    """The gap factor a source of config kind ``source_kind`` (``hil``, ``lsl``, ``brainflow``) counts
    lost samples with: what the loop's data-quality check must use on its timestamps."""
    return HOST_STAMPED_GAP_FACTOR if source_kind == "brainflow" else GAP_FACTOR


def count_gaps(timestamps: np.ndarray, previous_t: float | None, fs_hz: float,
               gap_factor: float = GAP_FACTOR) -> tuple[int, int, float]:
    """Samples missing from a regularly sampled timestamp sequence.

    Looks at the steps between consecutive timestamps (including from
    ``previous_t``, the last timestamp of the previous chunk). A step above
    ``gap_factor / fs_hz`` counts ``round(step * fs_hz) - 1`` lost samples.
    Returns ``(n_gaps, n_lost, t_first_gap)``; ``(0, 0, nan)`` if none or ``fs_hz == 0``.
    """
    n = timestamps.shape[0]
    if fs_hz <= 0 or n == 0:
        return 0, 0, float("nan")
    # The usual case (no gap) without np.diff(prepend=...): its concatenate cost 30–60 µs per
    # chunk once the code had gone cold between 1 ms chunks, on the spike path's every sample.
    limit = gap_factor / fs_hz
    first_ok = previous_t is None or not float(timestamps[0]) - previous_t > limit
    if first_ok and (n == 1 or not (timestamps[1:] - timestamps[:-1] > limit).any()):
        return 0, 0, float("nan")
    steps = np.diff(timestamps, prepend=timestamps[0] if previous_t is None else previous_t)
    big = steps > limit
    lost = np.rint(steps[big] * fs_hz).astype(np.int64) - 1
    return int(big.sum()), int(lost.sum()), float(timestamps[np.argmax(big)])
