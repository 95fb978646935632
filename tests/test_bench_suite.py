"""stimloop bench: the quick suite end to end (real processes, LSL, ptys, ONNX) and its pure helpers.

Benchmarks measure; these tests check behaviour: well-formed output, sane
orderings, errors that name the bad value. No latency threshold is asserted.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from controller.bench.common import CpuMeter, cpu_seconds, machine_info, ratio_ci95, stats_ms
from controller.bench.outlet import check_spec
from controller.bench.peers.harness import PEER_STAGES, match, ratio_ci_table, ratio_table
from controller.bench.peers.pylsl_floor import rising_edges
from controller.bench.report import markdown
from controller.bench.suite import SPIKE_STAGES, run_suite, strip_raw
from controller.bench_ads import WARMUP_S

KEYS = ("p50", "p90", "p99", "p999", "max")


def _sane(stats: dict, full: bool = True) -> None:
    assert stats["n"] > 0
    vals = [stats[k] for k in KEYS]
    if full:
        assert all(v is not None for v in vals)
    present = [v for v in vals if v is not None]
    assert all(v >= 0 and math.isfinite(v) for v in present)
    assert present == sorted(present), f"percentiles out of order: {stats}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from controller.bench.cli import app
    out = tmp_path_factory.mktemp("bench")
    res = CliRunner().invoke(app, ["--quick", "--duration", "5", "--out", str(out), "--json", str(out / "r.json")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out, json.loads((out / "r.json").read_text()), res.output


@pytest.mark.timeout(120)
def test_quick_suite_writes_wellformed_json(quick_run):
    out, doc, _ = quick_run
    m = doc["machine"]
    assert m["cores"] >= 1 and len(m["load_average"]) == 3 and m["python"] and m["cpu_model"]
    assert set(doc["scenarios"]) == {"spike_triggered", "spike_triggered_busy_poll", "seizure_loop", "throughput"}
    for name, sc in doc["scenarios"].items():
        assert "error" not in sc, f"{name}: {sc.get('error')}\n{sc.get('traceback')}"
        if sc.get("skipped"):
            assert name == "seizure_loop" and sc["skipped"] == "no model"
            continue
        _sane(sc["end_to_end_ms"])
        assert sc["stages_ms"], name
        for stage, st in sc["stages_ms"].items():
            _sane(st)
        assert sc["deadline_misses"] >= 0
        assert isinstance(sc["dropped_samples"], int) and sc["dropped_samples"] >= 0
        assert sc["cpu_percent"] and all(v is None or v >= 0 for v in sc["cpu_percent"].values())
        assert "_raw_s" not in json.dumps(sc)   # raw arrays stay out of the JSON
    for name, busy in (("spike_triggered", False), ("spike_triggered_busy_poll", True)):
        sp = doc["scenarios"][name]
        assert list(sp["stages_ms"]) == [*SPIKE_STAGES, "push_to_decision_every_chunk"]
        assert sp["stages_ms"]["governor_and_framing"]["n"] > 0 and sp["commands"] > 0
        assert sp["busy_poll"] is busy
        # Every 1 ms block after the warm-up counts once, however many pulls it came in (a busy-polled
        # pull can return part of a block).
        blocks = (sp["duration_s"] - WARMUP_S) * 1000
        assert 0.95 * blocks <= sp["stages_ms"]["push_to_decision_every_chunk"]["n"] <= blocks + 1
    sz = doc["scenarios"]["seizure_loop"]
    if not sz.get("skipped"):
        assert set(sz["stages_ms"]) >= {"lsl_transport", "ring_write", "ring_to_loop", "features", "inference",
                                        "policy_governor", "port_write", "device_receive"}
        assert sz["received_by_device"] == sz["commands"] > 0
    tp = doc["throughput"]
    assert tp["max_channels_at_30khz"] in (None, 16, 64)
    for p in doc["scenarios"]["throughput"]["sweep"]:
        assert p["pushed_samples"] > 0 and p["dropped_samples"] >= 0


@pytest.mark.timeout(120)
def test_quick_suite_peers_pngs_markdown(quick_run):
    out, doc, output = quick_run
    assert set(doc["peers"]) == {"stimloop", "stimloop_busy_poll", "pylsl_floor"}
    for name, r in doc["peers"].items():
        _sane(r["end_to_end_ms"])
        assert r["detected"] + r["missed"] == r["pulses"] > 0
    # Each stimloop mode against each other peer, never against the other mode.
    assert {k: set(v) for k, v in doc["peer_ratios"].items()} == {"stimloop": {"pylsl_floor"},
                                                                  "stimloop_busy_poll": {"pylsl_floor"}}
    for ours in ("stimloop", "stimloop_busy_poll"):
        assert all(v is None or v > 0 for v in doc["peer_ratios"][ours]["pylsl_floor"].values())
        # The quick run is one round per peer: too few to say how much rounds differ, so no interval.
        assert doc["peer_ratio_ci95"][ours]["pylsl_floor"] == {"p50": None, "p99": None}
        # Its stages: every command joined with its device receipt, stamps in causal order.
        stages = doc["peers"][ours]["stages_ms"]
        assert list(stages) == list(PEER_STAGES)
        for st in stages.values():
            _sane(st)
            assert st["n"] >= doc["peers"][ours]["detected"] > 0   # a receipt > 50 ms late is "missed" there
    assert doc["peer_stream"]["rounds"] == 1 and "stages_ms" not in doc["peers"]["pylsl_floor"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "peer_stimloop__end_to_end.png" in pngs and "throughput__ring_visible.png" in pngs
    assert "spike_triggered__governor_and_framing.png" in pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)
    md = (out / "bench.md").read_text()
    assert "| scenario | stage |" in md and "Ratio stimloop / peer" in md
    assert "| stimloop | pylsl_floor |" in md and "| stimloop_busy_poll | pylsl_floor |" in md
    assert "| governor_and_framing |" in md and "peer_stimloop__governor_and_framing.png" in pngs
    assert "peers: end to end" in output


def test_stats_ms_orders_and_handles_empty():
    s = stats_ms(np.r_[np.linspace(0.001, 0.002, 1000), np.nan, np.inf])
    assert s["n"] == 1000 and s["p50"] == pytest.approx(1.5, abs=1e-3) and s["max"] == pytest.approx(2.0)
    assert s["p50"] <= s["p90"] <= s["p99"] <= s["p999"] <= s["max"]
    assert s["jitter_p99_p50"] == pytest.approx(s["p99"] - s["p50"], abs=1e-3)
    e = stats_ms([])
    assert e["n"] == 0 and all(e[k] is None for k in KEYS)


def test_match_latency_missed_and_extra():
    pulses = [1.0, 1.2, 1.4, 1.6]
    outs = [1.0012, 1.2030, 1.2040, 1.65]   # 1.4 missed; 1.204 duplicate; 1.65 matched late (50 ms)
    m = match(pulses, outs, 0.9, 1.7)
    assert m["pulses"] == 4 and m["detected"] == 3 and m["missed"] == 1 and m["extra_outputs"] == 1
    assert np.allclose(sorted(m["latencies_s"]), [0.0012, 0.003, 0.05])
    assert match(pulses, [], 0.9, 1.7)["missed"] == 4


def test_rising_edges_carry_state_between_chunks():
    x = np.array([0, 600, 600, 0, 700, 0], np.float32)
    assert rising_edges(x, 500, False) == (2, False)
    assert rising_edges(np.array([600, 0], np.float32), 500, True) == (0, False)   # continues the previous pulse
    assert rising_edges(np.array([0, 0, 900], np.float32), 500, False) == (1, True)
    assert rising_edges(np.zeros(0, np.float32), 500, True) == (0, True)


def test_ratio_table_per_percentile():
    a = {"end_to_end_ms": {"p50": 2.0, "p90": 3.0, "p99": 4.0, "p999": 5.0, "max": 6.0}}
    b = {"end_to_end_ms": {"p50": 1.0, "p90": 1.5, "p99": None, "p999": 2.5, "max": 3.0}}
    r = ratio_table({"stimloop": a, "x": b, "y": {"skipped": "why"}})
    assert r == {"stimloop": {"x": {"p50": 2.0, "p90": 2.0, "p99": None, "p999": 2.0, "max": 2.0}}}
    both = ratio_table({"stimloop": a, "stimloop_busy_poll": b, "x": b})
    assert set(both) == {"stimloop", "stimloop_busy_poll"} and set(both["stimloop"]) == {"x"}
    assert both["stimloop_busy_poll"]["x"]["p50"] == 1.0


def test_ratio_ci95_covers_the_true_ratio_and_narrows_with_more_samples():
    rng = np.random.default_rng(7)
    peer = [rng.gamma(4.0, 0.05e-3, 300) for _ in range(10)]
    ours = [1.6 * rng.gamma(4.0, 0.05e-3, 300) for _ in range(10)]   # true ratio 1.6 at every percentile
    lo, hi = ratio_ci95(ours, peer, 99.0)
    assert lo < 1.6 < hi and lo > 1.0                  # clearly slower, and the interval says so
    lo50, hi50 = ratio_ci95(ours, peer, 50.0)
    assert lo50 < 1.6 < hi50 and hi50 - lo50 < hi - lo   # the median is better determined than p99
    few_lo, few_hi = ratio_ci95([o[:20] for o in ours[:5]], [p[:20] for p in peer[:5]], 99.0)
    assert few_hi - few_lo > 2 * (hi - lo)             # ~100 latencies (a 10 s peer run): a wide p99 interval
    same = ratio_ci95([rng.gamma(4.0, 1.0, 100) for _ in range(5)], [rng.gamma(4.0, 1.0, 100) for _ in range(5)], 99.0)
    assert same[0] < 1.0 < same[1]                     # same distribution: cannot be told apart


def test_ratio_ci95_resamples_rounds_so_a_noisy_round_is_not_called_a_difference():
    """Two identical programs, each round scaled by the machine's mood: the interval over rounds holds 1
    about 95 % of the time; treating every latency as independent (one value per "round") calls the
    difference real about half the time, as the pooled bootstrap did on the peers (docs/performance.md)."""
    holds_rounds = holds_values = 0
    n_runs = 40
    for seed in range(n_runs):
        rng = np.random.default_rng(seed)
        a = [rng.lognormal(0.0, 0.2) * rng.gamma(4.0, 1.0, 100) for _ in range(5)]
        b = [rng.lognormal(0.0, 0.2) * rng.gamma(4.0, 1.0, 100) for _ in range(5)]
        lo, hi = ratio_ci95(a, b, 50.0, seed, n_boot=400)
        holds_rounds += lo <= 1.0 <= hi
        lo, hi = ratio_ci95(np.concatenate(a), np.concatenate(b), 50.0, seed, n_boot=400)
        holds_values += lo <= 1.0 <= hi
    assert holds_rounds / n_runs >= 0.85 and holds_values / n_runs <= 0.7, (holds_rounds, holds_values)


def test_ratio_ci95_is_deterministic_and_refuses_too_few():
    rng = np.random.default_rng(3)
    a = [rng.gamma(3.0, 1.0, 100) for _ in range(4)]
    b = [rng.gamma(3.0, 1.0, 80) for _ in range(3)]
    whole = ratio_ci95(a, b, 99.0, seed=5)
    assert whole == ratio_ci95(a, b, 99.0, seed=5) and whole != ratio_ci95(a, b, 99.0, seed=6)
    assert ratio_ci95([np.r_[a[0], np.nan, np.inf], *a[1:]], b, 99.0, seed=5) == whole   # non-finite ignored
    assert ratio_ci95(a, b[:2], 99.0) is None                      # under MIN_ROUNDS rounds
    assert ratio_ci95(a, [b[0], [], b[1]], 99.0) is None           # an empty round is no round
    assert ratio_ci95(a, [x[:6] for x in b], 99.0) is None         # 18 values: too few
    assert ratio_ci95(a, [np.zeros(50)] * 3) is None


def test_ratio_ci_table_uses_each_peers_rounds():
    rng = np.random.default_rng(2)
    base = [rng.gamma(4.0, 1.0, 100) for _ in range(4)]
    res = {"stimloop": {"_rounds_s": [(2 * x).tolist() for x in base]},
           "x": {"_rounds_s": [x.tolist() for x in base]}, "y": {"skipped": "why"},
           "one_round": {"_rounds_s": [np.concatenate(base).tolist()]}}
    t = ratio_ci_table(res)["stimloop"]
    assert set(t) == {"x", "one_round"} and set(t["x"]) == {"p50", "p99"}
    assert t["x"]["p50"][0] < 2.0 < t["x"]["p50"][1]
    assert t["one_round"] == {"p50": None, "p99": None}


def test_rounds_for_gives_about_5_s_rounds_and_at_least_three():
    from controller.bench.peers.harness import rounds_for
    assert [rounds_for(d) for d in (1.0, 2.5, 3.0, 10.0, 60.0, 600.0)] == [1, 1, 3, 3, 12, 20]


def test_outlet_spec_errors_name_field_and_range():
    with pytest.raises(ValueError, match=r"fs_hz=0.*expected 1.0\.\.100000"):
        check_spec({"fs_hz": 0})
    with pytest.raises(ValueError, match=r"pulse_channel=9.*0\.\.7"):
        check_spec({"n_channels": 8, "pulse_channel": 9})
    with pytest.raises(ValueError, match="unknown field"):
        check_spec({"rate": 3})


def test_bad_scenario_and_duration_are_refused():
    with pytest.raises(ValueError, match=r"scenario\(s\) \['nope'\] unknown"):
        run_suite(2.0, ["nope"], peers=False)
    with pytest.raises(ValueError, match=r"duration_s=0\.1 invalid, expected 1\.\.3600"):
        run_suite(0.1, ["throughput"], peers=False)
    from controller.bench.cli import app
    res = CliRunner().invoke(app, ["--scenario", "nope", "--no-peers"])
    assert res.exit_code != 0 and "nope" in res.output


def test_seizure_loop_without_model_is_skipped(tmp_path):
    from controller.bench.seizure_loop import run
    r = run(2.0, model_path=tmp_path / "missing.onnx")
    assert r == {"skipped": "no model", "model_path": str(tmp_path / "missing.onnx")}


def test_machine_info_and_cpu_meter_on_real_process():
    info = machine_info()
    assert info["cores"] == os.cpu_count() and "pylsl" in info
    c0 = cpu_seconds(os.getpid())
    meter = CpuMeter({"self": os.getpid(), "gone": 2 ** 22 + 12345}).start()
    x = 0
    for i in range(300_000):   # burn a little CPU so the meter has something to see
        x += i
    pct = meter.stop()
    assert cpu_seconds(os.getpid()) >= c0 and pct["self"] >= 0 and pct["gone"] is None


def test_markdown_and_strip_raw():
    doc = {"machine": {"cpu_model": "cpu", "cores": 2}, "settings": {"duration_s": 1},
           "scenarios": {"s": {"end_to_end_ms": stats_ms([0.001, 0.002]), "stages_ms": {"a": stats_ms([0.001])},
                               "_raw_s": {"a": [0.001]}, "dropped_samples": 0, "deadline_misses": 0}},
           "peers": {"t": {"skipped": "no venv"}}, "throughput": {}}
    md = markdown(doc)
    assert "| s | a |" in md and "| s | end_to_end |" in md and "skipped: no venv" in md
    assert "_raw_s" not in json.dumps(strip_raw(doc)) and "_raw_s" in doc["scenarios"]["s"]


@pytest.mark.timeout(120)
def test_peers_run_in_rounds_and_pool_them():
    from controller.bench.peers.harness import run_peers
    with pytest.raises(ValueError, match="rounds=0 invalid"):
        run_peers(2.0, ["pylsl_floor"], rounds=0)
    with pytest.raises(ValueError, match="rounds=3 invalid"):
        run_peers(2.0, ["pylsl_floor"], rounds=3)   # under 1 s per round
    res = run_peers(4.0, ["pylsl_floor"], rounds=2)
    r = res["peers"]["pylsl_floor"]
    assert res["stream"]["rounds"] == 2 and r["rounds"] == 2 and len(r["per_round_p99_ms"]) == 2
    assert len(r["_rounds_s"]) == 2 and sum(len(x) for x in r["_rounds_s"]) == r["end_to_end_ms"]["n"]
    # ~10 pulses/s over two 2 s rounds (the first 0.2 s of each is not scored), pooled: every pulse is
    # either detected (one latency each) or missed, and each round found some. How many are missed is a
    # measurement, not a test: a pulse whose output is stamped more than MATCH_WINDOW_S after its nominal
    # time is missed, and a loaded machine starves the peer or the stamper that long (CI once saw 1 of 36;
    # with two busy loops beside it, up to 33 of 36).
    assert r["pulses"] >= 25 and r["detected"] + r["missed"] == r["pulses"] and r["end_to_end_ms"]["n"] == r["detected"]
    assert all(len(x) > 0 for x in r["_rounds_s"]), r


@pytest.mark.timeout(60)
def test_throughput_point_closes_its_reader_before_the_outlet(capfd):
    """The outlet outlives the acquisition: no liblsl "transmission broke off" error on the user's terminal."""
    from controller.bench.throughput import run_point
    r = run_point(8, duration_s=0.5)
    assert r["pushed_samples"] > 0 and r["dropped_samples"] == 0
    err = capfd.readouterr().err
    assert "broke off" not in err and "ERR|" not in err, err[-500:]
