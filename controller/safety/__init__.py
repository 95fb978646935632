"""Safety: profiles (limits and the rules profiles obey) and the governor every request passes."""
from controller.safety.governor import (Decision, Dose, SafetyGovernor, StimRequest, check_params,
                                        conservative_charge_uc)
from controller.safety.profiles import (BUILTIN_PROFILES, MACRO_RNS, MICRO, TES, SafetyProfile, build_profile,
                                        UnsafeProfileError, ViolationActions)

__all__ = ["BUILTIN_PROFILES", "MACRO_RNS", "MICRO", "TES", "Decision", "Dose", "SafetyGovernor",
           "SafetyProfile", "StimRequest", "UnsafeProfileError", "ViolationActions", "build_profile", "check_params",
           "conservative_charge_uc"]
