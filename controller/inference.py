"""ONNX model contract, single-threaded predictor, deadline accounting, detector stage.

A shipped model carries its own contract in the ONNX ``metadata_props`` under
``stimloop.contract`` (JSON; docs/architecture.md, "Predictor contract"). The
controller reads it, checks it can fit the stream at start-up
(``ModelContract.check_stream``), then per chunk runs
``SeizureDetectorStage.step`` (resample -> causal prefilter -> windows ->
feature pipeline) and ``OnnxPredictor.predict`` on each window's features.
``DeadlineAccount`` decides whether a result is still fresh enough to act on.

Everything here except ``OnnxPredictor`` (which holds an onnxruntime session)
is functional core: no I/O, no clock reads.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from controller.features import PIPELINES, make_pipeline
from controller.resample import StreamResampler

__all__ = [
    "CONTRACT_KEY",
    "ContractError",
    "ModelContract",
    "OnnxPredictor",
    "DeadlineAccount",
    "SeizureDetectorStage",
    "read_contract",
]

CONTRACT_KEY = "stimloop.contract"
#: ONNX output types a probability may have (onnxruntime's names)
PROBABILITY_TYPES = ("tensor(float)", "tensor(double)")
#: characters of an offending value quoted in a contract error: a whole foreign contract is kilobytes
MAX_QUOTED_CHARS = 80
# A source rate must be representable within this relative error by the
# resampler's rational approximation; beyond it spectral features shift.
MAX_RATE_ERROR = 1e-3


#: Seconds above threshold before a detection when a model's contract has no ``min_duration_s``
#: (an optional extra key; the shipped seizure model carries it, models/seizure/train.py).
DEFAULT_MIN_DURATION_S = 0.5


def contract_min_duration_s(contract: "ModelContract") -> float:
    """The contract's ``min_duration_s``, or ``DEFAULT_MIN_DURATION_S`` for a model that does not declare it."""
    return float((contract.model_extra or {}).get("min_duration_s", DEFAULT_MIN_DURATION_S))


class ContractError(ValueError):
    """The model's contract is malformed or cannot be fitted to the stream."""


def _problem(err: dict) -> str:
    """One validation error: where, what, and the offending value, shortened (a missing field has none:
    pydantic's ``input`` is then the whole contract)."""
    where = ".".join(map(str, err["loc"])) or "contract"
    if err["type"] == "missing":
        return f"{where}: missing"
    got = repr(err.get("input"))
    if len(got) > MAX_QUOTED_CHARS:
        got = got[:MAX_QUOTED_CHARS - 1] + "…"
    return f"{where}: {err['msg']} (got {got})"


