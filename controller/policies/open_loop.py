"""Open-loop stimulation (sham / control arms): periodic and Poisson bursts.

Both policies are functional core: ``step(t) -> (requests, events)`` with ``t``
the session time of the call; they never read a clock.

Scheduling rule (shared with the other policies of this package through
``BurstSchedule``):

- bursts are *due* at planned times (periodic grid ``start + k * period_s``,
  or a seeded Poisson sequence), counted from ``start`` = ``start_t`` +
  ``start_delay_s``, where ``start_t=None`` (the default) means the time of the
  first step. Sessions anchor at the first step: in real time the session clock
  is LSL's ``local_clock`` (seconds since boot), so a start given as an
  absolute time would lie hours in the past;
- with ``lookahead_s > 0`` a burst due in ``(t, t + lookahead_s]`` is requested
  at this step with ``at = due_t``: the device schedules it, so the delivered
  timing does not depend on when the runner happens to call ``step``;
- a burst due at or before ``t`` that was not yet requested is requested now
  (``at=None``);
- **catch-up**: if several due times passed since the previous step (the runner
  stalled), only the most recent one is requested; the older ones are skipped
  and counted (``n_skipped``, ``meta["skipped"]``), never bunched together — a
  train of back-to-back catch-up bursts would break the minimum interval and
  the dose pattern the control arm is meant to reproduce;
- a due time is never requested twice.

``matched_periodic`` computes the period that gives a periodic arm the same
total charge as a reference (e.g. closed-loop) session.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from controller.events import Event, EventKind
from controller.policies.base import PolicyOutput, Reconfigurable, check_burst_spacing, check_time, min_burst_spacing_s
from controller.safety.governor import StimRequest, conservative_charge_uc
from drivers.params import StimParams

__all__ = ["PeriodicPolicy", "PoissonPolicy", "matched_periodic", "BurstSchedule", "check_number", "check_stim"]


def check_number(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> float:
    """Return ``value`` as float or raise ``ValueError`` naming it, its value and the expected range."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        rng = lo_s if hi == math.inf else f"{lo_s} and <= {hi}"
        raise ValueError(f"{name}={value!r} invalid, expected a finite number {rng}")
    return float(value)


def check_stim(stim, who: str) -> StimParams:
    """``stim`` must be a ``StimParams`` with a positive amplitude and duration."""
    if not isinstance(stim, StimParams):
        raise TypeError(f"{who} stim must be a StimParams, got {type(stim).__name__}")
    if not stim.burst_duration_s > 0:
        raise ValueError(f"{who} stim burst duration {stim.burst_duration_s} s invalid, expected > 0 "
                         "(pulsed: n_pulses/frequency_hz, continuous: duration_s)")
    return stim


class BurstSchedule:
    """Due-time bookkeeping shared by the scheduled policies (rule in the module docstring).

    ``next_due`` is a callable returning the due time that follows a given one.
    ``take(t)`` returns ``(due_t, at, skipped)`` for the burst to request now,
    or ``None``.

    ``min_spacing_s`` (``min_burst_spacing_s`` of the stim): a burst requested late
    starts when it is requested, not at its due time, so the next due time can
    fall closer to it than the governor allows; that due time is skipped (counted
    in ``n_skipped``) rather than requested and refused.
    """

    def __init__(self, first_due_t: float, next_due, lookahead_s: float = 0.0, min_spacing_s: float = 0.0) -> None:
        self.lookahead_s = check_number("lookahead_s", lookahead_s, 0.0)
        self.min_spacing_s = check_number("min_spacing_s", min_spacing_s, 0.0)
        self._next_due = next_due
        self.due_t = float(first_due_t)
        self.n_skipped = 0

    def take(self, t: float) -> tuple[float, float | None, int] | None:
        """The burst to request at time ``t`` (at most one), or ``None``."""
        if self.due_t > t + self.lookahead_s:
            return None
        skipped = 0
        # Catch-up: jump to the most recent due time <= t (older ones are skipped).
        nxt = self._next_due(self.due_t)
        while nxt <= t:
            skipped += 1
            self.due_t = nxt
            nxt = self._next_due(nxt)
        due = self.due_t
        at = due if due > t else None
        start = due if at is not None else t
        while nxt < start + self.min_spacing_s:
            self.n_skipped += 1
            nxt = self._next_due(nxt)
        self.due_t = nxt
        self.n_skipped += skipped
        return due, at, skipped


