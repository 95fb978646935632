"""Test-session setup: loopback-only LSL discovery before anything imports pylsl."""
from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()
