"""The session report: ``metrics.json`` and a PNG a person can read.

Rebuilt from the folder alone, so it also works after a crash.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table

from controller.metrics import compute_metrics, end_to_end_pairs, join_receipts, load_ground_truth, trigger_commands
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


def channel_labels(session_dir: Path, n: int) -> list[str]:
    """The first ``n`` channels' names as the source gave them (an amplifier's "Fp1", the
    simulator's "E01"), from the recording's meta.json as the EDF export reads it; ``ch0``... where
    it has none."""
    from controller.export import source_fields
    try:
        names = source_fields(json.loads((Path(session_dir) / "raw" / "meta.json").read_text()))[0] or []
    except (OSError, ValueError, AttributeError):
        names = []
    return [str(names[i]) if i < len(names) and names[i] else f"ch{i}" for i in range(n)]


def plot_report(session_dir: Path, metrics: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metrics.get("ads") is not None:
        return plot_ads_report(session_dir, metrics)
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
        ax_sig.set_yticks([-i * spread for i in range(n_show)], channel_labels(session_dir, n_show))
    # An outside source (an amplifier, another tool's stream) comes with no ground truth to shade.
    ax_sig.set_title(f"Session {session_dir.name}: signal (µV, clipped for display), "
                     + ("true seizures shaded" if "seizures" in truth else "no ground truth (outside source)"))
    for ax in (ax_sig, ax_p, ax_stim):
        for s in truth.get("seizures", []):
            off = s.get("offset_t") or truth.get("end_t") or s["onset_t"] + 1
            ax.axvspan(s["onset_t"] - t_ref, off - t_ref, color="tab:red", alpha=0.15, lw=0)

    ipf = next((e for e in events if e["kind"] == "decision" and e.get("what") == "ipf_estimate"), None)
    if ipf is not None and ipf.get("baseline_s"):
        # The personalized policy's baseline, and the segments it left out (seizure, spikes, artifacts).
        start = (ipf.get("baseline_start_t") or ipf["t"] - float(ipf["baseline_s"])) - t_ref
        ax_sig.axvspan(start, ipf["t"] - t_ref, color="tab:blue", alpha=0.07, lw=0, label="IPF baseline")
        seg_s = float(ipf.get("segment_s") or 2.0)
        for i, r in enumerate(ipf.get("rejected_segments_s") or []):
            ax_sig.axvspan(start + r, start + r + seg_s, ymin=0.97, ymax=1.0, color="tab:orange", lw=0,
                           label="left out of the estimate" if i == 0 else None)
        ax_sig.legend(loc="upper right", fontsize=7, framealpha=0.7)

    preds = [e for e in events if e["kind"] == "prediction"]
    if preds:
        ax_p.plot([e["window_end_t"] - t_ref for e in preds], [e["p"] if e["p"] is not None else np.nan for e in preds],
                  color="tab:blue", lw=1, label="p(seizure)")
        thr = next((e.get("threshold") for e in preds if e.get("threshold") is not None), None)
        if thr is not None:
            ax_p.axhline(thr, color="tab:blue", ls="--", lw=0.8, label=f"threshold {thr:.2f}")
    det = metrics.get("detection") or {}
    if det.get("source") == "model":
        # Scored offline from the predictions: drawn apart from what a policy acted on.
        for k, t in enumerate(det.get("detection_t") or []):
            ax_p.axvline(t - t_ref, color="tab:orange", lw=1, ls=":",
                         label=None if k else "model detection (scored offline; the policy did not act on it)")
    for k, e in enumerate(e for e in events if e["kind"] == "decision" and e.get("what") == "detection_start"):
        ax_p.axvline(e["t"] - t_ref, color="tab:orange", lw=1, label=None if k else "detection (policy)")
    ax_p.set_ylim(-0.05, 1.05)
    ax_p.set_ylabel("prediction")
    if preds:
        # p sits near 0 or near 1 most of the time: the middle of the panel hides the least of it.
        ax_p.legend(loc="center right", fontsize=8, framealpha=0.7)

    cmds = trigger_commands(events)
    amps = [float((c.get("params") or {}).get("amplitude_ua", 0.0)) for c in cmds]
    if cmds:
        ax_stim.vlines([c["t"] - t_ref for c in cmds], 0, amps, color="tab:green", lw=2,
                       label="stimulation command (amplitude)")
        # Bursts of a second or more (tACS, tDCS, long trains) are drawn as their envelope, ramps
        # included: a line at the command alone hides that stimulation lasted, and the prediction
        # gap it blanks.
        # A safe state (a fault, a stop, the session's end) stops a running burst: the envelope ends there.
        stops = np.sort([e["t"] for e in events if e["kind"] == "safe_state"])
        first = True
        for c, amp in zip(cmds, amps):
            prm = c.get("params") or {}
            dur, ramp = _burst_envelope_s(prm)
            if dur >= 1.0:
                start = float(c.get("start_t") or c["t"])
                after = stops[stops > start]
                xs, ys = envelope_points(start - t_ref, dur, ramp, amp, after[0] - t_ref if after.size else None)
                ax_stim.fill_between(xs, ys, color="tab:green", alpha=0.25, lw=0,
                                     label="burst envelope (ramps, duration)" if first else None)
                first = False
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
        ax_stim.legend(loc="best", fontsize=8, framealpha=0.7)
    ax_sig.set_xlim(left=0)
    for ax in (ax_p, ax_stim):  # one time axis for signal, prediction and stimulation
        ax.set_xlim(ax_sig.get_xlim())

    e2e = metrics.get("end_to_end_ms", {})
    # The pairing metrics.json uses (join_receipts): a seq reused after a wrap is not an old receipt.
    received = join_receipts(cmds, read_jsonl(session_dir / "device_log.jsonl")).received_t
    vals = [(r - c["window_end_t"]) * 1e3 for c, r in end_to_end_pairs(cmds, received)]
    ring = [(e["t_read"] - e["window_end_t"]) * 1e3 for e in preds if "t_read" in e]
    inf = [(e["t_inference"] - e["t_read"]) * 1e3 for e in preds if "t_inference" in e]
    bins = 40
    if ring:
        ax_lat.hist(ring, bins=bins, alpha=0.6, label="window end → read by loop (incl. the rest of its chunk)")
    if inf:
        ax_lat.hist(inf, bins=bins, alpha=0.6, label="features + inference")
    if vals:
        # (no p99 from fewer than 100 commands: metrics.MIN_N)
        tail = f"p99 {e2e['p99']} ms" if e2e.get("p99") is not None else f"max {e2e.get('max')} ms"
        ax_lat.hist(vals, bins=bins, alpha=0.8, label=f"end to end ({tail}, n={len(vals)})")
    ax_lat.set_xlabel("latency (ms)")
    ax_lat.set_ylabel("count")
    if vals and not (ring or inf) and np.ptp(vals) < 1e-6:
        ax_lat.cla()
        ax_lat.text(0.5, 0.5, f"simulated time: modeled latency {vals[0]:.2f} ms (measure it with stimloop run / bench)",
                    ha="center", transform=ax_lat.transAxes)
        ax_lat.set_axis_off()   # a note, not a plot: no 0..1 axes
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


def plot_ads_report(session_dir: Path, metrics: dict) -> Path:
    """Report of an ADS / random-control session: what the policy did, on one time axis.

    Panels: a trigger channel around the first delivered pulse (spike, pulse,
    blanking window); a raster of true spikes, detections and delivered pulses
    on the trigger channels; the STDP weight from the ground truth; the
    delivered-delay histogram (device delivery − detected spike, from the
    device log) against the imposed delay.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from controller.metrics import ads_timeline
    events = read_jsonl(session_dir / "events.jsonl")
    truth = load_ground_truth(session_dir)
    tl = ads_timeline(events, read_jsonl(session_dir / "device_log.jsonl"), truth)
    a = metrics["ads"]
    samples, ts = _load_signal(session_dir)
    t_ref = float(ts[0]) if ts is not None and len(ts) else (tl["t0"] or (events[0]["t"] if events else 0.0))
    trig = tl["trigger_channels"] or sorted({int(c) for c in tl["det_ch"]}) or [0]
    cmd = tl["cmd"]
    delivered = cmd["t_delivered"][np.isfinite(cmd["t_delivered"])]
    pulses_t = np.asarray([p["t"] for p in tl["pulses"]], float) if tl["pulses"] else delivered
    blank_s = (a.get("blanking_ms") or 28.0) * 1e-3

    fig, (ax_zoom, ax_r, ax_w, ax_d) = plt.subplots(4, 1, figsize=(13, 11),
                                                    gridspec_kw={"height_ratios": [1.6, 2, 1, 1.6]})
    # A close look at the first delivered pulse: the spike that triggered it, the pulse, the blanking.
    first = int(np.argmin(cmd["t_delivered"])) if np.isfinite(cmd["t_delivered"]).any() else None
    if samples is not None and len(samples) and first is not None:
        t_p = float(cmd["t_delivered"][first])
        has_s = bool(np.isfinite(cmd["spike_t"][first]))  # random control: no spike behind the pulse
        t_s = float(cmd["spike_t"][first]) if has_s else t_p - 0.0075
        lo, hi = np.searchsorted(ts, [t_s - 0.01, t_p + blank_s + 0.01])
        ch = int(cmd["spike_channel"][first]) if cmd["spike_channel"][first] >= 0 else int(trig[0])
        ch = ch if ch < samples.shape[1] else 0
        ax_zoom.plot((ts[lo:hi] - t_p) * 1e3, samples[lo:hi, ch], lw=0.6, color="k")
        ax_zoom.axvspan(0, blank_s * 1e3, color="tab:gray", alpha=0.2, lw=0, label=f"detector blanked {blank_s * 1e3:g} ms")
        ax_zoom.axvline(0, color="tab:red", lw=1, label="pulse delivered")
        if has_s:
            ax_zoom.axvline((t_s - t_p) * 1e3, color="tab:blue", lw=1, ls="--", label="detected spike")
        ax_zoom.set_ylim(-400, 250)  # artifacts saturate at thousands of µV: keep the spikes visible
        ax_zoom.set_xlabel("ms from the first delivered pulse")
        ax_zoom.set_ylabel(f"ch{ch} (µV)")
        ax_zoom.legend(loc="lower right", fontsize=8)
    else:
        ax_zoom.text(0.5, 0.5, "no delivered pulse or no raw recording", ha="center", transform=ax_zoom.transAxes)
    ax_zoom.set_title(f"Session {session_dir.name}: {a['policy']} — {a['spikes_detected']} spikes detected, "
                      f"{a['pulses_delivered']}/{a['pulses_requested']} pulses delivered, {a['refusals']} refused, "
                      f"{a.get('artifact_triggers', 'n/a')} artifact triggers", fontsize=10)

    for i, c in enumerate(trig):
        y = float(i)
        tt = tl["true_t"][tl["true_ch"] == c] - t_ref
        if tt.size:
            ax_r.vlines(tt, y - 0.4, y - 0.05, color="0.6", lw=1, label="true spike" if i == 0 else None)
        dt = tl["det_t"][tl["det_ch"] == c] - t_ref
        if dt.size:
            ax_r.vlines(dt, y + 0.05, y + 0.4, color="tab:blue", lw=1, label="detected" if i == 0 else None)
    yp = len(trig)
    if pulses_t.size:
        ax_r.vlines(pulses_t - t_ref, yp - 0.4, yp + 0.4, color="tab:red", lw=1, label="pulse delivered")
    refused = [e["t"] - t_ref for e in events if e["kind"] == "refusal"]
    if refused:
        ax_r.plot(refused, [yp + 0.5] * len(refused), "v", color="tab:purple", label="refused")
    if tl["t_start"] is not None and tl["t_start"] > t_ref:
        ax_r.axvspan(0, tl["t_start"] - t_ref, color="0.9", lw=0, label="loop starting")
    ax_r.set_yticks(list(range(len(trig))) + [yp], [f"ch{c}" for c in trig] + ["stim"])
    ax_r.set_ylabel("trigger channels")
    ax_r.legend(loc="upper right", fontsize=8, ncol=4)

    if tl["weight_t"].size:
        ax_w.step(np.append(tl["weight_t"], tl["end_t"] or tl["weight_t"][-1]) - t_ref,
                  np.append(tl["weight_w"], tl["weight_w"][-1]), where="post", color="tab:green")
        ax_w.set_title(f"trigger → target STDP weight (ground truth): {tl['w_init']:.3f} → {tl['w_final']:.3f}",
                       fontsize=9)
    else:
        ax_w.text(0.5, 0.5, "no simulator ground truth (weight unknown)", ha="center", transform=ax_w.transAxes)
    ax_w.set_ylabel("w")
    ax_w.set_xlabel("time since first sample (s)")
    ax_r.set_xlim(left=0)
    ax_w.set_xlim(ax_r.get_xlim())

    has_spike = np.isfinite(cmd["t_delivered"]) & np.isfinite(cmd["spike_t"])
    delay = a.get("imposed_delay_ms")
    if has_spike.any():
        vals = (cmd["t_delivered"][has_spike] - cmd["spike_t"][has_spike]) * 1e3
        what = "delivered − detected spike"
    else:  # random control: no spike behind a pulse; the device's timing against the planned time
        vals = (cmd["t_delivered"][np.isfinite(cmd["t_delivered"])] - cmd["at"][np.isfinite(cmd["t_delivered"])]) * 1e3
        what = "delivered − planned time"
    if vals.size:
        ax_d.hist(vals, bins=40, color="tab:red", alpha=0.8, label=f"{what} (n={vals.size})")
        if delay is not None and has_spike.any():
            ax_d.axvline(delay, color="k", ls="--", lw=1, label=f"imposed delay {delay:g} ms")
        ax_d.legend(fontsize=8)
    else:
        ax_d.text(0.5, 0.5, "no delivered pulse", ha="center", transform=ax_d.transAxes)
    ax_d.set_xlabel("ms")
    ax_d.set_ylabel("pulses")
    fig.tight_layout()
    out = session_dir / "report.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _num(v, digits: int = 3) -> str:
    """A figure for the summary table: fixed decimals (metrics.json keeps full precision), "–" if absent."""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _burst_envelope_s(params: dict) -> tuple[float, float]:
    """A command's burst duration and ramp (s), from the params its COMMAND event recorded."""
    from drivers.params import StimParams

    p = StimParams.from_dict(params)
    return p.burst_duration_s, min(p.ramp_s, p.burst_duration_s / 2)


