"""Voltage units of a source's channels, and the factor that takes each to µV.

stimloop works in µV throughout (docs/architecture.md conventions): the seizure
model's amplitude features, the data-quality limits and the report all assume
it. Streams declare their units in many spellings ("microvolts" in the LSL
meta-data convention, "uV", "µV", "V" from MNE-based players), or not at all.
One table, used by the live source and by the EDF export alike.
"""
from __future__ import annotations

__all__ = ["uv_factor", "KNOWN_UNITS"]

# Symbols are case-sensitive, as SI prefixes are ("MV" would be megavolts, not millivolts); words are not.
_SYMBOLS = {"V": 1e6, "mV": 1e3, "uV": 1.0, "\u00b5V": 1.0, "\u03bcV": 1.0, "nV": 1e-3}
_WORDS = {"volt": 1e6, "volts": 1e6, "millivolt": 1e3, "millivolts": 1e3,
          "microvolt": 1.0, "microvolts": 1.0, "nanovolt": 1e-3, "nanovolts": 1e-3}
#: spellings recognised, for error messages
KNOWN_UNITS = ("V", "mV", "uV", "\u00b5V", "nV", "volts", "millivolts", "microvolts", "nanovolts")


def uv_factor(unit: str | None) -> float | None:
    """The factor that takes samples in ``unit`` to µV; ``None`` for an empty or unknown unit."""
    text = str(unit or "").strip()
    return _SYMBOLS.get(text, _WORDS.get(text.lower()))