class _OpenLoop(Reconfigurable):
    """Common part of the open-loop policies."""

    source: str

    def _init_common(self, stim: StimParams, start_t: float | None, start_delay_s: float, stop_t: float,
                     lookahead_s: float, who: str) -> None:
        self.stim = check_stim(stim, who)
        self.start_t = None if start_t is None else check_number("start_t", start_t)
        self.start_delay_s = check_number("start_delay_s", start_delay_s, 0.0)
        self.stop_t = float(stop_t) if stop_t == math.inf else check_number("stop_t", stop_t)
        self.lookahead_s = check_number("lookahead_s", lookahead_s, 0.0)
        self._last_t = -math.inf

    def _check_t(self, t: float) -> float:
        self._last_t = check_time(t, self._last_t)
        return self._last_t

    def _restart(self) -> None:
        """Common part of ``reset``: unanchored unless ``start_t`` was given."""
        self._last_t = -math.inf
        self.n_requests = 0
        self._sched: BurstSchedule | None = None
        #: ``start_t`` (or the first step's t) + ``start_delay_s``; ``None`` until anchored
        self.anchor_t: float | None = None
        if self.start_t is not None:
            self._anchor(self.start_t)

    def _anchor(self, t0: float) -> None:
        self.anchor_t = t0 + self.start_delay_s
        self._sched = self._schedule(self.anchor_t)

    def _schedule(self, start: float) -> BurstSchedule:
        raise NotImplementedError

    def _updated(self, names: set[str]) -> None:
        if "stim" in names and self._sched is not None:   # a longer burst needs a longer gap before the next
            self._sched.min_spacing_s = min_burst_spacing_s(self.stim)

    @property
    def n_skipped(self) -> int:
        """Due bursts skipped by the catch-up rule (runner stalled longer than one interval)."""
        return self._sched.n_skipped if self._sched is not None else 0

    def step(self, t: float) -> PolicyOutput:
        """Requests for the burst due by ``t`` (+ lookahead), at most one per call; see module docstring."""
        t = self._check_t(t)
        requests: list[StimRequest] = []
        events: list[Event] = []
        if self._sched is None:
            self._anchor(t)
        got = self._sched.take(t)
        if got is None:
            return requests, events
        due, at, skipped = got
        if due >= self.stop_t:
            self._sched.due_t = math.inf
            return requests, events
        self.n_requests += 1
        meta = {"due_t": due, "burst_index": self.n_requests, "skipped": skipped, "window_end_t": t}
        requests.append(StimRequest(t=t, source=self.source, params=self.stim, at=at, meta=meta))
        events.append(Event(t, EventKind.DECISION, self.source, {"what": "stim_request", **meta}))
        return requests, events


class PeriodicPolicy(_OpenLoop):
    """Open-loop bursts every ``period_s`` from ``start`` (exact grid ``start + k * period_s``).

    ``start`` = ``start_t`` + ``start_delay_s``, ``start_t=None``: the first
    step's time. ``step(t) -> (requests, events)``. Bursts are due on the grid
    until ``stop_t`` (excluded, session clock). The period must be at least the
    burst duration so bursts never overlap.
    """

    def __init__(self, period_s: float, stim: StimParams, start_t: float | None = None, start_delay_s: float = 0.0,
                 stop_t: float = math.inf, lookahead_s: float = 0.0, source: str = "policy.periodic") -> None:
        self._init_common(stim, start_t, start_delay_s, stop_t, lookahead_s, "PeriodicPolicy")
        self.period_s = check_number("period_s", period_s, 0.0, lo_open=True)
        check_burst_spacing("period_s", self.period_s, stim, "PeriodicPolicy")
        self.source = source
        self.reset()

    def params(self) -> dict:
        return {"period_s": self.period_s, "stim": self.stim, "start_t": self.start_t,
                "start_delay_s": self.start_delay_s, "stop_t": self.stop_t, "lookahead_s": self.lookahead_s,
                "source": self.source}

    def reset(self) -> None:
        """Forget all state (new session; unanchored again unless ``start_t`` was given)."""
        self._restart()

    def _schedule(self, start: float) -> BurstSchedule:
        # The grid is computed from k (not by accumulating period_s) so due
        # times stay exact over hours: start + k * period_s.
        return BurstSchedule(start, self._next, self.lookahead_s, min_burst_spacing_s(self.stim))

    def _next(self, due: float) -> float:
        k = round((due - self.anchor_t) / self.period_s)
        return self.anchor_t + (k + 1) * self.period_s

    def due_times(self, until_t: float) -> np.ndarray:
        """The planned grid in ``[start, min(until_t, stop_t))`` (for reports and tests)."""
        if self.anchor_t is None:
            raise ValueError("PeriodicPolicy.due_times: the grid starts at the first step (start_t=None); "
                             "call step first, or give start_t")
        end = min(until_t, self.stop_t)
        n = max(0, math.ceil((end - self.anchor_t) / self.period_s))
        g = self.anchor_t + np.arange(n) * self.period_s
        return g[g < end]