def envelope_points(start: float, dur: float, ramp: float, amp: float,
                    stop_t: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The burst's amplitude envelope as polygon points: ramp up, hold, ramp down; cut to zero at
    ``stop_t`` when a stop came before its end."""
    xs = np.array([0.0, ramp, dur - ramp, dur]) + start
    ys = np.array([0.0, amp, amp, 0.0])
    if stop_t is not None and stop_t < start + dur:
        keep = xs < stop_t
        xs, ys = np.r_[xs[keep], stop_t, stop_t], np.r_[ys[keep], np.interp(stop_t, xs, ys), 0.0]
    return xs, ys


FAULT_ROWS = 4


def fault_rows(faults: list[dict], n: int = FAULT_ROWS, width: int = 90) -> list[tuple[str, str]]:
    """Summary rows for the first ``n`` distinct faults, seconds after the first sample, and a row
    counting the rest. Distinct by reason: the governor's fault repeats the reason that latched it."""
    distinct: dict[str, dict] = {}
    for f in faults:
        distinct.setdefault(str(f.get("reason") or ""), f)
    rows = []
    for reason, f in list(distinct.items())[:n]:
        at = f.get("after_start_s")
        text = f"{f['what']}: {reason}" if f.get("what") else reason
        rows.append((f"  at {at:.1f} s: {f.get('source')}" if at is not None else f"  {f.get('source')}",
                     escape(text if len(text) <= width else text[:width - 1] + "…")))
    if len(distinct) > n:
        rows.append(("  …", f"{len(distinct) - n} more: events.jsonl"))
    return rows


def ipf_text(ipf: dict, width: int = 130) -> str:
    """One line for the personalized policy's estimate: the frequency and its evidence, or why not."""
    n, rejected = ipf.get("n_segments"), ipf.get("n_segments_rejected") or 0
    clean = f"{n} of {n + rejected} baseline segments clean" if n is not None else ""
    if ipf.get("accepted"):
        text = f"{ipf['ipf_hz']:.2f} Hz, {ipf['peak_db']:.1f} dB above 1/f" + (f", {clean}" if clean else "")
    else:
        text = f"none, stimulation refused: {ipf.get('reason', '')}"
    return text if len(text) <= width else text[:width - 1] + "…"


def summary_table(metrics: dict) -> Table:
    t = Table(title="stimloop session summary", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    e2e = metrics.get("end_to_end_ms") or {}
    virtual = metrics.get("clock") == "virtual"
    t.add_row("end-to-end latency, modeled (simulator.stim_latency_ms) p50 / p99 / max (ms)" if virtual
              else "end-to-end latency p50 / p99 / max (ms)",
              f"{_num(e2e.get('p50'))} / {_num(e2e.get('p99'))} / {_num(e2e.get('max'))}  (n={e2e.get('n', 0)})")
    pushed = metrics.get("pushed_to_device_ms") or {}
    if pushed.get("n"):
        t.add_row("  from the chunk's push p50 / p99 (ms)", f"{_num(pushed.get('p50'))} / {_num(pushed.get('p99'))}")
    for stage, v in (metrics.get("stage_ms") or {}).items():
        # Stages the session's policy does not have (no model, no spikes) stay out, and so do all of a
        # simulated-time session's: no stage takes time on its clock.
        if v.get("n") and not virtual:
            t.add_row(f"  stage {stage} p50 / p99 (ms)", f"{_num(v.get('p50'))} / {_num(v.get('p99'))}")
    det = metrics.get("detection") or {}
    if det and det.get("source") is None and "source" in det:
        t.add_row("seizures detected", f"not scored: {det.get('reason')}")
    elif det:
        sens = det.get("sensitivity")
        t.add_row("seizures detected", f"{det.get('detected')}/{det.get('onsets')}"
                  + (f" ({sens:.0%})" if sens is not None else ""))
        d = det.get("detector") or {}
        if det.get("source") == "model":   # the policy declares none: say whose detections these are
            t.add_row("  detections from", f"model predictions at threshold {_num(d.get('threshold'), 2)}, "
                                           f"{_num(d.get('min_duration_s'), 2)} s (scored offline)")
        if det.get("unscored_before_end_s"):
            t.add_row("  not scored: onset this long before the end (s)",
                      ", ".join(f"{x:.1f}" for x in det["unscored_before_end_s"]))
        t.add_row("false detections", str(det.get("false_detections")))
        t.add_row("median detection latency (s)", _num(det.get("latency_s_median"), 2))
    stim = metrics.get("stim") or {}
    t.add_row("stimulation commands (received by device)", f"{stim.get('commands')} ({stim.get('received_by_device')})")
    t.add_row("charge delivered (µC)", _num(stim.get("charge_uc"), 1))
    t.add_row("clamps / refusals", f"{stim.get('clamps')} / {stim.get('refusals')}")
    ipf = metrics.get("ipf_estimate")
    if ipf:   # what set the tACS frequency, or why there was none
        t.add_row("individual peak frequency", escape(ipf_text(ipf)))
    ads = metrics.get("ads")
    if ads:
        t.add_row(f"{ads['policy']}: spikes detected / artifact triggers",
                  f"{ads['spikes_detected']} / {ads.get('artifact_triggers', 'n/a')}")
        t.add_row(f"{ads['policy']}: pulses requested / delivered / refused",
                  f"{ads['pulses_requested']} / {ads['pulses_delivered']} / {ads['refusals']}")
        d = ads.get("delay_error_ms") or {}
        if d.get("n"):
            t.add_row("delay error vs imposed p50 / p99 (ms)", f"{_num(d.get('p50'))} / {_num(d.get('p99'))}")
        if ads.get("weight"):
            t.add_row("STDP weight change (ground truth)", f"{ads['weight']['change']:+.4f}")
    t.add_row("deadline misses", str(metrics.get("deadline_misses")))
    t.add_row("dropped samples", str(metrics.get("dropped_samples")))
    faults = metrics.get("faults") or []
    t.add_row("faults", str(len(faults)))
    for row in fault_rows(faults):
        t.add_row(*row)
    stops = metrics.get("operator_stops") or []
    if stops:   # a pause or an emergency stop explains stimulation that did not come
        first = stops[0]
        at = f"at {first['after_start_s']:.1f} s: " if first.get("after_start_s") is not None else ""
        t.add_row("operator stops", f"{len(stops)} (first {at}"
                  + escape(str(first.get("reason", "")).removeprefix("emergency_stop: ")) + ")")
    stop = metrics.get("final_stop")
    if stop is not None:
        t.add_row("stimulation off at the end",
                  "confirmed by the device" if stop["confirmed"] else "[bold red]NOT confirmed by the device[/]")
    sched = metrics.get("scheduling") or {}
    nice = sched.get("nice") or {}
    if sched.get("low_latency") or any(nice.values()):   # real-time sessions: what the OS granted
        t.add_row("low-latency mode", str(sched.get("low_latency")))
        t.add_row("priority: acquisition / loop", f"{nice.get('acquisition')} / {nice.get('loop')}")
        steal = sched.get("host_steal_ms")
        if steal is not None:   # a VM's host running something else on our vCPUs (10 ms resolution)
            t.add_row("host steal, all CPUs (ms)", f"{steal['total']:.0f}")
        cpu = sched.get("cpu_percent")
        if cpu:   # % of one core each, while the loop ran
            t.add_row(f"CPU % of a core: {' / '.join(cpu)}", " / ".join(_num(v, 0) for v in cpu.values()))
    return t
