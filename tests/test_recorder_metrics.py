"""Recorder (crash-safe JSON lines) and event-level detection scoring."""

from controller.events import Event, EventKind
from controller.metrics import percentiles_ms, score_detections
from controller.recorder import EventLog, new_session_dir, read_jsonl


def test_event_log_appends_whole_lines_and_survives_torn_tail(tmp_path):
    path = tmp_path / "events.jsonl"
    a, b = EventLog(path), EventLog(path)  # two writers, as two processes would be
    for i in range(100):
        (a if i % 2 else b).append(Event(float(i), EventKind.MARK, "test", {"i": i, "nan": float("nan")}))
    a.close()
    b.close()
    with open(path, "ab") as f:
        f.write(b'{"t": 1, "kind": "ma')  # a kill in the middle of a write
    rows = read_jsonl(path)
    assert sorted(r["i"] for r in rows) == list(range(100))
    assert all(r["nan"] is None for r in rows)  # NaN is written as null: valid JSON


def test_flush_interval(tmp_path):
    log = EventLog(tmp_path / "e.jsonl", flush_interval_s=0.5)
    log.append({"t": 0.0, "kind": "mark"})
    log.maybe_flush(0.0)
    assert len(read_jsonl(log.path)) == 1  # first flush is immediate
    log.append({"t": 0.1, "kind": "mark"})
    log.maybe_flush(0.2)
    assert len(read_jsonl(log.path)) == 1  # buffered
    log.maybe_flush(0.6)
    assert len(read_jsonl(log.path)) == 2
    log.close()


def test_session_dirs_are_unique(tmp_path):
    a, b = new_session_dir(tmp_path), new_session_dir(tmp_path)
    assert a != b and (a / "raw").is_dir() and (b / "raw").is_dir()


def test_score_detections():
    seizures = [{"onset_t": 10.0, "offset_t": 20.0}, {"onset_t": 40.0, "offset_t": 50.0},
                {"onset_t": 70.0, "offset_t": None}]
    s = score_detections([11.5, 12.0, 30.0, 52.0], seizures, session_end_t=80.0)
    assert s["onsets"] == 3 and s["detected"] == 2
    assert s["false_detections"] == 1 and s["false_detection_t"] == [30.0]
    assert s["latency_s"] == [1.5, 12.0]
    assert abs(s["sensitivity"] - 2 / 3) < 1e-12


def test_percentiles_ignore_missing():
    p = percentiles_ms([0.001, 0.002, None, float("nan"), 0.003])
    assert p["n"] == 3 and p["p50"] == 2.0 and p["max"] == 3.0
    assert percentiles_ms([])["p50"] is None


def test_session_percentiles_need_enough_values_like_the_benchmarks():
    """A p99 of 3 values would only interpolate between the two largest: none is given below 100,
    the same rule as the benchmarks' stats_ms (one rule, in controller.metrics)."""
    from controller.bench.common import stats_ms
    few = percentiles_ms([0.001, 0.002, 0.003])
    assert few["p50"] == 2.0 and few["p90"] is None and few["p99"] is None and few["max"] == 3.0
    many = [i * 1e-5 for i in range(1, 101)]
    p = percentiles_ms(many)
    assert p["p99"] is not None and p["p999"] is None
    s = stats_ms(many)
    assert all(s[k] == p[k] for k in ("p50", "p90", "p99", "p999", "max", "n"))


def test_chunk_push_times_map_samples_to_their_chunk(tmp_path):
    import numpy as np
    import pytest

    from controller.metrics import chunk_push_times
    fs, chunk_n, first, t0 = 1000.0, 10, 20, 100.0
    push = t0 + (first + (np.arange(5) + 1) * chunk_n - 1) / fs + 0.0003   # each 0.3 ms after its last sample
    push.astype("<f8").tofile(tmp_path / "push_t.f64")
    truth = {"t0": t0, "push": {"file": "push_t.f64", "chunk_n": chunk_n, "first_sample": first,
                                "n_chunks": 5, "fs_hz": fs}}
    samples = t0 + np.array([20, 29, 30, 69, 70, 19]) / fs        # first and last of chunks 0, 0, 1, 4; after; before
    got = chunk_push_times(tmp_path, truth, samples)
    assert got[:4] == pytest.approx(push[[0, 0, 1, 4]])
    assert np.isnan(got[4:]).all()                                  # outside the pushed chunks: unknown
    assert np.isnan(chunk_push_times(tmp_path, {"t0": t0}, samples)).all()   # no push truth (a real source)


