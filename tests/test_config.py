"""Config: defaults run the demo; errors name field, value and allowed range; TOML round trip."""
import subprocess
import sys
import tomllib

import pytest

from controller.config import DEFAULTS_PATH, Config, ConfigError, load_config, parse_config


def test_defaults_file_equals_built_in_defaults():
    assert load_config(DEFAULTS_PATH) == Config()


def test_errors_name_field_value_and_range():
    with pytest.raises(ConfigError) as exc:
        parse_config({"source": {"resolve_timeout_s": -1, "kind": "serial"},
                      "policy": {"stim": {"amplitude_ua": 1e9}}, "bogus": 1})
    msg = str(exc.value)
    assert "4 problem(s)" in msg
    assert "source.resolve_timeout_s = -1" in msg and "allowed range: > 0, <= 120" in msg
    assert "policy.stim.amplitude_ua = 1000000000.0" in msg and "<= 20000" in msg
    assert "source.kind = 'serial'" in msg and "'hil', 'lsl' or 'brainflow'" in msg
    assert "bogus: unknown field" in msg


def test_a_missing_field_is_named_not_shown_as_the_table_around_it():
    with pytest.raises(ConfigError) as exc:
        parse_config({"faults": [{"kind": "nan_burst"}]})
    msg = str(exc.value)
    assert "faults.0.at_s: missing, it is required" in msg and "{'kind'" not in msg, msg


def test_hysteresis_must_be_ordered():
    with pytest.raises(ConfigError, match="threshold_off .* must be <= threshold_on"):
        parse_config({"policy": {"threshold_on": 0.3, "threshold_off": 0.6}})


def test_malformed_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[session\nduration_s = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_errors_say_whether_overrides_were_applied(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[session]\nduration_s = 3\n")
    with pytest.raises(ConfigError, match=r"^defaults \+ overrides: 1 problem\(s\)\n  - session.duration_s = -3.0"):
        load_config(None, {"session": {"duration_s": -3.0}})       # what `stimloop run --duration -3` passes
    with pytest.raises(ConfigError, match=rf"^{good} \+ overrides: 1 problem"):
        load_config(good, {"session": {"duration_s": -3.0}})


def test_config_files_layer_in_order(tmp_path):
    """A lab's device file under an experiment's: tables merge key by key, a later value or array
    replaces the earlier one, and errors name every file in order."""
    lab = tmp_path / "lab.toml"
    lab.write_text('[device]\nkind = "serial"\nport = "/dev/ttyUSB0"\nbaudrate = 115200\n'
                   '[[faults]]\nkind = "nan_burst"\nat_s = 5.0\nduration_s = 1.0\n')
    exp = tmp_path / "exp.toml"
    exp.write_text('[device]\nbaudrate = 1000000\n[session]\nduration_s = 12.0\n'
                   '[[faults]]\nkind = "stream_stall"\nat_s = 3.0\nduration_s = 1.0\n')
    cfg = load_config([lab, exp])
    assert (cfg.device.kind, cfg.device.port, cfg.device.baudrate) == ("serial", "/dev/ttyUSB0", 1_000_000)
    assert cfg.session.duration_s == 12.0
    assert [f.kind for f in cfg.faults] == ["stream_stall"]     # an array is replaced, not appended to
    assert load_config([exp, lab]).device.baudrate == 115200    # order matters
    assert load_config([lab]) == load_config(lab)
    bad = tmp_path / "bad.toml"
    bad.write_text("[session]\nduration_s = -1\n")
    with pytest.raises(ConfigError, match=rf"^{lab} \+ {bad}: 1 problem\(s\)\n  - session.duration_s = -1"):
        load_config([lab, bad])
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_config([lab, tmp_path / "nope.toml"])


def test_cli_takes_repeated_config_files(tmp_path):
    """`-c a -c b` layers b on a (click keeps only the last of a repeated single option, silently)."""
    lab = tmp_path / "lab.toml"
    lab.write_text('[device]\nimpedance_ohm = 1200.0\n')
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "examples" / "personalized.toml"
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "show", "-c", str(example), "-c", str(lab)],
                       capture_output=True, text=True, check=True)
    shown = tomllib.loads(r.stdout)
    assert shown["policy"]["kind"] == "personalized" and shown["device"]["impedance_ohm"] == 1200.0
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "validate", str(example), str(lab)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"ok {example} + {lab}"), (r.stdout, r.stderr)


