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
    stimulation is something the governor would let through. Raises ``UnsafeProfileError`` /
    ``ValueError`` naming the rule.

    The decision is the governor's own, on one request at the start of an empty session: what it
    refuses here it refuses on every request at run time (a session that starts and never
    stimulates), while what it only clamps (amplitude above the profile cap but below the hard
    max, pulse width above the maximum, charge per phase / density / Shannon, burst length, each
    as ``on_violation`` says) is fine. The built-in devices' limits (the emulator's, the simulated
    stimulator's: a channel it lacks, a waveform it cannot make) are known and checked here; a serial
    device's are checked when it is open and has told its capabilities. The impedance is the one
    measured beforehand (``device.impedance_ohm``).
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
    from controller.loop import known_capabilities
    # A serial device's limits are unknown until HELLO: one that can do anything, so that only the
    # profile's own rules speak here.
    device = known_capabilities(cfg) or DeviceCapabilities(
        n_channels=256, waveforms=tuple(Waveform), max_amplitude_ua=1e9, min_pulse_width_us=0.0,
        max_pulse_width_us=1e9, max_frequency_hz=1e9, name="any device")
    impedance_ohm = getattr(getattr(cfg, "device", None), "impedance_ohm", None)
    if profile.require_impedance_check and impedance_ohm is None:
        raise UnsafeProfileError("device.impedance_ohm", None,
                                 f"profile {profile.name} refuses all stimulation until an electrode impedance "
                                 f"in {profile.impedance_min_ohm:g}..{profile.impedance_max_ohm:g} Ω is known: "
                                 "set device.impedance_ohm to the value measured before the session")
    governor = SafetyGovernor(profile, device, source="start-up check")
    governor.heartbeat_ok(0.0)
    if impedance_ohm is not None:
        governor.set_impedance(impedance_ohm, 0.0)
        if not governor.impedance_ok():
            raise UnsafeProfileError("device.impedance_ohm", impedance_ohm,
                                     f"outside the impedance window {profile.impedance_min_ohm:g}.."
                                     f"{profile.impedance_max_ohm:g} Ω of profile {profile.name}: "
                                     "every request would be refused")
    decision = governor.step(StimRequest(t=0.0, source="start-up check", params=stim), 0.0)
    if not decision.allowed:
        rule = decision.events[-1].data.get("rule")
        summary = (f"{stim.waveform}, {stim.amplitude_ua:g} µA, {stim.pulse_width_us:g} µs, "
                   f"{stim.frequency_hz:g} Hz")
        problems = check_params(profile, device, stim)
        also = f"; every problem with these settings: {'; '.join(problems)}" if problems else ""
        raise UnsafeProfileError("policy.stim", summary,
                                 f"the governor would refuse every request ({rule}: "
                                 f"{decision.events[-1].data.get('reason')}){also} (profile {profile.name}, "
                                 f"device {device.name!r})")
    return profile