def test_summary_table_rounds_figures_and_marks_missing_ones():
    from rich.console import Console

    from controller.report import summary_table
    metrics = {"end_to_end_ms": {"p50": 3.4452183, "p99": 3.6027, "max": None, "n": 3},
               "stage_ms": {"features": {"p50": 0.59641, "p99": 0.79552, "n": 3}, "spike_to_loop": {"n": 0}},
               "detection": {"detected": 3, "onsets": 3, "sensitivity": 1.0, "false_detections": 0,
                             "latency_s_median": 2.183573844999046,
                             "unscored_near_end": [77274.177064864], "unscored_before_end_s": [1.23]},
               "stim": {"commands": 3, "received_by_device": 3, "charge_uc": 288.0, "clamps": 0, "refusals": 0},
               "deadline_misses": 0, "dropped_samples": 0, "faults": []}
    con = Console(record=True, width=120)
    con.print(summary_table(metrics))
    text = con.export_text()
    assert "3.445 / 3.603 / –  (n=3)" in text and "0.596 / 0.796" in text
    assert "2.18" in text and "2.1835" not in text and "288.0" in text
    assert "spike_to_loop" not in text   # a stage the policy does not have stays out
    # An onset too near the end: placed before the end, not at its session-clock time (LSL's, since boot).
    assert "onset this long before the end (s)" in text and "1.2" in text and "77274" not in text


def test_summary_lists_distinct_faults_in_session_time_and_the_final_stop():
    from rich.console import Console

    from controller.metrics import final_stop
    from controller.report import FAULT_ROWS, summary_table
    lost = "driver error during heartbeat: StimulatorError: [Errno 5] Input/output error " + "x" * 200
    faults = [{"t": 100.0, "after_start_s": 16.04, "source": "governor", "reason": lost},
              {"t": 100.0, "after_start_s": 16.05, "source": "lsl", "what": "stream_lost", "reason": "lost_error"},
              {"t": 101.0, "after_start_s": 17.0, "source": "loop", "what": "stream_stalled", "reason": "no data"},
              {"t": 101.0, "after_start_s": 17.0, "source": "governor", "reason": "no data"}]   # a repeat
    faults += [{"t": 102.0 + i, "after_start_s": 18.0 + i, "source": "loop", "reason": f"other {i}"} for i in range(3)]
    closed = [{"kind": "safe_state", "reason": "no data", "stop_ok": False, "stop_errors": ["e"]},
              {"kind": "safe_state", "reason": "actuator closed", "stop_ok": False,
               "stop_errors": ["port not open: STOP not sent", "port not open: STOP not sent"]}]
    metrics = {"end_to_end_ms": {"n": 0}, "stage_ms": {}, "stim": {}, "deadline_misses": 0, "dropped_samples": 0,
               "faults": faults, "final_stop": final_stop(closed),
               "operator_stops": [{"t": 90.0, "after_start_s": 7.04, "reason": "emergency_stop: paused by the operator"}]}
    con = Console(record=True, width=200)
    con.print(summary_table(metrics))
    text = con.export_text()
    assert "at 16.0 s: governor" in text and "[Errno 5]" in text and "x" * 100 not in text   # escaped, cut
    assert "stream_lost: lost_error" in text and "stream_stalled: no data" in text
    assert text.count("no data") == 1                      # the governor's repeat is left out
    assert "2 more: events.jsonl" in text and FAULT_ROWS == 4   # 6 distinct reasons, 4 shown
    assert "NOT confirmed by the device" in text
    assert "1 (first at 7.0 s: paused by the operator)" in text   # why stimulation did not come
    assert final_stop(closed[:1]) is None                  # the actuator never closed
    assert final_stop([{"reason": "actuator closed", "stop_ok": True, "stop_errors": []}]) == \
        {"confirmed": True, "errors": []}


