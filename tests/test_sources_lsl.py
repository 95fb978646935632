"""LslSource against real LSL outlets running in other processes."""
from __future__ import annotations

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()  # before pylsl loads (here and in the spawned outlet processes)

import multiprocessing as mp  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pylsl  # noqa: E402
import pytest  # noqa: E402

from controller.events import EventKind  # noqa: E402
from controller.ring import SharedRing  # noqa: E402
from controller.sources import SourceError, build_source  # noqa: E402
from controller.sources.lsl import LslSource  # noqa: E402

pytestmark = pytest.mark.realtime
FS = 250.0
N_CH = 3


def _outlet_process(name: str, source_id: str, duration_s: float, skip: tuple[int, int] | None, ready) -> None:
    """Push a counter pattern (value = sample index) at FS with exact timestamps, omitting ``skip`` samples."""
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl as lsl
    info = lsl.StreamInfo(name, "EEG", N_CH, FS, "float32", source_id)
    chans = info.desc().append_child("channels")
    for label in ("A1", "A2", "A3"):
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        ch.append_child_value("unit", "microvolts")
    outlet = lsl.StreamOutlet(info, chunk_size=4)
    ready.set()
    t0 = lsl.local_clock()
    k = 0
    while True:
        now = lsl.local_clock()
        if now - t0 > duration_s:
            break
        due = int((now - t0) * FS)
        if due > k:
            idx = np.arange(k, due)
            keep = np.ones(idx.shape, bool) if skip is None else ~((idx >= skip[0]) & (idx < skip[1]))
            if keep.any():
                x = np.repeat(idx[keep, None].astype(np.float32), N_CH, axis=1)
                outlet.push_chunk(x, (t0 + idx[keep] / FS).tolist())
            k = due
        time.sleep(0.004)


def start_outlet(name, duration_s=3.0, skip=None, source_id=None):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_outlet_process, args=(name, source_id or name + "-sid", duration_s, skip, ready),
                    daemon=True)
    p.start()
    assert ready.wait(30), "outlet process did not start"
    return p


def stop(p):
    if p.is_alive():
        p.kill()
    p.join(10)


def pump(src, ring, seconds, until=None):
    events = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        src.read_into(ring)
        events += src.drain_events()
        if until is not None and until(events):
            break
    return events


