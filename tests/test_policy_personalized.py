"""PersonalizedFrequencyPolicy: IPF estimate (synthetic 1/f + alpha, real Delhi EEG), refusal, tACS schedule."""

import numpy as np
import pytest
import scipy.io

from controller.actuator import Actuator
from controller.events import EventKind
from controller.policies.base import Policy
from controller.policies.personalized import PersonalizedFrequencyPolicy, estimate_ipf
from controller.safety import SafetyGovernor
from controller.safety.profiles import TES
from drivers.params import StimParams, Waveform
from drivers.simulated import SimulatedStimulator

from shared_data import DELHI  # noqa: E402
FS = 250.0
TACS = StimParams(waveform=Waveform.SINE, amplitude_ua=1000.0, frequency_hz=10.0, duration_s=60.0, ramp_s=10.0)


def pink(n, rng):
    """1/f (power) noise, unit variance."""
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / FS)
    f[0] = f[1]
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return x / x.std()


def synthetic(seconds, alpha_uv, seed, f_hz=10.3):
    rng = np.random.default_rng(seed)
    n = int(seconds * FS)
    t = np.arange(n) / FS
    return (20 * pink(n, rng) + alpha_uv * np.sin(2 * np.pi * f_hz * t + rng.uniform(0, 2 * np.pi))).astype(np.float32)


def delhi(name):
    folder = name.rstrip("0123456789")
    return scipy.io.loadmat(DELHI / folder / f"{name}.mat")[folder].ravel()


def feed(pol, x, t0=0.0, chunk=37, extra_s=0.0, fs=FS):
    """Feed x in chunks (t = time of the chunk's last sample + 1/fs), then step on without data."""
    reqs, events = [], []
    for a in range(0, len(x), chunk):
        b = min(a + chunk, len(x))
        r, e = pol.step(x[a:b, None], t0 + b / fs)
        reqs += r
        events += e
    t = t0 + len(x) / fs
    for tt in np.arange(t, t + extra_s, 0.5)[1:]:
        r, e = pol.step(None, float(tt))
        reqs += r
        events += e
    return reqs, events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipf_on_synthetic_one_over_f_plus_alpha(seed):
    est = estimate_ipf(synthetic(60, 6.0, seed), FS)
    assert est["accepted"], est
    assert abs(est["ipf_hz"] - 10.3) < 0.25
    assert est["peak_db"] > 3.0 and est["prominence_db"] > 1.0 and est["confidence_z"] > 3.0


@pytest.mark.parametrize("f_hz", [7.8, 9.1, 12.6])
def test_ipf_tracks_other_frequencies(f_hz):
    est = estimate_ipf(synthetic(60, 6.0, 5, f_hz=f_hz), FS)
    assert est["accepted"] and abs(est["ipf_hz"] - f_hz) < 0.25


def test_pure_one_over_f_has_no_clear_peak():
    for seed in range(3):
        est = estimate_ipf(20 * pink(int(60 * FS), np.random.default_rng(seed)), FS)
        assert not est["accepted"] and est["ipf_hz"] is not None and est["reason"] != "clear_peak"


def test_policy_estimates_then_schedules_tacs_at_ipf():
    pol = PersonalizedFrequencyPolicy(FS, baseline_s=60.0, stim=TACS, period_s=120.0, n_bursts=3)
    assert isinstance(pol, Policy)
    x = synthetic(70, 6.0, 0)     # 10 s more than the baseline: ignored
    reqs, events = feed(pol, x, t0=100.0, extra_s=400.0)
    est = [e for e in events if e.data.get("what") == "ipf_estimate"]
    assert len(est) == 1 and est[0].kind is EventKind.DECISION
    # the baseline is counted in samples: complete at the chunk holding sample 60*FS
    assert est[0].t == pytest.approx(100.0 + 15022 / FS)
    assert est[0].data["accepted"] and est[0].data["stimulation"] == "scheduled"
    assert est[0].data["baseline_start_t"] == pytest.approx(100.0 + 1 / FS)   # the first chunk's first sample
    ipf = est[0].data["ipf_hz"]
    assert abs(ipf - 10.3) < 0.25 and pol.ipf_hz == ipf
    assert est[0].data["confidence_db"] == est[0].data["peak_db"] > 3.0
    # n_bursts=3 tACS bursts at the IPF, every 120 s from the end of the baseline
    assert len(reqs) == 3
    assert all(r.params.waveform is Waveform.SINE and r.params.frequency_hz == ipf for r in reqs)
    assert all(r.params.amplitude_ua == 1000.0 and r.params.ramp_s == 10.0 for r in reqs)
    due = [r.meta["due_t"] for r in reqs]
    assert np.allclose(np.diff(due), 120.0) and due[0] == est[0].t


def test_policy_refuses_without_clear_peak_and_never_stimulates():
    pol = PersonalizedFrequencyPolicy(FS, baseline_s=30.0, stim=TACS, period_s=120.0)
    x = (20 * pink(int(30 * FS), np.random.default_rng(9))).astype(np.float32)
    reqs, events = feed(pol, x, extra_s=600.0)
    est = [e for e in events if e.data.get("what") == "ipf_estimate"]
    assert reqs == [] and len(est) == 1
    assert est[0].data["accepted"] is False and est[0].data["stimulation"] == "refused"
    assert pol.ipf_hz is None


