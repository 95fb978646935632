"""A prediction that is not acted upon says why: the model's warm-up, stimulation, missing samples, bad samples."""
import numpy as np

from conftest import closed_loop_rig

from controller.events import EventKind

FS, N_CH, CHUNK = 256.0, 4, 32


def test_predictions_say_why_they_are_not_acted_on():
    step, _, _, clock = closed_loop_rig(FS, N_CH)
    loop = step.loop
    rng = np.random.default_rng(0)
    k = [0]

    def feed(seconds: float, skip: int = 0, nan: bool = False) -> list[dict]:
        preds = []
        k[0] += skip   # samples that never arrived: a timestamp gap
        for _ in range(int(seconds * FS / CHUNK)):
            x = rng.normal(0, 20, (CHUNK, N_CH)).astype(np.float32)
            if nan:
                x[3, 0] = np.nan
            ts = (k[0] + np.arange(CHUNK)) / FS
            k[0] += CHUNK
            clock.advance_to(float(ts[-1]))
            preds += [e.data for e in step.step(x, ts) if e.kind is EventKind.PREDICTION]
            step.housekeeping()
        return preds

    warm = loop.stage.contract.warmup_s
    first = feed(warm + loop.window_s + 2.0)
    assert first[0]["valid"] is False and first[0]["invalid"] == "model warm-up"
    assert first[-1]["valid"] is True and "invalid" not in first[-1]

    after_gap = feed(1.0, skip=64)
    assert after_gap[0]["invalid"] == "samples missing (timestamp gap)"

    feed(loop.window_s + 1.0)                        # clean again
    bad = feed(0.5, nan=True)
    assert bad and all(p["invalid"] == "bad samples" for p in bad)

    feed(loop.window_s + 2.0)
    t_now = k[0] / FS
    loop.quality.blank(t_now, t_now + 0.1)           # a burst delivered now: its artifact is never acted on
    after_stim = feed(0.5)
    assert after_stim and after_stim[0]["invalid"] == "stimulation (blanking)"
    assert feed(loop.window_s + 1.0)[-1]["valid"] is True
