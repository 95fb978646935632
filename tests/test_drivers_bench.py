"""The serial benchmark command runs end to end (a smoke run, no timing asserted)."""
from __future__ import annotations

import json

import pytest

from drivers import bench_serial

pytestmark = pytest.mark.realtime


@pytest.mark.parametrize("inproc", [True, False])
def test_bench_serial_writes_consistent_json(tmp_path, inproc, capsys):
    out = tmp_path / "b.json"
    assert bench_serial.main(["--json", str(out), "--n", "10"] + (["--inproc"] if inproc else [])) == 0
    res = json.loads(out.read_text())
    assert res["emulator"] == ("thread" if inproc else "process")
    for key in ("trigger_rtt_us", "heartbeat_rtt_us", "host_to_device_us"):
        s = res[key]
        assert s["n"] == 10 and 0 < s["p50"] <= s["p99"] <= s["max"]
    assert res["scheduled_lateness_us"]["n"] + res["scheduled_too_late"] == 2
    assert "trigger_rtt_us" in capsys.readouterr().out


def test_bench_serial_rejects_bad_n(tmp_path):
    with pytest.raises(SystemExit):
        bench_serial.main(["--json", str(tmp_path / "x.json"), "--n", "0"])
