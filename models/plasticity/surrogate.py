"""ONNX surrogate of the plasticity simulator: protocol parameters → expected Δw.

The ONNX graph (StandardScaler → regressor, exported with skl2onnx) takes the
*encoded* feature row (``FEATURE_NAMES``, float32). Encoding from raw protocol
parameters (``RAW_INPUTS``) happens here, in NumPy, identically for training
and inference; the contract in the model's ``metadata_props``
(key ``stimloop.contract``) lists both, with units, ranges and formulas.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from models.plasticity.protocols import HILL_N, I50_UA, Q50_NC, TAU_MEMBRANE_S, WAVEFORMS, Protocol
from models.plasticity.stdp import DEFAULT_MODEL

__all__ = ["RAW_INPUTS", "FEATURE_NAMES", "CONTRACT_KEY", "DEFAULT_MODEL_PATH", "encode", "raw_from_protocols",
           "make_contract", "PlasticityPredictor"]

CONTRACT_KEY = "stimloop.contract"
_WF_CODE = {w: i for i, w in enumerate(WAVEFORMS)}
DEFAULT_MODEL_PATH = Path(__file__).with_name("plasticity_v1.onnx")
_TAU_C_S = DEFAULT_MODEL.reward.tau_c_s  # REFERENCE.md §7: τc = 1 s
_TAU_PLUS_MS = DEFAULT_MODEL.rule.tau_plus_s * 1e3
_TAU_MINUS_MS = DEFAULT_MODEL.rule.tau_minus_s * 1e3
_TWO_PI_TAU_M = 2 * math.pi * TAU_MEMBRANE_S

# (name, unit, low, high): the surrogate's validity domain = its training ranges.
RAW_INPUTS: tuple[tuple[str, str, float, float], ...] = (
    ("frequency_hz", "Hz", 1.0, 100.0),
    ("waveform", "code 0=pulsed 1=sine 2=ti", 0.0, 2.0),
    ("pulse_width_us", "us", 40.0, 1000.0),
    ("timing_ms", "ms (t_post - t_pre)", -50.0, 50.0),
    ("n_pulses", "count", 10.0, 900.0),
    ("baseline_w", "fraction of w_max", 0.0, 1.0),
    ("reward_um", "uM dopamine (0 = no reward)", 0.0, 1.0),
    ("reward_delay_s", "s after last spike", 0.0, 5.0),
    ("amplitude_ua", "uA", 200.0, 3000.0),
)
RAW_NAMES = tuple(r[0] for r in RAW_INPUTS)
_LO = np.array([r[2] for r in RAW_INPUTS])
_HI = np.array([r[3] for r in RAW_INPUTS])
_LO_T = tuple(float(v) for v in _LO)
_HI_T = tuple(float(v) for v in _HI)

FEATURE_NAMES = ("log10_frequency_hz", "is_pulsed", "is_sine", "is_ti", "log10_pulse_width_us", "timing_ms",
                 "log10_n_pulses", "baseline_w", "reward_um", "reward_trace", "log10_amplitude_ua",
                 "log10_charge_nc", "ltp_kernel", "ltd_kernel", "p_recruit")
_FEATURE_FORMULAS = {
    "log10_frequency_hz": "log10(frequency_hz)", "is_pulsed": "waveform == 0", "is_sine": "waveform == 1",
    "is_ti": "waveform == 2", "log10_pulse_width_us": "log10(pulse_width_us)", "timing_ms": "timing_ms",
    "log10_n_pulses": "log10(n_pulses)", "baseline_w": "baseline_w", "reward_um": "reward_um",
    "reward_trace": "reward_um * exp(-reward_delay_s / 1.0)", "log10_amplitude_ua": "log10(amplitude_ua)",
    "log10_charge_nc": "log10(amplitude_ua * pulse_width_us * 1e-3)",
    "ltp_kernel": "exp(-timing_ms / 16.8) if timing_ms >= 0 else 0",
    "ltd_kernel": "exp(timing_ms / 33.7) if timing_ms < 0 else 0",
    "p_recruit": "pulsed: hill(amplitude_ua*pulse_width_us*1e-3, 100 nC, 2); sine/ti: "
                 "hill(amplitude_ua/sqrt(1+(2*pi*frequency_hz*0.01)^2), 500 uA, 2)",
}


def _check_range(raw: np.ndarray) -> None:
    bad = (raw < _LO) | (raw > _HI) | ~np.isfinite(raw)
    if bad.any():
        rows, cols = np.nonzero(np.atleast_2d(bad))
        c = int(cols[0])
        v = float(np.atleast_2d(raw)[rows[0], c])
        raise ValueError(f"plasticity surrogate input {RAW_NAMES[c]} = {v!r} (row {int(rows[0])}): "
                         f"expected [{_LO[c]}, {_HI[c]}] {RAW_INPUTS[c][1]}, the range it was trained on")


def encode(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Raw parameter rows (n, len(RAW_INPUTS)) → float32 feature rows (n, len(FEATURE_NAMES))."""
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float64))
    if raw.shape[1] != len(RAW_INPUTS):
        raise ValueError(f"raw inputs have {raw.shape[1]} columns: expected {len(RAW_INPUTS)} ({', '.join(RAW_NAMES)})")
    _check_range(raw)
    if out is None:
        out = np.empty((raw.shape[0], len(FEATURE_NAMES)), dtype=np.float32)
    f, wf, pw, dt, n, w0, r, delay, amp = raw.T
    out[:, 0] = np.log10(f)
    out[:, 1] = wf == 0
    out[:, 2] = wf == 1
    out[:, 3] = wf == 2
    out[:, 4] = np.log10(pw)
    out[:, 5] = dt
    out[:, 6] = np.log10(n)
    out[:, 7] = w0
    out[:, 8] = r
    out[:, 9] = r * np.exp(-delay / _TAU_C_S)
    out[:, 10] = np.log10(amp)
    out[:, 11] = np.log10(amp * pw * 1e-3)
    # The STDP kernels and the recruitment probability are known in closed form;
    # giving them to the regressor spares it learning the sign flip at Δt = 0.
    out[:, 12] = np.where(dt >= 0, np.exp(-np.abs(dt) / _TAU_PLUS_MS), 0.0)
    out[:, 13] = np.where(dt < 0, np.exp(-np.abs(dt) / _TAU_MINUS_MS), 0.0)
    q = (amp * pw * 1e-3) ** HILL_N
    drive = (amp / np.sqrt(1.0 + (_TWO_PI_TAU_M * f) ** 2)) ** HILL_N
    out[:, 14] = np.where(wf == 0, q / (q + Q50_NC ** HILL_N), drive / (drive + I50_UA ** HILL_N))
    return out


