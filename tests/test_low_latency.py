"""Low-latency mode (PM QoS): held while entered, withdrawn on exit, never fatal when unavailable."""
import os
import struct

import pytest

from controller.low_latency import LowLatency


def test_request_is_written_held_and_withdrawn(tmp_path):
    dev = tmp_path / "cpu_dma_latency"   # stands in for the device: same open/write/close protocol
    dev.write_bytes(b"")
    with LowLatency(device=str(dev)) as qos:
        assert qos.held and qos.status == "cpu_dma_latency 0 µs held"
        assert struct.unpack("i", dev.read_bytes()) == (0,)
        assert qos.acquire() == qos.status            # idempotent: one request, one fd
    assert not qos.held and qos.status == "released"


def test_unwritable_device_is_reported_not_raised(tmp_path):
    with LowLatency(device=str(tmp_path / "missing" / "cpu_dma_latency")) as qos:
        assert not qos.held and qos.status.startswith("unavailable:") and "missing" in qos.status


def test_disabled_does_nothing_and_bad_value_is_refused(tmp_path):
    dev = tmp_path / "dev"
    dev.write_bytes(b"")
    with LowLatency(enabled=False, device=str(dev)) as qos:
        assert qos.status == "off" and not qos.held and dev.read_bytes() == b""
    with pytest.raises(ValueError, match="max_latency_us=-1"):
        LowLatency(max_latency_us=-1)


@pytest.mark.skipif(not os.access("/dev/cpu_dma_latency", os.W_OK), reason="needs write access to the PM QoS device")
def test_the_real_device_accepts_the_request():
    with LowLatency() as qos:
        assert qos.held, qos.status
