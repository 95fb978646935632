"""Safety profiles: the limits the governor enforces, and the rules a profile itself must obey.

A profile is data (pydantic, frozen). A profile that asks for limits the
literature says are unsafe is refused when it is built (``UnsafeProfileError``),
so an unsafe configuration cannot reach the governor, even through a TOML file.
Every ceiling below cites ``/work/shared/REFERENCE.md``; values marked
*unverified* are starting points, not established limits (see docs/safety.md).
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from drivers.params import Waveform
from drivers.protocol import MAX_SCHEDULE_AHEAD_S

Kind = Literal["macro", "micro", "tes"]
Action = Literal["clamp", "refuse"]

PULSED_WAVEFORMS = frozenset({Waveform.BIPHASIC, Waveform.MONOPHASIC})
# Waveforms whose net charge over a period is zero. DC and monophasic pulses are not.
CHARGE_BALANCED_WAVEFORMS = frozenset({Waveform.BIPHASIC, Waveform.SINE, Waveform.TI})

# Ceilings a profile of each kind may never exceed. A profile asking for more is refused.
SHANNON_K_DAMAGE = 1.85            # REFERENCE.md §4 (Shannon 1992): damage from k >= 1.85
RNS_MAX_AMPLITUDE_UA = 12_000.0    # REFERENCE.md §3: RNS 0-12 mA
RNS_MIN_FREQUENCY_HZ = 1.0         # REFERENCE.md §3: 1-333 Hz
RNS_MAX_FREQUENCY_HZ = 333.0       # REFERENCE.md §3
RNS_MIN_PULSE_WIDTH_US = 40.0      # REFERENCE.md §3: pulse width from 40 µs
RNS_MAX_PULSE_WIDTH_US = 1_000.0   # REFERENCE.md §3: upper bound ~1000 µs (unverified)
RNS_MAX_DENSITY_UC_CM2 = 25.0      # REFERENCE.md §3/§4: 25 µC/cm²/phase
RNS_IMPEDANCE_OHM = (250.0, 3_500.0)  # REFERENCE.md §3: lead impedance flagged outside 250-3500 Ω
TES_HARD_MAX_UA = 4_000.0          # REFERENCE.md §4 (Bikson 2016): <= 4 mA
TES_MAX_SESSION_S = 40 * 60.0      # REFERENCE.md §4: <= 40 min
TES_MAX_SESSION_UC = 7.2e6         # REFERENCE.md §4: <= 7.2 C per session (= 7.2e6 µC)
# REFERENCE.md §7: temporal interference uses kHz carriers, which neurons do not follow; only the
# envelope at |f1 - f2| drives them. A carrier below 1 kHz is low-frequency tACS at the TI amplitude,
# not TI: refused, whatever the profile.
TI_MIN_CARRIER_HZ = 1_000.0


class UnsafeProfileError(Exception):
    """A safety profile asks for limits a safety rule forbids.

    Deliberately not a ``ValueError``: pydantic would wrap it and blur which
    rule refused the profile. ``field``, ``value`` and ``rule`` are attributes.
    """

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"unsafe safety profile: {field}={value!r} is forbidden by rule: {rule}")


class ViolationActions(BaseModel):
    """What the governor does when a request exceeds a limit that can be met by reducing it.

    Clamps only ever *reduce* the stimulus (lower amplitude, shorter pulse or
    burst). Waveform, charge balance, frequency, rate and dose violations are
    always refused: there is no safe way to "fix" them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    amplitude: Action = "clamp"       # above max_amplitude_ua (above hard max: always refused)
    pulse_width: Action = "clamp"     # above max pulse width (below min: always refused)
    charge: Action = "clamp"          # charge/phase, charge density, Shannon k: lower amplitude
    burst_duration: Action = "clamp"  # fewer pulses / shorter duration