def _encode_one(raw, out: np.ndarray) -> None:
    """Scalar twin of ``encode`` for one row (pure Python math: faster than NumPy on 1 row)."""
    f, wf, pw, dt, n, w0, r, delay, amp = raw
    for c in range(len(RAW_INPUTS)):
        v = raw[c]
        if not _LO_T[c] <= v <= _HI_T[c]:  # also false for NaN
            _check_range(np.asarray(raw, dtype=np.float64))
    q = (amp * pw * 1e-3) ** HILL_N
    drive = (amp / math.sqrt(1.0 + (_TWO_PI_TAU_M * f) ** 2)) ** HILL_N
    out[:] = (math.log10(f), wf == 0, wf == 1, wf == 2, math.log10(pw), dt, math.log10(n), w0, r,
              r * math.exp(-delay / _TAU_C_S), math.log10(amp), math.log10(amp * pw * 1e-3),
              math.exp(-dt / _TAU_PLUS_MS) if dt >= 0 else 0.0, math.exp(dt / _TAU_MINUS_MS) if dt < 0 else 0.0,
              q / (q + Q50_NC ** HILL_N) if wf == 0 else drive / (drive + I50_UA ** HILL_N))


def raw_from_protocols(protocols: list[Protocol]) -> np.ndarray:
    """Rows of raw surrogate inputs for protocols (no reward → reward 0, delay 0)."""
    rows = [[p.frequency_hz, WAVEFORMS.index(p.waveform), p.pulse_width_us, p.timing_ms, p.n_pulses, p.baseline_w,
             0.0 if p.reward_delay_s is None else p.reward, 0.0 if p.reward_delay_s is None else p.reward_delay_s,
             p.amplitude_ua] for p in protocols]
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(RAW_INPUTS))


def make_contract(metrics: dict, version: str = "1") -> dict:
    """The JSON stored under ``stimloop.contract`` in the ONNX metadata."""
    return {
        "kind": "plasticity_surrogate",
        "inputs": [{"name": n, "unit": u, "range": [lo, hi]} for n, u, lo, hi in RAW_INPUTS],
        "features": [{"name": n, "formula": _FEATURE_FORMULAS[n]} for n in FEATURE_NAMES],
        "onnx_input": "features (1 x n_features float32, in 'features' order)",
        "output": "delta_w",
        "output_unit": "fraction of w_max (w_end - baseline_w)",
        "simulator": "models.plasticity: triplet STDP (Pfister & Gerstner 2006, visual cortex all-to-all minimal), "
                     "soft bounds [0, 1], dopamine reward (Izhikevich 2007)",
        "metrics": metrics,
        "version": version,
    }


