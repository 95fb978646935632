"""Render a model card (Markdown) from the training metrics JSON and, optionally, a held-out evaluation.

``write_model_card(metrics, path, heldout=None, delhi=None)``: ``metrics`` is
what ``train.train_model`` returns (also ``<model>.metrics.json``),
``heldout`` the ``summary`` of ``stimloop evaluate --sim-patients ... --json``.
Every figure carries its interval (Wilson for proportions, exact Poisson for
false-alarm rates) and the rules it was scored with.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_model_card", "render_model_card"]


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


def render_model_card(metrics: dict, heldout: dict | None = None, heldout_cmd: str | None = None) -> str:
    """The Markdown text of the card."""
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
              "(the post-processing every event figure below was measured with: the responsive policy's).", "",
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
    lines += [f"| CV, simulated (threshold {cv['simulated_event']['threshold']:.2f}) |" + r[1:]
              for r in _event_rows(cv["simulated_event"])]
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
    lines += ["", "Threshold trade-off (out of fold, simulated, SzCORE):", "",
              "| threshold | sensitivity | false alarms / 24 h | median latency (s) |", "|---|---|---|---|"]
    for e in sorted(cv["simulated_event_by_threshold"] + [cv["simulated_event"]], key=lambda e: e["threshold"]):
        lines.append(f"| {e['threshold']:.2f} | {_pct(e['sensitivity'])} | {_num(e['false_alarms_per_24h'])} | "
                     f"{_num(e['median_latency_s'])} |")
    lines += ["", "## Known limits",
              "- Simulated iEEG (Wendling neural masses) is most of the data; the only real data are 150 five-second "
              "scalp segments. Performance on other real recordings is unknown until evaluated "
              "(`stimloop evaluate your.edf`).",
              f"- The first {c['warmup_s']:g} s of a session are warm-up (running baseline); a seizure already under "
              "way at start-up is taken as background.",
              "- Delhi windows are scored within their 5 s segment: no running baseline, amplitude features carry them; "
              "their patients are unknown, so CV there is grouped by segment, not patient.",
              "- Event figures depend on the scorer; SzCORE's 30 s/60 s tolerances are generous for a closed loop, "
              "so the latency column is the figure to watch for stimulation.",
              ]
    return "\n".join(lines) + "\n"


def write_model_card(metrics: dict | str | Path, path: str | Path, heldout: dict | None = None,
                     heldout_cmd: str | None = None) -> Path:
    """Write the card to ``path`` (``metrics`` as a dict or a path to the metrics JSON); return the path."""
    if not isinstance(metrics, dict):
        metrics = json.loads(Path(metrics).read_text())
    path = Path(path)
    path.write_text(render_model_card(metrics, heldout, heldout_cmd))
    return path