class SafetyProfile(BaseModel):
    """Limits for one kind of stimulation; frozen, validated against the safety rules when built.

    Amplitudes are µA (peak for sine/TI), pulse widths µs per phase, charge µC,
    charge density µC/cm² per phase. ``None`` disables an optional limit where
    the kind's rules allow it. ``heartbeat_timeout_s=None`` disables the heartbeat rule.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    kind: Kind
    max_amplitude_ua: float
    hard_max_amplitude_ua: float
    min_pulse_width_us: float
    max_pulse_width_us: float
    min_frequency_hz: float
    max_frequency_hz: float
    max_charge_per_phase_uc: float | None = None
    electrode_area_cm2: float
    max_charge_density_uc_cm2: float | None = None
    shannon_k_max: float | None = None
    require_charge_balanced: bool = True
    allowed_waveforms: tuple[Waveform, ...] = (Waveform.BIPHASIC,)
    max_burst_duration_s: float
    max_bursts_per_min: int
    min_interval_s: float
    max_session_charge_uc: float
    max_session_stim_s: float
    min_ramp_s: float = 0.0
    max_ramp_rate_ua_per_s: float | None = None
    impedance_min_ohm: float | None = None
    impedance_max_ohm: float | None = None
    require_impedance_check: bool = False
    heartbeat_timeout_s: float | None = 2.0
    max_schedule_ahead_s: float = 1.0
    on_violation: ViolationActions = ViolationActions()

    @model_validator(mode="after")
    def _check_rules(self) -> "SafetyProfile":
        self.validate_against_rules()
        return self

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "SafetyProfile":
        """Copy with changes, re-validated (pydantic's default copy would skip the safety rules)."""
        data = self.model_dump()
        data.update(update or {})
        return type(self).model_validate(data)

    def validate_against_rules(self) -> None:
        """Raise ``UnsafeProfileError`` naming field, value and rule if this profile is unsafe."""
        def bad(field: str, rule: str) -> None:
            raise UnsafeProfileError(field, getattr(self, field), rule)

        for f in ("max_amplitude_ua", "hard_max_amplitude_ua", "min_pulse_width_us", "max_pulse_width_us",
                  "min_frequency_hz", "max_frequency_hz", "electrode_area_cm2", "max_burst_duration_s",
                  "max_session_charge_uc", "max_session_stim_s"):
            if not getattr(self, f) > 0:
                bad(f, "must be > 0")
        for f in ("min_interval_s", "min_ramp_s", "max_schedule_ahead_s"):
            if not getattr(self, f) >= 0:
                bad(f, "must be >= 0")
        for f in ("max_charge_per_phase_uc", "max_charge_density_uc_cm2", "max_ramp_rate_ua_per_s",
                  "impedance_min_ohm", "impedance_max_ohm", "heartbeat_timeout_s"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                bad(f, "must be > 0 or None")
        if self.max_schedule_ahead_s > MAX_SCHEDULE_AHEAD_S:
            # The governor would book such a burst and the device then refuse it (NACK OUT_OF_RANGE): a fault.
            bad("max_schedule_ahead_s", f"must be <= {MAX_SCHEDULE_AHEAD_S} s: devices refuse triggers further "
                                        "ahead (drivers/PROTOCOL.md §5.3)")
        if self.max_bursts_per_min < 1:
            bad("max_bursts_per_min", "must be >= 1")
        if self.max_amplitude_ua > self.hard_max_amplitude_ua:
            bad("max_amplitude_ua", f"must be <= hard_max_amplitude_ua ({self.hard_max_amplitude_ua})")
        if self.min_pulse_width_us > self.max_pulse_width_us:
            bad("min_pulse_width_us", f"must be <= max_pulse_width_us ({self.max_pulse_width_us})")
        if self.min_frequency_hz > self.max_frequency_hz:
            bad("min_frequency_hz", f"must be <= max_frequency_hz ({self.max_frequency_hz})")
        if not self.allowed_waveforms:
            bad("allowed_waveforms", "must allow at least one waveform")
        if (self.impedance_min_ohm is None) != (self.impedance_max_ohm is None):
            bad("impedance_min_ohm", "impedance window needs both impedance_min_ohm and impedance_max_ohm")
        if self.impedance_min_ohm is not None and self.impedance_min_ohm >= self.impedance_max_ohm:
            bad("impedance_min_ohm", f"must be < impedance_max_ohm ({self.impedance_max_ohm})")
        if self.require_impedance_check and self.impedance_min_ohm is None:
            bad("require_impedance_check", "needs an impedance window")
        if self.shannon_k_max is not None and not self.shannon_k_max < SHANNON_K_DAMAGE:
            bad("shannon_k_max", f"Shannon 1992: tissue damage from k >= {SHANNON_K_DAMAGE} (REFERENCE.md §4)")
        if self.require_charge_balanced:
            unbalanced = [str(w) for w in self.allowed_waveforms if w not in CHARGE_BALANCED_WAVEFORMS]
            if unbalanced:
                bad("allowed_waveforms", f"require_charge_balanced forbids {unbalanced}")

        if self.kind in ("macro", "micro"):
            # REFERENCE.md §4: implanted electrodes need biphasic, charge-balanced pulses.
            if not self.require_charge_balanced:
                bad("require_charge_balanced", f"implanted ({self.kind}) electrodes need charge-balanced pulses (REFERENCE.md §4)")
            if set(self.allowed_waveforms) - {Waveform.BIPHASIC}:
                bad("allowed_waveforms", f"{self.kind} profiles allow only biphasic pulses (REFERENCE.md §4)")
        if self.kind == "macro":
            if self.hard_max_amplitude_ua > RNS_MAX_AMPLITUDE_UA:
                bad("hard_max_amplitude_ua", f"macro (RNS-like) amplitude <= {RNS_MAX_AMPLITUDE_UA} µA (REFERENCE.md §3)")
            if self.min_frequency_hz < RNS_MIN_FREQUENCY_HZ or self.max_frequency_hz > RNS_MAX_FREQUENCY_HZ:
                bad("max_frequency_hz" if self.max_frequency_hz > RNS_MAX_FREQUENCY_HZ else "min_frequency_hz",
                    f"macro (RNS-like) frequency within {RNS_MIN_FREQUENCY_HZ}-{RNS_MAX_FREQUENCY_HZ} Hz (REFERENCE.md §3)")
            if self.min_pulse_width_us < RNS_MIN_PULSE_WIDTH_US:
                bad("min_pulse_width_us", f"macro (RNS-like) pulse width >= {RNS_MIN_PULSE_WIDTH_US} µs (REFERENCE.md §3)")
            if self.max_pulse_width_us > RNS_MAX_PULSE_WIDTH_US:
                bad("max_pulse_width_us", f"macro (RNS-like) pulse width <= {RNS_MAX_PULSE_WIDTH_US} µs (REFERENCE.md §3, unverified)")
            if self.max_charge_density_uc_cm2 is None or self.max_charge_density_uc_cm2 > RNS_MAX_DENSITY_UC_CM2:
                bad("max_charge_density_uc_cm2", f"macro charge density <= {RNS_MAX_DENSITY_UC_CM2} µC/cm²/phase (REFERENCE.md §3, §4)")
        if self.kind == "micro" and self.shannon_k_max is None:
            bad("shannon_k_max", f"microstimulation needs a Shannon limit k < {SHANNON_K_DAMAGE} (REFERENCE.md §4)")
        if self.kind == "tes":
            if self.hard_max_amplitude_ua > TES_HARD_MAX_UA:
                bad("hard_max_amplitude_ua", f"tES <= {TES_HARD_MAX_UA} µA (REFERENCE.md §4, Bikson 2016)")
            if self.max_session_stim_s > TES_MAX_SESSION_S:
                bad("max_session_stim_s", f"tES <= {TES_MAX_SESSION_S} s per session (REFERENCE.md §4)")
            if self.max_session_charge_uc > TES_MAX_SESSION_UC:
                bad("max_session_charge_uc", f"tES <= {TES_MAX_SESSION_UC} µC (7.2 C) per session (REFERENCE.md §4)")
            if not self.min_ramp_s > 0 or self.max_ramp_rate_ua_per_s is None:
                bad("min_ramp_s", "tES needs ramps: min_ramp_s > 0 and max_ramp_rate_ua_per_s set (REFERENCE.md §4)")
            if set(self.allowed_waveforms) & PULSED_WAVEFORMS:
                bad("allowed_waveforms", "tES profiles allow continuous waveforms (dc, sine, ti) only")
            if not self.require_impedance_check:
                bad("require_impedance_check", "tES burns come from poor contact: impedance check required (REFERENCE.md §4)")
        for f in ("max_amplitude_ua", "hard_max_amplitude_ua", "max_session_charge_uc"):
            if not math.isfinite(getattr(self, f)):
                bad(f, "must be finite")


# RNS-like responsive stimulation of depth/strip electrodes (REFERENCE.md §3).
MACRO_RNS = SafetyProfile(
    name="macro_rns",
    kind="macro",
    max_amplitude_ua=RNS_MAX_AMPLITUDE_UA,          # §3; the density cap binds first for long pulses
    hard_max_amplitude_ua=RNS_MAX_AMPLITUDE_UA,
    min_pulse_width_us=RNS_MIN_PULSE_WIDTH_US,
    max_pulse_width_us=RNS_MAX_PULSE_WIDTH_US,
    min_frequency_hz=RNS_MIN_FREQUENCY_HZ,
    max_frequency_hz=RNS_MAX_FREQUENCY_HZ,
    electrode_area_cm2=0.0798,  # RNS depth-lead contact area (unverified; not in REFERENCE.md)
    max_charge_density_uc_cm2=RNS_MAX_DENSITY_UC_CM2,
    require_charge_balanced=True,
    allowed_waveforms=(Waveform.BIPHASIC,),
    max_burst_duration_s=5.0,           # unverified design ceiling
    max_bursts_per_min=20,              # unverified design ceiling
    min_interval_s=0.1,                 # unverified design ceiling
    max_session_charge_uc=1e6,          # unverified coarse ceiling (~1 C per session)
    max_session_stim_s=3600.0,          # unverified
    impedance_min_ohm=RNS_IMPEDANCE_OHM[0],
    impedance_max_ohm=RNS_IMPEDANCE_OHM[1],
    heartbeat_timeout_s=2.0,
)

# Intracortical microstimulation with small electrodes (REFERENCE.md §4, Shannon 1992).
MICRO = SafetyProfile(
    name="micro",
    kind="micro",
    max_amplitude_ua=100.0,             # unverified, typical ICMS ceiling
    hard_max_amplitude_ua=200.0,        # unverified
    min_pulse_width_us=20.0,
    max_pulse_width_us=1_000.0,
    min_frequency_hz=0.1,
    max_frequency_hz=333.0,
    electrode_area_cm2=2e-5,            # 2000 µm² microelectrode site (unverified)
    shannon_k_max=1.75,                 # margin below the 1.85 damage threshold (§4); 1.85 derived for >= 1 mm²
    require_charge_balanced=True,
    allowed_waveforms=(Waveform.BIPHASIC,),
    max_burst_duration_s=2.0,           # unverified
    max_bursts_per_min=600,             # ADS: a stimulus per detected spike (REFERENCE.md §2), bounded
    min_interval_s=0.028,               # Guggenmos 2013 blanking of 28 ms after each stimulus (REFERENCE.md §2)
    max_session_charge_uc=1e4,          # unverified
    max_session_stim_s=3600.0,          # unverified
    heartbeat_timeout_s=2.0,
)

# Transcranial electrical stimulation (tDCS/tACS), REFERENCE.md §4 (Bikson 2016, Antal 2017).
TES = SafetyProfile(
    name="tes",
    kind="tes",
    max_amplitude_ua=2_000.0,           # §4: mild effects at 1-2 mA; default cap 2 mA
    hard_max_amplitude_ua=TES_HARD_MAX_UA,
    min_pulse_width_us=20.0,            # unused for continuous waveforms
    max_pulse_width_us=1_000.0,
    min_frequency_hz=0.5,               # tACS range (unverified)
    max_frequency_hz=100.0,
    electrode_area_cm2=25.0,            # 5 x 5 cm sponge (unverified)
    require_charge_balanced=False,      # tDCS is DC by design; the session charge cap bounds it
    allowed_waveforms=(Waveform.DC, Waveform.SINE),
    max_burst_duration_s=TES_MAX_SESSION_S,
    max_bursts_per_min=2,
    min_interval_s=1.0,
    max_session_charge_uc=TES_MAX_SESSION_UC,
    max_session_stim_s=TES_MAX_SESSION_S,
    min_ramp_s=10.0,                    # §4: 10-30 s ramps common (unverified)
    max_ramp_rate_ua_per_s=200.0,       # 2 mA over 10 s (unverified)
    impedance_min_ohm=200.0,            # contact check window (unverified)
    impedance_max_ohm=10_000.0,
    require_impedance_check=True,
    heartbeat_timeout_s=2.0,
)

BUILTIN_PROFILES: dict[str, SafetyProfile] = {p.name: p for p in (MACRO_RNS, MICRO, TES)}


_BY_KIND: dict[str, SafetyProfile] = {"macro": MACRO_RNS, "micro": MICRO, "tes": TES}


def build_profile(name: str, overrides: dict[str, Any] | None = None) -> SafetyProfile:
    """A built-in profile by kind (``macro``/``micro``/``tes``) or name, with ``overrides`` applied.

    The result is validated like any profile: overrides that ask for unsafe
    limits raise ``UnsafeProfileError``; unknown fields raise pydantic's
    ``ValidationError`` naming them.
    """
    base = _BY_KIND.get(name) or BUILTIN_PROFILES.get(name)
    if base is None:
        raise ValueError(f"safety profile {name!r} unknown, expected one of "
                         f"{sorted(set(_BY_KIND) | set(BUILTIN_PROFILES))}")
    return base.model_copy(update=dict(overrides or {})) if overrides else base
