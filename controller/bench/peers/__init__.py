"""Peers measured side by side with stimloop on one stimulus stream: pylsl floor, mne-lsl, Timeflux."""
from controller.bench.peers.harness import PEERS, create_timeflux_venv, ratio_table, run_peers, timeflux_venv

__all__ = ["PEERS", "run_peers", "ratio_table", "timeflux_venv", "create_timeflux_venv"]
