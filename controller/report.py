"""The session report: ``metrics.json`` and a PNG a person can read.

Rebuilt from the folder alone, so it also works after a crash.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from controller.metrics import compute_metrics, load_ground_truth
from controller.recorder import read_jsonl, write_json


def build_report(session_dir: Path) -> dict:
    session_dir = Path(session_dir)
    metrics = compute_metrics(session_dir)
    write_json(session_dir / "metrics.json", metrics)
    plot_report(session_dir, metrics)
    return metrics


def _load_signal(session_dir: Path):
    try:
        from controller.acquisition import load_raw
        return load_raw(session_dir / "raw")
    except (ImportError, FileNotFoundError, ValueError):
        return None, None


def plot_report(session_dir: Path, metrics: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = read_jsonl(session_dir / "events.jsonl")
    truth = load_ground_truth(session_dir)
    samples, ts = _load_signal(session_dir)
    t_ref = float(ts[0]) if ts is not None and len(ts) else (events[0]["t"] if events else 0.0)

    fig, axes = plt.subplots(4, 1, figsize=(13, 10), gridspec_kw={"height_ratios": [3, 1.3, 0.8, 1.6]})
    ax_sig, ax_p, ax_stim, ax_lat = axes

    if samples is not None and len(samples):
        n_show = min(4, samples.shape[1])
        step = max(1, len(samples) // 20000)
        x = ts[::step] - t_ref
        # Spacing from the background level, and traces clipped to it, so that stimulation
        # artifacts (hundreds of times larger) do not flatten everything else.
        spread = float(np.nanpercentile(np.abs(samples[:, :n_show]), 95)) * 6 or 1.0
        for i in range(n_show):
            trace = np.clip(samples[::step, i], -0.5 * spread, 0.5 * spread)
            ax_sig.plot(x, trace - i * spread, lw=0.4, color="k")
        ax_sig.set_yticks([-i * spread for i in range(n_show)], [f"ch{i}" for i in range(n_show)])
    ax_sig.set_title(f"Session {session_dir.name}: signal (µV, clipped for display), true seizures shaded")
    for ax in (ax_sig, ax_p, ax_stim):
        for s in truth.get("seizures", []):
            off = s.get("offset_t") or truth.get("end_t") or s["onset_t"] + 1
            ax.axvspan(s["onset_t"] - t_ref, off - t_ref, color="tab:red", alpha=0.15, lw=0)

    preds = [e for e in events if e["kind"] == "prediction"]
    if preds:
        ax_p.plot([e["window_end_t"] - t_ref for e in preds], [e["p"] if e["p"] is not None else np.nan for e in preds],
                  color="tab:blue", lw=1, label="p(seizure)")
        thr = next((e.get("threshold") for e in preds if e.get("threshold") is not None), None)
        if thr is not None:
            ax_p.axhline(thr, color="tab:blue", ls="--", lw=0.8, label=f"threshold {thr:.2f}")
    for e in events:
        if e["kind"] == "decision" and e.get("what") == "detection_start":
            ax_p.axvline(e["t"] - t_ref, color="tab:orange", lw=1)
    ax_p.set_ylim(-0.05, 1.05)
    ax_p.set_ylabel("prediction")
    if preds:
        ax_p.legend(loc="upper right", fontsize=8)

    cmds = [e for e in events if e["kind"] == "command" and e.get("op") == "trigger"]
    amps = [float((c.get("params") or {}).get("amplitude_ua", 0.0)) for c in cmds]
    if cmds:
        ax_stim.vlines([c["t"] - t_ref for c in cmds], 0, amps, color="tab:green", lw=2,
                       label="stimulation command (amplitude)")
    for kind, color in (("clamp", "gold"), ("refusal", "tab:purple"), ("fault", "tab:red")):
        xs = [e["t"] - t_ref for e in events if e["kind"] == kind]
        if xs:
            ax_stim.plot(xs, [max(amps or [1.0]) * 0.5] * len(xs), "v", color=color, label=kind)
    # What the policy decided, in its own words (IPF estimate, protocol choice, adaptive state...).
    notes = [e for e in events if e["kind"] == "decision" and e.get("what") in (
        "ipf_estimate", "plasticity_choice", "adaptive_state")]
    for e in notes[:12]:
        text = {"ipf_estimate": lambda e: f"IPF {e.get('ipf_hz') or float('nan'):.2f} Hz "
                                          f"({'accepted' if e.get('accepted') else 'refused'})",
                "plasticity_choice": lambda e: f"{e.get('frequency_hz', '?')} Hz, {e.get('pulse_width_us', '?')} µs, "
                                               f"Δw {e.get('predicted_delta_w', float('nan')):+.3f}",
                "adaptive_state": lambda e: f"{e.get('state', '')}"}[e["what"]](e)
        ax_stim.annotate(text, (e["t"] - t_ref, max(amps or [1.0]) * 0.8), fontsize=7, rotation=0)
    started = next((e for e in events if e["kind"] == "status" and e.get("status") == "started"), {})
    ax_stim.set_ylabel("µA")
    ax_stim.set_title(f"stimulation — policy: {started.get('policy', '?')}, "
                      f"{len(cmds)} commands, {metrics.get('stim', {}).get('charge_uc', 0)} µC", fontsize=9)
    ax_stim.set_xlabel("time since first sample (s)")
    if cmds or any(e["kind"] in ("clamp", "refusal", "fault") for e in events):
        ax_stim.legend(loc="upper right", fontsize=8)
    ax_sig.set_xlim(left=0)
    for ax in (ax_p, ax_stim):  # one time axis for signal, prediction and stimulation
        ax.set_xlim(ax_sig.get_xlim())

    e2e = metrics.get("end_to_end_ms", {})
    device_log = {r["seq"]: r["t_received"] for r in read_jsonl(session_dir / "device_log.jsonl") if "seq" in r}
    vals = [(device_log[c["seq"]] - c["window_end_t"]) * 1e3 for c in cmds
            if c.get("seq") in device_log and c.get("window_end_t") is not None]
    ring = [(e["t_read"] - e["window_end_t"]) * 1e3 for e in preds if "t_read" in e]
    inf = [(e["t_inference"] - e["t_read"]) * 1e3 for e in preds if "t_inference" in e]
    bins = 40
    if ring:
        ax_lat.hist(ring, bins=bins, alpha=0.6, label="window end → read by loop (incl. resampler look-ahead)")
    if inf:
        ax_lat.hist(inf, bins=bins, alpha=0.6, label="features + inference")
    if vals:
        ax_lat.hist(vals, bins=bins, alpha=0.8, label=f"end to end (p99 {e2e.get('p99')} ms)")
    ax_lat.set_xlabel("latency (ms)")
    ax_lat.set_ylabel("count")
    if vals and not (ring or inf) and np.ptp(vals) < 1e-6:
        ax_lat.cla()
        ax_lat.text(0.5, 0.5, f"simulated time: modeled latency {vals[0]:.2f} ms (measure it with stimloop run / bench)",
                    ha="center", transform=ax_lat.transAxes)
        ax_lat.set_yticks([])
    elif ring or inf or vals:
        ax_lat.legend(fontsize=8)
    else:
        ax_lat.text(0.5, 0.5, "latency is measured in real-time sessions (stimloop run)", ha="center",
                    transform=ax_lat.transAxes)
    fig.tight_layout()
    out = session_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def summary_table(metrics: dict) -> Table:
    t = Table(title="stimloop session summary", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    e2e = metrics.get("end_to_end_ms") or {}
    t.add_row("end-to-end latency p50 / p99 / max (ms)",
              f"{e2e.get('p50')} / {e2e.get('p99')} / {e2e.get('max')}  (n={e2e.get('n', 0)})")
    for stage, v in (metrics.get("stage_ms") or {}).items():
        t.add_row(f"  stage {stage} p50 / p99 (ms)", f"{v.get('p50')} / {v.get('p99')}")
    det = metrics.get("detection") or {}
    if det:
        sens = det.get("sensitivity")
        t.add_row("seizures detected", f"{det.get('detected')}/{det.get('onsets')}"
                  + (f" ({sens:.0%})" if sens is not None else ""))
        t.add_row("false detections", str(det.get("false_detections")))
        t.add_row("median detection latency (s)", f"{det.get('latency_s_median')}")
    stim = metrics.get("stim") or {}
    t.add_row("stimulation commands (received by device)", f"{stim.get('commands')} ({stim.get('received_by_device')})")
    t.add_row("charge delivered (µC)", f"{stim.get('charge_uc')}")
    t.add_row("clamps / refusals", f"{stim.get('clamps')} / {stim.get('refusals')}")
    t.add_row("deadline misses", str(metrics.get("deadline_misses")))
    t.add_row("dropped samples", str(metrics.get("dropped_samples")))
    t.add_row("faults", str(len(metrics.get("faults") or [])))
    return t