#: The TI carrier of every training protocol (models/plasticity/train.py CARRIER_HZ).
TRAINING_CARRIER_HZ = 2000.0


def _check_carrier(protocol: Protocol) -> None:
    """Refuse a TI protocol whose carrier is not the training one: the carrier is not an input
    (every training protocol had this carrier), and the simulated Δw moves with it
    (models/plasticity/MODEL_CARD.md). One check for every entry point that takes protocols."""
    if protocol.waveform == "ti" and protocol.carrier_hz != TRAINING_CARRIER_HZ:
        raise ValueError(f"TI carrier_hz={protocol.carrier_hz:g}: this model was trained with a "
                         f"{TRAINING_CARRIER_HZ:g} Hz carrier only (models/plasticity/MODEL_CARD.md)")


class PlasticityPredictor:
    """Predict Δw of a stimulation protocol with the shipped ONNX surrogate.

    onnxruntime runs single-threaded; ``predict`` writes into preallocated,
    IO-bound input/output buffers so that a call allocates almost nothing.
    """

    def __init__(self, path: str | Path = DEFAULT_MODEL_PATH) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plasticity surrogate {path}: file not found (train it with "
                                    f"`stimloop train plasticity`)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta = self._sess.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise ValueError(f"{path}: no '{CONTRACT_KEY}' in ONNX metadata_props: expected a plasticity surrogate")
        self.contract = json.loads(meta[CONTRACT_KEY])
        names = tuple(i["name"] for i in self.contract["inputs"])
        feats = tuple(i["name"] for i in self.contract["features"])
        if names != RAW_NAMES or feats != FEATURE_NAMES:
            raise ValueError(f"{path}: contract inputs {names} / features {feats} do not match this code "
                             f"({RAW_NAMES} / {FEATURE_NAMES}): expected the same version")
        self._in_name = self._sess.get_inputs()[0].name
        self._out_name = self._sess.get_outputs()[0].name
        self._x = np.zeros((1, len(FEATURE_NAMES)), dtype=np.float32)
        self._y = np.zeros((1, 1), dtype=np.float32)
        self._binding = self._sess.io_binding()
        self._binding.bind_cpu_input(self._in_name, self._x)
        self._binding.bind_output(self._out_name, "cpu", 0, np.float32, list(self._y.shape), self._y.ctypes.data)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Column order of the raw arrays ``predict_many`` takes."""
        return RAW_NAMES

    def predict(self, protocol: Protocol) -> float:
        """Expected Δw of one protocol (raises if a parameter is outside the trained range)."""
        _check_carrier(protocol)
        rewarded = protocol.reward_delay_s is not None
        raw = (float(protocol.frequency_hz), float(_WF_CODE[protocol.waveform]), float(protocol.pulse_width_us),
               float(protocol.timing_ms), float(protocol.n_pulses), float(protocol.baseline_w),
               float(protocol.reward) if rewarded else 0.0, float(protocol.reward_delay_s) if rewarded else 0.0,
               float(protocol.amplitude_ua))
        _encode_one(raw, self._x[0])
        self._sess.run_with_iobinding(self._binding)
        return float(self._y[0, 0])

    def predict_many(self, raw: np.ndarray) -> np.ndarray:
        """Δw for rows of raw inputs, shape (n, 9), columns in ``input_names`` order.

        Raw rows carry no carrier: a TI row stands for the training carrier
        (``TRAINING_CARRIER_HZ``). Protocols with their own carrier go through
        ``predict`` / ``predict_protocols`` / ``best_protocol``, which check it.
        """
        x = encode(raw)
        return self._sess.run([self._out_name], {self._in_name: x})[0].reshape(-1).astype(np.float64)

    def predict_protocols(self, protocols: list[Protocol]) -> np.ndarray:
        """Δw for a list of protocols (raises for a TI protocol with another carrier than the training one)."""
        for p in protocols:
            _check_carrier(p)
        return self.predict_many(raw_from_protocols(protocols))

    def best_protocol(self, candidates: list[dict], maximize: bool = True) -> tuple[dict, float]:
        """Choose the candidate (dicts of ``Protocol`` fields) with the largest Δw (smallest if not ``maximize``).

        Returns the chosen candidate dict (as given) and its predicted Δw.
        """
        if not candidates:
            raise ValueError("candidates is empty: expected at least one protocol dict")
        protocols = [Protocol.from_dict(c) for c in candidates]
        dw = self.predict_protocols(protocols)
        i = int(np.argmax(dw) if maximize else np.argmin(dw))
        return dict(candidates[i]), float(dw[i])