def test_resolves_pulls_and_counts_a_timestamp_gap_as_dropped():
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0, skip=(500, 510))  # 10 samples missing 2 s in
    src = LslSource(name=name, resolve_timeout_s=10.0)
    try:
        info = src.open()
        assert (info.name, info.n_channels, info.fs_hz) == (name, N_CH, FS)
        assert info.channel_names == ("A1", "A2", "A3") and info.units[0] == "microvolts"
        ring = SharedRing.create(None, N_CH, 4096, FS)
        reader = ring.reader("oldest")
        events = pump(src, ring, 6.0, until=lambda ev: ring.counter and reader.ring.counter > 0 and
                      any(e.kind is EventKind.DROPPED for e in ev) and ring.counter > 700)
        res = reader.read_new(copy=True)
        vals = res.samples[:, 0].astype(np.int64)
        assert (res.samples == res.samples[:, :1]).all()  # channels carry the same counter
        steps = np.diff(vals)
        assert set(np.unique(steps)) <= {1, 11}  # in order; only the 10-sample hole
        assert 510 in vals and not np.isin(np.arange(500, 510), vals).any()
        # timestamps are the sender's, in our clock: exactly index/FS apart
        assert np.allclose(np.diff(res.timestamps), steps / FS, atol=1e-4)
        assert abs(res.timestamps[-1] - pylsl.local_clock()) < 1.0
        dropped = [e for e in events if e.kind is EventKind.DROPPED]
        assert len(dropped) == 1 and dropped[0].data["n_lost"] == 10
        assert src.n_dropped == 10
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_a_refreshed_clock_offset_shifts_timestamps_without_faking_a_gap():
    """Offsets move later stamps; gaps are counted on the sender's clock, so a jump is not a loss."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0)
    src = LslSource(name=name, resolve_timeout_s=10.0, time_correction_interval_s=0.0)   # refresh every chunk
    try:
        src.open()
        # liblsl's offset on one host is ~0 and steady: make each refresh 5 ms later than the last
        # (more than a 250 Hz gap limit of 6 ms minus one 4 ms sample period).
        jump = 0.005
        offsets = iter(src._offset_s + jump * np.arange(1, 100_000))
        src._inlet.time_correction = lambda timeout=0.0: float(next(offsets))
        ring = SharedRing.create(None, N_CH, 4096, FS)
        reader = ring.reader("oldest")
        events = pump(src, ring, 5.0, until=lambda ev: ring.counter > 300)
        res = reader.read_new(copy=True)
        vals = res.samples[:, 0].astype(np.int64)
        assert ring.counter > 300 and (np.diff(vals) == 1).all()
        assert not [e for e in events if e.kind is EventKind.DROPPED] and src.n_dropped == 0
        # Stamps within a chunk keep the sender's spacing; across chunks they carry the offset's jumps.
        extra = np.diff(res.timestamps) - 1 / FS
        assert np.all(np.isclose(extra, 0, atol=1e-6) | np.isclose(extra, jump, atol=1e-6))
        assert np.isclose(extra, jump, atol=1e-6).sum() >= 10
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_unknown_stream_fails_after_timeout_listing_streams_seen():
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=20.0)
    try:
        src = build_source({"kind": "lsl", "name": "stimloop-no-such-stream", "resolve_timeout_s": 0.5})
        t0 = time.monotonic()
        with pytest.raises(SourceError) as exc:
            src.open()
        elapsed = time.monotonic() - t0
        msg = str(exc.value)
        assert "name='stimloop-no-such-stream'" in msg and "0.5 s" in msg
        assert name in msg  # the stream that *was* there is listed
        assert 0.4 < elapsed < 10.0  # liblsl occasionally overshoots short timeouts by ~5 s (seen here)
    finally:
        stop(p)


def test_busy_poll_reads_every_sample_in_order():
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0)
    src = LslSource(name=name, resolve_timeout_s=10.0, busy_poll=True)
    try:
        src.open()
        ring = SharedRing.create(None, N_CH, 4096, FS)
        reader = ring.reader("oldest")
        events = pump(src, ring, 5.0, until=lambda ev: ring.counter > 300)
        vals = reader.read_new(copy=True).samples[:, 0].astype(np.int64)
        assert ring.counter > 300 and (np.diff(vals) == 1).all() and src.n_dropped == 0
        assert not [e for e in events if e.kind in (EventKind.DROPPED, EventKind.FAULT)]
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_busy_poll_spends_the_wait_on_the_cpu_and_blocking_does_not():
    """A stream with no samples: both wait ``wait_s`` and return 0; only busy polling keeps a core busy."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", N_CH, FS, "float32", name + "-sid"))
    ring = SharedRing.create(None, N_CH, 1024, FS)
    cpu = {}
    try:
        for busy in (False, True):
            src = LslSource(name=name, resolve_timeout_s=10.0, wait_s=0.3, stall_timeout_s=60.0, busy_poll=busy)
            src.open()
            try:
                c0 = time.process_time()
                assert src.read_into(ring) == 0 and src.read_into(ring) == 0
                cpu[busy] = time.process_time() - c0
            finally:
                src.close()
        # 0.6 s of waiting: polling burns (most of) it, liblsl's blocking wait nearly none of it.
        assert cpu[True] > 0.1 and cpu[True] > 4 * cpu[False], cpu
    finally:
        del outlet
        ring.close()
        ring.unlink()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one of name, type or source_id"):
        LslSource()
    with pytest.raises(ValueError, match="busy_poll='yes'"):
        LslSource(name="x", busy_poll="yes")
    with pytest.raises(ValueError, match="max_buflen_s=0.5"):
        LslSource(name="x", max_buflen_s=0.5)
    with pytest.raises(ValueError, match="kind='nope'"):
        build_source({"kind": "nope"})


def test_stream_lost_then_back_recovers():
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p1 = start_outlet(name, duration_s=1.5)
    src = LslSource(name=name, resolve_timeout_s=10.0, stall_timeout_s=0.5)
    ring = SharedRing.create(None, N_CH, 2048, FS)
    p2 = None
    try:
        src.open()
        events = pump(src, ring, 8.0, until=lambda ev: any(e.kind is EventKind.FAULT for e in ev))
        lost = [e for e in events if e.kind is EventKind.FAULT]
        assert lost and lost[0].data["what"] == "stream_lost"
        n_before = ring.counter
        assert n_before > 0
        p1.join(10)
        p2 = start_outlet(name, duration_s=10.0)  # same name, new outlet instance
        events = pump(src, ring, 10.0, until=lambda ev: any(e.data.get("what") == "stream_recovered" for e in ev)
                      and ring.counter > n_before + 100)
        rec = [e for e in events if e.data.get("what") == "stream_recovered"]
        assert rec and rec[0].kind is EventKind.STATUS and rec[0].data["outage_s"] > 0
        assert ring.counter > n_before + 100  # data flows again from the new outlet
    finally:
        src.close()
        stop(p1)
        if p2 is not None:
            stop(p2)
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("fmt, rate, why", [("float32", pylsl.IRREGULAR_RATE, "is irregular"),
                                            ("string", 100.0, "string/undefined channel format")])
def test_a_stream_that_cannot_feed_the_ring_is_refused_by_name(fmt, rate, why):
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    outlet = pylsl.StreamOutlet(pylsl.StreamInfo(name, "Markers", 1, rate, fmt, name + "-sid"))
    try:
        src = build_source({"kind": "lsl", "name": name, "resolve_timeout_s": 5.0})
        with pytest.raises(SourceError, match=f"LSL stream '{name}'.*{why}"):
            src.open()
    finally:
        del outlet
