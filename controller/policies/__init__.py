"""Stimulation policies: ``step(...) -> (list[StimRequest], list[Event])``; all requests pass the governor."""
from controller.policies.base import Policy, PolicyOutput
from controller.policies.responsive import ResponsivePolicy

__all__ = ["Policy", "PolicyOutput", "ResponsivePolicy"]
