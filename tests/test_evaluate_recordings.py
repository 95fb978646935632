"""stimloop evaluate: loaders (real EDF+ via edfio, .npz), bad input messages, NaN stretches, JSON layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.seizure.evaluate import EvaluationError, OnnxDetector, default_model_path, evaluate_recording, summarize
from models.seizure.recordings import RecordingError, load_edf, load_npz, load_recording

MODEL = default_model_path()


def test_shipped_model_is_present():
    # Tracked in git: a missing file is a failure, never a reason to skip the evaluation tests.
    assert MODEL.is_file(), f"shipped seizure model {MODEL} is missing (it is tracked in git: restore it)"


@pytest.fixture(scope="module")
def sim_recording():
    """Held-out cohort patient 110 (never trained on), 512 Hz x 2 ch, two scheduled seizures."""
    from models.seizure.dataset import SimSpec, simulate_patient

    spec = SimSpec(patient_index=110, seed=11, duration_s=260.0, fs_hz=512.0, n_channels=2, onsets_s=(30.0, 190.0),
                   spontaneous=False)
    x, seizures = simulate_patient(spec)
    return x, seizures


def _write_npz(path, x, fs, seizures=None, **extra):
    kw = {"data": x.T, "fs": fs, **extra}
    if seizures is not None:
        kw["onsets"] = [a for a, _ in seizures]
        kw["offsets"] = [b for _, b in seizures]
    np.savez(path, **kw)
    return path


def test_npz_loader_layout_and_errors(tmp_path, sim_recording):
    x, sz = sim_recording
    rec = load_npz(_write_npz(tmp_path / "a.npz", x, 512.0, sz))
    assert rec.data_uv.shape == x.shape and rec.fs_hz == 512.0 and np.allclose(rec.seizures, sz)
    rec = load_npz(_write_npz(tmp_path / "b.npz", x, 512.0))
    assert rec.seizures is None
    np.savez(tmp_path / "c.npz", data=x.T)
    with pytest.raises(RecordingError, match=r"c.npz: .*'fs'"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", data=x.T, fs=512.0, onsets=[10.0, 20.0], offsets=[15.0])
    with pytest.raises(RecordingError, match="onsets \\(2\\) and offsets \\(1\\)"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", data=x.T, fs=512.0, onsets=[10.0], offsets=[5.0])
    with pytest.raises(RecordingError, match="expected 0 <= onset < offset"):
        load_npz(tmp_path / "e.npz")
    # Not a zip: numpy takes it for a pickle and says "allow_pickle=True", advice never to follow here.
    (tmp_path / "g.npz").write_text("1,2\n")
    with pytest.raises(RecordingError, match=r"g.npz: not a .npz file") as err:
        load_npz(tmp_path / "g.npz")
    assert "pickle" not in str(err.value)
    np.savez(tmp_path / "h.npz", data=np.array([{"a": 1}], dtype=object), fs=512.0)   # a traceback before
    with pytest.raises(RecordingError, match=r"h.npz: cannot read as .npz \(ValueError: Object arrays"):
        load_npz(tmp_path / "h.npz")
    with pytest.raises(RecordingError, match="unsupported file type '.csv'"):
        (tmp_path / "f.csv").write_text("1,2\n")
        load_recording(tmp_path / "f.csv")
    with pytest.raises(RecordingError, match="does not exist"):
        load_recording(tmp_path / "missing.edf")


def test_edf_plus_annotations_and_units(tmp_path):
    import edfio

    fs = 256.0
    n = int(60 * fs)
    rng = np.random.default_rng(0)
    sig_mv = rng.normal(0, 0.05, n)  # 50 µV written in mV: the loader must convert
    edf = edfio.Edf([edfio.EdfSignal(sig_mv, fs, label="EEG T3", physical_dimension="mV"),
                     edfio.EdfSignal(rng.normal(0, 1, n // 256), 1.0, label="temp", physical_dimension="degC")],
                    annotations=[edfio.EdfAnnotation(10.0, 12.5, "Seizure"),
                                 edfio.EdfAnnotation(30.0, None, "sz start"),
                                 edfio.EdfAnnotation(41.0, None, "sz end"),
                                 edfio.EdfAnnotation(50.0, None, "interictal spike")])
    path = tmp_path / "rec.edf"
    edf.write(path)
    rec = load_edf(path)
    assert rec.fs_hz == fs and rec.n_channels == 1 and rec.channel_names == ["EEG T3"]
    assert np.std(rec.data_uv) == pytest.approx(50.0, rel=0.05)
    assert np.allclose(rec.seizures, [(10.0, 22.5), (30.0, 41.0)], atol=1e-3)
    assert any("temp" in note for note in rec.notes)


def test_seizures_from_a_csv_beside_a_recording_that_has_none(tmp_path, sim_recording):
    """CHB-MIT-style: the EDF carries no annotations, its seizures sit in a table. ``rec.seizures.csv``
    beside ``rec.edf`` gives them (header and comments allowed), to the loader, so to ``stimloop
    evaluate`` and ``train --recording`` alike; the CLI then scores the held-out patient's seizures."""
    import edfio
    import subprocess
    import sys

    x, sz = sim_recording
    path = tmp_path / "chb.edf"
    edfio.Edf([edfio.EdfSignal(x[:, k].astype(np.float64), 512.0, label=f"EEG {k}", physical_dimension="uV")
               for k in range(x.shape[1])]).write(path)
    assert load_recording(path).seizures is None                        # no annotations in the file
    side = tmp_path / "chb.seizures.csv"
    side.write_text("# from the summary file\nonset_s,offset_s\n" + "".join(f"{a},{b}\n" for a, b in sz))
    rec = load_recording(path)
    assert np.allclose(rec.seizures, sz, atol=1e-6) and any("chb.seizures.csv" in n for n in rec.notes)
    out = tmp_path / "ev.json"
    r = subprocess.run([sys.executable, "-m", "controller.cli", "evaluate", str(path), "--json", str(out),
                        "--no-windows"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    event = json.loads(out.read_text())["recordings"][0]["metrics"]["event"]
    assert event["n_seizures"] == 2 and event["n_detected"] == 2   # held-out patient 110: both found
    side.write_text("")                                                  # annotated: no seizure
    assert load_recording(path).seizures == []
    side.write_text("onset_s,offset_s\n10,20\n30 to 40\n")
    with pytest.raises(RecordingError, match=r"chb.seizures.csv, line 3: '30 to 40' is not 'onset_s,offset_s'"):
        load_recording(path)
    side.write_text("10,20\n99999,100000\n")
    with pytest.raises(RecordingError, match="after the end of the recording"):
        load_recording(path)


CHB_SUMMARY = """Data Sampling Rate: 256 Hz
*************************

Channels in EDF Files:
**********************
Channel 1: FP1-F7
Channel 2: F7-T7

File Name: chb01_01.edf
File Start Time: 11:42:54
File End Time: 12:42:54
Number of Seizures in File: 0

File Name: chb01_03.edf
File Start Time: 13:43:04
File End Time: 14:43:04
Number of Seizures in File: 1
Seizure Start Time: {a1} seconds
Seizure End Time: {b1} seconds

File Name: chb06_01.edf
Number of Seizures in File: 2
Seizure 1 Start Time: 1724 seconds
Seizure 1 End Time: 1738 seconds
Seizure 2 Start Time:  7461 seconds
Seizure 2 End Time: 7476 seconds

File Name: chb24_01.edf
Number of Seizures in File: 2
Seizure Start Time: 480 seconds
Seizure End Time: 505 seconds
Seizure Start Time: 2451 seconds
Seizure End Time: 2476 seconds
"""


def test_chbmit_summary_gives_the_seizures_of_the_files_it_lists(tmp_path, sim_recording):
    """CHB-MIT keeps seizure times in chbNN-summary.txt beside its EDFs, in three styles (plain, numbered,
    chb24's repeated pairs). A summary naming the EDF gives its seizures; a CSV sidecar still wins."""
    import edfio

    from models.seizure.recordings import read_chbmit_summary

    x, sz = sim_recording
    (a1, b1) = (round(sz[0][0]), round(sz[0][1]))
    summary = tmp_path / "chb01-summary.txt"
    summary.write_text(CHB_SUMMARY.format(a1=a1, b1=b1))
    listed = read_chbmit_summary(summary)
    assert listed == {"chb01_01.edf": [], "chb01_03.edf": [(a1, b1)],
                      "chb06_01.edf": [(1724.0, 1738.0), (7461.0, 7476.0)],
                      "chb24_01.edf": [(480.0, 505.0), (2451.0, 2476.0)]}
    for name in ("chb01_03.edf", "chb01_01.edf", "chb01_99.edf"):
        edfio.Edf([edfio.EdfSignal(x[:, 0].astype(np.float64), 512.0, label="EEG 0", physical_dimension="uV")]
                  ).write(tmp_path / name)
    rec = load_recording(tmp_path / "chb01_03.edf")
    assert rec.seizures == [(a1, b1)] and "seizures from chb01-summary.txt: 1" in rec.notes
    assert load_recording(tmp_path / "chb01_01.edf").seizures == []      # listed with none: known, not unknown
    assert load_recording(tmp_path / "chb01_99.edf").seizures is None    # not listed: unknown
    (tmp_path / "chb01_03.seizures.csv").write_text("5,6\n")
    assert load_recording(tmp_path / "chb01_03.edf").seizures == [(5.0, 6.0)]
    # A summary that contradicts itself is named, with its line, rather than half-read.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x-summary.txt").write_text("File Name: a.edf\nNumber of Seizures in File: 2\n"
                                       "Seizure Start Time: 10 seconds\nSeizure End Time: 20 seconds\n")
    with pytest.raises(RecordingError, match=r"x-summary.txt, line 2: a.edf says 2 seizure\(s\) and lists 1"):
        read_chbmit_summary(bad / "x-summary.txt")
    (bad / "x-summary.txt").write_text("File Name: a.edf\nSeizure Start Time: 10:42:00\n")
    with pytest.raises(RecordingError, match=r"line 2: 'Seizure Start Time: 10:42:00' is not a seizure time in s"):
        read_chbmit_summary(bad / "x-summary.txt")
    (bad / "x-summary.txt").write_text("File Name: a.edf\nSeizure Start Time: 10 seconds\n")
    with pytest.raises(RecordingError, match=r"line 2: seizure starting at 10.0 s in a.edf has no end time"):
        read_chbmit_summary(bad / "x-summary.txt")


def test_evaluate_a_batch_scores_what_it_can_read_and_names_what_it_cannot(tmp_path, sim_recording):
    """A batch (a CHB-MIT patient is tens of files) is read one recording at a time. A file that exists
    but cannot be read is named and left out, the others are scored and written, and the exit code
    says the figures are incomplete (1). A path that does not exist stops it before any work (2)."""
    import subprocess
    import sys

    x, sz = sim_recording
    good = _write_npz(tmp_path / "good.npz", x, 512.0, sz)
    broken = tmp_path / "broken.edf"
    broken.write_bytes(b"this is not an EDF header" * 20)
    out = tmp_path / "ev.json"
    import os
    env = {**os.environ, "COLUMNS": "400"}   # one line per message, whatever the paths' length
    run = lambda *a: subprocess.run([sys.executable, "-m", "controller.cli", "evaluate", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300, env=env)
    r = run(broken, good, "--json", out, "--no-windows")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "broken.edf not evaluated:" in r.stderr and "cannot read as EDF" in r.stderr
    assert "1 of 2 recording(s) could not be read" in r.stderr
    doc = json.loads(out.read_text())
    assert [Path(rec["path"]).name for rec in doc["recordings"]] == ["good.npz"]
    assert doc["recordings"][0]["metrics"]["event"]["n_detected"] == 2
    assert [Path(u["path"]).name for u in doc["unreadable"]] == ["broken.edf"]
    r = run(good, tmp_path / "typo.edf")
    assert r.returncode == 2 and "recording " in r.stderr and "typo.edf does not exist" in r.stderr
    assert "Scoring rules" not in r.stderr                      # refused before anything was read


def test_evaluate_sim_recording_with_nan_run_and_json(tmp_path, sim_recording):
    x, sz = sim_recording
    x = x.copy()
    x[int(100 * 512):int(110 * 512)] = np.nan
    rec = load_npz(_write_npz(tmp_path / "r.npz", x, 512.0, sz))
    det = OnnxDetector(MODEL)
    r = evaluate_recording(det, rec)
    # the 10 s NaN run (+ 1 window) is reported as not evaluated, never as background; so is the model's
    # warm-up at the start, which the loop does not act on either
    (w0, w1), (a, b) = r["not_evaluated"]
    assert w0 < 1.0 and det.contract.warmup_s <= w1 + det.hop_s < det.contract.warmup_s + 1.0
    assert 99.5 <= a <= 100.5 and 110.5 <= b <= 111.5
    assert any("NaN" in n for n in r["notes"])
    t, p = np.array(r["windows"]["t_s"]), r["windows"]["p"]
    assert all(p[i] is None for i in np.flatnonzero((t > 101) & (t < 110.9)))
    ev = r["metrics"]["event"]
    assert ev["n_seizures"] == 2 and ev["n_detected"] == 2 and ev["false_alarms"] == 0
    assert 0 <= ev["median_latency_s"] <= 5
    assert r["metrics"]["window"]["auroc"] > 0.95
    assert ev["evaluated_h"] == pytest.approx((260.0 - (b - a) - (w1 - w0)) / 3600, rel=1e-3)
    s = summarize([r])
    assert s["event"]["n_detected"] == 2 and s["event"]["sensitivity_ci95"][1] == 1.0
    json.dumps({k: v for k, v in r.items() if not k.startswith("_")})  # JSON-ready


def test_evaluate_a_detached_electrode_as_the_loop_would(tmp_path, sim_recording):
    """30 s of flat zero on every channel: not evaluated, and no false alarm for minutes after
    (a zero-filled stretch used to drag the baseline down: false detections followed)."""
    x, sz = sim_recording
    x = x.copy()
    x[int(100 * 512):int(130 * 512)] = 0.0
    r = evaluate_recording(OnnxDetector(MODEL), load_npz(_write_npz(tmp_path / "z.npz", x, 512.0, sz)))
    _warm_up, (a, b) = r["not_evaluated"]
    assert 99.5 <= a <= 100.5 and 130.5 <= b <= 131.5
    ev = r["metrics"]["event"]
    assert ev["false_alarms"] == 0 and ev["n_detected"] == 2


def test_evaluate_a_stretch_with_no_signal_as_the_loop_would(tmp_path, sim_recording):
    """30 s at a millionth of the amplitude (values in V where µV were meant; no sample repeats, so no
    stuck channel): its windows are not evaluated, as the loop does not act on them (FLAT_REASON)."""
    x, sz = sim_recording
    x = x.copy()
    x[int(100 * 512):int(130 * 512)] *= 1e-6
    r = evaluate_recording(OnnxDetector(MODEL), load_npz(_write_npz(tmp_path / "v.npz", x, 512.0, sz)))
    _warm_up, (a, b) = r["not_evaluated"]
    assert 100.5 <= a <= 104.0 and 129.5 <= b <= 131.0, r["not_evaluated"]   # once the prefilter has rung down
    assert r["metrics"]["event"]["n_detected"] == 2


def test_evaluate_bad_input_messages(tmp_path, sim_recording):
    x, sz = sim_recording
    det = OnnxDetector(MODEL)
    short = load_npz(_write_npz(tmp_path / "s.npz", x[:300], 512.0))
    with pytest.raises(EvaluationError, match="300 samples at 512 Hz is shorter than one 1 s window"):
        evaluate_recording(det, short)
    odd = load_npz(_write_npz(tmp_path / "o.npz", x[:5000], 7.77))
    with pytest.raises(EvaluationError, match="stream rate 7.77 Hz is below the 100 Hz model"):
        evaluate_recording(det, odd)
    unannotated = load_npz(_write_npz(tmp_path / "u.npz", x, 512.0))
    r = evaluate_recording(det, unannotated)
    assert r["truth"] is None and r["metrics"]["window"] is None
    assert r["metrics"]["event"]["sensitivity"] is None and "no seizure annotations" in r["metrics"]["event"]["note"]
    assert len(r["events"]) >= 2  # detections are still reported


def test_evaluate_leaves_the_model_warm_up_unevaluated_as_the_loop_does():
    """A window before the contract's warmup_s is recorded by the loop but never acted upon
    (SeizureDetectorStage.is_warm): offline it is NaN, not a detection the loop could not make.
    Held-out patient 103 with a seizure 5 s after start crossed the threshold at 7.25 s before."""
    from controller.inference import SeizureDetectorStage
    from models.seizure.dataset import SimSpec, simulate_patient
    from models.seizure.scoring import detector_events

    det = OnnxDetector(MODEL)
    spec = SimSpec(patient_index=103, seed=103, duration_s=40.0, fs_hz=256.0, n_channels=4, onsets_s=(5.0,),
                   spontaneous=False)
    x, _ = simulate_patient(spec)
    t, p = det.predict(x, 256.0)
    stage = SeizureDetectorStage(det.contract, 256.0, 4)
    stage.step(x, np.arange(x.shape[0]) / 256.0)
    warm = stage.warm_from_t
    assert warm is not None and warm >= det.contract.warmup_s
    assert np.isnan(p[t < warm]).all() and np.isfinite(p[t >= warm]).all()
    ev = detector_events(t, p, det.threshold, det.min_duration_s, det.refractory_s)
    assert ev and all(e[0] >= warm + det.min_duration_s - 1e-9 for e in ev), ev
    # and the warm-up is reported as not evaluated, so its time is not counted as background
    from models.seizure.recordings import Recording

    r = evaluate_recording(det, Recording("sim:patient103", x, 256.0, [(5.0, 20.0)]))
    (a, b), *_ = r["not_evaluated"]
    assert a < 1.0 and b == pytest.approx(warm - det.hop_s)
