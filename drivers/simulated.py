"""``SimulatedStimulator``: an in-process stimulator with the device's semantics.

Used by the simulated-time runner (virtual clock) and by tests. It refuses
what the serial device would refuse (same range check, ``protocol.check_params``,
same error code names), keeps ground truth of delivered bursts, and hands each
delivery to ``on_deliver(t, params)`` so a simulated patient can receive it.

There are no threads: scheduled triggers are delivered, exactly at their
``at`` time, by :meth:`poll` (and by every command, which polls first). The
runner calls ``poll()`` each step after advancing its clock.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable

from drivers import protocol as P
from drivers.base import CommandReceipt, DeviceTimeout, Stimulator, StimulatorError, nack_error
from drivers.params import DeviceCapabilities, StimParams, Waveform

SIMULATED_CAPABILITIES = DeviceCapabilities(
    n_channels=4,
    waveforms=(Waveform.BIPHASIC, Waveform.MONOPHASIC, Waveform.SINE, Waveform.DC, Waveform.TI),
    # RNS envelope, REFERENCE.md §3: 0–12 mA, up to 333 Hz, pulse width 40..~1000 µs (upper bound unverified).
    max_amplitude_ua=12_000.0, min_pulse_width_us=40.0, max_pulse_width_us=1_000.0, max_frequency_hz=333.0,
    scheduled_trigger=True, name="simulated", firmware="sim-1.0",
)


class SimulatedStimulator(Stimulator):
    """In-process stimulator on a caller-supplied clock.

    ``delivered`` is the list of ``(t, StimParams)`` actually delivered;
    ``state`` is ``"active"`` while a burst runs, else ``"off"``. With
    ``watchdog_s`` set, :meth:`poll` stops everything when no command came for
    longer than that (like the device) and records it in ``watchdog_trips``.
    """

    def __init__(self, clock: Callable[[], float], capabilities: DeviceCapabilities = SIMULATED_CAPABILITIES,
                 on_deliver: Callable[[float, StimParams], None] | None = None,
                 watchdog_s: float | None = None) -> None:
        if watchdog_s is not None and not watchdog_s > 0:
            raise ValueError(f"watchdog_s {watchdog_s} invalid, expected > 0 seconds or None")
        self.clock = clock
        self.capabilities = capabilities
        self.on_deliver = on_deliver
        self.watchdog_s = watchdog_s
        self.delivered: list[tuple[float, StimParams]] = []
        self.watchdog_trips: list[float] = []
        self._trips_drained = 0
        self.last_receipt_device_t: float | None = None
        self._configs: dict[int, StimParams] = {}
        self._active_until: dict[int, float] = {}
        self._pending: list[tuple[float, int, int, StimParams]] = []   # (at, seq, channel, params)
        self._seq = 0
        self._open = False
        self._mute = False
        self._last_cmd_t: float | None = None

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        self._open = True
        self._last_cmd_t = self.clock()

    def close(self) -> None:
        self._open = False

    def set_mute(self, mute: bool) -> None:
        """Fault knob: a muted device never answers, so every command raises DeviceTimeout."""
        self._mute = bool(mute)

    # ------------------------------------------------------------ state

    @property
    def device_watchdog_s(self) -> float | None:
        return self.watchdog_s

    @property
    def state(self) -> str:
        """``"active"`` when a burst runs at the current clock time, else ``"off"``."""
        now = self.clock()
        return "active" if any(until > now for until in self._active_until.values()) else "off"

    @property
    def active_channels(self) -> list[int]:
        now = self.clock()
        return sorted(ch for ch, until in self._active_until.items() if until > now)

    @property
    def pending(self) -> list[tuple[float, int]]:
        """Scheduled triggers not yet delivered, as ``(at, channel)``."""
        return sorted((at, ch) for at, _, ch, _ in self._pending)

    def poll(self) -> list[tuple[float, StimParams]]:
        """Deliver scheduled triggers that are due and run the watchdog; returns new deliveries."""
        now = self.clock()
        if (self.watchdog_s is not None and self._last_cmd_t is not None
                and now - self._last_cmd_t > self.watchdog_s):
            # Trip once per silence: re-arm from the trip time.
            trip_t = self._last_cmd_t + self.watchdog_s
            self._deliver_due(trip_t)
            self._stop_all(trip_t)
            self.watchdog_trips.append(trip_t)
            self._last_cmd_t = None
        return self._deliver_due(now)

    def drain_device_events(self) -> list[tuple[int, float]]:
        """Watchdog trips (``EventCode.WATCHDOG``, trip time) not returned before, like the device's EVENT frames."""
        new = self.watchdog_trips[self._trips_drained:]
        self._trips_drained = len(self.watchdog_trips)
        return [(int(P.EventCode.WATCHDOG), t) for t in new]

    # ------------------------------------------------------------ commands

    def configure(self, params: StimParams) -> CommandReceipt:
        now, seq = self._begin("CONFIGURE")
        self._refuse_if(P.check_params(params, self.capabilities), "CONFIGURE", seq)
        if self._busy(params.channel, now):
            self._nack("CONFIGURE", seq, P.ErrorCode.BUSY, f"channel {params.channel}")
        self._configs[params.channel] = params
        return self._receipt(seq, now)

    def trigger(self, channel: int, at: float | None = None) -> CommandReceipt:
        now, seq = self._begin("TRIGGER")
        if not 0 <= channel < self.capabilities.n_channels:
            self._nack("TRIGGER", seq, P.ErrorCode.BAD_CHANNEL,
                       f"channel {channel} out of range, expected 0..{self.capabilities.n_channels - 1}")
        params = self._configs.get(channel)
        if params is None:
            self._nack("TRIGGER", seq, P.ErrorCode.NOT_CONFIGURED, f"channel {channel}")
        if self._busy(channel, now):
            self._nack("TRIGGER", seq, P.ErrorCode.BUSY, f"channel {channel}")
        if at is None or at == 0.0:
            self._deliver(now, channel, params)
        else:
            if not math.isfinite(at) or at < 0:
                raise StimulatorError(f"TRIGGER not sent: deliver-at time {at!r} invalid, "
                                      "expected a finite clock time >= 0 (0 = now)")
            if not self.capabilities.scheduled_trigger:
                self._nack("TRIGGER", seq, P.ErrorCode.OUT_OF_RANGE, "scheduled triggers not supported")
            if at < now:
                # Virtual time is exact, so any past time is late (the serial device tolerates 2 ms).
                self._nack("TRIGGER", seq, P.ErrorCode.TOO_LATE, f"at {at} is {now - at} s in the past")
            heapq.heappush(self._pending, (at, seq, channel, params))
        return self._receipt(seq, now)

    def stop(self) -> CommandReceipt | None:
        """All channels off and scheduled triggers cancelled; works even when closed or muted."""
        now = self.clock()
        self._stop_all(now)
        self._seq = (self._seq + 1) % P.SEQ_MOD
        if self._mute:
            return CommandReceipt(seq=self._seq, sent_t=now, acked_t=float("nan"), ok=False,
                                  error="no reply (device muted); stopped locally")
        self._last_cmd_t = now
        return self._receipt(self._seq, now)

    def heartbeat(self) -> CommandReceipt:
        now, seq = self._begin("HEARTBEAT")
        return self._receipt(seq, now)

    # ------------------------------------------------------------ internals

    def _begin(self, what: str) -> tuple[float, int]:
        if not self._open:
            raise StimulatorError(f"{what}: simulated stimulator not open, call open() first")
        self.poll()
        now = self.clock()
        self._seq = (self._seq + 1) % P.SEQ_MOD
        if self._mute:
            raise DeviceTimeout(f"{what} seq {self._seq}: no reply from the simulated stimulator (muted)")
        self._last_cmd_t = now
        return now, self._seq

    def _receipt(self, seq: int, now: float) -> CommandReceipt:
        self.last_receipt_device_t = now
        return CommandReceipt(seq=seq, sent_t=now, acked_t=now, device_t=now)

    def _nack(self, what: str, seq: int, code: P.ErrorCode, msg: str) -> None:
        raise nack_error(code)(f"device refused {what} seq {seq}: {code.name} ({P.ERROR_TEXT[code]}): {msg}")

    def _refuse_if(self, bad, what: str, seq: int) -> None:
        if bad is not None:
            code, field_idx, msg = bad
            self._nack(what, seq, code, f"field {P.CONFIGURE_FIELDS[field_idx]}: {msg}")

    def _busy(self, channel: int, now: float) -> bool:
        if self._active_until.get(channel, -math.inf) > now:
            return True
        return any(ch == channel for _, _, ch, _ in self._pending)

    def _deliver(self, t: float, channel: int, params: StimParams) -> None:
        self._active_until[channel] = t + params.burst_duration_s
        self.delivered.append((t, params))
        if self.on_deliver is not None:
            self.on_deliver(t, params)

    def _deliver_due(self, now: float) -> list[tuple[float, StimParams]]:
        out = []
        while self._pending and self._pending[0][0] <= now:
            at, _, ch, params = heapq.heappop(self._pending)
            self._deliver(at, ch, params)
            out.append((at, params))
        return out

    def _stop_all(self, now: float) -> None:
        for ch, until in self._active_until.items():
            if until > now:
                self._active_until[ch] = now
        self._pending.clear()
