"""Stimulation policies: ``step(...) -> (list[StimRequest], list[Event])``; all requests pass the governor.

Events name what happened in ``data["what"]`` (e.g. ``detection_start``, ``adaptive_state``).
"""
from controller.policies.adaptive import AdaptivePolicy, BandPowerBiomarker
from controller.policies.ads import AdsPolicy, RandomStimPolicy
from controller.policies.base import Policy, PolicyOutput
from controller.policies.open_loop import PeriodicPolicy, PoissonPolicy, matched_periodic
from controller.policies.personalized import PersonalizedFrequencyPolicy, estimate_ipf
from controller.policies.plasticity_aware import PlasticityAwarePolicy
from controller.policies.responsive import ResponsivePolicy

__all__ = ["AdaptivePolicy", "AdsPolicy", "BandPowerBiomarker", "PeriodicPolicy", "PersonalizedFrequencyPolicy",
           "PlasticityAwarePolicy", "Policy", "PolicyOutput", "PoissonPolicy", "RandomStimPolicy", "ResponsivePolicy",
           "estimate_ipf", "matched_periodic"]
