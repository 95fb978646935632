"""Config errors through the CLI: policies that cannot be built, safety overrides, one message format."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import ConfigError, parse_config
from controller.keys import KeyPairExists, make_keys

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "COLUMNS": "400"}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd)


def _write(tmp_path, text, name="c.toml"):
    f = tmp_path / name
    f.write_text(text)
    return f


# Configs that pass the field checks but whose policy refuses its settings when it is built.
UNBUILDABLE = [
    ('[policy]\nkind = "adaptive"\n[policy.adaptive]\nmode = "dual"\nthresholds = [0.5]\n',
     '[policy.adaptive]', "thresholds=[0.5] invalid for mode='dual'"),
    # A second threshold in single mode was dropped without a word.
    ('[policy]\nkind = "adaptive"\n[policy.adaptive]\nmode = "single"\nthresholds = [0.5, 0.6]\n',
     '[policy.adaptive]', "thresholds=[0.5, 0.6] invalid for mode='single', expected 1 value(s)"),
    ('[policy]\nkind = "adaptive"\n[policy.adaptive]\nbiomarker = "band_power"\nband_hz = [30.0, 8.0]\n',
     '[policy.adaptive]', "band=(30.0, 8.0) invalid"),
    ('[safety]\nprofile = "tes"\n[device]\nimpedance_ohm = 1500.0\n[policy]\nkind = "personalized"\n'
     '[policy.stim]\nwaveform = "sine"\namplitude_ua = 1000.0\nfrequency_hz = 10.0\nduration_s = 30.0\n'
     'ramp_s = 10.0\n',
     '[policy.personalized]', "period_s=15.0 invalid"),
]


@pytest.mark.parametrize("toml, section, why", UNBUILDABLE)
def test_validate_builds_the_policy_and_names_its_sections(tmp_path, toml, section, why):
    r = _cli("config", "validate", str(_write(tmp_path, toml)))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert "\n" not in line, line                       # one line, also when the terminal is narrow
    assert "policy.kind =" in line and section in line and why in line, line


def test_sim_and_run_refuse_an_unbuildable_policy_before_starting(tmp_path):
    cfg = _write(tmp_path, UNBUILDABLE[0][0])
    out = tmp_path / "sessions"
    for cmd in (["sim", "-c", str(cfg), "-d", "2", "--out", str(out)],
                ["run", "-c", str(cfg), "-d", "2", "--out", str(out)]):
        r = _cli(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "thresholds=[0.5] invalid for mode='dual'" in r.stderr, r.stderr
    assert not out.exists()                              # refused before any session folder


def test_one_line_error_in_a_narrow_terminal(tmp_path):
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "validate",
                        str(_write(tmp_path, UNBUILDABLE[0][0]))],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "60"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_validate_reports_field_errors_and_the_safety_refusal_in_one_round(tmp_path):
    """A typo'd field and an unsafe override in one file: both are reported at once (the safety check
    runs on the rest, the failed field at its default), not the second only after the first is fixed."""
    f = _write(tmp_path, '[session]\nduration_s = -3\n[safety]\nprofile = "tes"\n[safety.overrides]\n'
                         'hard_max_amplitude_ua = 10000\nmax_amplitude_ua = 10000\n'
                         '[policy]\nkind = "adaptive"\n[policy.adaptive]\nmode = "dual"\nthresholds = [0.5]\n')
    r = _cli("config", "validate", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "1 problem(s)" in r.stderr and "session.duration_s = -3" in r.stderr
    assert "with those fields at their defaults" in r.stderr and "hard_max_amplitude_ua=10000.0" in r.stderr
    assert "tES <= 4000.0" in r.stderr
    # The policy is built even though the safety check refused: it reads the config, not the profile.
    assert "thresholds=[0.5] invalid for mode='dual'" in r.stderr
    # `run` still stops at the first problem, before anything starts
    r = _cli("run", "-c", str(f), "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "session.duration_s = -3" in r.stderr and not (tmp_path / "s").exists()


def test_a_field_error_does_not_hide_the_checks_across_sections(tmp_path):
    """Pydantic runs the whole-config checks only on valid fields: a bad seed hid a heartbeat too slow for
    the watchdog, a bad ADS rate hid four settings the spiking simulator refuses."""
    r = _cli("config", "validate", str(_write(tmp_path, '[session]\nseed = -1\n[device]\nheartbeat_s = 0.4\n')))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = " ".join(r.stderr.split())
    assert "session.seed = -1" in err and "with those fields at their defaults" in err
    assert "device.heartbeat_s = 0.4 s is more than device.watchdog_s / 3" in err
    ads = ('[simulator]\nmodel = "spiking"\nfs_hz = 8000.0\nn_channels = 4\nchunk_s = 0.01\n[policy]\n'
           'kind = "random"\n[policy.ads]\ntrigger_channels = [0, 1]\nrate_hz = {rate}\n[policy.stim]\n'
           'waveform = "monophasic"\n[safety]\nprofile = "macro"\n')
    r = _cli("config", "validate", str(_write(tmp_path, ads.format(rate=40.0), "ads.toml")))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "rate_hz must be < 35.71 Hz" in err, err
    assert "with those fields at their defaults, " in err and "4 problem(s)" in err and "chunk_s = 0.01" in err
    # The same checks without a field error: counted one by one, said once.
    r = _cli("config", "validate", str(_write(tmp_path, ads.format(rate=5.0), "ads2.toml")))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "4 problem(s)" in err and "at their defaults" not in err, err
    assert err.count("simulator.fs_hz = 8000") == 1


def test_external_stream_policy_is_checked_without_the_stream(tmp_path):
    # A band far above the simulator's Nyquist is fine for an LSL source: its rate is known only at start.
    high = '[source]\nkind = "lsl"\n[policy]\nkind = "adaptive"\n[policy.adaptive]\nbiomarker = "band_power"\n'
    r = _cli("config", "validate", str(_write(tmp_path, high + "band_hz = [300.0, 1000.0]\n")))
    assert r.returncode == 0, r.stderr
    assert "lsl stream's rate and channels are checked when the session starts" in r.stdout
    # ... but what does not depend on the stream is still refused.
    r = _cli("config", "validate", str(_write(tmp_path, high + "band_hz = [30.0, 8.0]\n", "bad.toml")))
    assert r.returncode == 2 and "band=(30.0, 8.0) invalid" in r.stderr, r.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_validates(example):
    r = _cli("config", "validate", str(example))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("overrides, expected", [
    ("max_amplitud = 2000.0", "safety.overrides.max_amplitud: unknown field, did you mean max_amplitude_ua?"),
    ('max_amplitude_ua = "big"', "safety.overrides.max_amplitude_ua = 'big': Input should be a valid number"),
])
def test_bad_safety_overrides_are_named_by_their_path(tmp_path, overrides, expected):
    r = _cli("config", "validate", str(_write(tmp_path, f"[safety]\noverrides = {{ {overrides} }}\n")))
    assert r.returncode == 2
    assert expected in r.stderr, r.stderr
    assert "validation error for SafetyProfile" not in r.stderr and "errors.pydantic.dev" not in r.stderr


@pytest.mark.parametrize("data, expected", [
    ({"policy": {"threshold_on": 0.3, "threshold_off": 0.6}},
     "policy = {'threshold_on': 0.3, 'threshold_off': 0.6}: threshold_off (0.6) must be <= threshold_on (0.3)"),
    ({"faults": [{"kind": "nan_burst", "at_s": 1.0, "duration_s": 0.5},
                 {"kind": "saturation", "at_s": 4.0, "duration_s": 1.0}]},
     "faults.1 = {'kind': 'saturation', 'at_s': 4.0, 'duration_s': 1.0}: fault kind='saturation' at_s=4.0: "
     "missing level_uv"),
    ({"faults": [{"kind": "nan_burst", "at_s": 4.0, "duration_s": 1.0, "level": 3}]},
     "faults.0.level: unknown field, did you mean level_uv? (docs/faults.md lists the fields of each kind)"),
    ({"policy": {"stim": {"amplitud_ua": 1.0}}}, "policy.stim.amplitud_ua: unknown field, did you mean amplitude_ua?"),
])
def test_cross_field_errors_keep_the_format(data, expected):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert expected in str(exc.value)
    assert "Value error" not in str(exc.value)


def test_bench_ads_help_is_the_full_option_list():
    r = _cli("bench", "ads", "--help")
    assert r.returncode == 0, r.stderr
    for option in ("--busy-poll", "--seed", "--out", "--duration", "--no-warm"):
        assert option in r.stdout, option
    r = _cli("bench", "telemetry", "--help")
    assert r.returncode == 0 and "--rounds" in r.stdout and "--hwm" in r.stdout


def test_keys_exists_message_speaks_to_each_caller(tmp_path):
    make_keys(tmp_path, "alice")
    with pytest.raises(KeyPairExists, match="pass overwrite=True") as exc:
        make_keys(tmp_path, "alice")
    assert isinstance(exc.value, FileExistsError) and exc.value.name == "alice"
    r = _cli("keys", "--dir", str(tmp_path), "--name", "alice")
    assert r.returncode == 2
    assert "use --overwrite to replace it" in r.stderr and "overwrite=True" not in r.stderr, r.stderr
    r = _cli("keys", "--dir", str(tmp_path), "--name", "../x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "key name '../x' is invalid" in r.stderr


def test_a_heartbeat_slower_than_the_watchdog_allows_is_refused_before_a_session(tmp_path):
    cfg = _write(tmp_path, "[device]\nheartbeat_s = 1.0\nwatchdog_s = 0.5\n")
    out = tmp_path / "sessions"
    for cmd in (["config", "validate", str(cfg)], ["sim", "-c", str(cfg), "-d", "2", "--out", str(out)]):
        r = _cli(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        assert "device.heartbeat_s = 1 s is more than device.watchdog_s / 3" in r.stderr, r.stderr
    assert not out.exists()


def test_run_names_the_streams_sharing_a_name_and_takes_the_source_id_flag(tmp_path):
    """Two outlets of one name: `stimloop run --stream` refuses, listing both; `--source-id` reaches
    the resolve (here an id neither has: the error names it)."""
    import uuid

    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl
    name = f"stimloop-twins-{uuid.uuid4().hex[:8]}"
    a = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 512, "float32", "amp-A"))
    b = pylsl.StreamOutlet(pylsl.StreamInfo(name, "EEG", 4, 512, "float32", "amp-B"))
    cfg = _write(tmp_path, '[source]\nresolve_timeout_s = 2.0\n')
    try:
        common = ("run", "-c", str(cfg), "--source", "lsl", "--stream", name, "--device", "simulated",
                  "--duration", "2", "--out", str(tmp_path))
        r = _cli(*common)
        assert r.returncode != 0
        assert f"2 LSL streams named '{name}'" in r.stderr and "'amp-A'" in r.stderr and "'amp-B'" in r.stderr
        r = _cli(*common, "--source-id", "amp-C")
        assert r.returncode != 0 and f"no LSL stream named '{name}' with source_id 'amp-C'" in r.stderr, r.stderr
    finally:
        del a, b


def test_sim_refuses_a_fault_only_real_time_can_inject_before_any_folder(tmp_path):
    """It was a traceback (exit 1) after the session folder was made (docs/faults.md, "Refused at start-up")."""
    f = _write(tmp_path, '[[faults]]\nkind = "stream_stall"\nat_s = 5.0\nduration_s = 2.0\n')
    r = _cli("sim", "-c", str(f), "--duration", "10", "--out", str(tmp_path / "s"))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "[[faults]]: simulated runner cannot inject fault kind(s) stream_stall" in err and "`stimloop run`" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("port_args, why", [(["--port", "/dev/stimloop-no-such-port"], "device.port /dev/stimloop-no-such-port not found"),
                                            ([], "device.kind = serial needs device.port")])
def test_run_refuses_a_serial_port_that_is_not_there_before_starting_anything(tmp_path, port_args, why):
    """Both were refused only after the simulator had started, with a session folder left behind."""
    r = _cli("run", "--device", "serial", *port_args, "--duration", "5", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and why in " ".join(r.stderr.split()), r.stderr
    assert "simulator:" not in r.stdout and not (tmp_path / "s").exists()
