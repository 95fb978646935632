"""The actuator: the only object that holds a stimulator driver (imperative shell).

Every path to the device goes ``Actuator.submit`` → ``SafetyGovernor.step`` →
``driver.configure``/``driver.trigger``. The driver lives in a name-mangled
private slot and no public attribute or method returns it, so the rest of the
controller cannot reach the device without passing the governor. Any driver
exception, or a receipt with ``ok=False``, is a fault: ``driver.stop()`` (best
effort), the governor latches, and ``FAULT`` + ``SAFE_STATE`` events are returned.
So is an exception out of the governor itself, and a device that reports stopping
on its own (its watchdog, ``Stimulator.drain_device_events``). Events of a fault
found where no events can be returned (``poll``, which re-raises, or any call
interrupted by ``KeyboardInterrupt`` and friends, which pass through) are
returned by the next call that returns events.
One exception is not a fault: the device refusing a scheduled trigger because
its time had passed (``TriggerTooLate``) is a missed deadline, reported as a
``REFUSAL`` with rule ``too_late`` like the loop's own late requests.

The governor books a burst's start when it allows it; once the TRIGGER is
acknowledged the actuator tells it when the device really started
(``SafetyGovernor.confirm_start``, from the ACK's device receipt time), which
only ever moves the booking later, and the ``COMMAND`` event records both.

Not thread-safe: one control loop owns the actuator. The clock is injected
(``pylsl.local_clock`` in real time, a virtual clock in simulation).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from controller.events import Event, EventKind
from controller.safety.governor import Decision, Dose, SafetyGovernor, StimRequest, conservative_charge_uc
from drivers import protocol as P
from drivers.base import CommandReceipt, Stimulator, StimulatorError, TriggerTooLate
from drivers.params import DeviceCapabilities, StimParams


WARM_PERIOD_S = 0.001   # warm() at most this often: 10–20 µs each in the loops measured, 1–2 % of a core
WARM_RESET_EVERY = 256  # rehearsals per scratch governor (a new one costs ~0.1 ms of validation)


class Actuator:
    """Governor-checked access to one stimulator; the safe state on any fault.

    Typical use::

        driver.open()                                   # serial: learns capabilities
        act = Actuator(SafetyGovernor(MACRO_RNS, driver.capabilities), driver, clock)
        events = act.heartbeat() + act.submit(request)

    ``submit(request)`` returns the governor's events plus ``COMMAND`` (or
    ``FAULT`` + ``SAFE_STATE`` on driver failure). ``heartbeat()`` should be
    called by the control loop at least every ``profile.heartbeat_timeout_s``:
    without it the governor refuses every request.
    """

    __slots__ = ("_governor", "__driver", "_clock", "_source", "_configured", "_closed", "_warm_params",
                 "_warm_gov", "_warm_t", "_warm_n", "_warm_next", "warm_period_s", "_pending_events")

    def __init__(self, governor: SafetyGovernor, driver: Stimulator, clock: Callable[[], float],
                 source: str = "actuator") -> None:
        if not isinstance(governor, SafetyGovernor):
            raise TypeError(f"governor must be a SafetyGovernor, got {type(governor).__name__}")
        if not isinstance(driver, Stimulator):
            raise TypeError(f"driver must implement drivers.base.Stimulator, got {type(driver).__name__}")
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning session time in s, got {clock!r}")
        caps = getattr(driver, "capabilities", None)
        if caps != governor.capabilities:
            # The governor must check against what this very device can do.
            raise ValueError(f"driver capabilities {caps!r} differ from the governor's "
                             f"{governor.capabilities!r}; build the governor with driver.capabilities")
        self._governor = governor
        self.__driver = driver
        self._clock = clock
        self._source = source
        self._configured: dict[int, StimParams] = {}  # what the device holds per channel (cleared on fault)
        self._closed = False
        self._warm_params: StimParams | None = None   # the last params sent: what warm() rehearses
        self._warm_gov: SafetyGovernor | None = None
        self._warm_t = 0.0
        self._warm_n = 0
        self._warm_next = -math.inf
        self.warm_period_s = WARM_PERIOD_S
        self._pending_events: list[Event] = []  # from a fault in poll(), which can only raise

    # ---- read-only views (none of them leads to the driver) ------------------------------
    @property
    def governor(self) -> SafetyGovernor:
        return self._governor

    @property
    def capabilities(self) -> DeviceCapabilities:
        return self._governor.capabilities

    @property
    def dose(self) -> Dose:
        return self._governor.dose

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Open the device (start-up: errors propagate with the driver's message).

        Drivers that learn their capabilities at open (``SerialStimulator``'s
        HELLO) must be opened before the governor is built from
        ``driver.capabilities``; opening again here is then a no-op. If the
        opened device reports other capabilities than the governor checks
        against, the device is stopped and closed and ``ValueError`` is raised.
        """
        self.__driver.open()
        caps = getattr(self.__driver, "capabilities", None)
        if caps != self._governor.capabilities:
            self._stop("capabilities changed at open", self._clock())
            self.__driver.close()
            raise ValueError(f"opened device reports capabilities {caps!r}, but the governor checks against "
                             f"{self._governor.capabilities!r}; open the driver first and build the governor "
                             "with driver.capabilities")

    def close(self) -> list[Event]:
        """Stop stimulation, latch the governor, close the device. Safe to call twice."""
        if self._closed:
            return []
        now = self._clock()
        events = self._take_pending()
        # A normal close is not a fault: keep the stop and the latch, drop the governor's FAULT event.
        events += [e for e in self._enter_safe_state("actuator closed", now, emergency=True)
                   if e.kind is not EventKind.FAULT]
        events += self._device_events(now)  # latched by now: reported only
        self._closed = True
        try:
            self.__driver.close()
        except Exception as exc:  # closing a broken device must not hide the stop that happened
            events.append(Event(now, EventKind.FAULT, self._source, {"reason": f"close failed: {_describe(exc)}"}))
        return events

    def __enter__(self) -> "Actuator":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the command path --------------------------------------------------------------
    def submit(self, request: StimRequest) -> list[Event]:
        """Check ``request`` with the governor and, if allowed, configure (if changed) and trigger."""
        now = self._clock()
        # A device that already stopped on its own latches first: this request is then refused.
        events = self._take_pending() + self._device_events(now)
        try:
            decision: Decision = self._governor.step(request, now)
        except BaseException as exc:
            # step() refuses rather than raises; if it still raises, nothing was sent, but the
            # governor can no longer be trusted to have said no to anything: stop and latch.
            events += self._enter_safe_state(f"governor error during submit: {_describe(exc)}", now)
            if not isinstance(exc, Exception):
                self._defer(events)
                raise
            return events
        events += decision.events
        params = decision.params
        if params is None:
            return events
        t_governed = self._clock()   # the latency stages split policy + governor from framing + write here
        booked_start_t = decision.events[-1].data.get("start_t", now)
        # The governor maps past "at" times to now; the device wants None for "now".
        at = booked_start_t if booked_start_t > now else None
        cfg: CommandReceipt | None = None
        triggering = False
        try:
            if self._configured.get(params.channel) != params:
                self._configured.pop(params.channel, None)
                cfg = _checked(self.__driver.configure(params), "configure")
                self._configured[params.channel] = params
            triggering = True
            rec = _checked(self.__driver.trigger(params.channel, at), "trigger")
        except TriggerTooLate as exc:
            # Nothing was delivered and the device is otherwise as it was: under load the command
            # reached it after its time, the same outcome as the loop's own too_late refusal (a
            # pulse at the wrong delay is worse than none), so the session goes on. The burst's
            # dose stays booked (never undercount).
            events.append(Event(now, EventKind.REFUSAL, self._source, {
                "rule": "too_late", "request_source": request.source, "at": at,
                "reason": f"the device refused the trigger, its time had passed: {exc}"}))
            return events + self._device_events(now)
        except BaseException as exc:
            booked = None
            if triggering:
                # The device may have acted on a copy whose ACK never came back: its burst started at
                # the latest now, and the next burst after a reset must keep its distance from that.
                t = self._clock()
                start_t, _ = self._confirm_start(booked_start_t, t, t)
                booked = {"booked_start_t": booked_start_t, "start_t": start_t}
            events += self._enter_safe_state(f"driver error during submit: {_describe(exc)}", now, extra=booked)
            if not isinstance(exc, Exception):
                self._defer(events)
                raise  # KeyboardInterrupt and friends: device stopped, then let them through
            return events + self._device_events(now)
        start_t, error = self._confirm_start(booked_start_t, _device_start_t(rec), self._clock())
        self._warm_params = params
        meta = request.meta if isinstance(request.meta, dict) else {}
        events.append(Event(now, EventKind.COMMAND, self._source, {
            "op": "trigger", "seq": rec.seq, "sent_t": rec.sent_t, "acked_t": rec.acked_t,
            "configure_seq": None if cfg is None else cfg.seq,
            "channel": params.channel, "at": at, "request_source": request.source, "request_t": request.t,
            "window_end_t": meta.get("window_end_t"), "params": params.to_dict(),
            "burst_charge_uc": conservative_charge_uc(params),
            **{k: v for k, v in meta.items() if k != "window_end_t"},  # stage times for metrics.json
            # After the policy's meta, so that no meta key can hide what the governor now books.
            "t_governed": t_governed, "device_t": rec.device_t, "booked_start_t": booked_start_t, "start_t": start_t,
            "start_moved_s": start_t - booked_start_t,
        }))
        if error is not None:
            events += self._enter_safe_state(f"governor error confirming the start: {_describe(error)}", now)
        # A trip the device reported on this very exchange: the burst just sent is stopped again.
        return events + self._device_events(now)

    def warm(self, params: StimParams | None = None) -> None:
        """Rehearse the command path so the next real command finds it in the CPU caches.

        Spike-triggered commands come a few times a second; in between, the
        governor's and the encoder's code and data fall out of the caches and
        the first command after a pause paid 50–115 µs more than a warm one
        (docs/performance_log.md, "Warm command path"). Called from the loop's idle
        iterations, at most every ``warm_period_s`` (clock time), this runs
        ``SafetyGovernor.step`` on a *scratch* governor (same profile and
        capabilities, its own state and its own fake clock) with ``params``
        (default: the last params sent) and the driver's pure encoder
        (``Stimulator.warm``). The real governor's state, the dose and the
        device are never touched; no event is produced.
        """
        now = self._clock()
        if now < self._warm_next or self._closed:
            return
        self._warm_next = now + self.warm_period_s
        params = params if params is not None else self._warm_params
        if params is None:
            return
        gov = self._warm_gov
        if gov is None or self._warm_n >= WARM_RESET_EVERY:
            # A fresh scratch governor now and then: its dose never nears the limits, so it keeps
            # rehearsing the allowed path rather than a dose refusal.
            gov = self._warm_gov = SafetyGovernor(self._governor.profile, self._governor.capabilities, "warm")
            if self._governor.impedance_ohm is not None:
                gov.set_impedance(self._governor.impedance_ohm, 0.0)
            self._warm_n, self._warm_t = 0, 0.0
        p = gov.profile
        # Far enough apart in fake time that neither the interval nor the rate rule refuses.
        self._warm_t += 2.0 * max(p.min_interval_s, 60.0 / p.max_bursts_per_min) + p.max_burst_duration_s
        self._warm_n += 1
        gov.heartbeat_ok(self._warm_t)
        gov.step(StimRequest(t=self._warm_t, source="warm", params=params), self._warm_t)
        self.__driver.warm(params.channel)

    def heartbeat(self) -> list[Event]:
        """Heartbeat the device (its watchdog) and, when it answers, the governor."""
        now = self._clock()
        events = self._take_pending()
        try:
            _checked(self.__driver.heartbeat(), "heartbeat")
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._defer(events)   # a heartbeat changes nothing on the device: only the events to keep
                raise
            if not self._latched_for("driver error"):
                # Latched as a driver error before any device event is looked at: that reason
                # decides what the runner does next (reconnect). Also under another latch (bad
                # data, a stall): when that one is released, this one must still hold.
                events += self._enter_safe_state(f"driver error during heartbeat: {_describe(exc)}", now)
            # else: already off and reported; a device that stays silent is not news every beat
            return events + self._device_events(now)
        self._governor.heartbeat_ok(now)
        return events + self._device_events(now)

    def poll(self) -> list[tuple[float, StimParams]]:
        """Let drivers with a ``poll()`` (simulated time) deliver scheduled bursts; returns deliveries."""
        poll = getattr(self.__driver, "poll", None)
        if poll is None:
            return []
        try:
            return poll()
        except Exception as exc:
            # poll() returns deliveries, not events, and re-raises: its FAULT and SAFE_STATE events
            # wait for the next call that returns events (the runners' close() in their finally).
            self._defer(self._enter_safe_state(f"driver error during poll: {_describe(exc)}", self._clock()))
            raise

    def set_impedance(self, ohm: float) -> list[Event]:
        """Report an impedance reading; outside the window the device is stopped at once."""
        now = self._clock()
        events = self._take_pending() + self._governor.set_impedance(ohm, now)
        if not self._governor.impedance_ok():
            events += self._stop(f"impedance_ohm={ohm!r} outside the window", now)
        return events

    def fault(self, reason: str) -> list[Event]:
        """A fault found elsewhere (deadline miss, lost stream, ...): stop and latch until ``reset``."""
        return self._take_pending() + self._enter_safe_state(str(reason), self._clock())

    def safe_state(self, reason: str = "operator") -> list[Event]:
        """Emergency stop: stimulation off now, governor latched until ``reset``."""
        return self._take_pending() + self._enter_safe_state(str(reason), self._clock(), emergency=True)

    def reconnect(self) -> list[Event]:
        """After a driver fault (device unplugged, port gone): close and reopen the device.

        Returns a ``device_reconnected`` STATUS event on success, nothing while
        the device is still away. The governor's latch stays: the caller
        releases it (``reset``) once it decides stimulation may resume.
        """
        if self._closed:
            raise RuntimeError("actuator is closed; build a new one to stimulate again")
        now = self._clock()
        events = self._take_pending()
        try:
            self.__driver.close()
        except Exception:
            pass  # a half-dead port: opening again is what matters
        try:
            self.__driver.open()
        except Exception:
            return events
        except BaseException:
            self._defer(events)   # Ctrl-C during a HELLO that can take connect_timeout_s
            raise
        self._configured.clear()  # the device may have restarted: send the configuration again
        # Reported before the caller resets the latch: a watchdog trip while the link was down is
        # part of the fault being recovered from, not a new one.
        events += self._device_events(now)
        caps = getattr(self.__driver, "capabilities", None)
        if caps != self._governor.capabilities:
            self.__driver.close()
            return events + [Event(now, EventKind.FAULT, self._source, {
                "what": "device_changed", "reason": "reconnected device reports other capabilities"})]
        return events + [Event(now, EventKind.STATUS, self._source, {"what": "device_reconnected"})]

    def reset(self, reason: str | None = None) -> list[Event]:
        """Clear the governor's latch (not after ``close``): every reason, or only ``reason`` (its cause
        went away; the others stay latched). Dose and rate history are kept."""
        if self._closed:
            raise RuntimeError("actuator is closed; build a new one to stimulate again")
        return self._take_pending() + self._governor.reset(self._clock(), reason)

    # ---- internals ---------------------------------------------------------------------
    def _confirm_start(self, booked_start_t: float, started_t: float, now: float) -> tuple[float, Exception | None]:
        """``governor.confirm_start``; an exception from it (a defect) is returned for the safe state."""
        try:
            return self._governor.confirm_start(booked_start_t, started_t, now), None
        except Exception as exc:
            return booked_start_t, exc

    def _stop(self, reason: str, now: float, extra: dict[str, Any] | None = None) -> list[Event]:
        self._configured.clear()  # after a stop/fault the device state is unknown: reconfigure
        errors = []
        for _ in range(2):  # a second try costs little when the first one hit a transient error
            try:
                r = self.__driver.stop()
                if r is None or r.ok:
                    errors = []
                    break
                errors.append(r.error or "stop receipt not ok")
            except Exception as exc:
                errors.append(_describe(exc))
        return [Event(now, EventKind.SAFE_STATE, self._source,
                      {"reason": reason, "stop_ok": not errors, "stop_errors": errors, **(extra or {})})]

    def _take_pending(self) -> list[Event]:
        events, self._pending_events = self._pending_events, []
        return events

    def _defer(self, events: list[Event]) -> None:
        """Keep ``events`` for the next call that returns events: this one ends in an exception."""
        self._pending_events += events

    def _device_events(self, now: float) -> list[Event]:
        """A ``FAULT`` per unsolicited device event; the safe state (latched) unless already in it."""
        try:
            raw = self.__driver.drain_device_events()
        except Exception as exc:
            if self._latched_for("driver error"):
                return []
            return self._enter_safe_state(f"driver error reading device events: {_describe(exc)}", now)
        if not raw:
            return []
        events = []
        for code, device_t in raw:
            if code == P.EventCode.WATCHDOG:
                what, reason = "device_watchdog", "the device's watchdog stopped all stimulation (host silent too long)"
            else:
                what, reason = "device_event", f"unknown device event code {code}"
            events.append(Event(now, EventKind.FAULT, self._source,
                                {"what": what, "code": code, "device_t": device_t, "reason": reason}))
        if not (self._latched_for(what) or self._latched_for("driver error")):
            # The device is already off; the host must stop believing otherwise until someone resets
            # (also under bad data, a stall or a pause, which may be released first). Under a driver
            # fault it is that fault's consequence (the host could not reach it): reported only.
            events += self._enter_safe_state(f"{what}: {reason} at device t={device_t}", now)
        return events

    def _latched_for(self, prefix: str) -> bool:
        return any(r.startswith(prefix) for r in self._governor.latch_reasons)

    def _enter_safe_state(self, reason: str, now: float, emergency: bool = False,
                          extra: dict[str, Any] | None = None) -> list[Event]:
        stop_events = self._stop(reason, now, extra)
        latch = self._governor.emergency_stop(now, reason) if emergency else self._governor.fault(reason, now)
        return latch + stop_events


def _device_start_t(rec: CommandReceipt) -> float:
    """When the device started an immediate burst: its receipt time of the TRIGGER (drivers/PROTOCOL.md
    §3), held inside [sent_t, acked_t] (it cannot have read the first copy before the host sent it, nor
    after the host read its ACK: a device clock that disagrees says nothing outside that), and
    ``acked_t``, the latest it can be, when the driver does not know the receipt time.
    NaN when even ``acked_t`` is not a time: the governor then takes its ``now``."""
    latest = rec.acked_t
    if not _is_time(latest):
        return math.nan
    dev = rec.device_t
    if not _is_time(dev):
        return latest
    return min(max(dev, rec.sent_t), latest) if _is_time(rec.sent_t) else min(dev, latest)


def _is_time(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _checked(receipt: Any, what: str) -> CommandReceipt:
    if not isinstance(receipt, CommandReceipt):
        raise StimulatorError(f"{what} returned {receipt!r}, expected a CommandReceipt")
    if not receipt.ok:
        raise StimulatorError(f"{what} seq {receipt.seq} not acknowledged: {receipt.error or 'ok=False'}")
    return receipt


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


__all__ = ["Actuator"]