def with_discharge(x, start_s, stop_s, f_hz=13.0, uv=150.0):
    """x plus a rhythmic high-amplitude discharge (a seizure's rhythm) over [start_s, stop_s)."""
    y = x.astype(np.float64)
    a, b = int(start_s * FS), int(stop_s * FS)
    y[a:b] += uv * np.sin(2 * np.pi * f_hz * np.arange(b - a) / FS)
    return y


def overlapping(start_s, stop_s, n_segments, segment_s=2.0):
    """Start times of the 50 %-overlap segments that share samples with [start_s, stop_s)."""
    starts = np.arange(n_segments) * segment_s / 2
    return set(starts[(starts + segment_s > start_s) & (starts < stop_s)].tolist())


def test_a_seizure_in_the_baseline_is_left_out_of_the_estimate():
    """Six seconds of a 13 Hz discharge in a 30 s baseline take the peak when every segment is
    averaged; the segment screen leaves them out and finds the resting 10.3 Hz again."""
    x = with_discharge(synthetic(30, 6.0, 3), 20.0, 26.0)
    unscreened = estimate_ipf(x, FS, max_segment_excess_db=60.0)
    assert unscreened["n_segments_rejected"] == 0 and abs(unscreened["ipf_hz"] - 13.0) < 0.3
    est = estimate_ipf(x, FS)
    assert est["accepted"] and abs(est["ipf_hz"] - 10.3) < 0.25, est
    assert est["n_segments"] + est["n_segments_rejected"] == 29
    rejected = set(est["rejected_segments_s"])
    assert {20.0, 21.0, 22.0, 23.0, 24.0} <= rejected <= overlapping(20.0, 26.0, 29)
    # the standard error follows the segments kept: a shorter clean baseline needs a taller peak
    assert est["noise_db"] == pytest.approx(10 * np.log10(np.e) / np.sqrt(est["n_segments"]))


def test_a_baseline_mostly_seizure_is_refused_and_never_stimulates():
    pol = PersonalizedFrequencyPolicy(FS, baseline_s=30.0, stim=TACS, period_s=120.0)
    x = with_discharge(synthetic(30, 6.0, 4), 8.0, 30.0).astype(np.float32)
    reqs, events = feed(pol, x, extra_s=600.0)
    (est,) = [e.data for e in events if e.data.get("what") == "ipf_estimate"]
    assert reqs == [] and pol.ipf_hz is None
    assert not est["accepted"] and est["stimulation"] == "refused"
    assert est["reason"].startswith("baseline_not_clean: ") and "of 29 segments" in est["reason"], est["reason"]
    from controller.report import ipf_text
    assert ipf_text(est).startswith("none, stimulation refused: baseline_not_clean: ")
    assert est["n_segments"] < 29 / 2


def test_a_dropout_in_the_baseline_costs_only_its_segments():
    """NaN samples (a lost packet a source passed through) reject the segments holding them."""
    x = synthetic(30, 6.0, 5).astype(np.float64)
    x[int(10.2 * FS):int(10.7 * FS)] = np.nan
    est = estimate_ipf(x, FS)
    assert est["accepted"] and abs(est["ipf_hz"] - 10.3) < 0.25
    assert set(est["rejected_segments_s"]) == overlapping(10.2, 10.7, 29) == {9.0, 10.0}
    assert estimate_ipf(np.full(int(10 * FS), np.nan), FS)["reason"] == "non_finite_or_zero_spectrum"


def test_real_delhi_interictal_segment_has_an_alpha_peak():
    """Real scalp EEG (5.12 s at 200 Hz): a clear peak, stable across Welch resolutions."""
    x = delhi("interictal25")
    est = estimate_ipf(x, 200.0)
    assert est["n_segments"] == 4 and est["noise_db"] > 2.0  # short segment: a taller peak is required
    assert est["accepted"], est
    assert 7.0 < est["ipf_hz"] < 14.0
    other = estimate_ipf(x, 200.0, segment_s=2.56)
    assert other["accepted"] and abs(other["ipf_hz"] - est["ipf_hz"]) < 0.25
    # the policy, fed the same segment in chunks, finds the same peak and schedules stimulation
    pol = PersonalizedFrequencyPolicy(200.0, baseline_s=5.12, stim=TACS, period_s=120.0)
    reqs, events = feed(pol, x.astype(np.float32), chunk=50, fs=200.0)
    assert pol.ipf_hz == pytest.approx(est["ipf_hz"], abs=1e-9)
    assert len(reqs) == 1 and reqs[0].params.frequency_hz == pol.ipf_hz


def test_real_delhi_ictal_segment_without_alpha_peak_is_refused():
    """Real ictal segment whose 7-14 Hz maximum sits on the band edge: the no-clear-peak path."""
    x = delhi("ictal1")
    est = estimate_ipf(x, 200.0)
    assert not est["accepted"] and est["reason"] == "peak_on_search_band_edge"
    pol = PersonalizedFrequencyPolicy(200.0, baseline_s=5.12, stim=TACS, period_s=120.0)
    reqs, events = feed(pol, x.astype(np.float32), chunk=50, fs=200.0, extra_s=300.0)
    assert reqs == [] and [e.data["stimulation"] for e in events] == ["refused"]


