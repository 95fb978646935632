"""Runners drive the functional core: real time (processes) and simulated time (virtual clock)."""
