"""The one interface every stimulator implements (cf. BrainFlow's BoardShim)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from drivers import protocol as P
from drivers.params import DeviceCapabilities, StimParams


class StimulatorError(RuntimeError):
    """The device refused a command, answered garbage, or went away."""


class DeviceTimeout(StimulatorError):
    """The device did not answer within the timeout, after all retries."""


class TriggerTooLate(StimulatorError):
    """The device refused a scheduled trigger whose deliver-at time had passed (NACK ``TOO_LATE``).

    Nothing was delivered and nothing else changed on the device: a missed
    deadline, not a broken device (drivers/PROTOCOL.md §6).
    """


def nack_error(code: int) -> type[StimulatorError]:
    """The exception a driver raises for a NACK with error ``code``: ``TriggerTooLate`` or ``StimulatorError``."""
    return TriggerTooLate if code == P.ErrorCode.TOO_LATE else StimulatorError


@dataclass(frozen=True, slots=True)
class CommandReceipt:
    """What the driver learned about one command.

    ``seq`` is the protocol sequence number (joins controller events with the
    device's own log); ``sent_t``/``acked_t`` are seconds on the session clock
    (``sent_t``: the first attempt, retries included). ``device_t`` is when the
    device received the command, from its ACK (drivers/PROTOCOL.md §3: the same
    time for a retry it answers from memory), or ``None`` when the driver does
    not know it. An immediate TRIGGER's burst starts then.
    """

    seq: int
    sent_t: float
    acked_t: float
    ok: bool = True
    error: str = ""
    device_t: float | None = None


class Stimulator(ABC):
    """A stimulator. Only ``controller.actuator.Actuator`` calls these methods.

    ``stop()`` must be safe to call at any time, from any state, more than once,
    and must try its best even when the device is misbehaving: it is how the
    safe state is reached.
    """

    capabilities: DeviceCapabilities
    #: The device's own heartbeat watchdog in s (drivers/PROTOCOL.md §7), known once open (serial: from
    #: HELLO); ``None`` for a device without one. The host must heartbeat at least every third of it.
    device_watchdog_s: float | None = None

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def configure(self, params: StimParams) -> CommandReceipt:
        """Load ``params`` on ``params.channel``; nothing is delivered yet."""

    @abstractmethod
    def trigger(self, channel: int, at: float | None = None) -> CommandReceipt:
        """Deliver the configured burst on ``channel``, now or at clock time ``at``."""

    @abstractmethod
    def stop(self) -> CommandReceipt | None:
        """All channels off, immediately.

        A receipt with ``ok=False`` when the stop is not confirmed, including when no STOP could be
        sent. ``None`` means "nothing to stop" and is only for a driver never opened: the actuator
        counts it as a success.
        """

    @abstractmethod
    def heartbeat(self) -> CommandReceipt:
        """Tell the device the controller is alive (its watchdog stops stimulation otherwise)."""

    def drain_device_events(self) -> list[tuple[int, float]]:
        """Unsolicited device events since the last call, as ``(code, device_t)``; each is returned once.

        ``code`` is a ``protocol.EventCode`` (``WATCHDOG``: the device stopped all stimulation on its
        own because the host went silent). Never does I/O: it hands over what the driver already
        read. Default: a device that reports nothing on its own.
        """
        return []

    def warm(self, channel: int) -> None:
        """Run the TRIGGER encoding for ``channel`` without any I/O (see ``Actuator.warm``).

        Drivers whose command path has pure work worth keeping in the CPU caches
        override this; it must never touch the device. Default: nothing.
        """

    def __enter__(self) -> "Stimulator":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.close()
