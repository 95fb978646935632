"""Live terminal view of a running loop's telemetry (``stimloop monitor --address ...``).

Works from another machine: it only needs the loop's telemetry address
(``tcp://HOST:5556``). :class:`MonitorState` folds telemetry messages into what
the screen shows and :func:`render` turns it into a rich renderable; both are
pure (the caller passes the receive time), so tests drive them without a terminal.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from controller.telemetry import TelemetrySubscriber

_BARS = "▁▂▃▄▅▆▇█"
# controller.session_control's pause/stop reasons end so; such safe states are wanted, not faults.
OPERATOR_MARK = "by the operator"
MAX_CHANNELS_SHOWN = 8


#: Values per sparkline: ~1 s of the decimated signal at the default ``telemetry.signal_hz`` (64 Hz)
SPARK_WIDTH = 60


def sparkline(x: np.ndarray, width: int = SPARK_WIDTH) -> str:
    """Unicode sparkline of the last ``width`` values (min→▁, max→█); flat data draws ▄."""
    x = np.asarray(x, dtype=np.float64)[-width:]
    x = x[np.isfinite(x)]
    if x.size == 0:
        return ""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 1e-12:
        return _BARS[3] * x.size
    idx = np.minimum(((x - lo) / (hi - lo) * len(_BARS)).astype(int), len(_BARS) - 1)
    return "".join(_BARS[i] for i in idx)


@dataclass
class MonitorState:
    """Everything the monitor screen shows, updated message by message."""

    address: str = ""
    history_samples: int = 120
    n_messages: int = 0
    last_rx: float | None = None          # receive time (caller's clock) of the newest message
    last_t: float | None = None           # session-clock time stamped by the loop
    signal: np.ndarray | None = None      # (history, ch) latest decimated samples
    signal_fs_hz: float | None = None
    channels: list[str] = field(default_factory=list)
    prediction: dict | None = None
    features: dict | None = None
    status: dict = field(default_factory=dict)
    stim: deque = field(default_factory=lambda: deque(maxlen=6))
    decisions: deque = field(default_factory=lambda: deque(maxlen=6))
    clamps: deque = field(default_factory=lambda: deque(maxlen=4))
    faults: deque = field(default_factory=lambda: deque(maxlen=6))
    marks: deque = field(default_factory=lambda: deque(maxlen=4))       # operator commands and notes
    counts: dict = field(default_factory=dict)
    # Latencies the loop stamps into its events (ms): window end → prediction, window end → command sent.
    prediction_latency_ms: deque = field(default_factory=lambda: deque(maxlen=256))
    command_latency_ms: deque = field(default_factory=lambda: deque(maxlen=64))
    deadline_misses: int = 0
    dropped_samples: int = 0
    stim_off: str | None = None           # why stimulation is off (safe state), None while it may run
    n_commands: int = 0
    last_command_t: float | None = None
    n_faults: int = 0                     # fault-topic events not caused by an operator pause/stop
    session_id: str | None = None         # from the loop's periodic state message

    def update(self, topic: str, t: float, payload: dict, received: float) -> None:
        """Fold one telemetry message in (``received``: caller's clock, for staleness)."""
        self.n_messages += 1
        self.last_rx = received
        self.last_t = t
        self.counts[topic] = self.counts.get(topic, 0) + 1
        if topic == "signal":
            x = payload.get("x")
            if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] > 0:
                x = x[:, :MAX_CHANNELS_SHOWN].astype(np.float32)
                if self.signal is None or self.signal.shape[1] != x.shape[1]:
                    self.signal = x[-self.history_samples:]
                else:
                    self.signal = np.concatenate([self.signal, x])[-self.history_samples:]
                self.signal_fs_hz = payload.get("fs_hz")
                if payload.get("channels"):
                    self.channels = list(payload["channels"])[:MAX_CHANNELS_SHOWN]
        elif topic == "prediction":
            self.prediction = {"t": t, **payload}
            lat = _diff_ms(payload.get("t_inference"), payload.get("window_end_t"))
            if lat is not None:
                self.prediction_latency_ms.append(lat)
        elif topic == "features":
            self.features = {"t": t, **payload}
        elif topic == "status":
            if payload.get("kind") == "mark":
                # Operator commands and notes are history, not state: they must not stick in the status row.
                self.marks.append((t, payload))
                if payload.get("cmd") == "resume" and payload.get("ok"):
                    self.stim_off = None
                return
            if payload.get("kind") == "state":
                # The loop's periodic state: a monitor started after a stop learns of it here, and it
                # corrects anything the events seen so far got wrong.
                self.session_id = payload.get("session") or self.session_id
                latched = payload.get("latched")
                if isinstance(latched, list) and latched:
                    self.stim_off = "; ".join(str(r) for r in latched)
                elif payload.get("paused"):
                    self.stim_off = "paused"
                elif isinstance(latched, list):
                    self.stim_off = None
                return
            if payload.get("what") == "reset":
                # A reset may release one reason (the stream came back) while others (an operator's
                # stop) hold: stimulation is on again only when nothing stays latched.
                still = payload.get("still_latched")
                if isinstance(still, list) and not still:
                    self.stim_off = None
                elif isinstance(still, list):
                    self.stim_off = "; ".join(str(r) for r in still)
            self.status.update({k: v for k, v in payload.items()
                                if not isinstance(v, (np.ndarray, dict, list)) and k not in ("kind",)})
            self.status["t"] = t
        elif topic == "stim":
            self.stim.append((t, payload))
            if payload.get("kind") == "command":
                self.stim_off = None
                self.n_commands += 1
                self.last_command_t = t
                lat = _diff_ms(payload.get("sent_t"), payload.get("window_end_t"))
                if lat is not None:
                    self.command_latency_ms.append(lat)
        elif topic == "decision":
            self.decisions.append((t, payload))
        elif topic == "clamp":
            self.clamps.append((t, payload))
        elif topic == "fault":
            self.faults.append((t, payload))
            kind = payload.get("kind")
            if OPERATOR_MARK not in str(payload.get("reason", "")):
                self.n_faults += 1
            if kind == "safe_state":
                self.stim_off = str(payload.get("reason") or payload.get("what") or "safe state")
            elif kind == "deadline_miss":
                self.deadline_misses += 1
            elif kind == "dropped":
                n = payload.get("n")
                self.dropped_samples += int(n) if isinstance(n, (int, float)) and n == n else 0