class PoissonPolicy(_OpenLoop):
    """Open-loop bursts at random times: a seeded Poisson process at ``rate_hz``, with a dead time.

    Inter-burst intervals are ``dead_time_s`` + exponential, the exponential
    mean chosen so the mean rate stays exactly ``rate_hz``. ``dead_time_s``
    defaults to (and is at least) the burst duration + the device-busy guard
    (``min_burst_spacing_s``: bursts never overlap and the device is free again). The first burst is
    due one interval after ``start`` = ``start_t`` + ``start_delay_s`` (``start_t=None``: the first
    step's time). Same seed → same due times relative to ``start``, whatever the clock reads.
    ``step(t) -> (requests, events)``.
    """

    def __init__(self, rate_hz: float, stim: StimParams, seed: int, start_t: float | None = None,
                 start_delay_s: float = 0.0, dead_time_s: float | None = None, stop_t: float = math.inf,
                 lookahead_s: float = 0.0, source: str = "policy.poisson") -> None:
        self._init_common(stim, start_t, start_delay_s, stop_t, lookahead_s, "PoissonPolicy")
        self.rate_hz = check_number("rate_hz", rate_hz, 0.0, lo_open=True)
        dead = min_burst_spacing_s(stim) if dead_time_s is None else dead_time_s
        self.dead_time_s = check_number("dead_time_s", dead, 0.0)
        check_burst_spacing("dead_time_s", self.dead_time_s, stim, "PoissonPolicy")
        if not self.dead_time_s < 1.0 / self.rate_hz:
            raise ValueError(f"rate_hz={rate_hz} invalid with dead_time_s={self.dead_time_s}: expected "
                             f"rate_hz < 1/dead_time_s = {1.0 / self.dead_time_s:.6g} Hz")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed={seed!r} invalid, expected an integer")
        self.seed = int(seed)
        self.source = source
        self.reset()

    def params(self) -> dict:
        return {"rate_hz": self.rate_hz, "stim": self.stim, "seed": self.seed, "start_t": self.start_t,
                "start_delay_s": self.start_delay_s, "dead_time_s": self.dead_time_s, "stop_t": self.stop_t,
                "lookahead_s": self.lookahead_s, "source": self.source}

    def reset(self) -> None:
        """Forget all state and restart the random sequence from ``seed`` (unanchored unless ``start_t``)."""
        self._rng = np.random.default_rng(self.seed)
        self._mean_exp_s = 1.0 / self.rate_hz - self.dead_time_s
        self._restart()

    def _schedule(self, start: float) -> BurstSchedule:
        return BurstSchedule(start + self._draw(), lambda due: due + self._draw(), self.lookahead_s,
                             min_burst_spacing_s(self.stim))

    def _draw(self) -> float:
        return self.dead_time_s + float(self._rng.exponential(self._mean_exp_s))


def matched_periodic(total_charge_uc: float, duration_s: float, stim: StimParams) -> float:
    """Period (s) of a ``PeriodicPolicy(period, stim)`` matching a reference session's charge.

    ``total_charge_uc`` is the reference session's delivered charge, counted
    like ``metrics.json`` does (``conservative_charge_uc`` per allowed burst);
    ``duration_s`` is the session length. The periodic arm delivers
    ``n = round(total_charge_uc / conservative_charge_uc(stim))`` bursts at
    ``0, T, ..., (n - 1) T`` after its start with ``T = duration_s / n``, all inside
    ``[0, duration_s)`` of it: its total charge is within half a burst of the reference.
    """
    total = check_number("total_charge_uc", total_charge_uc, 0.0, lo_open=True)
    dur = check_number("duration_s", duration_s, 0.0, lo_open=True)
    check_stim(stim, "matched_periodic")
    q = conservative_charge_uc(stim)
    if not q > 0:
        raise ValueError(f"matched_periodic stim charge per burst {q} µC invalid, expected > 0 (amplitude_ua > 0)")
    n = round(total / q)
    if n < 1:
        raise ValueError(f"total_charge_uc={total_charge_uc} invalid, expected >= half a burst "
                         f"({q / 2:.6g} µC for this stim) to match with at least one burst")
    period = dur / n
    if period < min_burst_spacing_s(stim):
        raise ValueError(f"total_charge_uc={total_charge_uc} needs {n} bursts in {dur} s (period {period:.6g} s), "
                         f"expected a period >= {min_burst_spacing_s(stim):.6g} s (the burst duration "
                         f"{stim.burst_duration_s} s + the device-busy guard)")
    return period
