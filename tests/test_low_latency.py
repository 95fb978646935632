"""Low-latency mode (PM QoS) and priority (nice): held while entered, withdrawn on exit, never fatal when unavailable."""
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from controller.low_latency import LowLatency, nice_while, set_nice


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


def _in_thread(fn):
    """Run ``fn`` in a fresh thread and return its result: a nice value belongs to a thread on Linux, so
    the test runner's own priority is never touched."""
    out = {}
    t = threading.Thread(target=lambda: out.update(r=fn()))
    t.start()
    t.join()
    return out["r"]


def test_set_nice_applies_to_the_calling_thread_and_the_threads_it_starts():
    def body():
        status = set_nice(7)   # lowering a priority is always allowed
        return status, os.getpriority(os.PRIO_PROCESS, 0), _in_thread(lambda: os.getpriority(os.PRIO_PROCESS, 0))

    before = os.getpriority(os.PRIO_PROCESS, 0)
    assert _in_thread(body) == ("nice 7", 7, 7)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_nice_while_restores_the_old_value_and_none_leaves_it_alone():
    def body():
        start = os.getpriority(os.PRIO_PROCESS, 0)
        with nice_while(start + 3) as status:
            inside = os.getpriority(os.PRIO_PROCESS, 0)
        after = os.getpriority(os.PRIO_PROCESS, 0)
        with nice_while(None) as unchanged:
            same = os.getpriority(os.PRIO_PROCESS, 0)
        return start, status, inside, after, unchanged, same

    start, status, inside, after, unchanged, same = _in_thread(body)
    assert status == f"nice {start + 3}" and inside == start + 3 and after == start
    assert unchanged == "unchanged" and same == start


def test_raising_priority_without_permission_is_reported_not_raised():
    # As an unprivileged user (root drops to "nobody" in a child process first).
    code = ("import os\n"
            "from controller.low_latency import set_nice\n"   # imported first: "nobody" may not read the venv
            "if os.getuid() == 0: os.setuid(65534)\n"
            "print(set_nice(-10)); print(os.getpriority(os.PRIO_PROCESS, 0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout.splitlines()
    # Refused, the child keeps the priority it inherited from this process.
    assert out[0].startswith("unavailable: nice -10") and int(out[1]) == os.getpriority(os.PRIO_PROCESS, 0)


def test_bad_nice_values_are_refused():
    for bad in (-21, 20, 1.5, True, "5"):
        with pytest.raises(ValueError, match="nice="):
            set_nice(bad)


def test_a_busy_polling_process_keeps_its_priority():
    """A spinner at a raised priority crowds out its core's other tasks (docs/performance_log.md, "Priority")."""
    from controller.low_latency import nice_for
    assert nice_for(-10, busy_poll=False) == -10
    assert nice_for(-10, busy_poll=True) is None
    assert nice_for(None, busy_poll=False) is None


def test_freeze_gc_keeps_what_exists_out_of_collections_and_still_collects_what_comes_later():
    import gc

    from controller.low_latency import freeze_gc

    class Cycle:
        pass
    try:
        status = freeze_gc()
        n = gc.get_freeze_count()
        assert status == f"froze {n} objects" and n > 1000
        a = Cycle()
        a.self = a   # garbage only a collection can free
        del a
        assert gc.collect() >= 1          # made after the freeze: still collected
        assert gc.get_freeze_count() == n  # the frozen ones were not looked at again
    finally:
        gc.unfreeze()
