"""What the control commands do to a running loop (the ``ControlServer`` handler).

Every command is recorded by the server as a ``MARK`` event with who asked;
side effects here (stimulation off, latch released) add their own events to
``pending_events``, which the loop drains. Parameter changes go through the
safety governor's own check and then the policy's own (its constructor's
checks, run again by ``Reconfigurable.update``): a value either refuses is
refused with its reason, and nothing changes.
"""
from __future__ import annotations

import math
from dataclasses import replace

from controller.events import Event, EventKind
from controller.safety import check_params

PAUSE_REASON = "paused by the operator"
ESTOP_REASON = "emergency stop by the operator"
POLICY_FIELDS = ("threshold_on", "threshold_off", "min_duration_s", "refractory_s", "burst_interval_s")
STIM_FIELDS = ("amplitude_ua", "pulse_width_us", "frequency_hz", "n_pulses", "interphase_gap_us")
INT_STIM_FIELDS = ("n_pulses",)


def _finite(value) -> float | None:
    """``value`` as a finite float, or ``None`` (not a number, NaN, ±inf, or an integer too large for a
    float): such values are refused as input, not left to raise inside the handler."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class SessionControl:
    def __init__(self, step, actuator, clock):
        self.step = step            # controller.closed_loop.ChunkStep (its .paused and .loop.policy)
        self.actuator = actuator
        self.clock = clock
        self.pending_events: list[Event] = []

    def drain(self) -> list[Event]:
        out, self.pending_events = self.pending_events, []
        return out

    def handle(self, cmd: dict) -> dict:
        name = cmd["cmd"]
        who = cmd.get("who", "?")
        if name == "status":
            return self.status()
        if name == "pause":
            self.step.paused = True
            unconfirmed = self._stop(f"{PAUSE_REASON} ({who})", "pause")
            return unconfirmed or {"ok": True, "paused": True}
        if name == "emergency_stop":
            self.step.paused = True
            unconfirmed = self._stop(f"{ESTOP_REASON} ({who})", "emergency stop")
            return unconfirmed or {"ok": True, "stimulation": "off"}
        if name == "resume":
            operator, faults = [], []
            for latch in self.actuator.governor.latch_reasons:
                cause = latch.removeprefix("emergency_stop: ")
                (operator if cause.startswith((PAUSE_REASON, ESTOP_REASON)) else faults).append(latch)
            if faults:
                return {"ok": False, "error": f"cannot resume: stimulation is off after a fault ({'; '.join(faults)}); "
                                              "fix the cause and restart the session"}
            for latch in operator:   # the operator's own pause / e-stop, and nothing else
                self.pending_events += self.actuator.reset(latch)
            self.step.paused = False
            return {"ok": True, "paused": False}
        if name == "set_param":
            return self.set_param(cmd["name"], cmd["value"])
        if name == "mark":
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {name!r}"}

    def _stop(self, reason: str, what: str) -> dict | None:
        """Safe state now; ``None`` when the device confirmed the stop, else the reply that says it did not.

        The governor latches either way, so nothing new is sent; but a burst the device is already
        delivering stops only when the device obeys STOP, and it did not say it did.
        """
        events = self.actuator.safe_state(reason)
        self.pending_events += events
        # The last one is this stop's: earlier ones may be held over from a call that raised.
        stops = [e for e in events if e.kind is EventKind.SAFE_STATE][-1:]
        if stops and all(e.data.get("stop_ok") is True for e in stops):
            return None
        errors = [err for e in stops for err in e.data.get("stop_errors") or []] or ["no stop was sent"]
        return {"ok": False, "paused": True, "latched": True, "stimulation": "unknown", "stop_errors": errors,
                "error": f"{what} NOT confirmed by the device ({'; '.join(dict.fromkeys(errors))}). The governor "
                         "is latched and sends nothing more, but a burst already running on the device may not "
                         "have stopped: cut the stimulator's output or power now"}

    def status(self) -> dict:
        policy = self.step.loop.policy
        dose = self.actuator.dose
        return {"ok": True, "paused": self.step.paused, "latched": self.actuator.governor.latched,
                "threshold": self.step.loop.threshold,
                "deadline_misses": self.step.loop.deadline.n_missed,
                "dose": {"charge_uc": dose.charge_uc, "stim_s": dose.stim_s, "bursts": dose.bursts},
                "stim": policy.stim.to_dict() if policy is not None else None}

    def set_param(self, name: str, value) -> dict:
        policy = self.step.loop.policy
        if policy is None:
            return {"ok": False, "error": "no policy is running"}
        who = type(policy).__name__
        if name in POLICY_FIELDS:
            if not hasattr(policy, name):
                return {"ok": False, "error": f"the {who} has no parameter {name!r}"}
            number = _finite(value)
            if number is None or number < 0:
                return {"ok": False, "error": f"{name}={value!r} invalid, expected a finite number >= 0"}
            on = number if name == "threshold_on" else policy.threshold_on
            off = number if name == "threshold_off" else policy.threshold_off
            if name.startswith("threshold") and not (0 <= off <= on <= 1):
                return {"ok": False, "error": f"{name}={value!r}: need 0 <= threshold_off <= threshold_on <= 1"}
            refused = self._update(policy, name, value, **{name: number})
            return refused or {"ok": True, name: getattr(policy, name)}
        if name in STIM_FIELDS:
            number = _finite(value)
            if number is None:
                return {"ok": False, "error": f"{name}={value!r} invalid, expected a finite number"}
            if name in INT_STIM_FIELDS and not number.is_integer():
                # int() would truncate 2.7 to 2 and report success with a value nobody asked for.
                return {"ok": False, "error": f"{name}={value!r} invalid, expected a whole number"}
            if name in getattr(policy, "STIM_FIELDS_IT_SETS", ()):
                return {"ok": False, "error": f"{name}={value!r}: the {who} sets {name} itself; changing it in "
                                              "its stim template would do nothing"}
            try:
                new = replace(policy.stim, **{name: int(number) if name in INT_STIM_FIELDS else number})
            except (TypeError, ValueError) as exc:
                return {"ok": False, "error": f"{name}={value!r}: {exc}"}
            problems = check_params(self.actuator.governor.profile, self.actuator.capabilities, new)
            if problems:  # outside the safety profile: refused, nothing changes
                return {"ok": False, "error": f"{name}={value!r} refused by the safety profile: " + "; ".join(problems)}
            refused = self._update(policy, name, value, stim=new)
            return refused or {"ok": True, name: getattr(policy.stim, name)}
        return {"ok": False, "error": f"unknown parameter {name!r}; allowed: {', '.join(POLICY_FIELDS + STIM_FIELDS)}"}

    @staticmethod
    def _update(policy, name: str, value, **changes) -> dict | None:
        """The policy's own checks, then the change; ``None`` when applied, else the refusal (nothing changed)."""
        update = getattr(policy, "update", None)
        who = type(policy).__name__
        if update is None:
            # Setting attributes behind its back would skip every check its constructor makes.
            return {"ok": False, "error": f"{name}={value!r}: the {who} takes no parameter changes while it runs "
                                          "(restart the session with the new value)"}
        try:
            update(**changes)
        except (TypeError, ValueError) as exc:
            return {"ok": False, "error": f"{name}={value!r} refused by the {who}: {exc}"}
        return None
