"""stimloop bench blame: a benchmark's slowest blocks against a scheduler trace (perf sched timehist -w)."""
import json

from typer.testing import CliRunner

from controller.bench.cli import app
from controller.bench.sched_blame import (ALL_IDLE_LABEL, IDLE_LABEL, LONG_TURN, SPREAD_LABEL, blame, idle_cause,
                                         parse_timehist, summarize)

# The layout `perf sched timehist -w` prints (header, switch lines, wake-up lines); times in s, durations in ms.
# CPU 0: the simulator thread 201 is woken at 100.0010 and waits 3.0 ms while the CPU shows idle (the
# host did not run the vCPU). CPU 1: the controller (pid 100) is woken at 100.0100 and waits 1.5 ms
# behind kdamond.
TIMEHIST = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
  100.000500 [0000]  python3[201/200]                    0.100      0.010      0.200 
  100.001000 [0001]  python3[202/200]                                              awakened: python3[201/200]
  100.004000 [0000]  <idle>                              0.000      0.000      3.500 
  100.004100 [0000]  python3[201/200]                    3.500      3.000      0.100 
  100.010000 [0001]  swapper                                                       awakened: stimloop[100]
  100.011600 [0001]  kdamond.0[107]                      500.000      0.010      1.700 
  100.011800 [0001]  stimloop[100]                       1.600      1.500      0.200 
  100.020500 [0000]  stimloop[100]                       0.100      0.100      0.300 
  100.030000 [0000]  <idle>                              0.000      0.000      9.500 
  100.030000 [0001]  <idle>                              0.000      0.000     18.200 