class ModelContract(BaseModel):
    """What a model expects: rate, windowing, feature pipeline, output, threshold."""

    model_config = ConfigDict(extra="allow", frozen=True)

    fs_hz: float = Field(gt=0)
    window_s: float = Field(gt=0)
    hop_s: float = Field(gt=0)
    n_channels: int = Field(ge=0, description="0 = any channel count")
    feature_pipeline: str
    feature_names: tuple[str, ...]
    output: str = "p_seizure"
    threshold: float = Field(ge=0.0, le=1.0)
    version: str
    input_name: str = "features"
    # Seconds of stream after start-up during which the pipeline's running state
    # is still settling: results exist but must not be acted upon.
    warmup_s: float = Field(default=0.0, ge=0.0)
    # Lowest source rate the model takes (sources are resampled to fs_hz, but below the rates it was
    # trained on its beta/gamma bands hold nothing). 100 Hz: the lowest rate in the shipped seizure
    # model's training data (models/seizure/MODEL_CARD.md).
    min_source_fs_hz: float = Field(default=100.0, gt=0)

    @field_validator("feature_names")
    @classmethod
    def _names_unique(cls, v):
        if len(v) == 0 or len(set(v)) != len(v):
            raise ValueError(f"feature_names must be non-empty and unique, got {list(v)}")
        return v

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def window_n(self) -> int:
        return int(round(self.window_s * self.fs_hz))

    @property
    def hop_n(self) -> int:
        return int(round(self.hop_s * self.fs_hz))

    @classmethod
    def from_json(cls, text: str, origin: str = "contract") -> "ModelContract":
        """Parse the ``stimloop.contract`` JSON; ``ContractError`` names what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ContractError(f"{origin}: {CONTRACT_KEY} is not valid JSON ({e})") from None
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind == "plasticity_surrogate":
            raise ContractError(f"{origin} is the plasticity surrogate (models/plasticity, {CONTRACT_KEY} kind "
                                f"{kind!r}), not a seizure model: point model.path at a seizure detector such as "
                                "models/seizure/seizure_v1.onnx") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(_problem(err) for err in e.errors())
            what = f" (its kind is {kind!r}, not a seizure detector's)" if kind is not None else ""
            raise ContractError(f"{origin}: invalid {CONTRACT_KEY}{what}: {problems}") from None

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def check_stream(self, fs_hz: float, n_channels: int) -> None:
        """Raise ``ContractError`` if a stream of ``n_channels`` at ``fs_hz`` cannot feed this model."""
        if not (isinstance(n_channels, (int, np.integer)) and n_channels >= 1):
            raise ContractError(f"stream n_channels must be an integer >= 1, got {n_channels!r}")
        if self.n_channels not in (0, n_channels):
            raise ContractError(f"model {self.version} needs {self.n_channels} channels, the stream has {n_channels}")
        if not (isinstance(fs_hz, (int, float, np.floating)) and math.isfinite(fs_hz) and fs_hz > 0):
            raise ContractError(f"stream fs_hz must be a finite rate > 0 Hz, got {fs_hz!r}")
        if fs_hz < self.min_source_fs_hz:
            raise ContractError(f"stream rate {fs_hz:g} Hz is below the {self.min_source_fs_hz:g} Hz model {self.version} "
                                f"takes (min_source_fs_hz: the lowest rate it was trained on)")
        if self.feature_pipeline not in PIPELINES:
            raise ContractError(f"model {self.version} names feature pipeline {self.feature_pipeline!r}, "
                                f"which this controller does not have (known: {sorted(PIPELINES)})")
        try:
            pipe = make_pipeline(self.feature_pipeline, self.fs_hz, n_channels, self.hop_s)
        except ValueError as e:
            raise ContractError(f"model {self.version}: pipeline {self.feature_pipeline!r} rejects the contract: {e}") from None
        if tuple(pipe.feature_names) != tuple(self.feature_names):
            raise ContractError(f"model {self.version} expects features {list(self.feature_names)}, pipeline "
                                f"{self.feature_pipeline!r} produces {list(pipe.feature_names)}")
        if self.window_n < 8 or self.hop_n < 1:
            raise ContractError(f"model window {self.window_s} s / hop {self.hop_s} s at {self.fs_hz} Hz is too short "
                                f"(window >= 8 samples, hop >= 1 sample expected)")
        try:   # one window through the pipeline now, so a window it cannot use fails here, not mid-session
            pipe.step(np.zeros((self.window_n, max(1, n_channels)), dtype=np.float32))
        except ValueError as e:
            raise ContractError(f"model {self.version}: pipeline {self.feature_pipeline!r} cannot use a "
                                f"{self.window_s:g} s window at {self.fs_hz:g} Hz: {e}") from None
        if fs_hz != self.fs_hz:
            try:
                rs = StreamResampler(fs_hz, self.fs_hz, 1)
            except ValueError as e:
                raise ContractError(f"stream rate {fs_hz:g} Hz cannot be resampled to the model's {self.fs_hz:g} Hz: "
                                    f"{e}") from None
            if abs(rs.rate_error) > MAX_RATE_ERROR:
                raise ContractError(f"stream rate {fs_hz} Hz cannot be resampled to the model's {self.fs_hz} Hz within "
                                    f"{MAX_RATE_ERROR:.1%} (best {rs.up}/{rs.down}, error {rs.rate_error:+.3%})")


def read_contract(path: str | Path) -> ModelContract:
    """Read the contract from an ONNX file's metadata (no inference session needed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as exc:   # protobuf DecodeError and friends: say what the file is not
        raise ContractError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if CONTRACT_KEY not in meta:
        raise ContractError(f"{path}: no {CONTRACT_KEY!r} in metadata_props (keys: {sorted(meta)})")
    return ModelContract.from_json(meta[CONTRACT_KEY], origin=str(path))


