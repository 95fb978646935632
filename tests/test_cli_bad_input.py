"""Bad input on the command line: a one-line error and exit 2, never a traceback, and nothing lost.

Each case was a traceback, an exit 0 on failure, or data overwritten (an audit of every command's
arguments, 2026-12-08). The command runs as users run it: ``python -m controller.cli`` is the
``stimloop`` entry point (``controller.cli.main``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "controller.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, "COLUMNS": "200"})


def _refused(r, *needles):
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    for n in needles:
        assert n in out, out
    return out


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    base = tmp_path_factory.mktemp("sessions")
    r = _cli("sim", "--duration", "10", "--out", base)
    assert r.returncode == 0, r.stderr
    return next(base.iterdir())


def test_export_never_overwrites_the_sessions_own_files(session, tmp_path):
    s = tmp_path / "s"
    shutil.copytree(session, s)
    before = (s / "raw" / "samples.f32").read_bytes()
    _refused(_cli("export", s, "--out", s / "raw" / "samples.f32"), "is the session's own raw/samples.f32")
    assert (s / "raw" / "samples.f32").read_bytes() == before
    _refused(_cli("export", s, "--out", tmp_path), "is a folder")           # was a traceback and a .tmp left
    assert not list(tmp_path.glob("*.tmp"))


def test_report_and_export_need_a_session_folder_and_name_what_is_damaged(session, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a session")
    for cmd in ("report", "export"):   # report wrote empty metrics into it, exit 0
        _refused(_cli(cmd, other), "has no events.jsonl: not a stimloop session folder")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    s = tmp_path / "s"
    shutil.copytree(session, s)
    metrics = (s / "metrics.json").read_text()
    (s / "ground_truth.json").write_text("nope")
    _refused(_cli("report", s), "ground_truth.json: not JSON")
    assert (s / "metrics.json").read_text() == metrics                    # the good metrics are kept
    (s / "raw" / "meta.json").write_text("[1]")
    _refused(_cli("export", s), "meta.json: expected a JSON object, got list")


def test_paths_the_system_refuses_are_one_line_errors(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    _refused(_cli("sim", "--duration", "5", "--out", a_file), "a file stands where a folder must go")
    _refused(_cli("keys", "--dir", a_file), "a file stands where a folder must go")
    # An output file checked before the work it is to hold (a cohort simulated, then a traceback).
    _refused(_cli("sim", "compare-ads", "--duration", "5", "--json", tmp_path), "--json", "is a folder")
    _refused(_cli("evaluate", "--sim-patients", "100", "--json", tmp_path / "no" / "x.json"), "does not exist")


def test_config_files_that_are_no_toml_text(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\x00\xf2\xff\x10garbage")
    _refused(_cli("config", "validate", binary), "not a TOML text file (not UTF-8")
    _refused(_cli("config", "validate", tmp_path), "is not a file")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[session]\nduration_s = 5\n")          # as some Windows editors save it
    r = _cli("config", "validate", bom)
    assert r.returncode == 0, r.stderr


def test_control_addresses_and_keys(tmp_path):
    out = _refused(_cli("stop", "--address", "garbage"), "cannot use the control address 'garbage'")
    assert "STIMULATION STATE UNKNOWN" in out                             # the stop's warning is kept
    _refused(_cli("ctl", "status", "--keys", tmp_path / "none.key_secret", "--server-key", tmp_path / "none.key"),
             "control keys", "does not exist")
    _refused(_cli("ctl", "bogus"), "unknown command 'bogus'")
    _refused(_cli("monitor", "--address", "garbage", "--duration", "1"), "ZeroMQ refused the address")


def test_model_files_that_are_no_model(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("not a model")
    _refused(_cli("plasticity", "curves", "--model", text, "--out", tmp_path / "c.png"), "is not a plasticity surrogate")
    seizure = ROOT / "models" / "seizure" / "seizure_v1.onnx"
    _refused(_cli("plasticity", "evaluate", "--model", seizure), "is not a plasticity surrogate")
    _refused(_cli("evaluate", "-m", text, "--sim-patients", "100"), "not an ONNX model onnxruntime can load")


@pytest.mark.parametrize("args, needle", [
    (["evaluate", "--sim-patients", "100", "--sim-hours", "nan"], "--sim-hours"),
    (["evaluate", "--sim-patients", "100", "--threshold", "2"], "--threshold"),
    (["evaluate", "--sim-patients", "1-100000000"], "more than 10000 patients"),   # never ended
    (["sim", "compare", "--patients", "0"], "--patients"),
    (["sim", "compare-ads", "--duration", "0.001"], "--duration"),                  # ZeroDivisionError
    (["sim", "compare-ads", "--duration", "inf"], "--duration"),
    (["evaluate", "--segments", ROOT, "--segments-fs", "200", "--sensitivity"], "not --segments (they were ignored)"),
    (["hil", "--duration", "-1"], "--duration"),                                    # "running for -1 s", exit 0
    (["monitor", "--duration", "nan"], "--duration"),
    # An option of a source or device the session does not use was ignored without a word.
    (["run", "--stream", "MyAmp", "--duration", "5"], "--stream is for --source lsl, and the session's source is 'hil'"),
    (["run", "--port", "/dev/ttyACM0", "--duration", "5"], "--port is for --device serial"),
])
def test_values_that_cannot_be_right_are_refused_before_any_work(args, needle):
    _refused(_cli(*args, timeout=60), needle)


def test_segments_none_of_which_fit_the_model_fail(tmp_path):
    """Every segment "not evaluated" printed an empty table and exit 0 (recordings in the same case: 1)."""
    import numpy as np
    for cls in ("ictal", "interictal"):
        (tmp_path / "seg" / cls).mkdir(parents=True)
        np.save(tmp_path / "seg" / cls / "a.npy", np.zeros(50, np.float32))   # 0.25 s: shorter than a window
    r = _cli("evaluate", "--segments", tmp_path / "seg", "--segments-fs", "200")
    assert r.returncode == 2 and "none of the 2 segments could be evaluated" in " ".join(r.stderr.split()), \
        r.stdout + r.stderr
    assert "Traceback" not in r.stderr
