"""Command line for the seizure model: ``stimloop train seizure`` and ``stimloop evaluate``.

``train_app`` (a typer app with the command ``seizure``) is mounted by
``controller/cli.py`` as ``stimloop train``, which adds ``plasticity`` (``models/plasticity/cli.py``); ``evaluate`` is a plain function
mounted as the command ``stimloop evaluate``. ``python -m models.seizure.cli``
runs both standalone (``... train seizure``, ``... evaluate``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from controller.cli_checks import output_file, within

__all__ = ["train_app", "evaluate", "seizure", "app"]

console = Console(stderr=True)
train_app = typer.Typer(help="Train models.", no_args_is_help=True, add_completion=False)


@train_app.callback()
def _train_group() -> None:
    """Train models (a group even with one command standalone, so the command reads ``stimloop train seizure``)."""


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/] {msg}")
    raise typer.Exit(2)


@train_app.command("seizure")
def seizure(
    out: Path = typer.Option(Path(__file__).resolve().parent / "seizure_v1.onnx", "--out", "-o",
                             help="ONNX file to write (+ .sha256, .metrics.json, and MODEL_CARD.md beside it)"),
    sim_patients: str = typer.Option("0-23", help="virtual-cohort training patient ids (keep test ids, e.g. 100-119, out)"),
    sim_duration: float = typer.Option(1800.0, help="simulated seconds per training patient"),
    delhi: Optional[Path] = typer.Option(None, help="Delhi segments folder (default <repo>/../shared/data/delhi)"),
    no_delhi: bool = typer.Option(False, "--no-delhi", help="train without the Delhi segments"),
    group_identical_delhi: bool = typer.Option(
        False, "--group-identical-delhi",
        help="put identical Delhi segments (4 pairs) in one CV group; off reproduces the shipped model "
             "(MODEL_CARD.md, Audits)"),
    recording: Optional[List[Path]] = typer.Option(None, "--recording", "-r",
                                                   help="annotated EDF/EDF+ or .npz recording (repeatable; seizures from the file, "
                                                        "a REC.seizures.csv beside it or a CHB-MIT *-summary.txt "
                                                        "in its folder)"),
    max_fa_per_24h: float = typer.Option(1.0, help="out-of-fold background false alarms per 24 h allowed when "
                                                    "choosing the operating point"),
    min_durations: str = typer.Option("0.25,0.5,0.75,1.0,1.25,1.5",
                                      help="min_duration_s values (s above threshold before a detection) in the "
                                           "operating-point grid, comma-separated"),
    refractory: float = typer.Option(5.0, help="s after a detection start during which no new one counts"),
    kind: str = typer.Option("gbt", help="gbt | logreg"),
    seed: int = typer.Option(0),
    card: bool = typer.Option(True, help="write MODEL_CARD.md next to the model"),
):
    """Train the seizure detector on the simulator cohort, Delhi segments and your annotated recordings."""
    from models.seizure.dataset import parse_id_range
    from models.seizure.train import TrainConfig, train_model

    try:
        ids = tuple(parse_id_range(sim_patients))
    except ValueError as e:
        _fail(str(e))
    for r in recording or []:
        if not r.is_file():
            _fail(f"recording {r} does not exist")
    if delhi is not None and not no_delhi and not delhi.is_dir():
        _fail(f"Delhi folder {delhi} does not exist")
    try:
        min_durs = tuple(float(v) for v in min_durations.split(","))
    except ValueError:
        _fail(f"--min-durations {min_durations!r} invalid, expected comma-separated seconds like '0.5,1.0'")
    if not all(0 <= v <= 60 for v in min_durs):
        _fail(f"--min-durations {min_durations!r} invalid, expected seconds in [0, 60]")
    cfg = TrainConfig(out=out, train_patients=ids, duration_s=sim_duration,
                      delhi_dir=delhi, use_delhi=not no_delhi, delhi_group_identical=group_identical_delhi, recordings=tuple(recording or ()), kind=kind,
                      seed=seed, max_bg_fa_per_24h=max_fa_per_24h, min_durations_s=min_durs, refractory_s=refractory,
                      extra={"command": "stimloop train seizure " + " ".join(_argv())})
    with console.status("training") as status:
        def say(msg: str) -> None:
            console.print(msg)
            status.update(msg.strip()[:80])
        try:
            metrics = train_model(cfg, progress=say)
        except ValueError as e:
            _fail(str(e))
    if card:
        from models.seizure.model_card import write_model_card

        path = write_model_card(metrics, out.with_name("MODEL_CARD.md") if out.name == "seizure_v1.onnx"
                                else out.with_suffix(".card.md"))
        console.print(f"model card: {path}")


def _argv() -> list[str]:
    import sys

    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "seizure":
            return args[i + 1:]
    return args


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{_fmt(v[0], pct)}, {_fmt(v[1], pct)}]"
    if isinstance(v, float):
        return f"{100 * v:.1f} %" if pct else f"{v:.3g}"
    return str(v)


_ROWS = [("window precision", "window", "precision", True), ("window recall", "window", "recall", True),
         ("window F1", "window", "f1", True), ("window AUROC", "window", "auroc", False),
         ("seizures", "event", "n_seizures", False), ("detected", "event", "n_detected", False),
         ("event sensitivity", "event", "sensitivity", True), ("  95 % CI (Wilson)", "event", "sensitivity_ci95", True),
         ("event precision", "event", "precision", True), ("event F1", "event", "f1", True),
         ("false alarms", "event", "false_alarms", False), ("evaluated hours", "event", "evaluated_h", False),
         ("false alarms / 24 h", "event", "false_alarms_per_24h", False),
         ("  95 % CI (Poisson)", "event", "false_alarms_per_24h_ci95", False),
         ("median latency (s)", "event", "median_latency_s", False)]


def _summary_table(title: str, summaries: dict[str, dict]) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for name in summaries:
        t.add_column(name, justify="right")
    for label, sec, key, pct in _ROWS:
        t.add_row(label, *[_fmt((s.get(sec) or {}).get(key), pct) for s in summaries.values()])
    return t


def _segments_table(r: dict, model_name: str) -> Table:
    w = r["window"] or {}
    t = Table(title=f"segments ({model_name}, threshold {r['threshold']:g}; positive: {', '.join(r['positive'])}; "
                    f"{r['fs_hz']:g} Hz)", caption=r["rule"])
    t.add_column("class")
    for col in ("segments", "windows", "windows ≥ threshold", "95 % CI (Wilson)", "segments with one"):
        t.add_column(col, justify="right")
    for cls, c in r["by_class"].items():
        t.add_row(cls + (" (seizure)" if c["positive"] else ""), str(c["segments"]), str(c["windows"]),
                  _fmt(c["frac_windows_above"], True), _fmt(c["frac_windows_above_ci95"], True),
                  f"{c['segments_above']}/{c['segments']}")
    t.add_section()
    t.add_row("window sensitivity", "", "", _fmt(w.get("recall"), True), _fmt(w.get("recall_ci95"), True), "")
    t.add_row("window specificity", "", "", _fmt(w.get("specificity"), True), _fmt(w.get("specificity_ci95"), True), "")
    t.add_row("window AUROC", "", "", "—" if w.get("auroc") is None else f"{w['auroc']:.4f}", "", "")
    return t


def evaluate(
    recordings: Optional[List[Path]] = typer.Argument(
        None, help="EDF/EDF+ or .npz recordings (seizures from the file, a REC.seizures.csv beside it: "
                   "onset_s,offset_s rows, or a CHB-MIT *-summary.txt in its folder)"),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="stimloop ONNX model (default: shipped)"),
    sim_patients: Optional[str] = typer.Option(None, help="evaluate on simulated cohort patients, e.g. 100-119"),
    sim_hours: float = typer.Option(2.0, help="simulated hours in total, split evenly over --sim-patients",
                                    callback=within(0, 1000, lo_open=True)),
    sim_fs: float = typer.Option(256.0, help="simulated sample rate (Hz)", callback=within(100, 50_000)),
    sim_channels: int = typer.Option(4, help="simulated channels", min=1, max=256),
    sim_seed: int = typer.Option(1, min=0),
    threshold: Optional[float] = typer.Option(None, help="override the contract threshold", callback=within(0, 1)),
    min_duration: Optional[float] = typer.Option(None, help="override min_duration_s (s above threshold)",
                                                 callback=within(0, 60)),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full results (windows, events) as JSON",
                                            callback=output_file),
    compare_mayo: bool = typer.Option(False, "--compare-mayo", help="also run the Mayo model (brainmaze-eeg-models)"),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="permutation importance + metrics vs threshold/min_duration"),
    no_windows: bool = typer.Option(False, "--no-windows", help="leave per-window t/p out of the JSON"),
    segments: Optional[Path] = typer.Option(
        None, "--segments", help="folder of class-labelled segments, one subfolder per class (ictal/, "
                                 "interictal/, …) of .mat, .txt or .npy files (the Delhi and Bonn layouts)"),
    segments_fs: Optional[float] = typer.Option(None, "--segments-fs",
                                                help="the segments' sample rate in Hz (required: they carry none; Delhi 200)"),
    positive: str = typer.Option("ictal", "--positive", help="segment classes that are seizure, comma-separated"),
):
    """Score a seizure model on recordings and/or a simulated cohort (window- and event-level, SzCORE rules),
    and/or on class-labelled segments (window-level)."""
    from models.seizure.evaluate import (CohortSpec, EvaluationError, OnnxDetector, default_model_path,
                                         evaluate_recording, evaluate_segments, permutation_importance,
                                         simulate_cohort, summarize, sweep)
    from models.seizure.recordings import (RecordingError, check_recording_path, default_delhi_dir, load_recording,
                                           load_segments)
    from models.seizure.scoring import SZCORE

    if segments is not None and not recordings and not sim_patients and (compare_mayo or sensitivity):
        _fail("--compare-mayo and --sensitivity score recordings or a simulated cohort, not --segments "
              "(they were ignored): add recordings or --sim-patients, or leave them out")
    if not recordings and not sim_patients and segments is None:
        _fail("nothing to evaluate: give recordings (EDF/EDF+ or .npz), --sim-patients and/or --segments")
    if segments is not None and (segments_fs is None or not 0 < segments_fs <= 100_000):
        _fail("--segments needs --segments-fs HZ, the segments' sample rate (> 0): the files carry none "
              "(the Delhi set: 200, Bonn: 173.61)")
    try:
        det = OnnxDetector(model, threshold=threshold, min_duration_s=min_duration)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    seg_result = None
    if segments is not None:
        try:
            segs = load_segments(segments)
        except RecordingError as e:
            _fail(str(e))
        classes = tuple(c.strip() for c in positive.split(",") if c.strip())
        found = sorted({c for c, _, _ in segs})
        if not set(classes) & set(found):
            _fail(f"--positive {positive!r}: no such class under {segments} (classes found: {', '.join(found)})")
        with console.status(f"scoring {len(segs)} segments"):
            seg_result = evaluate_segments(det, segs, segments_fs, classes)
        console.print(_segments_table(seg_result, det.name))
        for sk in seg_result["skipped"]:
            console.print(f"[yellow]{sk['class']}/{sk['file']} not evaluated:[/] {sk['reason']}")
        if det.path.resolve() == default_model_path().resolve() and segments.resolve() == default_delhi_dir():
            console.print("[yellow]note:[/] the shipped model was trained on these segments: these figures are "
                          "in-sample. MODEL_CARD.md gives them out of fold (CV) instead.")
        if len(seg_result["skipped"]) == len(segs):   # as for recordings: nothing scored is a failure
            _fail(f"none of the {len(segs)} segments could be evaluated (reasons above)")
        if not recordings and not sim_patients:
            if json_out:
                json_out.write_text(json.dumps({"model": str(det.path), "segments": seg_result}, default=float) + "\n")
                console.print(f"wrote {json_out}")
            return
    detectors = [det]
    if compare_mayo:
        from models.seizure.mayo import MayoDetector
        try:
            detectors.append(MayoDetector())
        except EvaluationError as e:
            _fail(str(e))
    paths = list(recordings or [])
    for path in paths:   # what can be told before any work: a typo in a list of files
        try:
            check_recording_path(path)
        except RecordingError as e:
            _fail(str(e))
    spec = None
    if sim_patients:
        from models.seizure.dataset import parse_id_range
        try:
            spec = CohortSpec(tuple(parse_id_range(sim_patients)), sim_hours, sim_fs, sim_channels, sim_seed)
        except ValueError as e:
            _fail(str(e))
    console.print(f"[bold]Scoring rules[/]: {SZCORE.describe()}. Detector events = threshold + min_duration_s "
                  "+ refractory, as the responsive policy acts. Window labels: window end inside a seizure.")
    records: dict[str, list] = {d.name: [] for d in detectors}
    recs = []          # kept only for --sensitivity's permutation importance, which needs the signals
    unreadable = []    # recordings that could not be read: reported, the others still scored

    def score(rec) -> None:
        for d in detectors:
            try:
                records[d.name].append(evaluate_recording(d, rec, keep_windows=not no_windows))
            except EvaluationError as e:
                console.print(f"[yellow]{d.name}: {rec.path} not evaluated:[/] {e}")
                continue
            for note in records[d.name][-1]["notes"]:
                console.print(f"  {rec.path}: {note}")
        if sensitivity:
            recs.append(rec)

    # One recording in memory at a time: a CHB-MIT patient is tens of one-hour files.
    with console.status("evaluating") as st:
        for k, path in enumerate(paths, 1):
            st.update(f"evaluating {k}/{len(paths)}: {path.name}")
            try:
                rec = load_recording(path)
            except RecordingError as e:
                console.print(f"[yellow]{path} not evaluated:[/] {e}")
                unreadable.append({"path": str(path), "reason": str(e)})
                continue
            score(rec)
            del rec
        if spec is not None:
            st.update("simulating cohort")
            for rec in simulate_cohort(spec, progress=lambda k, n, what: st.update(f"simulated {k}/{n}: {what}")):
                score(rec)
    results = {name: {"records": rs, "summary": summarize(rs)} for name, rs in records.items()}
    per = Table(title=f"per recording ({det.name}, threshold {det.threshold:g}, min_duration {det.min_duration_s:g} s)")
    for col in ("recording", "fs (Hz)", "duration (s)", "seizures", "detections", "detected", "false alarms",
                "not evaluated (s)"):
        per.add_column(col)
    for r in results[det.name]["records"]:
        e = r["metrics"]["event"]
        per.add_row(Path(r["path"]).name, f"{r['fs']:g}", f"{r['duration_s']:.0f}", _fmt(e["n_seizures"]),
                    str(e["n_detections"]), _fmt(e["n_detected"]), _fmt(e["false_alarms"]),
                    f"{sum(b - a for a, b in r['not_evaluated']):.1f}")
    console.print(per)
    console.print(_summary_table("summary" if len(detectors) == 1 else "comparison on the same recordings",
                                 {k: v["summary"] for k, v in results.items()}))
    extra = {}
    if sensitivity:
        rows = sweep(results[det.name]["records"])
        t = Table(title="event metrics vs threshold and min_duration (refractory 5 s)")
        for c in ("min_duration (s)", "threshold", "sensitivity", "FA / 24 h", "median latency (s)"):
            t.add_column(c, justify="right")
        for row in rows:
            t.add_row(f"{row['min_duration_s']:g}", f"{row['threshold']:.2f}", _fmt(row["sensitivity"], True),
                      _fmt(row["false_alarms_per_24h"]), _fmt(row["median_latency_s"]))
        console.print(t)
        try:
            imp = permutation_importance(det, recs)
        except EvaluationError as e:
            imp = None
            console.print(f"[yellow]permutation importance skipped:[/] {e}")
        if imp:
            t = Table(title="permutation importance (window AUROC drop, top 12)")
            t.add_column("feature")
            t.add_column("AUROC drop", justify="right")
            for row in imp[:12]:
                t.add_row(row["feature"], f"{row['auroc_drop']:.4f}")
            console.print(t)
        extra = {"sweep": rows, "permutation_importance": imp}
    if json_out:
        def clean(records):
            return [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
        main = results[det.name]
        doc = {"model": str(det.path), "rules": SZCORE.describe(), "recordings": clean(main["records"]),
               "summary": main["summary"], **extra, **({"segments": seg_result} if seg_result else {}),
               **({"unreadable": unreadable} if unreadable else {})}
        if len(detectors) > 1:
            doc["compare"] = {k: {"summary": v["summary"], "recordings": clean(v["records"])}
                              for k, v in results.items()}
        json_out.write_text(json.dumps(doc, default=float) + "\n")
        console.print(f"wrote {json_out}")
    if unreadable:
        console.print(f"[red]error:[/] {len(unreadable)} of {len(paths)} recording(s) could not be read "
                      "(listed above): the figures leave them out", highlight=False)
        raise typer.Exit(1)


app = typer.Typer(add_completion=False, no_args_is_help=True, help="stimloop seizure model tools")
app.add_typer(train_app, name="train")
app.command("evaluate")(evaluate)

if __name__ == "__main__":
    app()
