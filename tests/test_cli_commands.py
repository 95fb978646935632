"""The CLI's benchmark and comparison commands run and write well-formed JSON (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


def _cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_bench_inference_json(tmp_path):
    out = tmp_path / "inf.json"
    _cli("bench", "inference", "--n-calls", "500", "--json", str(out))
    res = json.loads(out.read_text())
    assert set(res) == {"seizure_v1", "plasticity_v1"}
    for r in res.values():
        assert r["calls"] == 500 and 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]


def test_sim_bench_json(tmp_path):
    out = tmp_path / "sim.json"
    _cli("sim", "bench", "--duration", "30", "--channels", "4", "--json", str(out))
    res = json.loads(out.read_text())
    # The figures are those of a session that ran: 30 s of 4 channels recorded, speed-up = simulated / wall.
    from controller.acquisition import load_raw
    x, ts = load_raw(Path(res["session"]) / "raw")
    assert x.shape == (int(30 * res["fs_hz"]), 4) and ts[-1] - ts[0] == pytest.approx(30 - 1 / res["fs_hz"])
    assert res["speedup"] == pytest.approx(30 / res["wall_s"], rel=0.05)


def test_sim_compare_small_cohort(tmp_path):
    out = tmp_path / "cmp.json"
    r = _cli("sim", "compare", "--patients", "2", "--duration", "240", "--rate", "30", "--channels", "2",
             "--out", str(tmp_path / "cmp"), "--json", str(out))
    res = json.loads(out.read_text())
    s = res["summary"]
    assert set(s) == {"none", "responsive", "periodic"}
    assert s["none"]["charge_uc_total"] == 0
    # Charge-matched open loop: within one burst of the closed loop's charge per patient.
    for row in res["rows"]:
        closed, periodic = row["arms"]["responsive"]["charge_uc"], row["arms"]["periodic"]["charge_uc"]
        assert abs(periodic - closed) <= 96.0 + 1e-9
    assert s["none"]["seizures_total"] >= 1
    assert "no seizure in any patient" not in r.stdout


def test_sim_compare_too_short_to_see_a_seizure_says_why(tmp_path):
    """100 s per patient: the first spontaneous seizure cannot come before min_interval_s (120 s). A table
    of zeros would compare nothing; the note says why and what to change."""
    r = _cli("sim", "compare", "--patients", "1", "--duration", "100", "--channels", "2", "--out", str(tmp_path))
    text = " ".join(r.stdout.split())
    assert "no seizure in any patient's 100 s" in text and "at least 120 s after the start" in text
    assert "Lengthen --duration" in text


def test_sim_compare_ads(tmp_path):
    out = tmp_path / "ads.json"
    _cli("sim", "compare-ads", "--duration", "10", "--json", str(out))
    res = json.loads(out.read_text())
    ads, rnd = res["ads (spike-triggered)"], res["random (matched rate)"]
    assert ads["n_pulses"] > 0 and abs(rnd["rate_hz"] - ads["rate_hz"]) < 0.5 * ads["rate_hz"] + 0.5
    assert ads["delta_w"] > rnd["delta_w"]  # pairing potentiates; random at the same rate does not


def _cli_fails(*args, timeout=120):
    r = subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode != 0, r.stdout[-3000:]
    return " ".join(r.stderr.split())   # rich may wrap long messages


def test_config_validate_refuses_a_simulator_stream_the_model_cannot_take(tmp_path):
    """`config validate` used to say ok for a simulator rate the session refuses at start-up."""
    cfg = tmp_path / "slow.toml"
    cfg.write_text("[simulator]\nfs_hz = 60.0\n")
    err = _cli_fails("config", "validate", str(cfg))
    assert "simulator.fs_hz = 60" in err and "stream rate 60 Hz is below the 100 Hz model seizure_v1.1" in err
    # the refusal the session itself gives, which validate now gives first
    assert "stream rate 60 Hz is below the 100 Hz model seizure_v1.1" in _cli_fails("sim", "-c", str(cfg), "-d", "2")


def test_config_validate_checks_the_simulator_channels_against_the_models_contract(tmp_path):
    import onnx

    from controller.inference import CONTRACT_KEY, read_contract
    from models.seizure.evaluate import default_model_path

    # the shipped model takes any channel count: a copy whose contract fixes 4 channels
    m = onnx.load(str(default_model_path()))
    c = read_contract(default_model_path()).model_copy(update={"n_channels": 4})
    for prop in m.metadata_props:
        if prop.key == CONTRACT_KEY:
            prop.value = c.to_json()
    model = tmp_path / "four.onnx"
    onnx.save(m, str(model))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n\n[simulator]\nn_channels = 16\n\n[policy]\nkind = "periodic"\n')
    err = _cli_fails("config", "validate", str(cfg))
    assert "simulator.n_channels = 16" in err and "model seizure_v1.1 needs 4 channels, the stream has 16" in err
    cfg.write_text(f'[model]\npath = "{model}"\n\n[simulator]\nn_channels = 4\n\n[policy]\nkind = "periodic"\n')
    assert _cli("config", "validate", str(cfg)).stdout.startswith("ok")
