"""The published Mayo iEEG seizure detector behind stimloop's ``Detector`` interface.

Sladky et al. 2022 (REFERENCE.md §3): spectrogram CNN + BiLSTM, shipped as
ONNX in the PyPI package ``brainmaze-eeg-models`` (optional extra ``mayo``;
``modelA`` = the published model, weights inside the wheel). It is run with
the package's own high-level ``predict_channel_seizure_probability``: 1 s
segments, 0.5 s hop, 300 s windows every 20 s; the seizure probability is the
softmax class index 3; NaN where it could not evaluate (gaps, flat signal).

Adapter choices (stated in every result):

* rate: the package needs an even integer rate >= 200 Hz. Other rates are
  resampled (``scipy.signal.resample_poly``, offline) to ``MAYO_FS_HZ`` = 256 Hz
  — at 100 or 173.61 Hz the model sees no content above the source Nyquist.
* channels: one trace per channel, combined with a NaN-aware maximum (the
  package works per channel; a seizure on any channel counts).
* time: the package stamps the centre of each 1 s segment; the adapter
  reports the segment *end* (centre + 0.5 s), the moment its data existed,
  like ``OnnxDetector``'s window ends.
* offline only: a 300 s bidirectional context is not causal; latencies are
  those of an offline reviewer, not of a closed loop.
"""
from __future__ import annotations

import math

import numpy as np

from models.seizure.evaluate import EvaluationError

__all__ = ["MayoDetector", "mayo_available", "MAYO_FS_HZ", "MIN_DURATION_S"]

MAYO_FS_HZ = 256.0
MIN_DURATION_S = 300.0  # REFERENCE.md §3: >= 300 s of signal


def mayo_available() -> tuple[bool, str]:
    """``(True, version)`` if ``brainmaze-eeg-models`` and its modelA weights load, else ``(False, reason)``."""
    try:
        import importlib.metadata as md

        from brainmaze_eeg_models.seizure import load_trained_model

        load_trained_model("modelA")
        return True, md.version("brainmaze-eeg-models")
    except Exception as e:  # noqa: BLE001 - the reason is reported verbatim
        return False, f"brainmaze-eeg-models unavailable: {type(e).__name__}: {e}"


class MayoDetector:
    """Mayo ``modelA`` (or ``modelB``) with ``predict(x_uv, fs_hz) -> (t_end_s, p)``; NaN = not evaluated."""

    hop_s = 0.5

    def __init__(self, model: str = "modelA", threshold: float = 0.5, min_duration_s: float = 0.5,
                 refractory_s: float = 5.0):
        ok, info = mayo_available()
        if not ok:
            raise EvaluationError(info)
        from brainmaze_eeg_models.seizure import load_trained_model

        self.model = load_trained_model(model)
        self.name = f"mayo-{model} (brainmaze-eeg-models {info})"
        self.threshold = float(threshold)
        self.min_duration_s = float(min_duration_s)
        self.refractory_s = float(refractory_s)

    @staticmethod
    def _rate_ok(fs_hz: float) -> bool:
        return float(fs_hz).is_integer() and int(fs_hz) % 2 == 0 and fs_hz >= 200

    def predict(self, x_uv: np.ndarray, fs_hz: float) -> tuple[np.ndarray, np.ndarray]:
        from brainmaze_eeg_models.seizure import predict_channel_seizure_probability

        x = np.asarray(x_uv, dtype=np.float64)
        if x.ndim == 1:
            x = x[:, None]
        if not (math.isfinite(fs_hz) and fs_hz > 0):
            raise EvaluationError(f"Mayo model: fs_hz={fs_hz!r} invalid, expected a rate > 0 Hz")
        if x.shape[0] / fs_hz < MIN_DURATION_S:
            raise EvaluationError(f"Mayo model needs >= {MIN_DURATION_S:g} s of signal (REFERENCE.md §3), "
                                  f"got {x.shape[0] / fs_hz:.1f} s")
        fs = float(fs_hz)
        if not self._rate_ok(fs):
            from scipy.signal import resample_poly

            from controller.resample import rational_ratio

            up, down = rational_ratio(fs, MAYO_FS_HZ)
            bad = ~np.isfinite(x)
            x = resample_poly(np.where(bad, 0.0, x), up, down, axis=0)
            if bad.any():  # keep gaps as gaps: a resampled zero-fill would look like data
                src = np.minimum((np.arange(x.shape[0]) * down) // up, bad.shape[0] - 1)
                x[bad[src]] = np.nan
            fs = MAYO_FS_HZ
        traces = []
        t = None
        for ch in range(x.shape[1]):
            t, p = predict_channel_seizure_probability(x[:, ch], int(fs), model=self.model)
            traces.append(p)
        P = np.vstack(traces)
        with np.errstate(all="ignore"):
            allnan = np.all(np.isnan(P), axis=0)
            p = np.where(allnan, np.nan, np.nanmax(np.where(np.isnan(P), -np.inf, P), axis=0))
        return np.asarray(t, dtype=np.float64) + 0.5, p