class OnnxPredictor:
    """One onnxruntime session, single-threaded, with a preallocated input.

    ``predict(features)`` copies the ``(n_features,)`` vector into the bound
    input buffer, runs the model and returns the contract's output (a
    probability) as a float. ``use_iobinding`` binds the input and output
    buffers once (REFERENCE.md §8: lowest latency for tiny models); the bench
    ``python -m controller.bench_inference`` measures both paths.
    """

    def __init__(self, path: str | Path, use_iobinding: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist")
        blob = self.path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises classes of its own (InvalidProtobuf, …)
            raise ContractError(f"{self.path}: not an ONNX model onnxruntime can load "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise ContractError(f"{self.path}: no {CONTRACT_KEY!r} in metadata_props (keys: {sorted(meta)})")
        self.contract = ModelContract.from_json(meta[CONTRACT_KEY], origin=str(self.path))
        c = self.contract
        inputs = {i.name: i for i in self.session.get_inputs()}
        if c.input_name not in inputs:
            raise ContractError(f"{self.path}: contract input {c.input_name!r} not in model inputs {sorted(inputs)}")
        width = inputs[c.input_name].shape[-1]
        if isinstance(width, int) and width != c.n_features:
            raise ContractError(f"{self.path}: model input {c.input_name!r} has {width} features, "
                                f"contract lists {c.n_features}")
        if inputs[c.input_name].type != "tensor(float)":
            raise ContractError(f"{self.path}: model input {c.input_name!r} is {inputs[c.input_name].type}, "
                                f"expected tensor(float) (float32 features)")
        outputs = {o.name: o for o in self.session.get_outputs()}
        if c.output not in outputs:
            raise ContractError(f"{self.path}: contract output {c.output!r} not in model outputs {sorted(outputs)}")
        if outputs[c.output].type not in PROBABILITY_TYPES:
            # e.g. an ArgMax class label (int64): read as p it is 0 or 1, and 1 >= any threshold
            raise ContractError(f"{self.path}: contract output {c.output!r} is {outputs[c.output].type}, expected "
                                f"{' or '.join(PROBABILITY_TYPES)} (a seizure probability; a class label or a "
                                "score of another type is not one)")
        self._x = np.zeros((1, c.n_features), dtype=np.float32)
        probe = self.session.run([c.output], {c.input_name: self._x})[0]
        if np.asarray(probe).size != 1:
            # e.g. (1, 2) class probabilities: taking the first would read P(no seizure) as p_seizure
            raise ContractError(f"{self.path}: contract output {c.output!r} has shape {np.shape(probe)} for one "
                                f"feature vector, expected one value (the probability)")
        value = float(np.asarray(probe).flat[0])
        if math.isfinite(value) and not 0.0 <= value <= 1.0:
            # A logit or an unscaled score: compared with a probability threshold it means nothing.
            raise ContractError(f"{self.path}: contract output {c.output!r} is {value:.6g} for an all-zero feature "
                                "vector, expected a probability in [0, 1] (a logit or score is not one)")
        self._use_iobinding = bool(use_iobinding)
        if self._use_iobinding:
            self._y = np.zeros(probe.shape, dtype=probe.dtype)
            self._binding = self.session.io_binding()
            # CPU OrtValues wrap the numpy buffers: writing self._x updates the input in place.
            self._x_ort = ort.OrtValue.ortvalue_from_numpy(self._x)
            self._y_ort = ort.OrtValue.ortvalue_from_numpy(self._y)
            self._binding.bind_ortvalue_input(c.input_name, self._x_ort)
            self._binding.bind_ortvalue_output(c.output, self._y_ort)
        self._feed = {c.input_name: self._x}
        self._fetch = [c.output]

    def predict(self, features: np.ndarray) -> float:
        """Probability for one ``(n_features,)`` feature vector."""
        f = np.asarray(features)
        if f.shape[-1] != self._x.shape[1] or f.size != self._x.shape[1]:
            raise ValueError(f"features must have shape ({self._x.shape[1]},), got {f.shape}")
        self._x[0] = f.reshape(-1)
        if self._use_iobinding:
            self.session.run_with_iobinding(self._binding)
            return float(self._y.flat[0])
        return float(self.session.run(self._fetch, self._feed)[0].flat[0])

    def predict_batch(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for ``(n, n_features)`` features (offline evaluation, not the real-time path)."""
        f = np.ascontiguousarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self._x.shape[1]:
            raise ValueError(f"features must have shape (n, {self._x.shape[1]}), got {f.shape}")
        out = self.session.run(self._fetch, {self.contract.input_name: f})[0]
        return np.asarray(out, dtype=np.float64).reshape(f.shape[0], -1)[:, 0]


class DeadlineAccount:
    """Counts predictions that came too late to act on.

    ``check(t_window_end, t_result)`` returns True when the result arrived
    within ``deadline_s`` of the end of its window (session-clock seconds);
    otherwise it counts a miss and returns False, and the caller must drop
    the result (a stale detection must never trigger stimulation).
    ``skip(t_window_end)`` counts a window that got no result at all.
    """

    def __init__(self, deadline_s: float):
        if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
            raise ValueError(f"deadline_s must be a finite number > 0 s, got {deadline_s!r}")
        self.deadline_s = float(deadline_s)
        self.n_checked = 0
        self.n_on_time = 0
        self.n_late = 0
        self.n_skipped = 0
        self.max_latency_s = 0.0
        self.last_latency_s = math.nan

    @property
    def n_missed(self) -> int:
        """Late results plus windows that never got a result."""
        return self.n_late + self.n_skipped

    def check(self, t_window_end: float, t_result: float) -> bool:
        """True if the result may be acted upon; False (and counted) if it is late or its times are invalid."""
        self.n_checked += 1
        latency = t_result - t_window_end
        self.last_latency_s = latency
        if not math.isfinite(latency) or latency < 0 or latency > self.deadline_s:
            # Non-finite or negative latency means the clocks are inconsistent:
            # treat it as late, never as on time.
            self.n_late += 1
            if math.isfinite(latency):
                self.max_latency_s = max(self.max_latency_s, latency)
            return False
        self.n_on_time += 1
        self.max_latency_s = max(self.max_latency_s, latency)
        return True

    def skip(self, t_window_end: float) -> None:
        """Count a window that was dropped without a result (e.g. the predictor fell behind)."""
        self.n_skipped += 1

    def summary(self) -> dict[str, Any]:
        return {"deadline_s": self.deadline_s, "n_checked": self.n_checked, "n_on_time": self.n_on_time,
                "n_late": self.n_late, "n_skipped": self.n_skipped, "n_missed": self.n_missed,
                "max_latency_s": self.max_latency_s}


class SeizureDetectorStage:
    """Per-chunk front end of a model: resample, prefilter, window, features.

    ``step(chunk (n, ch), timestamps (n,))`` returns a list of
    ``(window_end_t, features)`` for every hop completed by this chunk, where
    ``window_end_t`` is the timestamp of the newest source sample in the
    window (the moment the window's data existed) and ``features`` is a
    fresh ``(n_features,)`` float32 copy ready for ``OnnxPredictor.predict``.
    The first result comes once a full window has been collected; results
    before ``warm`` is True (the contract's ``warmup_s``) must not be acted upon.
    """

    def __init__(self, contract: ModelContract, source_fs_hz: float, n_channels: int):
        contract.check_stream(source_fs_hz, n_channels)
        self.contract = contract
        self.source_fs_hz = float(source_fs_hz)
        self.n_channels = int(n_channels)
        self.pipeline = make_pipeline(contract.feature_pipeline, contract.fs_hz, n_channels, contract.hop_s)
        self.prefilter = self.pipeline.make_prefilter()
        self.resampler = (StreamResampler(source_fs_hz, contract.fs_hz, n_channels)
                          if source_fs_hz != contract.fs_hz else None)
        self.window_n = contract.window_n
        self.hop_n = contract.hop_n
        self._cap = 4 * self.window_n
        self._buf = np.zeros((self._cap, self.n_channels), dtype=np.float32)
        self._tbuf = np.zeros(self._cap, dtype=np.float64)
        self._fill = 0
        self._since_hop = 0       # model-rate samples since the last emitted window
        self._n_windows = 0       # windows emitted
        #: end time of the first window past the warm-up (``None`` until then)
        self.warm_from_t: float | None = None
        self._warm_windows = math.ceil(contract.warmup_s / contract.hop_s - 1e-9)
        self._src_t = np.zeros(0, dtype=np.float64)  # recent source timestamps (resampling only)
        self._src_base = 0        # absolute source index of _src_t[0]
        #: end times of the windows of the last ``step`` that were flat on every channel (no signal)
        self.flat_window_t: list[float] = []

    @property
    def warm(self) -> bool:
        """True once a window past the warm-up has come out (see ``is_warm``)."""
        return self.warm_from_t is not None

    def is_warm(self, window_end_t: float) -> bool:
        """May the window ending at ``window_end_t`` be acted upon? Only once ``contract.warmup_s``
        of windows (counted from the first, as the pipeline counts its warm-up) have gone by; per
        window, so a chunk that completes the warm-up does not make its earlier windows actionable."""
        return self.warm_from_t is not None and window_end_t >= self.warm_from_t

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self._cap)
        buf = np.zeros((cap, self.n_channels), dtype=np.float32)
        tbuf = np.zeros(cap, dtype=np.float64)
        buf[:self._fill] = self._buf[:self._fill]
        tbuf[:self._fill] = self._tbuf[:self._fill]
        self._buf, self._tbuf, self._cap = buf, tbuf, cap

    def step(self, chunk: np.ndarray, timestamps: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """Consume one source chunk; return ``[(window_end_t, features), ...]`` for each completed hop."""
        x = np.asarray(chunk)
        if x.ndim == 1 and self.n_channels == 1:
            x = x[:, None]
        ts = np.asarray(timestamps, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_channels:
            raise ValueError(f"chunk must be (n, {self.n_channels}), got shape {np.shape(chunk)}")
        if ts.shape != (x.shape[0],):
            raise ValueError(f"timestamps must have shape ({x.shape[0]},), got {ts.shape}")
        self.flat_window_t.clear()   # read by the caller right after this step
        if x.shape[0] == 0:
            return []
        if not np.isfinite(x).all():
            # One NaN would poison the filters' state and the running baselines for good; the loop
            # leaves such rows out before this (controller.data_quality.DataQuality).
            raise ValueError("chunk holds NaN/inf samples: leave them out first (controller.data_quality)")
        if self.resampler is not None:
            y, src_idx = self.resampler.process(x)
            # Keep just enough source timestamps to map this chunk's outputs.
            self._src_t = np.concatenate([self._src_t, ts])
            ty = self._src_t[src_idx - self._src_base] if y.shape[0] else np.zeros(0)
            drop = self._src_t.size - 1
            if drop > 0:
                self._src_t = self._src_t[drop:]
                self._src_base += drop
        else:
            y, ty = x, ts
        if y.shape[0] == 0:
            return []
        if self.prefilter is not None:
            y = self.prefilter.process(y)
        n = y.shape[0]
        if self._fill + n > self._cap:
            self._grow(self._fill + n)
        self._buf[self._fill:self._fill + n] = y
        self._tbuf[self._fill:self._fill + n] = ty
        start_fill = self._fill
        self._fill += n
        out: list[tuple[float, np.ndarray]] = []
        # Window ends (exclusive, as buffer positions) at every hop boundary reached in this chunk.
        first_end = start_fill + (self.hop_n - self._since_hop)
        for end in range(first_end, self._fill + 1, self.hop_n):
            if end >= self.window_n:
                feats = self.pipeline.step(self._buf[end - self.window_n:end])
                t_end = float(self._tbuf[end - 1])
                if self.pipeline.all_flat:
                    self.flat_window_t.append(t_end)
                self._n_windows += 1
                if self.warm_from_t is None and self._n_windows >= self._warm_windows:
                    self.warm_from_t = t_end
                out.append((t_end, feats.copy()))
        self._since_hop = (self._since_hop + n) % self.hop_n
        # Keep only the last window_n samples (the rest can never be in a future window).
        if self._fill > self.window_n:
            k = self.window_n
            self._buf[:k] = self._buf[self._fill - k:self._fill]
            self._tbuf[:k] = self._tbuf[self._fill - k:self._fill]
            self._fill = k
        return out
