"""Commands joined to their device receipts by seq, which is 16-bit and wraps (PROTOCOL.md §4).

Synthetic session folders (events.jsonl + device_log.jsonl, as the runners and the emulator write
them): a seq reused after a wrap must pair with its own receipt, in metrics.json, in the ADS
timeline and in the report's histogram alike; a session without wrap keeps its figures.
"""
import json

import numpy as np
import pytest

from controller.metrics import ads_timeline, compute_metrics, percentiles_ms
from controller.recorder import read_jsonl

WRAP_S = 6600.0   # a seq comes back after a wrap: ~65536 frames of heartbeats (10 Hz) and commands


def _write(folder, events, device_log):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("events.jsonl", events), ("device_log.jsonl", device_log)):
        with open(folder / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


def _cmd(seq, sent_t, window_end_t, **extra):
    return {"t": sent_t - 0.0001, "kind": "command", "source": "actuator", "op": "trigger", "seq": seq,
            "sent_t": sent_t, "acked_t": sent_t + 0.0008, "channel": 0, "at": None,
            "request_source": "policy", "window_end_t": window_end_t,
            "params": {"amplitude_ua": 1000.0}, "burst_charge_uc": 2.0, **extra}


def _rec(type_, seq, t_received, ok=True, t_delivered=None, **extra):
    """A device_log.jsonl record as hil_sim.emulator writes it."""
    return {"t_received": t_received, "t_delivered": t_delivered, "seq": seq, "type": type_,
            "channel": 0 if type_ == "TRIGGER" else None, "ok": ok, "error": "", **extra}


def _seizure_session(folder, wrap: bool):
    """Triggers around a seq wrap (65535 -> 0), heartbeats in between, one trigger scheduled (its
    record is written at delivery, after later frames' records). With ``wrap``, the seqs come back
    WRAP_S later: 65535 and 5 as triggers, 8 as a heartbeat."""
    events = [_cmd(65535, 100.0, 99.990), _cmd(5, 100.2, 100.1945), _cmd(8, 100.4, 100.3954)]
    log = [_rec("TRIGGER", 65535, 100.0004, t_delivered=100.0005), _rec("HEARTBEAT", 0, 100.1001),
           _rec("TRIGGER", 5, 100.2005, t_delivered=100.2006), _rec("HEARTBEAT", 6, 100.3002),
           _rec("TRIGGER", 8, 100.4006, t_delivered=100.4007)]
    # e2e (ms): 10.4, 6.0, 5.2; device_receive (ms): 0.4, 0.5, 0.6
    if wrap:
        t = 100.0 + WRAP_S
        events += [_cmd(65535, t, t - 0.0116), _cmd(5, t + 0.2, t + 0.1853), _cmd(6, t + 0.3, t + 0.2956, at=t + 0.35)]
        log += [_rec("TRIGGER", 65535, t + 0.0004, t_delivered=t + 0.0005), _rec("HEARTBEAT", 0, t + 0.1001),
                _rec("TRIGGER", 5, t + 0.2003, t_delivered=t + 0.2004), _rec("HEARTBEAT", 7, t + 0.3201),
                _rec("TRIGGER", 6, t + 0.3004, t_delivered=t + 0.35, at=t + 0.35),  # written when delivered
                _rec("HEARTBEAT", 8, t + 0.4001)]
        # e2e (ms): 12.0, 15.0, 4.8; device_receive (ms): 0.4, 0.3, 0.4
    return _write(folder, events, log)


def _captured_hist(monkeypatch):
    """The values each histogram of the report is drawn from, by label."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    seen = {}
    real = Axes.hist

    def hist(self, x, *a, **kw):
        seen[str(kw.get("label"))] = np.asarray(x, float)
        return real(self, x, *a, **kw)
    monkeypatch.setattr(Axes, "hist", hist)
    return seen


def _end_to_end_hist(seen):
    (vals,) = [v for k, v in seen.items() if k.startswith("end to end")]
    return np.sort(vals)


def _same_figures(got: dict, values_ms: list) -> None:
    want = percentiles_ms(np.asarray(values_ms) * 1e-3)
    assert got.keys() == want.keys() and got["n"] == want["n"]
    for k in ("p50", "p90", "p99", "p999", "max"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


WRAP_E2E_MS = [10.4, 6.0, 5.2, 12.0, 15.0, 4.8]      # each command from its own receipt
WRAP_DEVICE_MS = [0.4, 0.5, 0.6, 0.4, 0.3, 0.4]


def test_seq_reused_after_a_wrap_pairs_with_its_own_receipt_in_metrics(tmp_path):
    m = compute_metrics(_seizure_session(tmp_path / "wrap", wrap=True))
    # Reviewer's case: the old join gave the second seq-5 command the first one's receipt (-6600 s).
    _same_figures(m["end_to_end_ms"], WRAP_E2E_MS)
    _same_figures(m["stage_ms"]["device_receive"], WRAP_DEVICE_MS)
    assert m["stim"]["commands"] == m["stim"]["received_by_device"] == 6
    # Each first receipt went to the first command of its seq: nothing was left to refuse.
    assert m["stim"]["receipts_refused"] == {"before_send": 0, "too_late": 0}


def test_seq_reused_after_a_wrap_pairs_with_its_own_receipt_in_the_report(tmp_path, monkeypatch):
    s = _seizure_session(tmp_path / "wrap", wrap=True)
    from controller.report import plot_report
    seen = _captured_hist(monkeypatch)
    plot_report(s, compute_metrics(s))
    # The histogram is drawn from the same pairs as metrics.json (heartbeat records are no receipts).
    assert _end_to_end_hist(seen) == pytest.approx(sorted(WRAP_E2E_MS), abs=1e-6)


def test_session_without_wrap_keeps_its_figures(tmp_path, monkeypatch):
    s = _seizure_session(tmp_path / "plain", wrap=False)
    m = compute_metrics(s)
    assert m["end_to_end_ms"] == {"p50": 6.0, "p90": None, "p99": None, "p999": None, "max": 10.4, "n": 3}
    _same_figures(m["stage_ms"]["device_receive"], [0.4, 0.5, 0.6])
    assert m["stim"]["commands"] == m["stim"]["received_by_device"] == 3
    assert m["stim"]["charge_uc"] == 6.0
    from controller.report import plot_report
    seen = _captured_hist(monkeypatch)
    plot_report(s, m)
    assert _end_to_end_hist(seen) == pytest.approx([5.2, 6.0, 10.4], abs=1e-6)


def _ads_session(folder):
    """An ADS session whose seq 10 comes back after a wrap: each pulse is its own command's."""
    events = [{"t": 199.0, "kind": "status", "source": "loop", "status": "started", "policy": "ads"}]
    log = []
    for seq, t in ((10, 200.0), (11, 200.5), (10, 200.0 + WRAP_S)):
        spike = t - 0.005
        events.append(_cmd(seq, t, spike, request_source="ads", spike_t=spike, spike_channel=0, at=spike + 0.0075,
                           delay_s=0.0075, blanking_s=0.028))
        log.append(_rec("TRIGGER", seq, t + 0.0003, t_delivered=spike + 0.0075 + 1e-5 * (seq - 9), at=spike + 0.0075))
    return _write(folder, events, log)


def test_ads_pulses_after_a_wrap_are_their_own_commands(tmp_path, monkeypatch):
    s = _ads_session(tmp_path / "ads")
    tl = ads_timeline(read_jsonl(s / "events.jsonl"), read_jsonl(s / "device_log.jsonl"), {})
    spike = tl["cmd"]["spike_t"]
    assert (tl["cmd"]["t_delivered"] - spike) * 1e3 == pytest.approx([7.51, 7.52, 7.51], abs=1e-6)
    a = compute_metrics(s)["ads"]
    assert a["pulses_delivered"] == 3
    assert a["delivered_delay_ms"]["max"] == pytest.approx(7.52, abs=1e-6)
    assert a["schedule_error_ms"]["max"] == pytest.approx(0.02, abs=1e-6)
    from controller.report import build_report
    seen = _captured_hist(monkeypatch)
    build_report(s)
    (vals,) = [v for k, v in seen.items() if k.startswith("delivered")]
    assert np.sort(vals) == pytest.approx([7.51, 7.51, 7.52], abs=1e-6)


# ---------------------------------------------------------------- the join itself


def test_join_never_pairs_a_receipt_older_than_the_command():
    from controller.metrics import join_receipts
    # Seq 3's first receipt is a trigger the host gave up on (no COMMAND event); its seq comes back.
    cmds = [_cmd(3, 5000.0, 4999.99)]
    j = join_receipts(cmds, [_rec("TRIGGER", 3, 10.0), _rec("TRIGGER", 3, 5000.0004)])
    assert j.received_t == [pytest.approx(5000.0004)] and j.before_send == 1


def test_join_leaves_a_command_without_receipt_unpaired_rather_than_take_a_later_ones():
    from controller.metrics import join_receipts
    cmds = [_cmd(4, 10.0, 9.99), _cmd(4, 10.0 + WRAP_S, 9.99 + WRAP_S)]   # the first one's record is missing
    j = join_receipts(cmds, [_rec("TRIGGER", 4, 10.0 + WRAP_S + 0.0003)])
    assert j.received_t == [None, pytest.approx(10.0 + WRAP_S + 0.0003)] and j.too_late == 1
    # Alone, a receipt far beyond any retry budget is not the command's either.
    j = join_receipts(cmds[:1], [_rec("TRIGGER", 4, 10.0 + WRAP_S + 0.0003)])
    assert j.received_t == [None] and j.too_late == 1


def test_join_takes_the_original_receipt_not_a_retry_nor_a_cancelled_trigger_as_received():
    from controller.metrics import join_receipts
    cmds = [_cmd(7, 20.0, 19.99, at=25.0), _cmd(9, 30.0, 29.99, at=35.0), _cmd(9, 30.0 + WRAP_S, 29.99 + WRAP_S)]
    log = [_rec("TRIGGER", 7, 20.0503, duplicate=True),       # the retry, answered from the dedup memory
           _rec("TRIGGER", 9, 30.0002, ok=False, error="cancelled: stopped", at=35.0),
           _rec("TRIGGER", 7, 20.0003, t_delivered=25.0, at=25.0),   # written at delivery, received first
           _rec("TRIGGER", 9, 30.0004 + WRAP_S, t_delivered=30.0005 + WRAP_S)]
    j = join_receipts(cmds, log)
    assert j.received_t == [pytest.approx(20.0003), None, pytest.approx(30.0004 + WRAP_S)]
    assert j.records[1]["ok"] is False          # the cancelled trigger keeps its own record
    assert (j.before_send, j.too_late) == (0, 0)
