"""LslSource against real LSL outlets running in other processes."""
from __future__ import annotations

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()  # before pylsl loads (here and in the spawned outlet processes)

import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pylsl  # noqa: E402
import pytest  # noqa: E402

from controller.data_quality import DataQuality  # noqa: E402
from controller.events import EventKind  # noqa: E402
from controller.ring import SharedRing  # noqa: E402
from controller.sources import SourceError, build_source  # noqa: E402
from controller.sources.lsl import LslSource  # noqa: E402

pytestmark = pytest.mark.realtime
FS = 250.0
N_CH = 3


def _outlet_process(name: str, source_id: str, duration_s: float, skip: tuple[int, int] | None, ready,
                    jump: tuple[int, float] | None = None, units=("microvolts",) * N_CH,
                    hold: tuple[int, float] | None = None) -> None:
    """Push a counter pattern (value = sample index) at FS with exact timestamps, omitting ``skip`` samples;
    ``jump = (k, offset_s)``: the sender's clock steps by ``offset_s`` from sample ``k`` on; ``hold = (k, s)``:
    at sample ``k`` nothing is pushed for ``s`` seconds, then the samples held are pushed at once (a USB or
    driver hiccup)."""
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl as lsl
    info = lsl.StreamInfo(name, "EEG", N_CH, FS, "float32", source_id)
    chans = info.desc().append_child("channels")
    for label, unit in zip(("A1", "A2", "A3"), units):
        ch = chans.append_child("channel")
        ch.append_child_value("label", label)
        if unit is not None:
            ch.append_child_value("unit", unit)
    outlet = lsl.StreamOutlet(info, chunk_size=4)
    ready.set()
    t0 = lsl.local_clock()
    k = 0
    while True:
        now = lsl.local_clock()
        if now - t0 > duration_s:
            break
        due = int((now - t0) * FS)
        if hold is not None and due > hold[0]:
            time.sleep(hold[1])
            hold = None
            continue
        if due > k:
            idx = np.arange(k, due)
            keep = np.ones(idx.shape, bool) if skip is None else ~((idx >= skip[0]) & (idx < skip[1]))
            if keep.any():
                x = np.repeat(idx[keep, None].astype(np.float32), N_CH, axis=1)
                stamps = t0 + idx[keep] / FS
                if jump is not None:
                    stamps = stamps + np.where(idx[keep] >= jump[0], jump[1], 0.0)
                outlet.push_chunk(x, stamps.tolist())
            k = due
        time.sleep(0.004)


def start_outlet(name, duration_s=3.0, skip=None, source_id=None, jump=None, units=("microvolts",) * N_CH,
                 hold=None):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_outlet_process, args=(name, source_id or name + "-sid", duration_s, skip, ready, jump),
                    kwargs={"units": units, "hold": hold}, daemon=True)
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
        assert info.channel_names == ("A1", "A2", "A3") and info.units == ("uV",) * N_CH
        assert info.declared_units == ("microvolts",) * N_CH and info.describe_units() == "in µV"
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


