"""Feeds each policy what it consumes, from what the loop has (functional core).

Policies have different inputs (``controller/policies``): a seizure
probability per window (responsive, adaptive on ``p_seizure``), the signal
chunk (personalized frequency, adaptive on band power) or only the time
(periodic, Poisson, plasticity-aware), or spikes detected in the chunk
(ADS and its random control). A drive turns the loop's moments —
a chunk arrived, a prediction is ready, a window could not be evaluated — into
the right call, so the runners stay the same for every policy.
"""
from __future__ import annotations

import numpy as np

from controller.config import Config, StimConfig
from controller.events import Event, EventKind
from drivers.params import StimParams, Waveform


def stim_params(cfg: StimConfig, **changes) -> StimParams:
    p = StimParams(channel=cfg.channel, waveform=Waveform(cfg.waveform), amplitude_ua=cfg.amplitude_ua,
                   pulse_width_us=cfg.pulse_width_us, interphase_gap_us=cfg.interphase_gap_us,
                   frequency_hz=cfg.frequency_hz, n_pulses=cfg.n_pulses, duration_s=cfg.duration_s,
                   ramp_s=cfg.ramp_s, carrier_hz=cfg.carrier_hz)
    return p.with_(**changes) if changes else p


class PolicyDrive:
    """Base: a policy that acts on nothing (``policy.kind = "none"``)."""

    kind = "none"

    def __init__(self, policy=None):
        self.policy = policy

    def on_chunk(self, chunk: np.ndarray, ts: np.ndarray):
        return [], []

    def on_prediction(self, p: float, window_end_t: float):
        return [], []

    def on_invalid(self, window_end_t: float, reason: str):
        """The window ending at ``window_end_t`` is not acted upon (``reason``: bad samples, a gap,
        blanking, warm-up, a missed deadline). Policies that count time across windows must hear of it."""
        return [], []

    def describe(self) -> dict:
        return {"kind": self.kind}


class PredictionDrive(PolicyDrive):
    """``step(p, t)`` on every valid, on-time prediction (responsive; adaptive on p_seizure)."""

    def __init__(self, policy, kind: str):
        super().__init__(policy)
        self.kind = kind

    def on_prediction(self, p, window_end_t):
        return self.policy.step(p, window_end_t)

    def on_invalid(self, window_end_t, reason):
        # Only policies with a timer across windows take it (responsive's onset timer); the
        # adaptive policy averages the values it got and needs nothing here.
        invalid = getattr(self.policy, "invalid", None)
        return invalid(window_end_t, reason) if invalid is not None else ([], [])


class ClockDrive(PolicyDrive):
    """``step(t)`` on every chunk (periodic, Poisson, plasticity-aware)."""

    def __init__(self, policy, kind: str):
        super().__init__(policy)
        self.kind = kind

    def on_chunk(self, chunk, ts):
        return self.policy.step(float(ts[-1]))


class ChunkDrive(PolicyDrive):
    """``step(chunk, t)`` on every chunk (personalized frequency)."""

    def __init__(self, policy, kind: str):
        super().__init__(policy)
        self.kind = kind

    def on_chunk(self, chunk, ts):
        return self.policy.step(chunk, float(ts[-1]))


class BandPowerDrive(PolicyDrive):
    """Adaptive policy driven by band power: biomarker from the chunks, one step per biomarker value."""

    kind = "adaptive"

    def __init__(self, policy, biomarker):
        super().__init__(policy)
        self.biomarker = biomarker

    def on_chunk(self, chunk, ts):
        t_out, values = self.biomarker.step(chunk, ts)
        requests, events = [], []
        for t, v in zip(t_out, values):
            r, e = self.policy.step(float(v), float(t))
            requests += r
            events += e
        return requests, events


