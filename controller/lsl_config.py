"""Loopback-only LSL discovery, configured before liblsl is loaded.

liblsl reads its configuration file once, when the library is loaded (at
``import pylsl``), from the path in ``LSLAPICFG``. Call :func:`ensure_lsl_config`
before anything imports pylsl: first thing in test sessions and in every
spawned process that uses LSL.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

# REFERENCE.md §8: IPv6 off, machine-scope multicast, 127.0.0.1 as the only known
# peer keeps discovery on this machine and silences multicast warnings.
LSL_API_CFG = """\
; written by stimloop (controller/lsl_config.py): loopback-only discovery
[ports]
IPv6 = disable

[multicast]
ResolveScope = machine

[lab]
KnownPeers = {127.0.0.1}

[log]
level = -2
"""


def default_config_path() -> Path:
    """Per-user path of the config file (in the temp dir, so it works on read-only homes)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"stimloop-{uid}" / "lsl_api.cfg"


def ensure_lsl_config(path: str | os.PathLike | None = None) -> Path:
    """Write the loopback-only ``lsl_api.cfg`` (if missing or different) and point ``LSLAPICFG`` at it.

    Idempotent. Returns the config path. Warns (``RuntimeWarning``) if pylsl
    was already imported with a different ``LSLAPICFG``: liblsl then keeps its
    old settings, which only costs discovery noise, so it is not fatal.
    """
    cfg = Path(path) if path is not None else default_config_path()
    if not (cfg.exists() and cfg.read_text() == LSL_API_CFG):
        cfg.parent.mkdir(parents=True, exist_ok=True)
        tmp = cfg.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(LSL_API_CFG)
        os.replace(tmp, cfg)  # atomic: concurrent processes never read a half-written file
    current = os.environ.get("LSLAPICFG")
    if "pylsl" in sys.modules and current != str(cfg):
        warnings.warn(f"pylsl was imported before ensure_lsl_config() (LSLAPICFG={current!r}, "
                           f"expected {str(cfg)!r}): liblsl has already read its configuration; "
                           f"call ensure_lsl_config() before importing pylsl", RuntimeWarning, stacklevel=2)
    os.environ["LSLAPICFG"] = str(cfg)
    return cfg