def test_a_stalled_stream_that_resumes_with_its_backlog_loses_nothing():
    """A 2.5 s hiccup, then the held samples at once: with the default inlet buffer (config's
    source.max_buflen_s) they all land. With a 1 s buffer, liblsl dropped the oldest of them."""
    from controller.config import load_config

    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=5.0, hold=(250, 2.5))
    src = LslSource(name=name, resolve_timeout_s=10.0, max_buflen_s=load_config(None).source.max_buflen_s)
    ring = SharedRing.create(None, N_CH, 4096, FS)
    try:
        src.open()
        reader = ring.reader("oldest")
        events = pump(src, ring, 12.0, until=lambda ev: ring.counter > 1000)
        vals = reader.read_new(copy=True).samples[:, 0].astype(np.int64)
        assert vals.size > 1000
        assert np.all(np.diff(vals) == 1), np.unique(np.diff(vals))       # every sample, in order
        assert not [e for e in events if e.kind is EventKind.DROPPED] and src.n_dropped == 0
        assert vals[0] < 250 < vals[-1] - 625                                # the hold lay inside what was read
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_a_refreshed_clock_offset_is_slewed_in_without_faking_a_gap_or_a_clock_jump():
    """A new offset estimate moves later stamps by at most a quarter period per chunk until it is
    reached: never a step the loop's DataQuality would read as a gap or as timestamps going backwards,
    and gaps are counted on the sender's clock, so the change is not a loss either.

    (This test used to expect each refresh to land in one step between two chunks; a step of a
    sample period or more is what the loop reads as a clock jump, and at 30 kHz the estimates
    wander by that much, so a refresh must be slewed in instead.)"""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0)
    src = LslSource(name=name, resolve_timeout_s=10.0, time_correction_interval_s=0.0)   # refresh every chunk
    try:
        src.open()
        # liblsl's offset on one host is ~0 and steady: stand-in estimates, each of the first three
        # 5 ms earlier than the last (more than the 4 ms sample period at 250 Hz), then steady.
        step = -0.005
        base = src._offset_s
        estimates = iter([base + step, base + 2 * step] + [base + 3 * step] * 100_000)
        src._inlet.time_correction = lambda timeout=0.0: float(next(estimates))
        ring = SharedRing.create(None, N_CH, 4096, FS)
        reader = ring.reader("oldest")
        events = pump(src, ring, 5.0, until=lambda ev: ring.counter > 300)
        res = reader.read_new(copy=True)
        vals = res.samples[:, 0].astype(np.int64)
        assert ring.counter > 300 and (np.diff(vals) == 1).all()
        assert not [e for e in events if e.kind is EventKind.DROPPED] and src.n_dropped == 0
        # Stamps within a chunk keep the sender's spacing; across chunks the offset moves by at most
        # a quarter period (1 ms), fifteen times in all, to the estimate's -15 ms.
        extra = np.diff(res.timestamps) - 1 / FS
        quarter = 0.25 / FS
        assert np.all(np.isclose(extra, 0, atol=1e-6) | np.isclose(extra, -quarter, atol=1e-6))
        assert np.isclose(extra, -quarter, atol=1e-6).sum() == 15
        assert src._offset_s == base + 3 * step
        quality, dq_events = DataQuality(FS, N_CH, window_s=0.5), []
        quality.check(res.samples, res.timestamps, dq_events)
        assert dq_events == [] and quality.invalid_reason is None
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_after_a_reconnect_the_new_streams_first_offset_is_taken_at_once_then_slewed():
    """A reconnected stream may run on another clock (the sender rebooted): its first estimate
    replaces the old offset at once; slewed in at a quarter period per chunk, a one-hour difference
    would keep every timestamp wrong for hours. Later refreshes are slewed as usual."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0)
    src = LslSource(name=name, resolve_timeout_s=10.0, time_correction_interval_s=0.0)   # refresh every chunk
    ring = SharedRing.create(None, N_CH, 4096, FS)
    try:
        src.open()
        old = src._inlet
        (stream,) = pylsl.resolve_bypred(src.predicate, 1, 5.0)
        src._connect(stream, 5.0, wait_time_correction=False)   # what _try_reconnect does
        old.close_stream()
        new_clock = src._offset_s + 3600.0   # the new instance's clock is an hour away
        estimates = iter([new_clock] + [new_clock + 0.004] * 100_000)   # then one refresh a period later
        src._inlet.time_correction = lambda timeout=0.0: float(next(estimates))
        pump(src, ring, 5.0, until=lambda ev: src._offset_s == new_clock)
        assert src._offset_s == new_clock   # stepped: the first estimate after the reconnect
        pump(src, ring, 5.0, until=lambda ev: ring.counter > 200)
        assert src._offset_s == new_clock + 0.004   # reached by slewing, not by another step
        res = ring.reader("oldest").read_new(copy=True)
        extra = np.diff(res.timestamps) - 1 / FS
        step = np.isclose(extra, 3600.0, atol=1e-3)
        assert step.sum() == 1   # the one step, between two chunks; the refresh after it is slewed
        assert np.all(np.isclose(extra[~step], 0, atol=1e-6) | np.isclose(extra[~step], 0.25 / FS, atol=1e-6))
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()


def test_a_jump_of_the_senders_own_clock_is_still_seen_as_one():
    """Slewing applies to our offset estimate only: a step in the sender's timestamps reaches the ring
    as it is, and the loop's DataQuality reports it."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0, jump=(150, -0.02))   # 5 periods back, 0.6 s in
    # By source_id: open() then does not listen for a second outlet of the name (0.75 s), which
    # would leave the inlet subscribing after the jump.
    src = LslSource(name=name, source_id=name + "-sid", resolve_timeout_s=10.0)
    ring = SharedRing.create(None, N_CH, 4096, FS)
    try:
        src.open()
        reader = ring.reader("oldest")
        pump(src, ring, 5.0, until=lambda ev: ring.counter > 250)
        res = reader.read_new(copy=True)
        quality, dq_events = DataQuality(FS, N_CH, window_s=0.5), []
        quality.check(res.samples, res.timestamps, dq_events)
        faults = [e for e in dq_events if e.kind is EventKind.FAULT]
        assert faults and "timestamps went backwards" in faults[0].data["reason"]
        at = int(np.flatnonzero(res.samples[:, 0] == 150)[0])   # the first sample on the stepped clock
        assert faults[0].t == res.timestamps[at]
        assert np.isclose(res.timestamps[at] - res.timestamps[at - 1], 1 / FS - 0.02, atol=1e-6)
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


