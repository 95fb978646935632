"""Plain data describing what a stimulator is asked to do and what it can do.

Units are in the names (MNE style): ``amplitude_ua`` is µA, ``pulse_width_us``
is µs per phase. Charge per phase = current × pulse width (REFERENCE.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import StrEnum


class Waveform(StrEnum):
    BIPHASIC = "biphasic"      # symmetric, charge-balanced biphasic pulse train (cathodic first)
    MONOPHASIC = "monophasic"  # not charge-balanced: microstimulation/macro profiles refuse it
    SINE = "sine"              # tACS: sinusoid at frequency_hz, amplitude_ua = peak
    DC = "dc"                  # tDCS: constant current amplitude_ua for duration_s
    TI = "ti"                  # temporal interference: two carriers, beat at frequency_hz


@dataclass(frozen=True, slots=True)
class StimParams:
    """One stimulation setting for one channel.

    Pulse waveforms (biphasic, monophasic) deliver ``n_pulses`` pulses at
    ``frequency_hz`` when triggered (one burst). Continuous waveforms (sine, DC,
    TI) run for ``duration_s`` with ``ramp_s`` up and down.
    """

    channel: int = 0
    waveform: Waveform = Waveform.BIPHASIC
    amplitude_ua: float = 0.0
    pulse_width_us: float = 100.0
    interphase_gap_us: float = 0.0
    frequency_hz: float = 100.0
    n_pulses: int = 1
    duration_s: float = 0.0
    ramp_s: float = 0.0
    carrier_hz: float = 0.0  # TI only: carrier f1; f2 = carrier_hz + frequency_hz

    @property
    def charge_per_phase_uc(self) -> float:
        """Charge of one phase in µC (µA × µs × 1e-6)."""
        return self.amplitude_ua * self.pulse_width_us * 1e-6

    @property
    def is_pulsed(self) -> bool:
        return self.waveform in (Waveform.BIPHASIC, Waveform.MONOPHASIC)

    @property
    def burst_duration_s(self) -> float:
        if self.is_pulsed:
            return self.n_pulses / self.frequency_hz if self.frequency_hz > 0 else 0.0
        return self.duration_s

    @property
    def burst_charge_uc(self) -> float:
        """Absolute charge moved by one burst in µC (both phases of every pulse).

        For continuous waveforms it is the integral of |I| over the burst
        (sine: 2/π of the peak; ramps ignored, which over-counts: safe side).
        """
        if self.is_pulsed:
            phases = 2 if self.waveform is Waveform.BIPHASIC else 1
            return phases * self.n_pulses * self.charge_per_phase_uc
        mean_abs_ua = self.amplitude_ua * (2 / 3.141592653589793 if self.waveform in (Waveform.SINE, Waveform.TI) else 1.0)
        return mean_abs_ua * self.duration_s

    def with_(self, **changes) -> "StimParams":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        # Field by field: dataclasses.asdict deep-copies and costs tens of µs on the command path.
        d = {name: getattr(self, name) for name in _STIM_FIELDS}
        d["waveform"] = str(self.waveform)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StimParams":
        d = dict(d)
        if "waveform" in d:
            d["waveform"] = Waveform(d["waveform"])
        return cls(**d)


_STIM_FIELDS = tuple(f.name for f in fields(StimParams))


@dataclass(frozen=True, slots=True)
class DeviceCapabilities:
    """What a device can physically do; the governor also enforces these."""

    n_channels: int = 4
    waveforms: tuple[Waveform, ...] = (Waveform.BIPHASIC,)
    max_amplitude_ua: float = 12_000.0
    min_pulse_width_us: float = 20.0
    max_pulse_width_us: float = 1_000.0
    max_frequency_hz: float = 333.0
    scheduled_trigger: bool = True  # accepts "deliver at time t" triggers
    name: str = "device"
    firmware: str = ""
    extra: dict = field(default_factory=dict)
