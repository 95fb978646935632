"""Voltage units: one table for the live source and the EDF export."""
import pytest

from controller.units import KNOWN_UNITS, uv_factor


@pytest.mark.parametrize("unit, factor", [("V", 1e6), ("volts", 1e6), ("Volts", 1e6), ("mV", 1e3), ("millivolts", 1e3),
                                          ("uV", 1.0), ("\u00b5V", 1.0), ("\u03bcV", 1.0),
                                          ("microvolts", 1.0), (" Microvolts ", 1.0), ("nV", 1e-3)])
def test_every_spelling_of_a_voltage_unit_has_its_factor_to_microvolts(unit, factor):
    assert uv_factor(unit) == factor


@pytest.mark.parametrize("unit", ["", None, "counts", "a.u.", "mA", "uS", "MV"])   # MV: megavolts
def test_anything_else_has_none(unit):
    assert uv_factor(unit) is None


def test_the_spellings_named_in_errors_are_all_known():
    assert all(uv_factor(u) is not None for u in KNOWN_UNITS)