def test_a_new_outlet_that_does_not_answer_at_first_is_retried_not_refused():
    """A matching outlet that is found but does not answer within the reconnect timeout (here: its
    process stopped, as a busy host would hold it) is retried once it answers, not refused for good."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    p1 = start_outlet(name, duration_s=2.0)   # outlives open()'s 0.75 s listen for a second outlet
    src = LslSource(name=name, resolve_timeout_s=10.0, stall_timeout_s=0.5)
    ring = SharedRing.create(None, N_CH, 2048, FS)
    p2 = None
    try:
        src.open()
        events = pump(src, ring, 8.0, until=lambda ev: any(e.data.get("what") == "stream_lost" for e in ev))
        assert any(e.data.get("what") == "stream_lost" for e in events)
        p1.join(10)
        p2 = start_outlet(name, duration_s=15.0)
        old_uid = src._uid
        deadline = time.monotonic() + 10
        while not any(s.uid() != old_uid for s in src._resolver.results()) and time.monotonic() < deadline:
            time.sleep(0.05)   # the source's own resolver sees the new outlet...
        os.kill(p2.pid, signal.SIGSTOP)   # ...which then does not answer
        try:
            events = pump(src, ring, 5.0, until=lambda ev: any(e.data.get("what") == "reconnect_retrying" for e in ev))
        finally:
            os.kill(p2.pid, signal.SIGCONT)
        retrying = [e for e in events if e.data.get("what") == "reconnect_retrying"]
        assert len(retrying) == 1 and "not readable" in retrying[0].data["error"]
        n_before = ring.counter
        events += pump(src, ring, 10.0, until=lambda ev: any(e.data.get("what") == "stream_recovered" for e in ev)
                       and ring.counter > n_before + 50)
        assert any(e.data.get("what") == "stream_recovered" for e in events)
        assert not [e for e in events if e.data.get("what") == "reconnect_failed"]
        assert ring.counter > n_before + 50
    finally:
        src.close()
        stop(p1)
        if p2 is not None:
            stop(p2)
        ring.close()
        ring.unlink()


@pytest.mark.parametrize("channels, sid, why", [(N_CH + 1, "-sid", "came back with 4 channels"),
                                                (N_CH, "-other", "came back from another source: source_id"),
                                                (N_CH, "-sid", None)])
def test_a_stream_back_with_another_channel_count_or_source_is_refused_once(channels, sid, why):
    """Incompatibility is for good (one reconnect_failed for that instance, the stream stays lost);
    so is another device under the same name; the same stream back as it was is taken."""
    name = f"stimloop-test-{uuid.uuid4().hex[:8]}"
    make = lambda n, sid="-sid": pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", n, FS, "float32", name + sid))  # noqa: E731
    first = make(N_CH)
    src = LslSource(name=name, resolve_timeout_s=5.0, stall_timeout_s=0.3)
    ring = SharedRing.create(None, N_CH, 2048, FS)
    try:
        src.open()
        del first
        events = pump(src, ring, 5.0, until=lambda ev: any(e.data.get("what") == "stream_lost" for e in ev))
        again = make(channels, sid)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            again.push_chunk(np.zeros((2, channels), np.float32))
            src.read_into(ring)
            events += src.drain_events()
            time.sleep(2 / FS)
        whats = [e.data.get("what") for e in events]
        refused = [e for e in events if e.data.get("what") == "reconnect_failed"]
        if why is None:
            assert not refused and "stream_recovered" in whats
        else:
            assert len(refused) == 1 and why in refused[0].data["error"] and "stream_recovered" not in whats
    finally:
        src.close()
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


def test_two_streams_answering_to_one_name_are_refused_naming_the_way_out():
    """Which outlet answers first is chance: by name alone the source could take another amplifier,
    or another session's simulator. It lists both and asks for source_id; with it, it opens."""
    name = f"stimloop-twins-{uuid.uuid4().hex[:8]}"
    a = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 512, "float32", "amp-A"))
    b = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 512, "float32", "amp-B"))
    try:
        time.sleep(0.2)   # both outlets announced: each answers the one query
        with pytest.raises(SourceError, match=rf"2 LSL streams named '{name}'.*'amp-[AB]'.*'amp-[AB]'.*source\.source_id"):
            build_source({"kind": "lsl", "name": name, "resolve_timeout_s": 5.0}).open()
        src = build_source({"kind": "lsl", "name": name, "source_id": "amp-B", "resolve_timeout_s": 5.0})
        assert src.open().source_id == "amp-B"
        src.close()
    finally:
        del a, b


