"""The spike_triggered_session scenario runs the ADS session users run (examples/ads.toml)."""
from pathlib import Path

import pytest

from controller.bench.spike_session import N_CHANNELS, session_config
from controller.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_scenario_runs_examples_ads_at_the_suites_channel_count(tmp_path):
    bench = session_config(7.0, tmp_path)
    example = load_config(EXAMPLES / "ads.toml", {"simulator": {"n_channels": N_CHANNELS}})
    # What the bench sets of its own: length, folder, a private stream name and free ports.
    for section in ("simulator", "ring", "policy", "safety", "device"):
        assert getattr(bench, section) == getattr(example, section), section
    assert bench.session.duration_s == 7.0 and bench.session.out_dir == str(tmp_path)
    assert bench.source.stream != example.source.stream and bench.source.busy_poll is False
    assert bench.session.nice == example.session.nice   # the suite's default is the session's


def test_the_scenario_refuses_a_too_short_run():
    from controller.bench.spike_session import run_spike_session
    with pytest.raises(ValueError, match="duration_s=0.5 invalid"):
        run_spike_session(0.5)