class SpikeDrive(PolicyDrive):
    """Spikes → ADS (``AdsPolicy``) or its random control (``RandomStimPolicy``), on every chunk.

    ``on_chunk(chunk, ts)`` runs ``detector.step``; ADS steps with the
    detections, random control with the chunk's last sample time. Every
    request blanks the detector over ``blanking_window(req.at, blanking_ms)``
    before it is returned, so the pulse's artifact can never be detected (the
    governor still checks every request). Detections become one ``SPIKE`` event
    per chunk that has any (``t_spike`` and ``channel`` lists). Requests carry
    ``at = t_spike + delay`` (the device schedules the pulse) and
    ``meta["on_time_only"]``: a pulse that can no longer be delivered at its
    imposed delay is dropped, not moved. Functional core: the session time is
    the chunk's last sample time.
    """

    def __init__(self, policy, detector, kind: str, blanking_ms: float):
        super().__init__(policy)
        from controller.policies.ads import blanking_window
        self._blanking_window = blanking_window
        self.detector = detector
        self.kind = kind
        self.blanking_ms = float(blanking_ms)
        self.n_spikes = 0

    def on_chunk(self, chunk, ts):
        det = self.detector
        spikes = det.step(chunk, ts)
        now = float(ts[-1])
        events: list[Event] = []
        if spikes.t.size:
            self.n_spikes += int(spikes.t.size)
            events.append(Event(now, EventKind.SPIKE, "detector", {
                "what": "spikes", "n": int(spikes.t.size), "t_spike": spikes.t.tolist(),
                "channel": spikes.channel.tolist()}))
        if self.kind == "ads":
            requests = self.policy.step(spikes.t, spikes.channel, now) if spikes.t.size else []
        else:
            requests = self.policy.step(now)
        for r in requests:
            det.blank(*self._blanking_window(r.at, self.blanking_ms))
            r.meta["on_time_only"] = True
            r.meta["blanking_s"] = self.blanking_ms * 1e-3  # for metrics.json: pulses never inside another's
        return requests, events

    def describe(self) -> dict:
        return {"kind": self.kind, "n_spikes": self.n_spikes, "n_requests": self.policy.n_requests}


def build_spike_drive(cfg: Config, fs_hz: float, n_channels: int) -> SpikeDrive:
    """ADS or random-control drive from ``[policy.ads]``; errors name a trigger channel the stream lacks."""
    from controller.policies.ads import AdsPolicy, RandomStimPolicy
    from controller.spikes import SpikeDetector

    a = cfg.policy.ads
    bad = [c for c in a.trigger_channels if c >= n_channels]
    if bad:
        raise ValueError(f"policy.ads.trigger_channels = {list(a.trigger_channels)}: channel(s) {bad} not in "
                         f"the stream, which has {n_channels} channels (0..{n_channels - 1})")
    if a.band_hz and a.band_hz[1] >= fs_hz / 2:   # the default band needs a stream above 6 kHz
        raise ValueError(f"policy.ads.band_hz = {list(a.band_hz)}: its high edge must be below half the stream's "
                         f"rate ({fs_hz / 2:g} Hz at {fs_hz:g} Hz); set a lower one, e.g. [300, {0.4 * fs_hz:g}], "
                         f"or [] if the amplifier already band-passes the spikes")
    det = SpikeDetector(fs_hz, n_channels, channels=a.trigger_channels, k=a.k, refractory_ms=a.refractory_ms,
                        band_hz=tuple(a.band_hz) if a.band_hz else None)
    stim = stim_params(cfg.policy.stim)
    if cfg.policy.kind == "ads":
        policy = AdsPolicy(a.trigger_channels, stim, delay_ms=a.delay_ms, blanking_ms=a.blanking_ms,
                           max_rate_hz=a.max_rate_hz)
    else:
        # Issued delay_ms ahead of its pulse, like ADS requests: the device schedules both the same way.
        policy = RandomStimPolicy(a.rate_hz, stim, seed=cfg.session.seed + 1000, min_interval_s=a.blanking_ms * 1e-3,
                                  lead_s=a.delay_ms * 1e-3)
    return SpikeDrive(policy, det, cfg.policy.kind, a.blanking_ms)


