"""Feeds each policy what it consumes, from what the loop has (functional core).

Policies have different inputs (``controller/policies``): a seizure
probability per window (responsive, adaptive on ``p_seizure``), the signal
chunk (personalized frequency, adaptive on band power) or only the time
(periodic, Poisson, plasticity-aware). A drive turns the loop's two moments —
a chunk arrived, a prediction is ready — into the right ``step`` call, so the
runners stay the same for every policy.
"""
from __future__ import annotations

import numpy as np

from controller.config import Config, StimConfig
from drivers.params import StimParams, Waveform


def stim_params(cfg: StimConfig, **changes) -> StimParams:
    p = StimParams(channel=cfg.channel, waveform=Waveform(cfg.waveform), amplitude_ua=cfg.amplitude_ua,
                   pulse_width_us=cfg.pulse_width_us, interphase_gap_us=cfg.interphase_gap_us,
                   frequency_hz=cfg.frequency_hz, n_pulses=cfg.n_pulses, duration_s=cfg.duration_s,
                   ramp_s=cfg.ramp_s)
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

    def describe(self) -> dict:
        return {"kind": self.kind}


class PredictionDrive(PolicyDrive):
    """``step(p, t)`` on every valid, on-time prediction (responsive; adaptive on p_seizure)."""

    def __init__(self, policy, kind: str):
        super().__init__(policy)
        self.kind = kind

    def on_prediction(self, p, window_end_t):
        return self.policy.step(p, window_end_t)


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


def build_drive(cfg: Config, fs_hz: float, n_channels: int, threshold: float) -> PolicyDrive:
    """The configured policy, wrapped in the drive that feeds it."""
    from controller import policies as P

    pc = cfg.policy
    kind = pc.kind
    if kind == "none":
        return PolicyDrive()
    if kind == "responsive":
        thr_on = pc.threshold_on if pc.threshold_on is not None else threshold
        thr_off = pc.threshold_off if pc.threshold_off is not None else thr_on * 0.8
        return PredictionDrive(P.ResponsivePolicy(
            threshold_on=thr_on, threshold_off=thr_off, min_duration_s=pc.min_duration_s,
            refractory_s=pc.refractory_s, stim=stim_params(pc.stim), bursts_per_detection=pc.bursts_per_detection,
            burst_interval_s=pc.burst_interval_s), kind)
    if kind == "adaptive":
        a = pc.adaptive
        policy = P.AdaptivePolicy(a.thresholds if a.mode == "dual" else a.thresholds[0], stim_params(pc.stim),
                                  a.min_amplitude_ua, a.max_amplitude_ua, mode=a.mode,
                                  ramp_up_ua_per_s=a.ramp_up_ua_per_s, ramp_down_ua_per_s=a.ramp_down_ua_per_s,
                                  decision_period_s=a.decision_period_s, blanking_s=a.blanking_s,
                                  stim_period_s=a.stim_period_s)
        if a.biomarker == "p_seizure":
            return PredictionDrive(policy, kind)
        return BandPowerDrive(policy, P.BandPowerBiomarker(fs_hz, band=a.band_hz, n_channels=n_channels))
    if kind == "periodic":
        o = pc.open_loop
        return ClockDrive(P.PeriodicPolicy(o.period_s, stim_params(pc.stim), start_t=o.start_s), kind)
    if kind == "poisson":
        o = pc.open_loop
        return ClockDrive(P.PoissonPolicy(o.rate_hz, stim_params(pc.stim), seed=cfg.session.seed,
                                          start_t=o.start_s), kind)
    if kind == "personalized":
        q = pc.personalized
        stim = stim_params(pc.stim, waveform=Waveform.SINE) if pc.stim.waveform != "sine" else stim_params(pc.stim)
        return ChunkDrive(P.PersonalizedFrequencyPolicy(fs_hz, q.baseline_s, stim, q.period_s, n_channels=n_channels,
                                                        search_band_hz=q.search_band_hz), kind)
    if kind == "plasticity":
        q = pc.plasticity
        from controller.safety import build_profile
        profile = build_profile(cfg.safety.profile, cfg.safety.overrides)
        return ClockDrive(P.PlasticityAwarePolicy(
            q.allowed_frequencies_hz, q.allowed_pulse_widths_us, stim_params(pc.stim), target=q.target,
            protocol={"timing_ms": q.timing_ms}, period_s=q.period_s,
            max_burst_duration_s=profile.max_burst_duration_s), kind)
    raise ValueError(f"policy.kind={kind!r}: expected one of {', '.join(('responsive', 'adaptive', 'periodic'))}…")
