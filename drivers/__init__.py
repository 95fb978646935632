"""Stimulator drivers behind one interface (:class:`drivers.base.Stimulator`).

Drivers never see an unchecked command: the controller's ``Actuator`` is the
only caller, and it passes every request through the safety governor first.
"""
from drivers.base import Stimulator, StimulatorError, DeviceTimeout, CommandReceipt
from drivers.params import DeviceCapabilities, StimParams, Waveform

__all__ = [
    "Stimulator", "StimulatorError", "DeviceTimeout", "CommandReceipt",
    "DeviceCapabilities", "StimParams", "Waveform",
]
