"""Profiles: built-ins are valid; profiles asking for unsafe limits are refused with the rule."""
import math

import pytest

from controller.safety import MACRO_RNS, MICRO, TES, SafetyGovernor, SafetyProfile, UnsafeProfileError
from drivers.params import DeviceCapabilities, Waveform


def test_builtin_values_follow_reference():
    assert MACRO_RNS.hard_max_amplitude_ua == 12_000.0          # §3
    assert (MACRO_RNS.min_frequency_hz, MACRO_RNS.max_frequency_hz) == (1.0, 333.0)
    assert MACRO_RNS.max_charge_density_uc_cm2 == 25.0
    assert (MACRO_RNS.impedance_min_ohm, MACRO_RNS.impedance_max_ohm) == (250.0, 3500.0)
    assert MICRO.shannon_k_max < 1.85 and MICRO.allowed_waveforms == (Waveform.BIPHASIC,)
    assert TES.max_amplitude_ua == 2000.0 and TES.hard_max_amplitude_ua == 4000.0
    assert TES.max_session_stim_s == 2400.0 and TES.max_session_charge_uc == 7.2e6
    assert TES.min_ramp_s > 0


@pytest.mark.parametrize("base, changes, field, rule_word", [
    (TES, {"max_amplitude_ua": 10_000.0, "hard_max_amplitude_ua": 10_000.0}, "hard_max_amplitude_ua", "4000"),
    (TES, {"max_session_stim_s": 3600.0}, "max_session_stim_s", "2400"),
    (TES, {"max_session_charge_uc": 8e6}, "max_session_charge_uc", "7.2 C"),
    (TES, {"min_ramp_s": 0.0}, "min_ramp_s", "ramps"),
    (TES, {"require_impedance_check": False}, "require_impedance_check", "impedance"),
    (TES, {"allowed_waveforms": (Waveform.DC, Waveform.BIPHASIC)}, "allowed_waveforms", "continuous"),
    (MICRO, {"require_charge_balanced": False}, "require_charge_balanced", "charge-balanced"),
    (MICRO, {"shannon_k_max": 1.85}, "shannon_k_max", "1.85"),
    (MICRO, {"shannon_k_max": 2.5}, "shannon_k_max", "Shannon"),
    (MICRO, {"shannon_k_max": None}, "shannon_k_max", "Shannon"),
    (MICRO, {"allowed_waveforms": (Waveform.BIPHASIC, Waveform.MONOPHASIC)}, "allowed_waveforms", "charge"),
    (MACRO_RNS, {"max_frequency_hz": 1000.0}, "max_frequency_hz", "333"),
    (MACRO_RNS, {"max_charge_density_uc_cm2": 30.0}, "max_charge_density_uc_cm2", "25"),
    (MACRO_RNS, {"max_charge_density_uc_cm2": None}, "max_charge_density_uc_cm2", "25"),
    (MACRO_RNS, {"hard_max_amplitude_ua": 20_000.0}, "hard_max_amplitude_ua", "12000"),
    (MACRO_RNS, {"min_pulse_width_us": 10.0}, "min_pulse_width_us", "40"),
    (MACRO_RNS, {"max_amplitude_ua": 5000.0, "hard_max_amplitude_ua": 4000.0}, "max_amplitude_ua", "hard_max"),
    (MACRO_RNS, {"electrode_area_cm2": 0.0}, "electrode_area_cm2", "> 0"),
    (MACRO_RNS, {"max_bursts_per_min": 0}, "max_bursts_per_min", ">= 1"),
    (MACRO_RNS, {"impedance_min_ohm": 5000.0}, "impedance_min_ohm", "impedance_max_ohm"),
])
def test_unsafe_profiles_are_refused_naming_field_value_rule(base, changes, field, rule_word):
    with pytest.raises(UnsafeProfileError) as ei:
        SafetyProfile(**{**base.model_dump(), **changes})
    assert ei.value.field == field
    msg = str(ei.value)
    assert field in msg and rule_word in msg and repr(ei.value.value) in msg
    # model_copy must not be a back door around the rules
    with pytest.raises(UnsafeProfileError):
        base.model_copy(update=changes)


def test_profile_is_frozen_and_rejects_unknown_and_nonfinite_fields():
    with pytest.raises(Exception):
        MACRO_RNS.max_amplitude_ua = 1e9  # frozen
    with pytest.raises(Exception, match="max_amplitude_ua"):
        SafetyProfile(**{**MACRO_RNS.model_dump(), "max_amplitude_ua": math.inf})
    with pytest.raises(Exception, match="typo_field"):
        SafetyProfile(**{**MACRO_RNS.model_dump(), "typo_field": 1})


def test_safe_custom_profile_is_accepted():
    p = MACRO_RNS.model_copy(update={"max_amplitude_ua": 3000.0, "name": "conservative"})
    assert p.max_amplitude_ua == 3000.0 and p.hard_max_amplitude_ua == 12_000.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic warns when dumping an unvalidated model
def test_governor_revalidates_profiles_built_without_validation():
    bad = SafetyProfile.model_construct(**{**MICRO.model_dump(), "shannon_k_max": 3.0})
    with pytest.raises(UnsafeProfileError, match="shannon_k_max"):
        SafetyGovernor(bad, DeviceCapabilities())


def test_build_profile_by_kind_with_overrides():
    from controller.safety import build_profile
    assert build_profile("macro") is MACRO_RNS and build_profile("macro_rns") is MACRO_RNS
    p = build_profile("tes", {"max_amplitude_ua": 1000.0})
    assert p.max_amplitude_ua == 1000.0 and p.kind == "tes"
    with pytest.raises(UnsafeProfileError, match="hard_max_amplitude_ua"):
        build_profile("tes", {"hard_max_amplitude_ua": 5000.0})
    with pytest.raises(Exception, match="not_a_field"):
        build_profile("macro", {"not_a_field": 1})
    with pytest.raises(ValueError, match="'nope' unknown"):
        build_profile("nope")