"""
ROLES = {100: "controller", 200: "simulator"}


def test_parse_timehist_reads_switch_lines_only():
    sw = parse_timehist(TIMEHIST)
    assert [s.task for s in sw] == ["python3[201/200]", "<idle>", "python3[201/200]", "kdamond.0[107]",
                                    "stimloop[100]", "stimloop[100]", "<idle>", "<idle>"]
    s = sw[2]
    assert (s.cpu, s.comm, s.pid, s.sch_delay_ms, s.run_ms) == (0, "python3", 200, 3.0, 0.1)
    assert abs(s.t_in - 100.0040) < 1e-9 and abs(s.t_woken - 100.0010) < 1e-9
    assert sw[3].pid == 107 and sw[1].pid is None   # a single-threaded task; the idle task has none
    assert parse_timehist("no trace here\n") == []


def test_blame_names_what_held_the_cpu():
    sw = parse_timehist(TIMEHIST)
    windows = [{"push_t": 100.0005, "done_t": 100.0045, "ms": 4.0},    # the simulator's wait on an idle vCPU
               {"push_t": 100.0095, "done_t": 100.0120, "ms": 2.5},    # the controller's wait behind kdamond
               {"push_t": 100.0200, "done_t": 100.0208, "ms": 0.8}]    # nothing waited 0.3 ms here
    res = blame(sw, windows, ROLES, min_wait_ms=0.3)
    assert res[0]["main"] == IDLE_LABEL
    (w,) = res[0]["waits"]
    assert w["role"] == "simulator (python3)" and w["cpu"] == 0 and w["waited_ms"] == 3.0
    assert w["blockers"][0][0] == IDLE_LABEL and abs(w["blockers"][0][1] - 3.0) < 1e-6
    assert res[1]["main"] == "kdamond.0"
    assert res[1]["waits"][0]["role"] == "controller (stimloop)" and abs(res[1]["waits"][0]["blockers"][0][1] - 1.5) < 1e-6
    assert res[2]["main"] == SPREAD_LABEL and res[2]["waits"] == []
    assert res[2]["turns"][0][:3] == ["controller (stimloop)", 0, 0.3]
    # A wait shorter than the floor is no wait; then a turn covering most of the window is named.
    (long,) = blame(sw, windows[1:2], ROLES, min_wait_ms=2.0)
    assert long["waits"] == [] and long["main"] == LONG_TURN + "kdamond.0"
    # No one waited and every CPU sat idle: what the block needed was not woken in time.
    (quiet,) = blame(sw, [{"push_t": 100.021, "done_t": 100.029, "ms": 8.0}], ROLES)
    assert quiet["main"] == ALL_IDLE_LABEL and quiet["turns"] == []
    # Overlapping slow blocks are one episode, named after its slowest block.
    queued = {"push_t": 100.0010, "done_t": 100.0046, "ms": 3.6, "waits": [], "main": SPREAD_LABEL}
    s = summarize(res + [queued])
    assert s["blocks"] == {IDLE_LABEL: 1, "kdamond.0": 1, SPREAD_LABEL: 2}
    assert s["episodes"] == {IDLE_LABEL: 1, "kdamond.0": 1, SPREAD_LABEL: 1}


HELD = "cpu_dma_latency 0 µs held"   # LowLatency's status when the request is held


def _bench_json(path, blocks, pids=None, machine=None):
    path.write_text(json.dumps({"machine": machine or {"virtualized": True, "low_latency": HELD},
                                "scenarios": {"spike_triggered": {
                                    "slowest_blocks": blocks, "pids": pids or {"controller": 100, "simulator": 200}}}}))
    return path


def test_idle_cause_follows_the_machine():
    assert f"idle CPU ({idle_cause(True, HELD)})" == IDLE_LABEL
    assert "low-latency mode off" in idle_cause(True, "off") and "host" in idle_cause(True, None)
    assert "low-latency mode off" in idle_cause(False, "unavailable: permission denied")
    assert "host" not in idle_cause(False, HELD)


def test_blame_command_prints_and_writes(tmp_path):
    th = tmp_path / "timehist.txt"
    th.write_text(TIMEHIST)
    bj = _bench_json(tmp_path / "bench.json", [{"push_t": 100.0095, "done_t": 100.0120, "ms": 2.5},
                                                {"push_t": 100.0005, "done_t": 100.0045, "ms": 4.0}])
    res = CliRunner().invoke(app, ["blame", "--timehist", str(th), "--json", str(bj), "--out", str(tmp_path / "b.json")],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "kdamond.0" in res.output and "2 episode(s), 2 block(s)" in res.output
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["scenarios"]["spike_triggered"]["summary"]["episodes"] == {"kdamond.0": 1, IDLE_LABEL: 1}
    # Without low-latency mode an idle CPU was halted: its wake-up is the cause, not only the host.
    off = _bench_json(tmp_path / "off.json", [{"push_t": 100.0005, "done_t": 100.0045, "ms": 4.0}],
                      machine={"virtualized": False, "low_latency": "off"})
    res = CliRunner().invoke(app, ["blame", "--timehist", str(th), "--json", str(off)], terminal_width=200)
    assert res.exit_code == 0 and "CPU waking from an idle state: low-latency mode off" in res.output


def test_blame_command_says_what_is_wrong(tmp_path):
    th = tmp_path / "timehist.txt"
    th.write_text(TIMEHIST)
    runner = CliRunner()
    # Blocks from another clock (perf without -k CLOCK_MONOTONIC) or another run: said, not guessed at.
    far = _bench_json(tmp_path / "far.json", [{"push_t": 5000.0, "done_t": 5000.003, "ms": 3.0}])
    res = runner.invoke(app, ["blame", "--timehist", str(th), "--json", str(far)], terminal_width=200)
    assert res.exit_code == 1 and "CLOCK_MONOTONIC" in res.output
    # A bench JSON without slowest blocks (a seizure-only run, an older version).
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"scenarios": {"seizure_loop": {"end_to_end_ms": {}}}}))
    res = runner.invoke(app, ["blame", "--timehist", str(th), "--json", str(bare)], terminal_width=200)
    assert res.exit_code == 1 and "no scenario with slowest_blocks" in res.output
    # Not a timehist file.
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    ok = _bench_json(tmp_path / "ok.json", [{"push_t": 100.0005, "done_t": 100.0045, "ms": 4.0}])
    res = runner.invoke(app, ["blame", "--timehist", str(junk), "--json", str(ok)], terminal_width=200)
    assert res.exit_code == 1 and "no context-switch lines" in res.output
    res = runner.invoke(app, ["blame", "--timehist", str(tmp_path / "absent.txt"), "--json", str(ok)])
    assert res.exit_code == 1 and "cannot read" in res.output
    res = runner.invoke(app, ["blame", "--timehist", str(th), "--json", str(ok), "--scenario", "seizure_loop"],
                        terminal_width=200)
    assert res.exit_code == 1 and "seizure_loop" in res.output