def test_a_seizure_starting_too_near_the_end_is_not_scored():
    """A seizure whose onset leaves less than window + min duration before the end cannot be confirmed:
    neither missed nor detected; a detection it explains is not a false one."""
    seizures = [{"onset_t": 10.0, "offset_t": 20.0}, {"onset_t": 77.0, "offset_t": None}]
    s = score_detections([11.5], seizures, session_end_t=80.0, min_detect_s=3.5)
    assert s["onsets"] == 1 and s["detected"] == 1 and s["sensitivity"] == 1.0
    assert s["unscored_near_end"] == [77.0] and s["unscored_before_end_s"] == [3.0]
    s = score_detections([11.5, 79.5], seizures, session_end_t=80.0, min_detect_s=3.5)
    assert s["detected"] == 1 and s["false_detections"] == 0 and s["latency_s"] == [1.5]
    # Without the model's span (the default) every onset is scored, as before.
    assert score_detections([11.5], seizures, session_end_t=80.0)["onsets"] == 2


def test_a_flush_failing_partway_keeps_every_event_for_the_retry(tmp_path):
    """Disk full in the middle of a flush (RLIMIT_FSIZE in a child process stands in for it): the
    events not wholly written are kept and written by the next flush, each once, whole."""
    import subprocess
    import sys
    import textwrap
    path = tmp_path / "events.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from controller.recorder import EventLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails (EFBIG) instead of killing
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        log = EventLog({str(path)!r})
        for i in range(40):
            log.append({{"t": float(i), "kind": "mark", "i": i}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (500, hard))
        try:
            log.flush()
            sys.exit("the flush should have failed")
        except OSError:
            pass
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))   # space again
        log.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    raw = path.read_bytes()
    assert raw.count(b"\n") > 40   # the torn line is there, on a line of its own
    assert sorted(row["i"] for row in read_jsonl(path)) == list(range(40))


def test_burst_envelope_of_pulsed_and_continuous_commands():
    from controller.report import _burst_envelope_s
    assert _burst_envelope_s({"waveform": "biphasic", "n_pulses": 100, "frequency_hz": 200.0}) == (0.5, 0.0)
    assert _burst_envelope_s({"waveform": "sine", "duration_s": 30.0, "ramp_s": 10.0}) == (30.0, 10.0)
    assert _burst_envelope_s({"waveform": "dc", "duration_s": 4.0, "ramp_s": 10.0}) == (4.0, 2.0)   # ramps meet
    assert _burst_envelope_s({"waveform": "biphasic", "n_pulses": 1, "frequency_hz": 0.0}) == (0.0, 0.0)


def test_a_burst_envelope_ends_at_the_stop_that_cut_it():
    from controller.report import envelope_points
    xs, ys = envelope_points(20.0, 30.0, 10.0, 1000.0)
    assert list(xs) == [20.0, 30.0, 40.0, 50.0] and list(ys) == [0.0, 1000.0, 1000.0, 0.0]
    xs, ys = envelope_points(20.0, 30.0, 10.0, 1000.0, stop_t=25.0)       # stopped half-way up the ramp
    assert list(xs) == [20.0, 25.0, 25.0] and list(ys) == [0.0, 500.0, 0.0]
    xs, ys = envelope_points(20.0, 30.0, 10.0, 1000.0, stop_t=60.0)       # a stop after the burst: no cut
    assert list(xs) == [20.0, 30.0, 40.0, 50.0]


def test_report_labels_channels_by_the_sources_names(tmp_path):
    """An amplifier's channel names (from the recording's meta.json) label the signal, not indices."""
    import json

    from controller.report import channel_labels
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "meta.json").write_text(json.dumps({"source": {"channel_names": ["Fp1", "", "Cz"]}}))
    assert channel_labels(tmp_path, 4) == ["Fp1", "ch1", "Cz", "ch3"]
    assert channel_labels(tmp_path / "nowhere", 2) == ["ch0", "ch1"]
    # a simulated-time session writes them at the top level (controller/export.py reads both)
    (tmp_path / "raw" / "meta.json").write_text(json.dumps({"channel_names": ["E01", "E02"]}))
    assert channel_labels(tmp_path, 2) == ["E01", "E02"]
