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
    assert 0 <= s["p50"] <= s["p99"] <= s["max"]
    assert r["threshold_uv"] > 0 and r["baseline_sigma_uv"] > 0


def test_loopback_errors_name_the_value():
    with pytest.raises(ValueError, match=r"n_triggers=0 invalid, expected 1\.\.10000"):
        measure("/dev/null", "x", 0, n_triggers=0)
    with pytest.raises(ValueError, match=r"interval_s=0\.001 invalid"):
        measure("/dev/null", "x", 0, interval_s=0.001)
    with pytest.raises(ValueError, match=r"peer\(s\) \['bonsai'\] unknown"):
        run_peers(2.0, ["bonsai"])
