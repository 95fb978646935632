"""Checks of command-line values run before any work (typer option callbacks).

A ``--json`` or ``--out`` file that cannot be written used to fail after the work it was to hold
(a cohort simulated, a model evaluated, then a traceback and nothing kept); a NaN or a zero duration
failed deep inside the work, or never ended.
"""
from __future__ import annotations

import math
from pathlib import Path

import typer

__all__ = ["output_file", "within"]


def output_file(value: Path | None) -> Path | None:
    """A file to write: not a folder, in a folder that exists."""
    if value is None:
        return None
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder: give the file to write, e.g. {value / 'out.json'}")
    if not value.parent.is_dir():
        raise typer.BadParameter(f"{value}: folder {value.parent} does not exist")
    return value


def within(lo: float, hi: float, *, lo_open: bool = False):
    """A callback accepting a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), None passing.
    Click's ranges let NaN through (every comparison with it is false)."""
    def check(value):
        if value is None:
            return None
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            raise typer.BadParameter(f"{value!r}: expected a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value
    return check
