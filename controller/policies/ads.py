"""Activity-dependent stimulation (ADS) and its random-stimulation control.

``AdsPolicy`` (Guggenmos et al. 2013, REFERENCE.md §2): each spike detected on
a trigger channel asks for one stimulus pulse at ``t_spike + delay_ms``
(7.5 ms). The delay travels in ``StimRequest.at``: the device schedules the
pulse, so the imposed delay does not depend on processing latency. After each
pulse a blanking window (28 ms) starts; spikes inside it are ignored, so the
stimulus artifact and stimulus-evoked spikes cannot trigger stimulation.
``blanking_windows`` tells the runner what to blank in the detector too.

``RandomStimPolicy`` (Averna et al. 2020/2021, REFERENCE.md §2): the sham
control, pulses at random (Poisson with dead time) at a matched rate.

Both are functional cores: the caller passes ``now``; they return
``controller.safety.StimRequest`` objects for the actuator (which passes them
through the safety governor: the only way to a driver).
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from controller.policies.base import Reconfigurable
from controller.safety import StimRequest
from drivers.params import StimParams

__all__ = ["AdsPolicy", "RandomStimPolicy", "GUGGENMOS_DELAY_MS", "GUGGENMOS_BLANKING_MS", "BLANK_GUARD_S",
           "blanking_window"]

GUGGENMOS_DELAY_MS = 7.5      # REFERENCE.md §2: imposed spike → stimulus delay
GUGGENMOS_BLANKING_MS = 28.0  # REFERENCE.md §2: blanking after each stimulus
BLANK_GUARD_S = 1e-4          # blanking starts this much before the pulse (a few samples at 30 kHz)


def _check_stim(stim: StimParams, who: str) -> None:
    if not isinstance(stim, StimParams):
        raise TypeError(f"{who} stim must be a StimParams, got {type(stim).__name__}")
    if not stim.is_pulsed:
        raise ValueError(f"{who} stim waveform={stim.waveform} invalid, expected a pulsed waveform (biphasic)")


class AdsPolicy(Reconfigurable):
    """Spike-triggered stimulation: one pulse per detected spike, ``delay_ms`` later.

    ``step(spike_t, spike_channel, now) -> list[StimRequest]`` takes the spikes
    of one detector step (arrays, seconds on the session clock). A spike makes
    a request unless it is on a non-trigger channel, inside the blanking window
    of an earlier pulse (``[at, at + blanking_ms)``), would put its pulse
    within ``blanking_ms`` of the previous one (a spike during the delay), or
    would exceed ``max_rate_hz`` averaged over ``rate_window_s``. Counters: ``n_requests``, ``n_blanked``,
    ``n_rate_limited``.
    """

    def __init__(self, trigger_channels: list[int] | tuple[int, ...], stim: StimParams,
                 delay_ms: float = GUGGENMOS_DELAY_MS, blanking_ms: float = GUGGENMOS_BLANKING_MS,
                 max_rate_hz: float = 10.0, rate_window_s: float = 1.0, source: str = "ads") -> None:
        _check_stim(stim, "AdsPolicy")
        trig = [int(c) for c in trigger_channels]
        if not trig or len(set(trig)) != len(trig) or min(trig) < 0:
            raise ValueError(f"AdsPolicy trigger_channels={trigger_channels!r} invalid, expected distinct indices >= 0")
        if not (math.isfinite(delay_ms) and 0 <= delay_ms <= 1000):
            raise ValueError(f"AdsPolicy delay_ms={delay_ms!r} invalid, expected 0..1000 ms")
        if not (math.isfinite(blanking_ms) and 0 <= blanking_ms <= 1000):
            raise ValueError(f"AdsPolicy blanking_ms={blanking_ms!r} invalid, expected 0..1000 ms")
        if not (math.isfinite(max_rate_hz) and 0 < max_rate_hz <= 1000):
            raise ValueError(f"AdsPolicy max_rate_hz={max_rate_hz!r} invalid, expected 0 < rate <= 1000 Hz")
        if not (math.isfinite(rate_window_s) and 0 < rate_window_s <= 3600):
            raise ValueError(f"AdsPolicy rate_window_s={rate_window_s!r} invalid, expected 0 < window <= 3600 s")
        self.trigger_channels = np.asarray(trig, np.int64)
        # A set, not np.isin: on the fast path the spikes of a chunk are a handful, and
        # np.isin's Python machinery costs ~100 µs when its code is cold (bench_ads breakdown).
        self._trigger_set = frozenset(trig)
        self.stim = stim
        self.delay_s = delay_ms * 1e-3
        self.blanking_s = blanking_ms * 1e-3
        self.max_rate_hz = float(max_rate_hz)
        self.rate_window_s = float(rate_window_s)
        self._max_in_window = max(1, int(math.floor(max_rate_hz * rate_window_s)))
        # A spike in the delay period before a pulse would need a pulse inside that
        # pulse's blanking: one pulse per blanking window (= governor min_interval_s, MICRO profile).
        self.min_interval_s = self.blanking_s
        self.source = source
        self._pulses: deque[float] = deque()   # `at` of recent pulses (rate window)
        self._last_at = -math.inf
        self.n_requests = 0
        self.n_blanked = 0
        self.n_rate_limited = 0

    def params(self) -> dict:
        return {"trigger_channels": self.trigger_channels.tolist(), "stim": self.stim,
                "delay_ms": self.delay_s * 1e3, "blanking_ms": self.blanking_s * 1e3,
                "max_rate_hz": self.max_rate_hz, "rate_window_s": self.rate_window_s, "source": self.source}

    def blanking_window(self, at: float) -> tuple[float, float]:
        """Detector blanking for a pulse delivered at ``at``: ``[at - guard, at + blanking)``.

        The guard (``BLANK_GUARD_S``) absorbs float rounding between ``at`` and the
        sample timestamps and the device's onset rounding to a sample: without it
        the first artifact sample can land just outside the window.
        """
        return at - BLANK_GUARD_S, at + self.blanking_s

    def step(self, spike_t: np.ndarray, spike_channel: np.ndarray, now: float) -> list[StimRequest]:
        """Requests for the spikes of one detector step (``now``: session time of the call)."""
        if len(spike_t) == 0:
            return []
        trig = self._trigger_set
        out: list[StimRequest] = []
        for t, ch in zip(np.asarray(spike_t).tolist(), np.asarray(spike_channel).tolist()):
            # Loop over a handful of spikes per chunk, in time order.
            if ch not in trig:
                continue
            if self._last_at <= t < self._last_at + self.blanking_s:
                self.n_blanked += 1
                continue
            at = t + self.delay_s
            if at - self._last_at < self.min_interval_s:
                self.n_rate_limited += 1
                continue
            while self._pulses and self._pulses[0] <= at - self.rate_window_s:
                self._pulses.popleft()
            if len(self._pulses) >= self._max_in_window:
                self.n_rate_limited += 1
                continue
            self._pulses.append(at)
            self._last_at = at
            self.n_requests += 1
            out.append(StimRequest(t=now, source=self.source, params=self.stim, at=at,
                                   meta={"spike_t": t, "spike_channel": int(ch), "window_end_t": t,
                                         "delay_s": self.delay_s}))
        return out


def blanking_window(at: float, blanking_ms: float = GUGGENMOS_BLANKING_MS) -> tuple[float, float]:
    """Detector blanking for a pulse at ``at`` (any policy): ``[at - BLANK_GUARD_S, at + blanking_ms)``."""
    return at - BLANK_GUARD_S, at + blanking_ms * 1e-3


class RandomStimPolicy(Reconfigurable):
    """Sham control: pulses at random times, Poisson at ``rate_hz`` with a dead time.

    Inter-pulse intervals are ``min_interval_s`` + exponential, with the
    exponential mean chosen so the mean rate is exactly ``rate_hz`` (matched
    to the ADS run's delivered rate). Requests are issued ``lead_s`` before
    their pulse time (``at``), like ADS requests, so the device schedules both
    the same way. ``step(now)`` returns the requests whose ``at <= now + lead_s``;
    pulses whose time passed before a (late) call are skipped (``n_skipped``).
    """

    def __init__(self, rate_hz: float, stim: StimParams, seed: int = 0, min_interval_s: float = 0.028,
                 lead_s: float = GUGGENMOS_DELAY_MS * 1e-3, start_t: float | None = None,
                 source: str = "random") -> None:
        _check_stim(stim, "RandomStimPolicy")
        if not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"RandomStimPolicy rate_hz={rate_hz!r} invalid, expected > 0 Hz")
        if not (math.isfinite(min_interval_s) and 0 <= min_interval_s < 1.0 / rate_hz):
            raise ValueError(f"RandomStimPolicy min_interval_s={min_interval_s!r} invalid, expected "
                             f"0 <= x < 1/rate_hz = {1.0 / rate_hz:.6g} s")
        if not (math.isfinite(lead_s) and 0 <= lead_s <= 1.0):
            raise ValueError(f"RandomStimPolicy lead_s={lead_s!r} invalid, expected 0..1 s")
        self.rate_hz = float(rate_hz)
        self.stim = stim
        self.seed = seed
        self.min_interval_s = float(min_interval_s)
        self.lead_s = float(lead_s)
        self.start_t = start_t
        self.source = source
        self._rng = np.random.default_rng(seed)
        self._mean_exp_s = 1.0 / rate_hz - min_interval_s
        self._next_at: float | None = None if start_t is None else start_t + self._draw()
        self.n_requests = 0
        self.n_skipped = 0

    def params(self) -> dict:
        return {"rate_hz": self.rate_hz, "stim": self.stim, "seed": self.seed, "min_interval_s": self.min_interval_s,
                "lead_s": self.lead_s, "start_t": self.start_t, "source": self.source}

    def _draw(self) -> float:
        return self.min_interval_s + float(self._rng.exponential(self._mean_exp_s))

    def step(self, now: float) -> list[StimRequest]:
        """Requests for every pulse due by ``now + lead_s`` (the first call starts the process at ``now``)."""
        if not math.isfinite(now):
            raise ValueError(f"RandomStimPolicy.step now={now!r} invalid, expected a finite time")
        if self._next_at is None:
            self._next_at = now + self._draw()
        out: list[StimRequest] = []
        while self._next_at <= now + self.lead_s:
            at = self._next_at
            self._next_at = at + self._draw()
            if at < now:
                # The caller stalled past this pulse: moving it to "now" would bunch pulses
                # closer than the dead time (the governor would refuse them), so skip it.
                self.n_skipped += 1
                continue
            out.append(StimRequest(t=now, source=self.source, params=self.stim, at=at, meta={"planned_at": at}))
            self.n_requests += 1
        return out
