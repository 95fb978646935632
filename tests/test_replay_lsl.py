"""Replay through LSL gives the same detections as offline evaluation.

Concatenated real Delhi segments (200 Hz, 1 channel) are pushed by a real
pylsl outlet in another process (faster than real time, sender timestamps on
the 200 Hz grid), pulled by ``controller.sources.lsl.LslSource`` into a
``SharedRing``, read back and fed chunk by chunk to ``SeizureDetectorStage``
-> ``OnnxPredictor.predict``, exactly as the acquisition/loop path does. The
offline evaluation (``OnnxDetector``) of the same samples must give the same
window ends (relative to the first sample) and the same probabilities.
"""
from __future__ import annotations

from controller.lsl_config import ensure_lsl_config

ensure_lsl_config()  # before pylsl loads (here and in the spawned outlet process)

import multiprocessing as mp  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from models.seizure.evaluate import OnnxDetector, default_model_path  # noqa: E402
from models.seizure.recordings import DELHI_FS_HZ, default_delhi_dir, load_delhi  # noqa: E402

pytestmark = [pytest.mark.realtime,
              # The shipped model is tracked in git (its presence is asserted in test_seizure_model.py);
              # only the shared Delhi recordings live outside the repository.
              pytest.mark.skipif(not default_delhi_dir().is_dir(), reason="shared Delhi data missing")]
SPEEDUP = 8.0  # replay this many times faster than real time


def _delhi_sequence() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """6 interictal, 4 ictal, 6 preictal, 4 ictal segments back to back (102 s); truth = the ictal stretches."""
    segs = load_delhi()
    by = {c: [x for k, _, x in segs if k == c] for c in ("ictal", "interictal", "preictal")}
    order = [("interictal", 6), ("ictal", 4), ("preictal", 6), ("ictal", 4)]
    parts, truth, t, used = [], [], 0.0, {"ictal": 0, "interictal": 0, "preictal": 0}
    for cls, n in order:
        for _ in range(n):
            x = by[cls][used[cls]]
            used[cls] += 1
            parts.append(x)
            dur = x.shape[0] / DELHI_FS_HZ
            if cls == "ictal":
                if truth and abs(truth[-1][1] - t) < 1e-9:
                    truth[-1] = (truth[-1][0], t + dur)  # consecutive ictal segments: one stretch
                else:
                    truth.append((t, t + dur))
            t += dur
    return np.concatenate(parts).astype(np.float32), truth


def _outlet(name: str, x: np.ndarray, ready, go) -> None:
    from controller.lsl_config import ensure_lsl_config
    ensure_lsl_config()
    import pylsl as lsl
    info = lsl.StreamInfo(name, "EEG", x.shape[1], DELHI_FS_HZ, "float32", name + "-sid")
    outlet = lsl.StreamOutlet(info, chunk_size=10)
    ready.set()
    go.wait(30)
    t0 = lsl.local_clock()
    chunk = 10
    for i in range(0, x.shape[0], chunk):
        due = t0 + i / DELHI_FS_HZ / SPEEDUP
        while lsl.local_clock() < due:
            time.sleep(0.001)
        idx = np.arange(i, min(i + chunk, x.shape[0]))
        outlet.push_chunk(np.ascontiguousarray(x[idx]), (t0 + idx / DELHI_FS_HZ).tolist())
    time.sleep(3.0)  # keep the outlet alive until the inlet has drained


def test_lsl_replay_matches_offline_evaluation():
    from controller.inference import SeizureDetectorStage
    from controller.ring import SharedRing
    from controller.sources.lsl import LslSource

    x, truth = _delhi_sequence()
    n = x.shape[0]
    det = OnnxDetector(default_model_path())
    t_off, p_off = det.predict(x, DELHI_FS_HZ)

    name = f"stimloop-replay-{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_outlet, args=(name, x, ready, go), daemon=True)
    proc.start()
    ring = None
    src = LslSource(name=name, resolve_timeout_s=15.0, max_buflen_s=60)
    try:
        assert ready.wait(30), "outlet process did not start"
        info = src.open()
        assert info.fs_hz == DELHI_FS_HZ and info.n_channels == 1
        ring = SharedRing.create(None, 1, 8192, DELHI_FS_HZ)
        reader = ring.reader("oldest")
        stage = SeizureDetectorStage(det.contract, info.fs_hz, info.n_channels)
        t_lsl, p_lsl, warm, got = [], [], [], []
        t_first = float("nan")
        go.set()
        deadline = time.monotonic() + n / DELHI_FS_HZ / SPEEDUP + 20.0
        while sum(len(g) for g in got) < n and time.monotonic() < deadline:
            src.read_into(ring)
            res = reader.read_new(copy=True)
            if res.samples.shape[0] == 0:
                continue
            if not got:
                t_first = float(res.timestamps[0])
            got.append(res.samples[:, 0].copy())  # read_new reuses its buffer
            for t_end, f in stage.step(res.samples, res.timestamps):  # the loop's per-chunk path
                t_lsl.append(t_end)
                p_lsl.append(det.predictor.predict(f))
                warm.append(stage.is_warm(t_end))
        assert src.n_dropped == 0
        received = np.concatenate(got)
        assert received.shape[0] == n, f"received {received.shape[0]} of {n} samples"
        assert np.array_equal(received, x[:, 0])  # float32 samples travel bit-exact
    finally:
        src.close()
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        if ring is not None:
            ring.close()
            ring.unlink()

    t_lsl, p_lsl = np.asarray(t_lsl) - t_first, np.asarray(p_lsl)
    assert t_lsl.shape == t_off.shape and t_off.size == int((n / DELHI_FS_HZ - 1.0) / 0.25) + 1
    assert np.allclose(t_lsl, t_off, atol=1e-4)  # same window ends (sender grid, same-host clock offset)
    # The offline evaluator leaves out (NaN) the windows the loop does not act on: the model's warm-up.
    acted = np.asarray(warm)
    assert np.array_equal(np.isfinite(p_off), acted)
    assert np.allclose(p_lsl[acted], p_off[acted], atol=1e-5)  # same probabilities
    # and therefore the same detections
    from models.seizure.scoring import detector_events
    ev_lsl = detector_events(t_lsl, np.where(acted, p_lsl, np.nan), det.threshold, det.min_duration_s,
                             det.refractory_s)
    ev_off = detector_events(t_off, p_off, det.threshold, det.min_duration_s, det.refractory_s)
    assert [round(e[0], 3) for e in ev_lsl] == [round(e[0], 3) for e in ev_off]
    # The first ictal stretch crosses the contract threshold window by window; whether that becomes a
    # detection depends on min_duration_s (at the shipped 1.5 s it does not: p stays above threshold for
    # ~1.25 s in these concatenated 5 s segments, MODEL_CARD.md known limits), so events are compared above.
    a, b = truth[0]
    ictal = (t_off >= a) & (t_off <= b)
    assert np.nanmax(p_off[ictal]) >= det.threshold, (a, b, np.nanmax(p_off[ictal]))
    assert not any(e0 < truth[0][0] for e0, _, _ in ev_off)  # nothing in the 30 s of interictal segments
    assert np.nanmax(p_off[t_off < truth[0][0] - 1.0]) < det.threshold