def test_tacs_at_ipf_passes_the_tes_governor_and_reaches_the_device():
    clock = type("Clock", (), {"t": 0.0, "__call__": lambda self: self.t})()
    drv = SimulatedStimulator(clock=clock)
    act = Actuator(SafetyGovernor(TES, drv.capabilities), drv, clock)
    act.open()
    act.set_impedance(2000.0)
    pol = PersonalizedFrequencyPolicy(FS, baseline_s=60.0, stim=TACS, period_s=120.0, n_bursts=2)
    x = synthetic(60, 6.0, 1)
    kinds = []
    for a in range(0, len(x), 250):
        clock.t = (a + 250) / FS
        act.heartbeat()
        for r in pol.step(x[a:a + 250, None], clock.t)[0]:
            kinds += [e.kind for e in act.submit(r)]
    for tt in np.arange(61.0, 300.0, 0.5):
        clock.t = float(tt)
        act.heartbeat()
        for r in pol.step(None, clock.t)[0]:
            kinds += [e.kind for e in act.submit(r)]
        act.poll()
    assert EventKind.REFUSAL not in kinds
    assert [round(t, 6) for t, _ in drv.delivered] == [60.0, 180.0]
    assert all(p.frequency_hz == pol.ipf_hz for _, p in drv.delivered)


@pytest.mark.parametrize("kw, needle", [
    (dict(stim=StimParams(amplitude_ua=100.0)), "expected sine"),
    (dict(baseline_s=1.0), "baseline_s=1.0"),
    (dict(period_s=10.0), "period_s=10.0"),
    (dict(search_band_hz=(7.0, 60.0)), "search_band_hz"),
    (dict(n_bursts=0), "n_bursts=0"),
    (dict(max_segment_excess_db=0.0), "max_segment_excess_db=0.0"),
    (dict(min_clean_fraction=1.5), "min_clean_fraction=1.5"),
])
def test_bad_parameters_are_named(kw, needle):
    args = dict(fs_hz=FS, baseline_s=60.0, stim=TACS, period_s=120.0)
    args.update(kw)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        PersonalizedFrequencyPolicy(**args)


@pytest.mark.parametrize("alpha_uv, onsets_s", [(15.0, [45.0, 90.0]), (0.0, [45.0, 90.0]), (15.0, [10.0, 30.0])])
def test_the_example_session_finds_the_simulated_patients_alpha(tmp_path, alpha_uv, onsets_s):
    """examples/personalized.toml in simulated time: the patient's 10.5 Hz rhythm (simulator.alpha_uv)
    is found within the estimate's 0.5 Hz resolution and every tACS burst runs at it. Without the
    rhythm the Wendling background has no clear peak, and the session does not stimulate. A seizure
    from 10 s, inside the 20 s baseline, is screened out (it set the frequency to 13.7 Hz before)."""
    import json
    from pathlib import Path

    from controller.config import load_config
    from controller.runners.simulated import run_simulated

    example = Path(__file__).resolve().parent.parent / "examples" / "personalized.toml"
    cfg = load_config(example, {"session": {"duration_s": 70.0, "out_dir": str(tmp_path)},
                                "simulator": {"alpha_uv": alpha_uv, "seizure_onsets_s": onsets_s}})
    session = run_simulated(cfg, session_dir=tmp_path / "s", write_report=False)
    events = [json.loads(line) for line in open(session / "events.jsonl")]
    (est,) = [e for e in events if e.get("what") == "ipf_estimate"]
    cmds = [e for e in events if e["kind"] == "command" and e.get("op") == "trigger"]
    # interictal spikes (4/min) cost a segment or two; a seizure from 10 s most of the segments after it
    in_seizure = [s for s in est["rejected_segments_s"] if s >= 9.0]
    assert len(in_seizure) >= 5 if onsets_s[0] < 20.0 else est["n_segments_rejected"] <= 3, est
    # the session summary says what set the frequency, or why there was none
    from controller.metrics import compute_metrics
    from controller.report import ipf_text
    ipf = compute_metrics(session)["ipf_estimate"]
    assert ipf["ipf_hz"] == est["ipf_hz"] and ipf["after_start_s"] == pytest.approx(20.0, abs=0.1)
    text = ipf_text(ipf)
    if alpha_uv:
        n = est["n_segments"]
        assert text == f"{est['ipf_hz']:.2f} Hz, {est['peak_db']:.1f} dB above 1/f, {n} of 19 baseline segments clean"
    else:
        assert text == f"none, stimulation refused: {est['reason']}"
    if alpha_uv:
        assert est["accepted"] and abs(est["ipf_hz"] - 10.5) <= 0.5, est
        assert len(cmds) == 2 and all(c["params"]["frequency_hz"] == est["ipf_hz"] for c in cmds)
    else:
        assert not est["accepted"] and est["stimulation"] == "refused" and cmds == [], est
