"""Typed events every stage emits; the recorder writes them as JSON lines.

``t`` is seconds on the session clock (LSL ``local_clock()`` in real time, the
virtual clock in simulated time). Stages never read the clock: the runner passes it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    CHUNK = "chunk"
    SPIKE = "spike"
    PREDICTION = "prediction"
    DECISION = "decision"        # a policy asked for stimulation
    CLAMP = "clamp"              # governor changed a request to fit the profile
    REFUSAL = "refusal"          # governor refused a request
    COMMAND = "command"          # a checked command was written to the driver
    ACK = "ack"
    FAULT = "fault"
    SAFE_STATE = "safe_state"    # stimulation is off after a fault or stop
    DEADLINE_MISS = "deadline_miss"
    DROPPED = "dropped"          # samples lost (timestamp gap, ring overrun)
    STATUS = "status"
    MARK = "mark"                # user annotation / control command


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    kind: EventKind
    source: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"t": self.t, "kind": str(self.kind), "source": self.source, **_clean(self.data)},
                          separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        d = dict(d)
        return cls(t=d.pop("t"), kind=EventKind(d.pop("kind")), source=d.pop("source"), data=d)


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, StrEnum):
        return str(value)
    return value