def detection_min_duration_s(cfg: Config, model_min_duration_s: float) -> float:
    """How long p must stay above threshold for a detection: ``policy.min_duration_s``, else the model's own."""
    return cfg.policy.min_duration_s if cfg.policy.min_duration_s is not None else model_min_duration_s


def build_drive(cfg: Config, fs_hz: float, n_channels: int, threshold: float,
                min_duration_s: float = 0.5) -> PolicyDrive:
    """The configured policy, wrapped in the drive that feeds it."""
    from controller import policies as P

    pc = cfg.policy
    kind = pc.kind
    if kind == "none":
        return PolicyDrive()
    from controller.config import SPIKE_POLICY_KINDS
    if kind in SPIKE_POLICY_KINDS:
        return build_spike_drive(cfg, fs_hz, n_channels)
    if kind == "responsive":
        thr_on = pc.threshold_on if pc.threshold_on is not None else threshold
        thr_off = pc.threshold_off if pc.threshold_off is not None else thr_on * 0.8
        return PredictionDrive(P.ResponsivePolicy(
            threshold_on=thr_on, threshold_off=thr_off,
            min_duration_s=detection_min_duration_s(cfg, min_duration_s),
            refractory_s=pc.refractory_s, stim=stim_params(pc.stim), bursts_per_detection=pc.bursts_per_detection,
            burst_interval_s=pc.burst_interval_s), kind)
    if kind == "adaptive":
        a = pc.adaptive
        policy = P.AdaptivePolicy(a.thresholds, stim_params(pc.stim),   # a count that does not fit the mode is refused there
                                  a.min_amplitude_ua, a.max_amplitude_ua, mode=a.mode,
                                  ramp_up_ua_per_s=a.ramp_up_ua_per_s, ramp_down_ua_per_s=a.ramp_down_ua_per_s,
                                  decision_period_s=a.decision_period_s, blanking_s=a.blanking_s,
                                  stim_period_s=a.stim_period_s)
        if a.biomarker == "p_seizure":
            return PredictionDrive(policy, kind)
        return BandPowerDrive(policy, P.BandPowerBiomarker(fs_hz, band=a.band_hz, n_channels=n_channels))
    if kind == "periodic":
        o = pc.open_loop
        # start_s counts from the first chunk, as every clock-driven policy does: in real time the
        # session clock is LSL's local_clock (s since boot), never 0 at the start of a session.
        return ClockDrive(P.PeriodicPolicy(o.period_s, stim_params(pc.stim), start_delay_s=o.start_s), kind)
    if kind == "poisson":
        o = pc.open_loop
        return ClockDrive(P.PoissonPolicy(o.rate_hz, stim_params(pc.stim), seed=cfg.session.seed,
                                          start_delay_s=o.start_s), kind)
    if kind == "personalized":
        q = pc.personalized
        stim = stim_params(pc.stim, waveform=Waveform.SINE) if pc.stim.waveform != "sine" else stim_params(pc.stim)
        return ChunkDrive(P.PersonalizedFrequencyPolicy(fs_hz, q.baseline_s, stim, q.period_s, n_channels=n_channels,
                                                        search_band_hz=q.search_band_hz,
                                                        max_segment_excess_db=q.max_segment_excess_db,
                                                        min_clean_fraction=q.min_clean_fraction), kind)
    if kind == "plasticity":
        q = pc.plasticity
        from controller.safety import build_profile
        profile = build_profile(cfg.safety.profile, cfg.safety.overrides)
        return ClockDrive(P.PlasticityAwarePolicy(
            q.allowed_frequencies_hz, q.allowed_pulse_widths_us, stim_params(pc.stim), target=q.target,
            protocol={"timing_ms": q.timing_ms}, period_s=q.period_s,
            max_burst_duration_s=profile.max_burst_duration_s), kind)
    from controller.config import POLICY_KINDS
    raise ValueError(f"policy.kind={kind!r}: expected one of {', '.join(POLICY_KINDS)}")
