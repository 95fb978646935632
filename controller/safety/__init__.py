"""Safety: profiles (limits and the rules profiles obey) and the governor every request passes."""
from controller.safety.governor import (Decision, Dose, SafetyGovernor, StimRequest, check_params,
                                        conservative_charge_uc)
from controller.safety.profiles import (BUILTIN_PROFILES, MACRO_RNS, MICRO, TES, SafetyProfile, build_profile,
                                        UnsafeProfileError, ViolationActions)

__all__ = ["BUILTIN_PROFILES", "MACRO_RNS", "MICRO", "TES", "Decision", "Dose", "SafetyGovernor",
           "SafetyProfile", "StimRequest", "UnsafeProfileError", "ViolationActions", "build_profile", "check_params",
           "conservative_charge_uc"]


def check_session_safety(cfg) -> SafetyProfile:
    """Start-up check of a session config: the profile obeys the safety rules, and the configured
    stimulation fits the profile. Raises ``UnsafeProfileError`` / ``ValueError`` naming the rule.

    Device limits are checked later, when the device is open and has told its capabilities.
    """
    from dataclasses import replace as _replace

    from controller.policy_drive import stim_params
    from drivers.params import DeviceCapabilities, Waveform

    profile = build_profile(cfg.safety.profile, cfg.safety.overrides)
    stim = stim_params(cfg.policy.stim)
    if cfg.policy.kind == "personalized" and stim.waveform is not Waveform.SINE:
        stim = _replace(stim, waveform=Waveform.SINE)
    if cfg.policy.kind in ("none",):
        return profile
    # A device that can do anything: only the profile's own rules speak here.
    any_device = DeviceCapabilities(n_channels=256, waveforms=tuple(Waveform), max_amplitude_ua=1e9,
                                    min_pulse_width_us=0.0, max_pulse_width_us=1e9, max_frequency_hz=1e9)
    problems = check_params(profile, any_device, stim)
    # Amplitude, pulse width, charge and burst length are clamped (reduced) at run time; the rest is refused.
    hard = [p for p in problems if any(k in p for k in ("waveform", "balanced", "frequency"))]
    if hard:
        summary = (f"{stim.waveform}, {stim.amplitude_ua:g} µA, {stim.pulse_width_us:g} µs, "
                   f"{stim.frequency_hz:g} Hz")
        raise UnsafeProfileError("policy.stim", summary, "; ".join(hard) + f" (profile {profile.name})")
    return profile
