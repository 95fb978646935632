"""Neural-mass models for the simulated patient (REFERENCE.md §6)."""
from hil_sim.brain.wendling import DEFAULT_CONSTANTS, WendlingBank, WendlingConstants, sigmoid

__all__ = ["DEFAULT_CONSTANTS", "WendlingBank", "WendlingConstants", "sigmoid"]