def test_a_ring_sized_for_another_stream_of_the_same_name_is_refused_naming_the_way_out():
    """The runner probes the stream to size the ring; the acquisition opens it again. With two
    outlets of one name (4 channels each, 512 and 256 Hz) the two can land on different streams:
    the rate check says so instead of stamping 256 Hz samples on a 512 Hz ring."""
    name = f"stimloop-twins-{uuid.uuid4().hex[:8]}"
    a = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 512, "float32", "amp-A"))
    b = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 256, "float32", "amp-B"))
    ring = SharedRing.create(None, 4, 4096, 512.0)
    try:
        for sid, ok in (("amp-A", True), ("amp-B", False)):
            src = build_source({"kind": "lsl", "name": name, "source_id": sid, "resolve_timeout_s": 5.0})
            src.open()
            try:
                if ok:
                    src.check_ring(ring)
                else:
                    with pytest.raises(SourceError, match=r"512 Hz.*'amp-B'.*256 Hz.*source\.source_id"):
                        src.check_ring(ring)
            finally:
                src.close()
    finally:
        ring.close()
        ring.unlink()
        del a, b


def test_samples_arrive_in_microvolts_whatever_unit_the_stream_declares():
    """An MNE-based player streams volts: V, mV and nV channels are scaled to µV, an undeclared one
    passes as it is (taken as µV, and said so); a unit that is no voltage is refused at open, unless
    source.units says what the values are."""
    name = f"stimloop-units-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0, units=("V", "mV", None))
    src = LslSource(name=name, resolve_timeout_s=10.0)
    ring = SharedRing.create(None, N_CH, 4096, FS)
    try:
        info = src.open()
        assert info.units == ("uV", "uV", "") and info.declared_units == ("V", "mV", "")
        assert info.describe_units() == "1 of 3 channel(s) declare no unit: taken as µV (set source.units if they are not)"
        reader = ring.reader("oldest")
        pump(src, ring, 4.0, until=lambda ev: ring.counter > 200)
        res = reader.read_new(copy=True)
        idx = res.samples[:, 2].astype(np.float64)          # the counter, as sent (undeclared: unchanged)
        assert idx.size > 200 and np.array_equal(idx, np.round(idx))
        assert np.allclose(res.samples[:, 0], idx * 1e6, rtol=1e-6)   # V -> µV
        assert np.allclose(res.samples[:, 1], idx * 1e3, rtol=1e-6)   # mV -> µV
    finally:
        src.close()
        stop(p)
    name = f"stimloop-units-{uuid.uuid4().hex[:8]}"
    p = start_outlet(name, duration_s=4.0, units=("counts", "counts", "microvolts"))
    try:
        with pytest.raises(SourceError, match=r"channel 0 \('A1'\) declares unit 'counts' \(and 1 more channel\(s\)\), "
                                              r"not a voltage stimloop knows .* set source.units"):
            LslSource(name=name, resolve_timeout_s=10.0).open()
        src = build_source({"kind": "lsl", "name": name, "resolve_timeout_s": 10.0, "units": "uV"})
        info = src.open()
        assert info.units == ("uV",) * N_CH and info.declared_units == ("counts", "counts", "microvolts")
        assert info.describe_units() == "taken as uV (source.units; the stream declares counts, microvolts)"
        reader = ring.reader("now")
        pump(src, ring, 4.0, until=lambda ev: ring.counter > 100 and reader.available() > 50)
        res = reader.read_new(copy=True)
        assert res.samples.size and (res.samples == res.samples[:, :1]).all()   # taken as they come
    finally:
        src.close()
        stop(p)
        ring.close()
        ring.unlink()
    with pytest.raises(ValueError, match="units='furlongs'"):
        LslSource(name=name, units="furlongs")
