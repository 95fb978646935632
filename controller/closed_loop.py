"""The seizure loop's functional core: chunk -> windows -> features -> ONNX -> policy.

The same object runs in real time (``controller.loop``) and in simulated time
(``controller.runners.simulated``). It never reads a clock: the runner passes
``now`` and measures how long inference took.

Bad samples (NaN/inf, saturation, clock jumps; see ``controller.data_quality``)
never reach the filters as such: a ``FAULT`` event is emitted, stimulation is
turned off, and every prediction whose window overlaps them is marked invalid
and never acted upon. The policy still hears of every invalid or late window
(``PolicyDrive.on_invalid``), so a timer it runs across windows cannot span one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.config import Config
from controller.data_quality import DataQuality
from controller.events import Event, EventKind
from controller.inference import (DeadlineAccount, ModelContract, OnnxPredictor, SeizureDetectorStage, contract_min_duration_s,
                                  read_contract)
from controller.policy_drive import PolicyDrive, build_drive, detection_min_duration_s
from controller.sources.base import GAP_FACTOR, gap_factor_for
from drivers.params import StimParams


@dataclass
class WindowResult:
    window_end_t: float
    features: np.ndarray
    valid: bool  # False: never act on it
    #: why not (``valid`` False): "model warm-up", or the data-quality reason (stimulation, a gap, bad samples)
    invalid: str | None = None


#: data-quality window of a loop without a model (spike policies): a fault clears after this much clean data
NO_MODEL_WINDOW_S = 0.1


@dataclass
class SeizureLoop:
    """Chunk -> windows -> model -> policy drive. ``stage``/``predictor`` are ``None`` when the
    policy reads no prediction (ADS, random control): then chunks only pass the data-quality
    check on their way to the drive, and nothing is resampled or inferred."""
    stage: SeizureDetectorStage | None
    predictor: OnnxPredictor | None
    deadline: DeadlineAccount
    drive: PolicyDrive
    #: the threshold the session started with (``policy.threshold_on``, else the model's); see ``threshold``
    start_threshold: float | None
    quality: DataQuality | None = None
    fs_hz: float = 0.0
    n_channels: int = 0
    #: window length + how long p must stay above threshold: a seizure starting less than this before
    #: the session ends cannot be confirmed, and is left out of the detection score (None: no model)
    min_detect_s: float | None = None
    #: the source's jitter tolerance (``SourceInfo.gap_factor``): a timestamp step above this many
    #: sample periods is missing samples, and the windows spanning it are not acted on
    gap_factor: float = GAP_FACTOR
    #: the last window was flat on every channel (FLAT_REASON): a fault until a window with signal
    flat: bool = False

    @classmethod
    def from_config(cls, cfg: Config, fs_hz: float, n_channels: int) -> "SeizureLoop":
        from controller.config import SPIKE_POLICY_KINDS
        if cfg.policy.kind in SPIKE_POLICY_KINDS:
            # 30 kHz spikes are never resampled for a seizure model the policy would not read.
            return cls(stage=None, predictor=None, deadline=DeadlineAccount(cfg.model.deadline_ms / 1e3),
                       drive=build_drive(cfg, fs_hz, n_channels, math.nan), start_threshold=None,
                       fs_hz=fs_hz, n_channels=n_channels, gap_factor=gap_factor_for(cfg.source.kind))
        path = cfg.model_path()
        contract: ModelContract = read_contract(path)
        stage = SeizureDetectorStage(contract, fs_hz, n_channels)
        predictor = OnnxPredictor(path)
        thr = cfg.policy.threshold_on if cfg.policy.threshold_on is not None else contract.threshold
        model_min_s = contract_min_duration_s(contract)
        return cls(stage=stage, predictor=predictor, deadline=DeadlineAccount(cfg.model.deadline_ms / 1e3),
                   drive=build_drive(cfg, fs_hz, n_channels, contract.threshold, model_min_s), start_threshold=thr,
                   fs_hz=fs_hz, n_channels=n_channels,
                   min_detect_s=contract.window_s + detection_min_duration_s(cfg, model_min_s),
                   gap_factor=gap_factor_for(cfg.source.kind))

    @property
    def policy(self):
        return self.drive.policy

    @property
    def threshold(self) -> float | None:
        """The threshold reported with every prediction (and by status, monitor, report): the one the policy
        acts on, which ``set_param threshold_on`` may have changed since the start."""
        return getattr(self.drive.policy, "threshold_on", self.start_threshold)

    @property
    def window_s(self) -> float:
        return self.stage.contract.window_s if self.stage is not None else NO_MODEL_WINDOW_S

    def windows(self, chunk: np.ndarray, timestamps: np.ndarray, events: list[Event]) -> list[WindowResult]:
        """Feed one chunk; return the windows it completed (``valid=False``: do not act on it)."""
        if self.quality is None:
            if self.stage is not None:
                self.quality = DataQuality(self.stage.source_fs_hz, self.stage.n_channels, self.window_s,
                                           gap_factor=self.gap_factor)
            else:
                self.quality = DataQuality(self.fs_hz, self.n_channels, self.window_s, gap_factor=self.gap_factor)
        chunk, timestamps = self.quality.check(chunk, timestamps, events)
        if not timestamps.size or self.stage is None:
            return []
        windows = self.stage.step(chunk, timestamps)
        flat_t = self.stage.flat_window_t
        # Before the model's warm-up (its running baselines settling) results are recorded, not acted on.
        out = []
        for t_end, feats in windows:
            flat = bool(flat_t) and t_end in flat_t
            if flat != self.flat:   # into or out of a stretch with no signal on any channel
                self.flat = flat
                events.append(Event(t_end, EventKind.FAULT, "loop", {"what": "flat_signal", "reason": FLAT_REASON})
                              if flat else Event(t_end, EventKind.STATUS, "loop",
                                                 {"what": "signal_back", "status": "signal on the channels again"}))
            why = (FLAT_REASON if flat else "model warm-up" if not self.stage.is_warm(t_end) else
                   self.quality.invalid_reason if t_end <= self.quality.invalid_until_t else None)
            out.append(WindowResult(t_end, feats, why is None, why))
        return out

    def predict(self, features: np.ndarray) -> float:
        return self.predictor.predict(features)

    @property
    def bad_data(self) -> bool:
        """Stimulation must stay off: bad samples (``DataQuality``), or no signal on any channel."""
        return self.flat or (self.quality is not None and self.quality.in_bad_run)


BAD_DATA_REASON = "bad samples in the stream"
#: Every channel below 0.01 µV rms over a window (features.SzV1Pipeline.flat_var_uv2): no amplifier's
#: noise floor is that low, so there is no signal to decide on: electrodes off, an amplifier streaming
#: a constant, or values in V read as µV.
FLAT_REASON = ("no signal: every channel below 0.01 µV rms (electrodes off, or values in V taken as µV: "
               "check the stream's units, source.units)")
STALE_REASON = "no data from the source"
DRIVER_FAULT = "driver error"  # prefix of the actuator's latch reasons for device failures
DEADLINE_MISSED = "deadline missed"  # why a late window is not acted upon (PolicyDrive.on_invalid)
AHEAD_REASON = "stream timestamps ahead of this clock"   # latched until a chunk's stamps are behind us again
#: How far a chunk's newest stamp may lie after its read before it counts as ahead: LSL's clock-offset
#: estimate for a sender on another machine is good to well under this, and a fast read of a local
#: stream comes tens of µs after its last sample.
AHEAD_TOLERANCE_S = 0.001


class ChunkStep:
    """One chunk through the whole loop: windows -> predictor -> deadline -> policy -> actuator.

    The one place both runners share. ``modeled_latency_s=None`` (real time)
    reads ``clock`` around every stage; a number (simulated time) charges that
    latency from window end to command and advances the virtual clock to it.
    Bad samples latch the actuator (stimulation off) until the data is clean
    for a whole window, then that latch — and only that one — is released.

    ``cpu_clock`` (real time only; e.g. ``time.thread_time``): the CPU time this
    thread has used, read beside ``clock`` where the loop computes (a window's
    read, features and inference: ``cpu_read``, ``cpu_features``,
    ``cpu_inference`` in the PREDICTION; a spike chunk's read and the request:
    ``cpu_read``, ``cpu_decided`` in the COMMAND). A stage's wall time minus its
    CPU time is the time the loop was off the CPU: waiting for one, or, on a VM,
    its vCPU held by the host (Linux with paravirtual steal accounting leaves
    steal out of a thread's CPU time). The benchmarks split their tails with it.
    """

    def __init__(self, loop: SeizureLoop, actuator, clock, modeled_latency_s: float | None = None,
                 source: str = "loop", stall_timeout_s: float = 1.0, heartbeat_s: float = 0.1,
                 reconnect_s: float = 1.0, blanking_s: float = 0.5, cpu_clock=None):
        self.loop, self.actuator, self.clock = loop, actuator, clock
        self.cpu_clock = None if modeled_latency_s is not None else cpu_clock
        self.modeled_latency_s = modeled_latency_s
        self.source = source
        self.stall_timeout_s = stall_timeout_s
        self.paused = False  # set by the control server: predictions go on, requests are dropped
        self.stale = False
        self._last_data_t = clock()
        self.heartbeat_s, self.reconnect_s = heartbeat_s, reconnect_s
        self.blanking_s = blanking_s
        self._next_hb = self._next_reconnect = clock()
        self._ahead_reported = False   # a chunk was stamped ahead of the clock: reported, latched (_check_stamps)

    def housekeeping(self) -> list[Event]:
        """Heartbeat the device when due; after a device fault, try to reconnect once per ``reconnect_s``."""
        now = self.clock()
        events: list[Event] = []
        driver_faults = [r for r in self.actuator.governor.latch_reasons if r.startswith(DRIVER_FAULT)]
        if now >= self._next_reconnect and driver_faults:
            self._next_reconnect = now + self.reconnect_s
            back = self.actuator.reconnect()
            events.extend(back)
            if any(e.data.get("what") == "device_reconnected" for e in back):
                for reason in driver_faults:   # only the device's faults: bad data or an e-stop stay latched
                    events.extend(self.actuator.reset(reason))
        if now >= self._next_hb:
            self._next_hb = now + self.heartbeat_s
            events.extend(self.actuator.heartbeat())
        return events

    def idle(self) -> list[Event]:
        """No new samples this iteration: after ``stall_timeout_s`` the stream counts as lost (safe state).

        Otherwise the wait for samples is used to keep the command path warm (``Actuator.warm``).
        """
        now = self.clock()
        if not self.stale and now - self._last_data_t > self.stall_timeout_s:
            self.stale = True
            return [Event(now, EventKind.FAULT, self.source, {"what": "stream_stalled", "reason": STALE_REASON,
                                                              "silent_s": now - self._last_data_t}),
                    *self.actuator.fault(STALE_REASON)]
        self.actuator.warm()
        return []

    def _check_stamps(self, ahead_s: float, now: float, events: list[Event]) -> None:
        """A chunk whose newest sample is stamped after we read it: impossible on one clock. Reported
        once per episode and latched (stimulation off) until a chunk's stamps are behind us again:
        every window would end in the future (refused by the deadline), and a spike's delay or a
        schedule taken from such stamps means nothing."""
        if ahead_s > AHEAD_TOLERANCE_S and not self._ahead_reported:
            self._ahead_reported = True
            events.append(Event(now, EventKind.FAULT, self.source, {
                "what": "timestamps_ahead", "ahead_ms": ahead_s * 1e3,
                "reason": f"the stream's timestamps run {ahead_s * 1e3:.2f} ms ahead of this machine's clock: "
                          "its samples are stamped after they are read, so no window is acted upon (counted as "
                          "deadline misses). Check the sender's timestamps (a chunk's stamp is its last sample's) "
                          "or, for a sender on another machine, clock synchronisation"}))
            events.extend(self.actuator.fault(AHEAD_REASON))
        elif ahead_s <= 0 and self._ahead_reported:
            self._ahead_reported = False
            events.append(Event(now, EventKind.STATUS, self.source, {"what": "timestamps_consistent"}))
            if AHEAD_REASON in self.actuator.governor.latch_reasons:
                events.extend(self.actuator.reset(AHEAD_REASON))

    def step(self, samples: np.ndarray, timestamps: np.ndarray) -> list[Event]:
        loop, actuator, clock = self.loop, self.actuator, self.clock
        modeled = self.modeled_latency_s is not None
        cpu = self.cpu_clock
        events: list[Event] = []
        t_read = t_chunk = clock()
        c_read = c_chunk = cpu() if cpu is not None else None
        self._last_data_t = t_read
        if self.stale:
            self.stale = False
            events.append(Event(t_read, EventKind.STATUS, self.source, {"what": "stream_resumed"}))
            if STALE_REASON in actuator.governor.latch_reasons:
                events.extend(actuator.reset(STALE_REASON))
        if timestamps.size:
            ahead_s = float(timestamps[-1]) - t_read
            if ahead_s > AHEAD_TOLERANCE_S or self._ahead_reported:   # the usual chunk: one comparison
                self._check_stamps(ahead_s, t_read, events)
        was_bad = loop.bad_data
        windows = loop.windows(samples, timestamps, events)
        if loop.bad_data and not was_bad:
            events.extend(actuator.fault(BAD_DATA_REASON))
        elif was_bad and not loop.bad_data and BAD_DATA_REASON in actuator.governor.latch_reasons:
            events.extend(actuator.reset(BAD_DATA_REASON))
        for w in windows:
            if modeled:
                t_feat = t_inf = w.window_end_t + self.modeled_latency_s
                p = loop.predict(w.features) if w.valid else math.nan
                clock.advance_to(t_inf)
            else:
                t_feat = clock()
                c_feat = cpu() if cpu is not None else None
                p = loop.predict(w.features) if w.valid else math.nan
                t_inf = clock()
                c_inf = cpu() if cpu is not None else None
            on_time = loop.deadline.check(w.window_end_t, t_inf)
            pred = {"window_end_t": w.window_end_t, "p": p, "valid": w.valid, "threshold": loop.threshold,
                    **({} if w.valid else {"invalid": w.invalid})}
            if not modeled:
                pred.update(t_read=t_read, t_features=t_feat, t_inference=t_inf)
                if cpu is not None:
                    pred.update(cpu_read=c_read, cpu_features=c_feat, cpu_inference=c_inf)
            events.append(Event(t_inf, EventKind.PREDICTION, self.source, pred))
            if not on_time:
                events.append(Event(t_inf, EventKind.DEADLINE_MISS, self.source,
                                    {"window_end_t": w.window_end_t, "latency_s": t_inf - w.window_end_t}))
                # A stale window must neither confirm an onset nor be skipped as if it had not been
                # there: the policy sees it as a hole in the evidence, like an invalid window.
                self._submit(*loop.drive.on_invalid(w.window_end_t, DEADLINE_MISSED), w.window_end_t, t_inf, events)
            elif w.valid:
                self._submit(*loop.drive.on_prediction(p, w.window_end_t), w.window_end_t, t_inf, events)
            else:
                # Skipping it silently would let an onset timer run across a fault (docs/policies.md).
                self._submit(*loop.drive.on_invalid(w.window_end_t, w.invalid), w.window_end_t, t_inf, events)
            if not modeled:
                t_read = clock()  # the next window of the same chunk starts here
                c_read = cpu() if cpu is not None else None
        if timestamps.size and not loop.bad_data:
            if modeled:   # chunk-driven requests (spikes, bursts due) are charged the latency windows are
                clock.advance_to(float(timestamps[-1]) + self.modeled_latency_s)
            t_now = clock()
            self._submit(*loop.drive.on_chunk(samples, timestamps), float(timestamps[-1]), t_now, events,
                         t_read=None if modeled else t_chunk, cpu_read=c_chunk)
        return events

    def _submit(self, requests, policy_events, window_end_t: float, t_inf: float, events: list[Event],
                t_read: float | None = None, cpu_read: float | None = None) -> None:
        """``t_read``: when the chunk behind chunk-driven requests (spikes) was read, for the latency
        stages; ``cpu_read``: this thread's CPU time then (``cpu_clock``)."""
        events.extend(policy_events)
        for r in requests:
            if self.paused:
                events.append(Event(t_inf, EventKind.REFUSAL, self.source,
                                    {"rule": "paused", "reason": "stimulation paused by the operator"}))
                continue
            r.meta.setdefault("window_end_t", window_end_t)
            r.meta["t_inference"] = t_inf
            if t_read is not None:
                r.meta["t_read"] = t_read
            r.meta["t_decided"] = self.clock()
            if cpu_read is not None:
                r.meta["cpu_read"] = cpu_read
                r.meta["cpu_decided"] = self.cpu_clock()
            if r.meta.pop("on_time_only", False) and r.at is not None and r.at < r.meta["t_decided"]:
                # The loop fell behind the imposed delay (ADS): a pulse at the wrong delay is worse than none.
                events.append(Event(r.meta["t_decided"], EventKind.REFUSAL, self.source, {
                    "rule": "too_late", "request_source": r.source, "at": r.at,
                    "reason": f"pulse due at {r.at:.6f} s, decided {r.meta['t_decided'] - r.at:.6f} s after it"}))
                continue
            out = self.actuator.submit(r)
            events.extend(out)
            for e in out:
                # Without a model there are no windows to protect: spike policies blank their own
                # detector (SpikeDrive), and a blank here would only send every chunk of the next
                # blanking_s through the data-quality check's slow path.
                if e.kind is EventKind.COMMAND and self.loop.quality is not None and self.loop.stage is not None:
                    start = e.data.get("at") or e.t
                    burst_s = StimParams.from_dict(e.data["params"]).burst_duration_s
                    self.loop.quality.blank(start, start + burst_s + self.blanking_s)
