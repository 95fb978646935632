"""Sources of multichannel samples: LSL, BrainFlow, array/file replay.

``build_source(spec)`` makes one from a plain dict (picklable, so a spawned
acquisition process can build it). Backends are imported lazily so that
``controller.lsl_config.ensure_lsl_config()`` can run before pylsl loads.
"""
from __future__ import annotations

from controller.sources.base import (Source, SourceError, SourceInfo, StreamIncompatible, StreamLost, count_gaps,
                                     gap_factor_for)

__all__ = ["Source", "SourceError", "SourceInfo", "StreamIncompatible", "StreamLost", "count_gaps", "gap_factor_for",
           "build_source", "probe_source"]


def build_source(spec: dict) -> Source:
    """Build a source from ``{"kind": "lsl"|"brainflow"|"array"|"file", ...kwargs}``.

    - ``lsl``: ``LslSource`` kwargs (``name``, ``type``, ``source_id``, ...)
    - ``brainflow``: ``board_id``, ``params``, ``channels``, ...
    - ``array``: ``data`` (list or array), ``fs_hz``, ...; ``file``: ``path``, ``fs_hz``, ``key``, ...
    """
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"source spec {spec!r}: expected a dict with a 'kind' key "
                         f"('lsl', 'brainflow', 'array' or 'file')")
    kw = {k: v for k, v in spec.items() if k != "kind"}
    kind = spec["kind"]
    if kind == "lsl":
        from controller.lsl_config import ensure_lsl_config
        ensure_lsl_config()
        from controller.sources.lsl import LslSource
        return LslSource(**kw)
    if kind == "brainflow":
        from controller.sources.brainflow_source import BrainFlowSource
        return BrainFlowSource(**kw)
    if kind == "array":
        from controller.sources.replay import ArraySource
        return ArraySource(**kw)
    if kind == "file":
        from controller.sources.replay import ArraySource
        return ArraySource.from_file(**kw)
    raise ValueError(f"source spec kind={kind!r}: expected 'lsl', 'brainflow', 'array' or 'file'")


def probe_source(spec: dict) -> SourceInfo:
    """Open a source just long enough to learn its channels and rate (clear error if it cannot be found).

    The runner calls it before anything else starts, so an unknown stream name
    or a missing board fails fast, and the ring can be sized to the source.
    """
    source = build_source(spec)
    info = source.open()
    source.close()
    return info
