"""Simulated-time sessions: deterministic, faster than real time, same folder as real time, faults handled."""
import json

from controller.config import parse_config
from controller.recorder import read_jsonl
from controller.runners.simulated import run_simulated


def _cfg(tmp_path, **over):
    base = {"session": {"duration_s": 40.0, "out_dir": str(tmp_path), "seed": 3},
            "simulator": {"seizure_onsets_s": [8.0, 28.0], "n_channels": 8}}
    for k, v in over.items():
        base[k] = v if isinstance(v, list) else {**base.get(k, {}), **v}
    return parse_config(base)


def _decisions(session):
    return [(e["t"], e["kind"], e.get("what"), e.get("seq")) for e in read_jsonl(session / "events.jsonl")
            if e["kind"] in ("decision", "command", "refusal", "fault")]


def test_same_seed_same_session(tmp_path):
    a = run_simulated(_cfg(tmp_path), write_report=False)
    b = run_simulated(_cfg(tmp_path), write_report=False)
    assert _decisions(a) == _decisions(b) and _decisions(a)
    assert (a / "raw/samples.f32").read_bytes() == (b / "raw/samples.f32").read_bytes()


def test_closed_loop_detects_and_stimulates_through_the_governor(tmp_path):
    s = run_simulated(_cfg(tmp_path))
    m = json.loads((s / "metrics.json").read_text())
    assert m["detection"]["detected"] == 2 and m["detection"]["false_detections"] == 0
    assert m["detection"]["latency_s_median"] <= 3.0
    assert m["stim"]["commands"] >= 2 and m["stim"]["charge_uc"] > 0
    truth = json.loads((s / "ground_truth.json").read_text())
    assert any(z["terminated_by_stim"] for z in truth["seizures"])  # the brain answers the stimulation
    assert (s / "report.png").stat().st_size > 10_000
    # Its latency is the modeled one, and the summary says so, without stages that take no time on its clock.
    from rich.console import Console

    from controller.report import summary_table
    assert m["clock"] == "virtual" and m["end_to_end_ms"]["p50"] == 2.0   # simulator.stim_latency_ms
    con = Console(record=True, width=140)
    con.print(summary_table(m))
    text = con.export_text()
    assert "end-to-end latency, modeled (simulator.stim_latency_ms)" in text and "stage " not in text


def test_a_seizure_starting_as_the_session_ends_is_not_scored_as_missed(tmp_path):
    from controller.metrics import compute_metrics
    s = run_simulated(_cfg(tmp_path, simulator={"seizure_onsets_s": [8.0, 39.0]}), write_report=False)
    det = compute_metrics(s)["detection"]
    started = next(e for e in read_jsonl(s / "events.jsonl") if e.get("status") == "started")
    assert started["min_detect_s"] > 1.0   # the shipped model's window + min duration
    assert det["unscored_near_end"] == [39.0] and det["onsets"] == 1 and det["detected"] == 1
    assert 0.0 < det["unscored_before_end_s"][0] < started["min_detect_s"]


def test_faults_from_config_reach_the_events(tmp_path):
    faults = [{"kind": "nan_burst", "at_s": 4.0, "duration_s": 1.0},
              {"kind": "saturation", "at_s": 15.0, "duration_s": 0.5, "level_uv": 40.0},
              {"kind": "device_mute", "at_s": 20.0, "duration_s": 0.5}]
    s = run_simulated(_cfg(tmp_path, faults=faults), write_report=False)
    events = read_jsonl(s / "events.jsonl")
    bad = [e for e in events if e["kind"] == "fault" and e.get("what") == "bad_data"]
    assert len(bad) == 2 and "non-finite" in bad[0]["reason"] and "saturation" in bad[1]["reason"]
    assert any(e["kind"] == "safe_state" and "heartbeat" in e["reason"] for e in events)  # muted device
    assert any(e.get("what") == "device_reconnected" for e in events)  # and it came back
    # No command is ever issued while bad data stands.
    for e in events:
        if e["kind"] == "command":
            assert not (4.0 <= e["t"] <= 6.0)
    truth = json.loads((s / "ground_truth.json").read_text())
    assert [f["kind"] for f in truth["faults"]] == ["nan_burst", "saturation", "device_mute"]