def _diff_ms(a: Any, b: Any) -> float | None:
    """(a − b) in ms when both are finite numbers (event fields may be missing or None)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.isfinite(a) and np.isfinite(b):
        return (float(a) - float(b)) * 1e3
    return None


def _lat(values: deque) -> str:
    if not values:
        return "–"
    x = np.fromiter(values, np.float64)
    return f"p50 {np.percentile(x, 50):.1f}/max {x.max():.1f} ms"


def _fmt(value: Any) -> str:
    if value is None:   # telemetry sends NaN/inf as null (strict JSON)
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _kv(payload: dict, skip: tuple[str, ...] = ("kind", "source"), limit: int = 6) -> str:
    items = [(k, v) for k, v in payload.items() if k not in skip and not isinstance(v, (dict, list, np.ndarray))]
    return "  ".join(f"{k}={_fmt(v)}" for k, v in items[:limit])


# What a person needs first from each kind of event; anything else falls back to the first fields.
_KEYS: dict[str, tuple[str, ...]] = {
    "command": ("seq", "channel"),
    "safe_state": ("reason",),
    "fault": ("what", "reason", "error"),
    "deadline_miss": ("latency_s",),
    "dropped": ("n", "reason"),
    "clamp": ("rule", "reason"),
    "refusal": ("rule", "reason"),
    "mark": ("cmd", "label", "name", "value", "who", "ok", "error"),
}


def _describe(payload: dict) -> str:
    kind = payload.get("kind", "")
    keys = _KEYS.get(kind)
    if keys is None:
        return _kv(payload)
    parts = [f"{k}={_fmt(payload[k])}" for k in keys if payload.get(k) is not None]
    if kind == "command":
        p = payload.get("params")
        if isinstance(p, dict):
            parts.append(f"{_fmt(p.get('amplitude_ua'))} µA  {_fmt(p.get('pulse_width_us'))} µs  "
                         f"{_fmt(p.get('frequency_hz'))} Hz × {p.get('n_pulses')}  {p.get('waveform', '')}")
        lat = _diff_ms(payload.get("sent_t"), payload.get("window_end_t"))
        if lat is not None:
            parts.append(f"window end → sent {lat:.1f} ms")
        if payload.get("amplitude_ua") is not None and not isinstance(p, dict):
            parts.append(f"amplitude_ua={_fmt(payload['amplitude_ua'])}")
    return "  ".join(parts)


def _events_table(title: str, rows: deque, style: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, expand=True, box=None)
    table.add_column("t", style="dim", width=12)
    table.add_column("what", style=style, ratio=1)
    for t, payload in list(rows)[::-1]:
        head = f"{payload.get('kind', '')}/{payload.get('source', '')}".strip("/")
        table.add_row(f"{t:.3f}", f"{head}  {_describe(payload)}")
    if not rows:
        table.add_row("", Text("none", style="dim"))
    return table


def render(state: MonitorState, now: float | None = None):
    """The monitor screen for ``state`` (``now``: caller's clock, to show staleness)."""
    age = None if state.last_rx is None or now is None else now - state.last_rx
    header = Text(f"stimloop monitor  {state.address}   messages {state.n_messages}")
    if state.session_id:
        header.append(f"   session {state.session_id}")
    if state.last_t is not None:
        header.append(f"   loop t={state.last_t:.3f} s")
    if age is None and state.n_messages == 0:
        header.append("   waiting for telemetry…", style="yellow")
    elif age is not None and age > 2.0:
        header.append(f"   NO DATA for {age:.1f} s", style="bold red")

    sig = Table(title="signal (decimated, µV)", title_justify="left", show_header=False, expand=True, box=None)
    sig.add_column("ch", width=10)
    sig.add_column("trace", no_wrap=True, overflow="crop", ratio=1)
    sig.add_column("range", width=22, justify="right")
    if state.signal is not None:
        for ch in range(state.signal.shape[1]):
            x = state.signal[-SPARK_WIDTH:, ch]   # the range printed is that of the values drawn
            name = state.channels[ch] if ch < len(state.channels) else f"ch{ch}"
            sig.add_row(name, Text(sparkline(x), style="cyan"), f"{np.nanmin(x):.1f} … {np.nanmax(x):.1f}")
    else:
        sig.add_row("", Text("no signal yet", style="dim"), "")

    info = Table(show_header=False, expand=True, box=None)
    info.add_column("k", style="bold", width=12)
    info.add_column("v", ratio=1)
    pred = state.prediction
    if pred is None:
        info.add_row("prediction", Text("none", style="dim"))
    elif "p" in pred:
        p, thr = pred.get("p"), pred.get("threshold")
        above = isinstance(p, float) and isinstance(thr, (int, float)) and p >= thr
        row = Text(f"p={_fmt(p)}", style="bold red" if above else "bold")
        if thr is not None:
            row.append(f"  threshold={_fmt(thr)}" + ("  ABOVE" if above else ""))
        if pred.get("valid") is False:
            row.append(f"  (not acted on: {pred.get('invalid') or 'window invalid'})", style="yellow")
        row.append(f"  @ {pred['t']:.3f}")
        info.add_row("prediction", row)
    else:
        info.add_row("prediction", _kv(pred, skip=("kind", "source", "t")) + f"  @ {pred['t']:.3f}")
    seen = f"{state.n_commands} command(s) since the monitor started"
    if state.last_command_t is not None and state.last_t is not None:
        seen += f", last {state.last_t - state.last_command_t:.1f} s ago"
    if state.stim_off:
        info.add_row("stimulation", Text(f"OFF: {state.stim_off}  ({seen})", style="bold yellow"))
    elif state.n_messages == 0:   # no session heard from: "armed" would claim one that may not exist
        info.add_row("stimulation", Text("unknown: no session heard from yet", style="dim"))
    else:
        info.add_row("stimulation", Text(f"armed  ({seen})", style="green"))
    latency = {k: v for k, v in state.status.items() if "latency" in k or "deadline" in k or "dropped" in k}
    lat_text = (f"window end → prediction {_lat(state.prediction_latency_ms)} · "
                f"→ command {_lat(state.command_latency_ms)} · deadline misses {state.deadline_misses} · "
                f"dropped samples {state.dropped_samples}")
    if latency:
        lat_text += "  " + _kv(latency, skip=(), limit=8)
    info.add_row("latency", lat_text)
    rest = {k: v for k, v in state.status.items() if k not in latency and k != "t"}
    info.add_row("status", _kv(rest, skip=("source",), limit=8) if rest else Text("none", style="dim"))
    info.add_row("counts", "  ".join(f"{k}={v}" for k, v in sorted(state.counts.items())))

    fault_style = "bold red" if state.n_faults else ("yellow" if state.stim_off else "green")
    return Panel(Group(header, sig, info,
                       _events_table("stimulation", state.stim, "magenta"),
                       _events_table("governor clamps/refusals", state.clamps, "yellow"),
                       _events_table("faults and safe state", state.faults, fault_style),
                       _events_table("operator (control commands, marks)", state.marks, "blue")),
                 title="stimloop", border_style=fault_style)


def status_line(state: MonitorState, now: float | None = None) -> str:
    """The screen's state in one line of plain text, for a log (the monitor's output is not a terminal)."""
    age = None if state.last_rx is None or now is None else now - state.last_rx
    if state.n_messages == 0:
        return f"{state.address}: waiting for telemetry…"
    parts = [f"t={state.last_t:.3f} s" if state.last_t is not None else "t=?"]
    pred = state.prediction
    if pred is not None and "p" in pred:
        parts.append(f"p={_fmt(pred.get('p'))}" + (f" (threshold {_fmt(pred['threshold'])})"
                                                   if pred.get("threshold") is not None else "")
                     + ("" if pred.get("valid") is not False else f" not acted on: {pred.get('invalid') or 'invalid'}"))
    parts.append(f"stimulation OFF: {state.stim_off}" if state.stim_off else "stimulation armed")
    parts.append(f"commands {state.n_commands}")
    parts.append(f"faults {state.n_faults}")
    parts.append(f"deadline misses {state.deadline_misses}")
    parts.append(f"dropped {state.dropped_samples}")
    if state.command_latency_ms:
        parts.append(f"window end → command {_lat(state.command_latency_ms)}")
    if age is not None and age > 2.0:
        parts.append(f"NO DATA for {age:.1f} s")
    return "  ".join(parts)


def run_monitor(address: str = "tcp://127.0.0.1:5556", duration_s: float | None = None,
                refresh_hz: float = 4.0, console: Console | None = None) -> MonitorState:
    """Show live telemetry from ``address`` until Ctrl-C or ``duration_s``; return the final state.

    On a terminal: the live screen. Otherwise (``stimloop monitor > log``, a pipe, a service) a live screen
    would print nothing until the end, so a ``status_line`` is printed once a second instead.
    """
    if refresh_hz <= 0:
        raise ValueError(f"monitor refresh_hz={refresh_hz} is invalid; expected > 0")
    console = console or Console()
    if not console.is_terminal:
        def line(state: MonitorState, now: float) -> None:
            console.print(status_line(state, now), markup=False, highlight=False, soft_wrap=True)

        return _follow(address, duration_s, 1.0, line)
    from rich.live import Live

    with Live(render(MonitorState(address=address), time.monotonic()), console=console,
              refresh_per_second=refresh_hz, transient=False) as live:
        return _follow(address, duration_s, 1.0 / refresh_hz, lambda state, now: live.update(render(state, now)))


def _follow(address: str, duration_s: float | None, period_s: float, show) -> MonitorState:
    """Fold telemetry into a ``MonitorState``; ``show(state, now)`` every ``period_s`` and once at the end."""
    state = MonitorState(address=address)
    start = time.monotonic()
    next_show = start
    with TelemetrySubscriber(address) as sub:
        try:
            while duration_s is None or time.monotonic() - start < duration_s:
                msg = sub.recv(timeout_ms=100)
                now = time.monotonic()
                if msg is not None:
                    state.update(*msg, received=now)
                if now >= next_show:
                    show(state, now)
                    next_show = now + period_s
        except KeyboardInterrupt:
            pass
    show(state, time.monotonic())
    return state