def test_to_toml_round_trip():
    cfg = parse_config({"session": {"duration_s": 12.5}, "simulator": {"seizure_onsets_s": [1.0, 2.0]},
                        "source": {"board_params": {"serial_port": "/dev/ttyUSB0"}}})
    again = parse_config(tomllib.loads(cfg.to_toml()))
    assert again == cfg


def test_cli_config_validate_refuses_unsafe_profile(tmp_path):
    f = tmp_path / "tes10.toml"
    f.write_text('[safety]\nprofile = "tes"\n[safety.overrides]\nhard_max_amplitude_ua = 10000\n'
                 'max_amplitude_ua = 10000\n')
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "validate", str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "hard_max_amplitude_ua" in r.stderr and "4000" in r.stderr
    ok = tmp_path / "ok.toml"
    ok.write_text("[session]\nduration_s = 5\n")
    r = subprocess.run([sys.executable, "-m", "controller.cli", "config", "validate", str(ok)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("toml, expected", [
    ('[safety]\nprofile = "micro"\n[safety.overrides]\nrequire_charge_balanced = false\n', "charge-balanced"),
    ('[safety]\nprofile = "micro"\n[policy.stim]\nwaveform = "monophasic"\n', "not charge-balanced"),
    ('[safety]\nprofile = "tes"\n[safety.overrides]\nmax_amplitude_ua = 10000\n', "4000"),
])
def test_unsafe_configs_are_refused_at_start_up_with_the_rule(tmp_path, toml, expected):
    f = tmp_path / "unsafe.toml"
    f.write_text(toml)
    for cmd in (["config", "validate", str(f)], ["sim", "--config", str(f), "--duration", "2"]):
        r = subprocess.run([sys.executable, "-m", "controller.cli", *cmd], capture_output=True, text=True,
                           env={**__import__("os").environ, "COLUMNS": "400"})
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert expected in r.stderr, r.stderr


def test_device_connect_timeout_reaches_the_serial_driver():
    from controller.loop import make_driver
    cfg = parse_config({"device": {"kind": "serial", "port": "/dev/ttyACM0", "connect_timeout_s": 5.5}})
    drv = make_driver(cfg, cfg.device.port, lambda: 0.0)   # built, not opened
    assert drv.connect_timeout_s == 5.5 and drv.timeout_s == cfg.device.timeout_ms / 1e3
    with pytest.raises(ConfigError, match=r"device.connect_timeout_s = -1"):
        parse_config({"device": {"connect_timeout_s": -1}})


def test_source_busy_poll_reaches_the_source_it_builds():
    from controller.runners.realtime import source_spec
    from controller.sources import build_source
    for kind, extra in (("lsl", {}), ("brainflow", {"board_id": -1})):
        cfg = parse_config({"source": {"kind": kind, "busy_poll": True, **extra}})
        spec = source_spec(cfg, "a-stream")
        assert spec["busy_poll"] is True
        assert build_source(spec).busy_poll is True   # built, not opened
    assert source_spec(parse_config({}), "a-stream")["busy_poll"] is False   # default: block, spend no core
    with pytest.raises(ConfigError, match=r"source.busy_poll"):
        parse_config({"source": {"busy_poll": "sometimes"}})


def test_only_the_built_in_simulator_is_read_without_time_correction():
    """The simulator stamps with this machine's clock (offset 0: an estimate would only add its
    error); any other LSL stream may come from another machine and is corrected."""
    from controller.runners.realtime import source_spec
    from controller.sources import build_source
    for kind, corrected in (("hil", False), ("lsl", True)):
        spec = source_spec(parse_config({"source": {"kind": kind}}), "a-stream")
        assert spec["time_correction"] is corrected
        assert build_source(spec).time_correction is corrected   # built, not opened


def test_heartbeat_must_come_within_a_third_of_the_watchdog():
    """heartbeat_s = 1.0 with watchdog_s = 0.5 passed validation, and the device then stopped between two
    heartbeats: a device_watchdog fault latched for the rest of the session (drivers/PROTOCOL.md §7)."""
    with pytest.raises(ConfigError) as exc:
        parse_config({"device": {"heartbeat_s": 1.0, "watchdog_s": 0.5}})
    msg = str(exc.value)
    assert "device.heartbeat_s = 1 s is more than device.watchdog_s / 3 = 0.1667 s" in msg
    assert "PROTOCOL.md §7" in msg
    parse_config({"device": {"heartbeat_s": 0.1, "watchdog_s": 0.3}})      # exactly a third (float-rounded)
    parse_config({"device": {"heartbeat_s": 1.0, "watchdog_s": 3.0}})
    # A serial device reports its own watchdog at HELLO (checked when the session starts); watchdog_s
    # only sets the emulator's.
    parse_config({"device": {"kind": "serial", "port": "/dev/ttyACM0", "heartbeat_s": 1.0, "watchdog_s": 0.5}})
    # The in-process simulated device has no watchdog at all: watchdog_s does not apply to it.
    parse_config({"device": {"kind": "simulated", "heartbeat_s": 0.3, "watchdog_s": 0.5}})


def test_heartbeat_must_be_below_the_profiles_heartbeat_timeout():
    for kind in ("hil", "serial"):
        with pytest.raises(ConfigError, match=r"device.heartbeat_s = 2 s is not below the safety profile's "
                                              r"heartbeat_timeout_s = 2 s \(safety.profile = \"macro\"\)"):
            parse_config({"device": {"kind": kind, "heartbeat_s": 2.0, "watchdog_s": 10.0}})
    parse_config({"device": {"heartbeat_s": 1.9, "watchdog_s": 10.0}})
    with pytest.raises(ConfigError, match=r"heartbeat_timeout_s = 0.5 s"):
        parse_config({"device": {"heartbeat_s": 0.5, "watchdog_s": 10.0},
                      "safety": {"overrides": {"heartbeat_timeout_s": 0.5}}})
    parse_config({"device": {"heartbeat_s": 5.0, "watchdog_s": 30.0},      # no heartbeat rule in the profile
                  "safety": {"overrides": {"heartbeat_timeout_s": None}}})


def test_the_spike_detection_band_is_set_from_the_config_and_can_be_turned_off():
    from controller.policy_drive import build_spike_drive

    def ads(**ads_fields):   # an ADS session on the spiking simulator (examples/ads.toml's settings)
        return parse_config({"policy": {"kind": "ads", "ads": ads_fields}, "safety": {"profile": "micro"},
                             "simulator": {"model": "spiking", "fs_hz": 30_000.0, "chunk_s": 0.001}})
    on = build_spike_drive(ads(), 30_000.0, 4)
    off = build_spike_drive(ads(band_hz=[]), 30_000.0, 4)
    assert on.detector.band_hz == (300.0, 3000.0) and off.detector.band_hz is None
    for bad in ([3000.0, 300.0], [300.0], [300.0, 3000.0, 6000.0]):
        with pytest.raises(ConfigError, match=r"policy\.ads.*band_hz"):
            parse_config({"policy": {"ads": {"band_hz": bad}}})
    # Above Nyquist: refused, naming the setting, when the stream's rate is known; [] or a lower band work.
    with pytest.raises(ValueError, match=r"policy\.ads\.band_hz = \[300\.0, 3000\.0\].*2500 Hz at 5000 Hz"):
        build_spike_drive(ads(), 5_000.0, 4)
    assert build_spike_drive(ads(band_hz=[]), 5_000.0, 4).detector.band_hz is None
    assert build_spike_drive(ads(band_hz=[300.0, 2000.0]), 5_000.0, 4).detector.band_hz == (300.0, 2000.0)
