"""Render a model card (Markdown) from the training metrics JSON and, optionally, a held-out evaluation.

``write_model_card(metrics, path)``: ``metrics`` is what
``train.train_model`` returns (also ``<model>.metrics.json``); its
``heldout_simulated`` entry (``attach_heldout``) is the ``summary`` of one
``stimloop evaluate --sim-patients ... --json`` run on held-out patients.
Every figure carries its interval (Wilson for proportions, exact Poisson for
false-alarm rates) and the rules it was scored with.

    python -m models.seizure.model_card --heldout heldout.json --command "stimloop evaluate ..."

stores the held-out summary in the metrics JSON and rewrites MODEL_CARD.md.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_model_card", "render_model_card", "attach_heldout"]


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _ci(v, pct=True) -> str:
    if not v:
        return ""
    return f" (95 % CI {_pct(v[0])}–{_pct(v[1])})" if pct else f" (95 % CI {v[0]:.2f}–{v[1]:.2f})"


def _num(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def _event_rows(e: dict) -> list[str]:
    return [f"| event sensitivity | {e['n_detected']}/{e['n_seizures']} = {_pct(e['sensitivity'])}{_ci(e.get('sensitivity_ci95'))} |",
            f"| false alarms | {e['false_alarms']} in {e['evaluated_h']:.1f} h = {_num(e['false_alarms_per_24h'])} / 24 h"
            f"{_ci(e.get('false_alarms_per_24h_ci95'), pct=False)} |",
            f"| median detection latency (from onset) | {_num(e.get('median_latency_s'))} s"
            f" (90th percentile {_num(e.get('latency_s_p90'))} s) |"]


def _grid_summary(cv: dict) -> list[str]:
    grid = cv.get("operating_point_grid") or []
    if not grid:
        return []
    lines = ["", "Operating-point grid (out of fold, simulated + Delhi): per `min_duration_s`, the lowest threshold "
             "with zero background false alarms, and the best admissible point.", "",
             "| min_duration_s | admissible points | lowest threshold with 0 background FA (sensitivity, latency, "
             "Delhi ≥ 90 %) | best admissible: threshold, sensitivity, median latency |", "|---|---|---|---|"]
    for md in sorted({g["min_duration_s"] for g in grid}):
        rows = sorted((g for g in grid if g["min_duration_s"] == md), key=lambda g: g["threshold"])
        zero = next((g for g in rows if g["background_false_alarms"] == 0), None)
        ok = [g for g in rows if g["admissible"]]
        best = min(ok, key=lambda g: (-(g["sensitivity"] or 0), g["median_latency_s"] or 1e9)) if ok else None
        z = (f"{zero['threshold']:.2f} ({_pct(zero['sensitivity'])}, {_num(zero['median_latency_s'])} s, "
             f"{'yes' if zero['window_ok'] else 'no'})" if zero else "none")
        b = (f"{best['threshold']:.2f}, {best['n_detected']}/{best['n_seizures']} = {_pct(best['sensitivity'])}, "
             f"{_num(best['median_latency_s'])} s" if best else "—")
        lines.append(f"| {md:g} | {len(ok)}/{len(rows)} | {z} | {b} |")
    fa0 = [g for g in grid if g["background_false_alarms"] == 0]
    fa_w = [g for g in fa0 if g["window_ok"]]
    pts = lambda gs: ", ".join(f"{g['threshold']:.2f}/{g['min_duration_s']:g} s ({_num(g['median_latency_s'])} s)"  # noqa: E731
                               for g in gs) or "none"
    lines += ["", f"Points with zero background false alarms: {len(fa0)}/{len(grid)}; with the Delhi targets too: "
              f"{pts(fa_w)}; with median latency ≤ 3 s as well: {sum(g['latency_ok'] for g in fa_w)}."]
    bh = grid[0]["background_h"]
    lines += ["", f"Background false alarms are counted over {bh:.1f} h of out-of-fold background (evaluated time "
              "outside every seizure's tolerance window); the full grid is `cv.operating_point_grid` in the metrics "
              "JSON."]
    dl = cv.get("delhi_window_by_threshold")
    if dl:
        ok = [d["threshold"] for d in dl if (d["sensitivity"] or 0) >= 0.9 and (d["specificity"] or 0) >= 0.9]
        lines.append(f"Delhi window sensitivity and specificity ≥ 90 % out of fold at thresholds "
                     f"{'%.2f–%.2f' % (min(ok), max(ok)) if ok else 'none'} of the grid.")
    return lines


def render_model_card(metrics: dict, heldout: dict | None = None, heldout_cmd: str | None = None) -> str:
    """The Markdown text of the card (``heldout`` defaults to the metrics' ``heldout_simulated`` entry)."""
    heldout_note = None
    if heldout is None and metrics.get("heldout_simulated"):
        heldout = metrics["heldout_simulated"]["summary"]
        heldout_cmd = heldout_cmd or metrics["heldout_simulated"].get("command")
        heldout_note = metrics["heldout_simulated"].get("note")
    c = metrics["contract"]
    d = metrics["data"]
    cv = metrics["cv"]
    sim = d["simulated"]
    lines = [f"# {c['version']} — seizure detector ({metrics['kind']}, feature pipeline `{c['feature_pipeline']}`)", "",
             f"**File**: `{metrics['model']}` (sha256 `{metrics['sha256'][:16]}…`, full digest in `.sha256`; "
             "all figures in `.metrics.json`).", ""]
    if metrics.get("command"):
        lines += ["**Reproduce**:", "", f"    {metrics['command']}", ""]
    lines += ["## Contract (ONNX `metadata_props[\"stimloop.contract\"]`)",
              f"`fs_hz` {c['fs_hz']:g} (other rates are resampled by the controller), `window_s` {c['window_s']:g}, "
              f"`hop_s` {c['hop_s']:g}, `n_channels` {c['n_channels']} (0 = any), `feature_pipeline` "
              f"`{c['feature_pipeline']}` ({len(c['feature_names'])} features), output `{c['output']}`, "
              f"`threshold` {c['threshold']:.2f}, `warmup_s` {c['warmup_s']:g} (results before it must not be acted "
              f"upon), `min_duration_s` {c.get('min_duration_s', 0.5):g} and `refractory_s` {c.get('refractory_s', 5.0):g} "
              "(chosen out of fold with the threshold, see Operating point: the post-processing every event figure below "
              "was measured with).", "",
              "## Training data",
              f"- Simulated: virtual cohort patients {sim['patients'][0]}–{sim['patients'][-1]} "
              f"(`hil_sim.cohort.patient_params`), {sim['duration_s_each']:g} s each = {sim['hours']:.1f} h, "
              f"{sim['seizures']} seizures, rates 100/173.61/200/256/512 Hz and 1/2/4/16 channels in rotation, "
              "half the recordings with a seizure 10–14 s after start, stimulation bursts (the default 3 mA, "
              "160 µs, 200 Hz, 0.5 s burst) after some onsets and in background.",
              ]
    if "delhi" in d:
        dl = d["delhi"]
        lines.append(f"- Delhi scalp EEG (real): {dl['segments']} segments of 5.12 s at 200 Hz, 1 channel "
                     f"({dl['classes']}), every window labelled by its segment (ictal = 1); weighted to "
                     f"{100 * metrics.get('delhi_weight', 0.4):.0f} % of the training weight.")
    for r in d.get("recordings", []):
        lines.append(f"- `{r['path']}`: {r['duration_s']:.0f} s at {r['fs_hz']:g} Hz x {r['n_channels']} ch, "
                     f"{r['seizures']} seizures.")
    lines += ["", "## Metrics", "",
              "Cross-validation: 5 folds grouped by simulated patient / Delhi segment (the Delhi patient of a segment "
              "is not given) / recording; out-of-fold predictions. Event scoring: SzCORE rules (REFERENCE.md §3: "
              "a detection from 30 s before onset to 60 s after offset counts, events > 300 s split, events closer "
              "than 90 s merged) on the detector events (threshold + min_duration_s + refractory).", "",
              "| data | metric | value |", "|---|---|---|"]
    e = cv["simulated_event"]
    lines += [f"| CV, simulated (threshold {e['threshold']:.2f}, min_duration_s {e['min_duration_s']:g}) |" + r[1:]
              for r in _event_rows(e)]
    if "background_false_alarms" in e:
        lines.append(f"| CV, simulated | background false alarms (outside every tolerance window, no merging) | "
                     f"{e['background_false_alarms']} in {e['background_h']:.1f} h = "
                     f"{_num(e['background_false_alarms_per_24h'])} / 24 h"
                     f"{_ci(e.get('background_false_alarms_per_24h_ci95'), pct=False)} |")
    w = cv["simulated_window"]
    lines.append(f"| CV, simulated | window AUROC / sensitivity / specificity | {_num(w['auroc'], '{:.4f}')} / "
                 f"{_pct(w['recall'])} / {_pct(w['specificity'])} |")
    if "delhi_window" in cv:
        dw = cv["delhi_window"]
        lines.append(f"| CV, Delhi (ictal vs interictal+preictal) | window sensitivity | {_pct(dw['recall'])}{_ci(dw.get('sensitivity_ci95'))} |")
        lines.append(f"| CV, Delhi | window specificity | {_pct(dw['specificity'])}{_ci(dw.get('specificity_ci95'))} |")
        lines.append(f"| CV, Delhi | window AUROC | {_num(dw['auroc'], '{:.4f}')} |")
        if "delhi_window_ictal_vs_interictal" in cv:
            di = cv["delhi_window_ictal_vs_interictal"]
            lines.append(f"| CV, Delhi ictal vs interictal only | window sensitivity / specificity | "
                         f"{_pct(di['recall'])} / {_pct(di['specificity'])} |")
    if heldout and heldout.get("event"):
        lines += [f"| **held-out simulated** | hours | {heldout['hours']:.1f} h |"]
        lines += ["| **held-out simulated** |" + r[1:] for r in _event_rows(heldout["event"])]
        hw = heldout.get("window") or {}
        lines.append(f"| **held-out simulated** | window precision / recall / F1 / AUROC | {_pct(hw.get('precision'))} / "
                     f"{_pct(hw.get('recall'))} / {_pct(hw.get('f1'))} / {_num(hw.get('auroc'), '{:.4f}')} |")
        if heldout_cmd:
            lines += ["", "Held-out figures from:", "", f"    {heldout_cmd}"]
        if heldout_note:   # when and where it ran, and what changed since an earlier run
            lines += ["", heldout_note]
    if heldout and heldout.get("event"):
        he = heldout["event"]
        verdict = [f"sensitivity {_pct(he['sensitivity'])} {'≥' if (he['sensitivity'] or 0) >= 0.95 else '**<**'} 95 %",
                   f"false alarms {_num(he['false_alarms_per_24h'])} / 24 h "
                   f"{'≤' if (he['false_alarms_per_24h'] or 0) <= 1 else '**>**'} 1",
                   f"median latency {_num(he['median_latency_s'])} s "
                   f"{'≤' if (he['median_latency_s'] or 1e9) <= 3 else '**>**'} 3 s"]
        lines += ["", "Held-out against the issue #4 targets (confirmed once, nothing chosen on it): " + "; ".join(verdict) + "."]
    e = cv["simulated_event"]
    lat = e.get("median_latency_s")
    lines.append(f"Out of fold (simulated) at the same point: sensitivity {_pct(e['sensitivity'])}, "
                 f"{e.get('background_false_alarms', '—')} background false alarms, median latency {_num(lat)} s: "
                 f"latency target ≤ 3 s {'met' if lat is not None and lat <= 3 else '**not met**'} out of fold.")
    if "delhi_window" in cv:
        dw = cv["delhi_window"]
        ok = (dw["recall"] or 0) >= 0.9 and (dw["specificity"] or 0) >= 0.9
        lines.append(f"Delhi out of fold against the 90 % window targets: sensitivity {_pct(dw['recall'])}, specificity "
                     f"{_pct(dw['specificity'])}: {'met' if ok else '**not met**'}.")
    if metrics.get("operating_point_rule"):
        lines += ["", "## Operating point", "",
                  f"Chosen out of fold on the training data only: threshold **{c['threshold']:.2f}**, `min_duration_s` "
                  f"**{c.get('min_duration_s', 0.5):g}**, `refractory_s` {c.get('refractory_s', 5.0):g}.", "",
                  f"Rule: {metrics['operating_point_rule']}.", "",
                  "Why background false alarms: the training cohort has a seizure every 100–200 s, so SzCORE's 90 s "
                  "merging folds most false detections into neighbouring true ones and its false-alarm count stays "
                  "near zero at every threshold; detections starting outside every tolerance window cannot be "
                  "merged away."]
        lines += _grid_summary(cv)
    lines += ["", "## Known limits",
              "- Simulated iEEG (Wendling neural masses) is most of the data; the only real data are 150 five-second "
              "scalp segments. Performance on other real recordings is unknown until evaluated "
              "(`stimloop evaluate your.edf`).",
              f"- The first {c['warmup_s']:g} s of a session are warm-up (running baseline); a seizure already under "
              "way at start-up is taken as background. The loop does not act on warm-up windows and `stimloop "
              "evaluate` does not score them (the held-out figures), but the out-of-fold operating point was chosen "
              "with them scored (`train_model` passes `warmup_s=0` to `choose_operating_point`; see Audits).",
              "- Delhi windows are scored within their 5 s segment: no running baseline, amplitude features carry them; "
              "their patients are unknown, so CV there is grouped by segment, not patient. Every one of them lies "
              f"inside the {c['warmup_s']:g} s warm-up: the Delhi figures describe output the loop records but does "
              "not act on, and `stimloop evaluate` on a lone Delhi segment has no evaluated window.",
              "- Event figures depend on the scorer; SzCORE's 30 s/60 s tolerances are generous for a closed loop, "
              "so the latency column is the figure to watch for stimulation.",
              ]
    lines.append(f"- The Delhi targets are window-level. As events, a 5 s ictal segment must hold p ≥ "
                 f"{c['threshold']:.2f} for `min_duration_s` {c.get('min_duration_s', 0.5):g} s: on concatenated Delhi "
                 "segments (tests/test_replay_lsl.py) p crosses the threshold in the first ictal stretch but not for "
                 "that long, so the shipped post-processing does not detect it there.")
    if "min_duration_s" in c:
        lines.append(f"- `stimloop run` acts with the contract's `min_duration_s` ({c['min_duration_s']:g} s), as measured "
                     "here, unless the config sets `policy.min_duration_s`.")
    audits = metrics.get("audits") or []
    if audits:
        # Checks made on this model after training (the figures above are untouched by them).
        lines += ["", "## Audits", ""]
        lines += [f"- {a['date']}, `{a['command']}`: {a['finding']}" for a in audits]
    return "\n".join(lines) + "\n"


def attach_heldout(metrics_path: str | Path, heldout_json: str | Path, command: str, note: str | None = None) -> dict:
    """Store the ``summary`` of a held-out ``stimloop evaluate --json`` run in the metrics JSON; return the metrics.

    The held-out run must have scored the model the metrics describe (same
    sha256), so a card never pairs one model's CV with another's held-out figures.
    Its threshold/min_duration sweep, if any, is kept as ``sweep_post_hoc``:
    for the record only, nothing is chosen on it. ``note`` (when, on what machine, what changed since
    an earlier run) is printed under the command on the card.
    """
    from controller.inference import OnnxPredictor

    metrics_path = Path(metrics_path)
    metrics = json.loads(metrics_path.read_text())
    doc = json.loads(Path(heldout_json).read_text())
    sha = OnnxPredictor(doc["model"]).sha256 if Path(doc["model"]).is_file() else None
    if sha != metrics["sha256"]:
        raise ValueError(f"held-out run scored {doc['model']} (sha256 {sha}), expected the model of {metrics_path} "
                         f"(sha256 {metrics['sha256']})")
    entry = {"command": command, "summary": doc["summary"], **({"note": note} if note else {})}
    if doc.get("sweep"):
        entry["sweep_post_hoc"] = [{k: r.get(k) for k in ("threshold", "min_duration_s", "sensitivity",
                                                          "false_alarms_per_24h", "median_latency_s")}
                                   for r in doc["sweep"]]
    metrics["heldout_simulated"] = entry
    metrics_path.write_text(json.dumps(metrics, indent=1, default=float) + "\n")
    return metrics


def write_model_card(metrics: dict | str | Path, path: str | Path, heldout: dict | None = None,
                     heldout_cmd: str | None = None) -> Path:
    """Write the card to ``path`` (``metrics`` as a dict or a path to the metrics JSON); return the path."""
    if not isinstance(metrics, dict):
        metrics = json.loads(Path(metrics).read_text())
    path = Path(path)
    path.write_text(render_model_card(metrics, heldout, heldout_cmd))
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m models.seizure.model_card [--heldout X.json --command "..."]``: (attach held-out,) rewrite the card."""
    import argparse

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--metrics", type=Path, default=here / "seizure_v1.metrics.json")
    ap.add_argument("--card", type=Path, default=here / "MODEL_CARD.md")
    ap.add_argument("--heldout", type=Path, help="JSON of stimloop evaluate --sim-patients ... --json")
    ap.add_argument("--command", help="the evaluate command that wrote --heldout (stored with it)")
    ap.add_argument("--note", help="when and where --heldout ran, what changed since the last run (on the card)")
    a = ap.parse_args(argv)
    if a.heldout is not None and not a.command:
        ap.error("--heldout needs --command (the card states how its figures were produced)")
    metrics = (attach_heldout(a.metrics, a.heldout, a.command, a.note) if a.heldout
               else json.loads(a.metrics.read_text()))
    print(write_model_card(metrics, a.card))


if __name__ == "__main__":
    main()
