"""The policy interface: turn detector output into stimulation requests.

Policies are functional core: plain objects with ``step(...)``, no I/O, no
clock reads (the caller passes ``t``). They only *ask*: every ``StimRequest``
still goes through ``SafetyGovernor`` via ``Actuator.submit``.
"""
from __future__ import annotations

import math
import numbers
from typing import Protocol, runtime_checkable

from controller.events import Event
from controller.safety.governor import DEVICE_BUSY_GUARD_S, StimRequest

PolicyOutput = tuple[list[StimRequest], list[Event]]


@runtime_checkable
class Policy(Protocol):
    """A stimulation policy. ``step`` arguments depend on the policy (e.g. ``(p, t)`` for responsive)."""

    source: str

    def step(self, *args, **kwargs) -> PolicyOutput:
        """Advance with new evidence at session time ``t``; return requests and events."""
        ...

    def reset(self) -> None:
        """Forget all state (new session)."""
        ...


class Reconfigurable:
    """A policy whose parameters may change while it runs (``stimloop ctl set_param``).

    ``params()`` returns its constructor's arguments as they stand;
    ``update(**changes)`` runs the constructor on a scratch object with the
    changes, so every check it makes (ranges, hysteresis, burst spacing
    against ``stim``) is made again, then takes the changed values over. A
    refused change raises the constructor's ``ValueError``/``TypeError`` and
    leaves the policy as it was. The state (detection, schedule, timers) is
    kept; ``_updated`` refreshes what a policy derived from a changed value.
    """

    #: fields of ``stim`` the policy replaces itself (changing them would do nothing)
    STIM_FIELDS_IT_SETS: tuple[str, ...] = ()

    def params(self) -> dict:
        raise NotImplementedError

    def update(self, **changes) -> dict:
        """Apply ``changes`` (constructor argument names) after the constructor's checks; return them as set."""
        params = self.params()
        unknown = sorted(set(changes) - set(params))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter {', '.join(unknown)}; it takes {', '.join(params)}")
        derived = sorted(n for n in changes if n not in vars(self))
        if derived:   # e.g. AdsPolicy keeps delay_ms as delay_s: nothing to take over by that name
            raise ValueError(f"{type(self).__name__} cannot change {', '.join(derived)} while it runs")
        trial = type(self)(**{**params, **changes})
        for name in changes:
            setattr(self, name, getattr(trial, name))
        self._updated(set(changes))
        return {name: getattr(self, name) for name in changes}

    def _updated(self, names: set[str]) -> None:
        """Refresh state derived from the parameters ``names`` (default: none)."""


def check_time(t, last_t: float) -> float:
    """``t`` as a float, refusing non-finite values and time going backwards (every policy's ``step``)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t):
        raise ValueError(f"t={t!r} invalid, expected a finite number (s on the session clock)")
    t = float(t)
    if t < last_t:
        raise ValueError(f"t={t} invalid, expected >= previous t={last_t} (time must not go backwards)")
    return t


def min_burst_spacing_s(stim) -> float:
    """The shortest start-to-start spacing of two bursts of ``stim`` the governor allows: the burst
    duration plus ``DEVICE_BUSY_GUARD_S`` (the device holds one burst at a time, docs/safety.md)."""
    return stim.burst_duration_s + DEVICE_BUSY_GUARD_S


def check_burst_spacing(name: str, value: float, stim, who: str = "") -> None:
    """A policy's planned spacing between bursts (``name`` = ``value`` s) must leave the device
    free: shorter, the governor would refuse every other burst (rule ``device_busy``)."""
    need = min_burst_spacing_s(stim)
    if value < need:
        raise ValueError(f"{who + ' ' if who else ''}{name}={value!r} invalid, expected >= {need:.6g} s: the burst "
                         f"duration {stim.burst_duration_s:.6g} s + {DEVICE_BUSY_GUARD_S} s for the device to be free "
                         "again (back-to-back bursts get device_busy refusals, docs/safety.md)")
