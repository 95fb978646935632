"""stimloop bench loopback on the simulator: real HIL process, emulator on a pty, LSL stream, governor."""
from __future__ import annotations

import pytest

from controller.bench.loopback import measure, run_simulated
from controller.bench.peers import run_peers


@pytest.mark.timeout(90)
def test_simulated_loopback_detects_every_artifact_after_the_command():
    r = run_simulated(n_triggers=4, interval_s=0.3)
    assert r["simulated"] and r["triggers"] == 4 and r["refused"] == 0 and r["faults"] == []
    assert r["detected"] + r["missed"] == 4 and r["detected"] >= 3
    s = r["command_to_artifact_ms"]
    # The artifact sample can never precede the command; it lands within a few sample periods.
    assert 0 <= s["p50"] <= s["max"]
    assert s["p99"] is None and s["n"] == r["detected"]   # 3-4 values: too few for a p99 (stats_ms)
    assert r["threshold_uv"] > 0 and r["baseline_sigma_uv"] > 0


def test_loopback_errors_name_the_value():
    with pytest.raises(ValueError, match=r"n_triggers=0 invalid, expected 1\.\.10000"):
        measure("/dev/null", "x", 0, n_triggers=0)
    with pytest.raises(ValueError, match=r"interval_s=0\.001 invalid"):
        measure("/dev/null", "x", 0, interval_s=0.001)
    with pytest.raises(ValueError, match=r"peer\(s\) \['bonsai'\] unknown"):
        run_peers(2.0, ["bonsai"])


@pytest.fixture
def no_simulator(monkeypatch):
    """A sentinel in place of the simulated run: these arguments must be refused before it starts."""
    from controller.bench import loopback
    started = []
    monkeypatch.setattr(loopback, "run_simulated", lambda *a, **k: started.append(1))
    return started


@pytest.mark.parametrize("args, hint, expect", [
    (["--n", "0"], "--n", "0 invalid, expected 1..10000"),
    (["--interval", "0"], "--interval", "0.0 invalid, expected 0.05..600 s"),
    (["--channel", "99"], "--channel", "99 invalid, the simulator streams channels 0..15"),
    (["--channel", "-1"], "--channel", "-1 invalid"),
])
def test_loopback_cli_refuses_bad_values_before_starting(no_simulator, args, hint, expect):
    from typer.testing import CliRunner

    from controller.bench.cli import app
    res = CliRunner().invoke(app, ["loopback", *args])
    said = " ".join(res.output.replace("│", " ").split())   # rich wraps the message in a box
    assert res.exit_code == 2 and hint in said and expect in said, res.output
    assert "Traceback" not in res.output and not no_simulator


def test_setup_timeflux_failure_is_one_line(monkeypatch):
    from typer.testing import CliRunner

    from controller.bench.cli import app
    monkeypatch.setenv("STIMLOOP_TIMEFLUX_VENV", "/proc/nope")
    res = CliRunner().invoke(app, ["setup-timeflux"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    said = " ".join(res.output.split())
    assert "setup-timeflux failed" in said and "/proc/nope" in said
    assert "Traceback" not in res.output and "CalledProcessError" not in res.output


@pytest.mark.timeout(90)
def test_loopback_cli_says_when_the_simulator_clamps_the_interval(tmp_path):
    import json

    from typer.testing import CliRunner

    from controller.bench.cli import app
    res = CliRunner().invoke(app, ["loopback", "--n", "2", "--interval", "1.5", "--json", str(tmp_path / "l.json")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "--interval 1.5 s clamped to 0.4 s" in " ".join(res.output.split())
    r = json.loads((tmp_path / "l.json").read_text())["loopback"]
    assert r["simulated"] and r["triggers"] == 2
