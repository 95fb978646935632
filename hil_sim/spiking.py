"""Spiking units at 30 kHz for activity-dependent stimulation (ADS) hardware-in-the-loop runs.

``SpikingUnits`` writes extracellular recordings (µV, ``(n, ch)`` float32) of:

* a **trigger population** (one unit per trigger channel) firing Poisson or
  bursty trains with known true times (the trough sample of each waveform);
  each spike is a biphasic ~1.6 ms template scaled to a per-unit trough of
  −60..−120 µV (REFERENCE.md §2: detected at −4..−5 σ of ~10 µV noise);
* band-limited Gaussian noise (300–6000 Hz, ~10 µV rms) on every channel;
* a **target unit** on its own channel, firing spontaneously, through a
  trigger → target synapse whose efficacy is the plastic weight ``w``, and in
  response to stimulation (latency, jitter, probability);
* **stimulation artifacts** from ``stimulate(t, params)``: a saturating pulse
  of ``artifact_uv_per_ua`` × amplitude during each phase, then an exponential
  recovery tail whose time constant grows with pulse width and amplitude, on all
  channels, scaled down with distance from the stimulation site. They are large
  enough (hundreds to thousands of µV) to trigger any threshold detector that
  is not blanked.

The trigger → target synapse learns online with STDP from the *true* pre
(trigger) and post (target) spike times: pair STDP (Song, Miller & Abbott 2000)
or triplet STDP (Pfister & Gerstner 2006), all-to-all traces, optionally
reward-modulated (Izhikevich 2007). Parameters come from
``models.plasticity.stdp.STDPRule`` (REFERENCE.md §7). With spike-triggered
stimulation 7.5 ms after each trigger spike (Guggenmos 2013, REFERENCE.md §2),
the evoked target spike follows the pre spike by ~10 ms → potentiation; random
stimulation at a matched rate gives pre/post intervals spread evenly over ±,
where the slightly larger LTD lobe (A− = 1.05 A+) wins.

Time is seconds from the first sample (``t`` = time of the next sample). The
object never reads a clock; a real-time runner maps ``t_lsl = t0 + t``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np
from scipy import signal

from drivers.params import StimParams
from models.plasticity.stdp import RewardParams, STDPRule

__all__ = ["SpikingUnits", "spike_template", "artifact_waveform"]

_TEMPLATE_PRE_S = 0.0004    # template samples before the trough
_TEMPLATE_POST_S = 0.0012   # after: the repolarisation hump
_ART_FLOOR_UV = 0.5         # an artifact tail is cut once below this (well under the noise)


def spike_template(fs_hz: float) -> tuple[np.ndarray, int]:
    """Unit-trough biphasic extracellular spike (trough = −1) and the trough's sample offset.

    A narrow negative Gaussian (the Na⁺ current seen from outside the cell) and a
    wider, smaller positive hump ~0.35 ms later: ~1.6 ms in all.
    """
    pre = int(round(_TEMPLATE_PRE_S * fs_hz))
    post = int(round(_TEMPLATE_POST_S * fs_hz))
    t = (np.arange(-pre, post + 1) / fs_hz)
    w = -np.exp(-0.5 * (t / 0.00010) ** 2) + 0.35 * np.exp(-0.5 * ((t - 0.00040) / 0.00020) ** 2)
    w /= -w[pre]  # exact −1 at the trough sample
    return w.astype(np.float32), pre


def artifact_waveform(params: StimParams, fs_hz: float, uv_per_ua: float, tau0_s: float,
                      saturation_uv: float) -> np.ndarray:
    """1-D stimulation artifact (µV at the site) for one burst of ``params``.

    Each pulse: −A for one phase, +A for the other (cathodic first, clipped at
    the amplifier's ``saturation_uv``), then a recovery tail A/2·exp(−t/τ) with
    τ = tau0·(1 + pw/200 µs)·(1 + I/100 µA): longer and bigger pulses leave the
    amplifier saturated longer. The tail is cut where it falls below 0.5 µV.
    """
    amp = min(abs(params.amplitude_ua) * uv_per_ua, saturation_uv)
    pw_n = max(1, int(round(params.pulse_width_us * 1e-6 * fs_hz)))
    gap_n = int(round(params.interphase_gap_us * 1e-6 * fs_hz))
    tau_s = tau0_s * (1.0 + params.pulse_width_us / 200.0) * (1.0 + abs(params.amplitude_ua) / 100.0)
    tail0 = 0.5 * amp
    tail_n = int(math.ceil(tau_s * math.log(max(tail0, 2 * _ART_FLOOR_UV) / _ART_FLOOR_UV) * fs_hz)) + 1
    pulse = np.concatenate([np.full(pw_n, -amp), np.zeros(gap_n), np.full(pw_n, amp)])
    n_pulses = params.n_pulses if params.is_pulsed else 1
    period_n = int(round(fs_hz / params.frequency_hz)) if params.frequency_hz > 0 else pulse.size
    total = (n_pulses - 1) * period_n + pulse.size + tail_n
    out = np.zeros(total, dtype=np.float64)
    tail = tail0 * np.exp(-np.arange(tail_n) / (tau_s * fs_hz))
    for k in range(n_pulses):  # per pulse, not per sample
        s = k * period_n
        out[s:s + pulse.size] += pulse
        out[s + pulse.size:s + pulse.size + tail_n] += tail
    return np.clip(out, -saturation_uv, saturation_uv).astype(np.float32)


@dataclass(slots=True)
class _Artifact:
    start: int               # absolute sample index of the pulse onset
    wave: np.ndarray          # (L,) µV at the site
    gains: np.ndarray         # (n_channels,) spatial fall-off


class SpikingUnits:
    """Trigger units, a target unit, noise, stimulation artifacts and a plastic synapse (see module doc).

    ``step(n)`` returns the next ``n`` samples, ``(n, n_channels)`` float32 µV,
    vectorized per block. ``stimulate(t, params)`` delivers a burst at time
    ``t`` (s from the first sample). ``ground_truth()`` returns every true
    spike, every delivered pulse (with its receipt time when given) and the
    weight trajectory.
    """

    def __init__(self, fs_hz: float = 30_000.0, n_channels: int = 32, seed: int = 0,
                 trigger_channels: tuple[int, ...] | list[int] = (0,), target_channel: int = 16,
                 rate_hz: float = 5.0, firing: str = "poisson", burst_size: tuple[int, int] = (2, 4),
                 burst_isi_ms: float = 4.0, refractory_ms: float = 2.0,
                 amplitude_range_uv: tuple[float, float] = (60.0, 120.0), noise_uv_rms: float = 10.0,
                 noise_band_hz: tuple[float, float] = (300.0, 6000.0),
                 stim_site_channel: int = 24, artifact_uv_per_ua: float = 100.0, artifact_tau0_s: float = 0.0005,
                 artifact_saturation_uv: float = 6000.0, artifact_space_ch: float = 4.0,
                 target_amplitude_uv: float = 90.0, target_rate_hz: float = 1.0,
                 evoked_prob: float = 0.9, evoked_latency_ms: float = 2.5, evoked_jitter_ms: float = 0.3,
                 w_init: float = 0.5, syn_prob_max: float = 0.2, syn_latency_ms: float = 4.0,
                 syn_jitter_ms: float = 0.5, stdp: STDPRule | None = None, reward: RewardParams | None = None,
                 w_bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        def need(cond: bool, name: str, value, expected: str) -> None:
            if not cond:
                raise ValueError(f"SpikingUnits {name}={value!r} invalid, expected {expected}")

        need(np.isfinite(fs_hz) and fs_hz >= 5_000, "fs_hz", fs_hz, ">= 5000 Hz (spike waveforms need it)")
        need(isinstance(n_channels, int) and n_channels >= 1, "n_channels", n_channels, "an int >= 1")
        trig = tuple(int(c) for c in trigger_channels)
        need(len(trig) >= 1 and len(set(trig)) == len(trig) and all(0 <= c < n_channels for c in trig),
             "trigger_channels", trigger_channels, f"distinct channels in 0..{n_channels - 1}")
        need(0 <= target_channel < n_channels and target_channel not in trig, "target_channel", target_channel,
             f"a channel in 0..{n_channels - 1} not among trigger_channels")
        need(0 <= stim_site_channel < n_channels, "stim_site_channel", stim_site_channel, f"0..{n_channels - 1}")
        need(np.isfinite(rate_hz) and 0 < rate_hz <= 100, "rate_hz", rate_hz, "0 < rate <= 100 Hz")
        need(firing in ("poisson", "bursty"), "firing", firing, "'poisson' or 'bursty'")
        need(0 < refractory_ms < 1000 / rate_hz, "refractory_ms", refractory_ms, f"0 < x < {1000 / rate_hz} ms")
        need(0 < amplitude_range_uv[0] <= amplitude_range_uv[1], "amplitude_range_uv", amplitude_range_uv,
             "0 < low <= high (trough magnitude, µV)")
        need(np.isfinite(noise_uv_rms) and noise_uv_rms >= 0, "noise_uv_rms", noise_uv_rms, ">= 0 µV")
        need(0 < noise_band_hz[0] < noise_band_hz[1] < fs_hz / 2, "noise_band_hz", noise_band_hz,
             f"0 < low < high < {fs_hz / 2} Hz")
        need(0 <= evoked_prob <= 1, "evoked_prob", evoked_prob, "0..1")
        need(0 <= syn_prob_max <= 1, "syn_prob_max", syn_prob_max, "0..1")
        need(w_bounds[0] < w_bounds[1] and w_bounds[0] <= w_init <= w_bounds[1], "w_init", w_init,
             f"within w_bounds {w_bounds}")
        need(target_rate_hz >= 0, "target_rate_hz", target_rate_hz, ">= 0 Hz")
        need(burst_size[0] >= 1 and burst_size[1] >= burst_size[0], "burst_size", burst_size, "1 <= low <= high")

        self.fs_hz = float(fs_hz)
        self.n_channels = n_channels
        self.seed = int(seed)
        self.trigger_channels = trig
        self.target_channel = int(target_channel)
        self.stim_site_channel = int(stim_site_channel)
        self.rate_hz = float(rate_hz)
        self.firing = firing
        self.channel_names = [f"e{c:02d}" for c in range(n_channels)]
        # Independent streams: stimulation timing never changes the noise or the trigger trains.
        ss = np.random.SeedSequence(self.seed)
        r_noise, r_pre, r_post, r_amp = (np.random.default_rng(s) for s in ss.spawn(4))
        self._rng_noise, self._rng_pre, self._rng_post = r_noise, r_pre, r_post
        self.unit_amplitude_uv = r_amp.uniform(*amplitude_range_uv, size=len(trig)).astype(np.float32)
        self.target_amplitude_uv = float(target_amplitude_uv)
        self._template, self._t_pre = spike_template(self.fs_hz)
        self._t_post = self._template.size - 1 - self._t_pre
        self._offsets = np.arange(-self._t_pre, self._t_post + 1)

        # Noise: white → 2nd-order Butterworth band-pass, scaled to the requested rms.
        self._sos = signal.butter(2, noise_band_hz, btype="bandpass", fs=self.fs_hz, output="sos")
        imp = np.zeros(int(self.fs_hz)); imp[0] = 1.0
        self._noise_gain = noise_uv_rms / math.sqrt(float(np.sum(signal.sosfilt(self._sos, imp) ** 2)))
        self._zi = np.zeros((self._sos.shape[0], 2, n_channels))

        self._refr_n = refractory_ms * 1e-3 * self.fs_hz
        self._burst_size = burst_size
        self._burst_isi_n = burst_isi_ms * 1e-3 * self.fs_hz
        # Pre spikes are drawn ahead in horizons: (sample index, unit), sorted by index.
        self._pre_idx = np.empty(0, np.int64)
        self._pre_unit = np.empty(0, np.int64)
        self._pre_amp = np.empty(0, np.float32)
        self._pre_horizon = 0
        self._pre_done = 0                # pre spikes with index < block end already processed
        mean_size = 1.0 if firing == "poisson" else (burst_size[0] + burst_size[1]) / 2
        self._mean_interval_n = mean_size / self.rate_hz * self.fs_hz     # between event starts
        self._mean_exp_n = self._mean_interval_n - self._refr_n - (mean_size - 1) * self._burst_isi_n
        need(self._mean_exp_n > 0, "rate_hz", rate_hz, "low enough that bursts + refractory periods fit "
             f"(mean interval {self._mean_interval_n / self.fs_hz * 1e3:.1f} ms)")
        self._pending_start = r_pre.exponential(self._mean_exp_n, size=len(trig))  # next event per unit

        self._target_rate_hz = float(target_rate_hz)
        self._next_spont = self._draw_spont(0.0)
        self._post: list[tuple[int, str]] = []    # (index, cause), sorted; future and rendered
        self._post_done = 0

        self.artifact_uv_per_ua = float(artifact_uv_per_ua)
        self.artifact_tau0_s = float(artifact_tau0_s)
        self.artifact_saturation_uv = float(artifact_saturation_uv)
        d = np.abs(np.arange(n_channels) - self.stim_site_channel)
        self._art_gains = (1.0 / (1.0 + d / artifact_space_ch)).astype(np.float32)
        self._artifacts: list[_Artifact] = []
        self._pulses: list[dict] = []
        self.evoked_prob = float(evoked_prob)
        self._evoked_lat_n = evoked_latency_ms * 1e-3 * self.fs_hz
        self._evoked_jit_n = evoked_jitter_ms * 1e-3 * self.fs_hz

        self.syn_prob_max = float(syn_prob_max)
        self._syn_lat_n = syn_latency_ms * 1e-3 * self.fs_hz
        self._syn_jit_n = syn_jitter_ms * 1e-3 * self.fs_hz
        self.rule = stdp if stdp is not None else STDPRule.song2000()
        self.reward_params = reward
        self.w_bounds = (float(w_bounds[0]), float(w_bounds[1]))
        self.w = float(w_init)
        self._r1 = self._r2 = self._o1 = self._o2 = 0.0   # STDP traces
        self._elig = 0.0
        self._dopa = 0.0
        self._t_trace = 0.0
        self._w_hist: list[tuple[float, float]] = [(0.0, self.w)]
        self._rewards: list[tuple[float, float]] = []
        self.n_samples = 0

    # ------------------------------------------------------------------ views
    @property
    def t(self) -> float:
        """Time of the next sample, s from the first."""
        return self.n_samples / self.fs_hz

    def artifact_duration_s(self, params: StimParams) -> float:
        """How long the artifact of one burst of ``params`` lasts (pulse onset to tail below 0.5 µV)."""
        return artifact_waveform(params, self.fs_hz, self.artifact_uv_per_ua, self.artifact_tau0_s,
                                 self.artifact_saturation_uv).size / self.fs_hz

    # ------------------------------------------------------------------ inputs
    def stimulate(self, t: float, params: StimParams, t_received: float | None = None) -> None:
        """Deliver one burst of ``params`` with onset at ``t`` (s from the first sample).

        A ``t`` before :attr:`t` (delivered while the block was already produced)
        keeps its true onset: only the not-yet-produced part of the artifact appears.
        """
        if not isinstance(params, StimParams):
            raise TypeError(f"SpikingUnits.stimulate params must be a StimParams, got {type(params).__name__}")
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"SpikingUnits.stimulate t={t!r} invalid, expected a finite time >= 0 s")
        i0 = int(round(t * self.fs_hz))
        wave = artifact_waveform(params, self.fs_hz, self.artifact_uv_per_ua, self.artifact_tau0_s,
                                 self.artifact_saturation_uv)
        self._artifacts.append(_Artifact(i0, wave, self._art_gains))
        self._pulses.append({"t_s": i0 / self.fs_hz, "t_received": t_received, "late_samples": max(0, self.n_samples - i0),
                             "amplitude_ua": params.amplitude_ua, "pulse_width_us": params.pulse_width_us,
                             "n_pulses": params.n_pulses, "artifact_s": wave.size / self.fs_hz})
        if self._rng_post.random() < self.evoked_prob:
            idx = int(round(i0 + self._evoked_lat_n + self._rng_post.normal(0.0, self._evoked_jit_n)))
            self._add_post(max(idx, i0 + 1), "evoked")

    def reward(self, t: float, amount_um: float) -> None:
        """Dopamine pulse of ``amount_um`` µM at time ``t`` (only with ``reward=RewardParams``)."""
        if self.reward_params is None:
            raise RuntimeError("SpikingUnits.reward: the synapse is not reward-modulated (reward=None)")
        self._rewards.append((float(t), float(amount_um)))
        self._rewards.sort()

    # ------------------------------------------------------------------ the block
    def step(self, n: int) -> np.ndarray:
        """Produce the next ``n`` samples, ``(n, n_channels)`` float32 µV."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"SpikingUnits.step n={n!r} invalid, expected an int >= 1")
        s0, s1 = self.n_samples, self.n_samples + int(n)
        self._extend_pre(s1 + self._t_pre + 1)
        self._extend_spont(s1 + self._t_pre + 1)
        self._run_events(s1)

        white = self._rng_noise.standard_normal((n, self.n_channels))
        x, self._zi = signal.sosfilt(self._sos, white, axis=0, zi=self._zi)
        out = (x * self._noise_gain).astype(np.float32)

        # Trigger spikes overlapping the block.
        lo = np.searchsorted(self._pre_idx, s0 - self._t_post, "left")
        hi = np.searchsorted(self._pre_idx, s1 + self._t_pre, "left")
        if hi > lo:
            self._add_waveforms(out, s0, self._pre_idx[lo:hi],
                                np.asarray(self.trigger_channels)[self._pre_unit[lo:hi]], self._pre_amp[lo:hi])
        # Target spikes overlapping the block.
        plo = bisect.bisect_left(self._post, (s0 - self._t_post, ""))
        phi = bisect.bisect_left(self._post, (s1 + self._t_pre, ""))
        if phi > plo:
            idx = np.fromiter((p[0] for p in self._post[plo:phi]), np.int64, phi - plo)
            self._add_waveforms(out, s0, idx, np.full(idx.size, self.target_channel),
                                np.full(idx.size, self.target_amplitude_uv, np.float32))
        # Artifacts overlapping the block.
        keep = []
        for a in self._artifacts:
            a_end = a.start + a.wave.size
            if a_end <= s0:
                continue
            keep.append(a)
            b0, b1 = max(a.start, s0), min(a_end, s1)
            if b1 > b0:
                out[b0 - s0:b1 - s0] += a.wave[b0 - a.start:b1 - a.start, None] * a.gains[None, :]
        self._artifacts = keep
        self.n_samples = s1
        return out

    def _add_waveforms(self, out: np.ndarray, s0: int, idx: np.ndarray, ch: np.ndarray, amp: np.ndarray) -> None:
        rows = idx[:, None] + self._offsets[None, :] - s0
        vals = amp[:, None] * self._template[None, :]
        cols = np.broadcast_to(ch[:, None], rows.shape)
        m = (rows >= 0) & (rows < out.shape[0])
        np.add.at(out, (rows[m], cols[m]), vals[m])

    # ------------------------------------------------------------------ spike trains
    def _extend_pre(self, upto: int) -> None:
        """Draw trigger spikes until every unit's train reaches sample ``upto`` (>= 1 s horizons).

        Events (single spikes, or bursts when ``firing='bursty'``) follow each
        other by the previous burst's length + the refractory period + an
        exponential gap: a Poisson process with dead time. The first event at or
        after the horizon is kept pending, so later horizons continue the same train.
        """
        if self._pre_horizon >= upto:
            return
        horizon = max(upto, self._pre_horizon + int(self.fs_hz))
        rng = self._rng_pre
        lo_b, hi_b = self._burst_size if self.firing == "bursty" else (1, 1)
        new_idx, new_unit, new_amp = [self._pre_idx], [self._pre_unit], [self._pre_amp]
        for u in range(len(self.trigger_channels)):   # per unit; vectorized over its events
            t = self._pending_start[u]
            starts_l, sizes_l = [], []
            while t < horizon:
                m = int((horizon - t) / self._mean_interval_n * 1.5) + 8
                sizes = rng.integers(lo_b, hi_b + 1, size=m)
                steps = (sizes - 1) * self._burst_isi_n + self._refr_n + rng.exponential(self._mean_exp_n, size=m)
                starts = t + np.concatenate([[0.0], np.cumsum(steps[:-1])])
                keep = starts < horizon
                starts_l.append(starts[keep])
                sizes_l.append(sizes[keep])
                t = starts[-1] + steps[-1] if keep.all() else float(starts[~keep][0])
            self._pending_start[u] = t
            starts = np.concatenate(starts_l) if starts_l else np.empty(0)
            sizes = np.concatenate(sizes_l) if sizes_l else np.empty(0, np.int64)
            k = np.arange(hi_b)
            jitter = rng.normal(0.0, 0.1 * self._burst_isi_n, size=(starts.size, k.size))
            tt = starts[:, None] + k[None, :] * self._burst_isi_n + np.where(k > 0, jitter, 0.0)
            valid = k[None, :] < sizes[:, None]
            # Amplitude shrinks within a burst (Na+ channel inactivation).
            amps = self.unit_amplitude_uv[u] * 0.9 ** np.broadcast_to(k, tt.shape)
            new_idx.append(np.round(tt[valid]).astype(np.int64))
            new_unit.append(np.full(int(valid.sum()), u, np.int64))
            new_amp.append(amps[valid].astype(np.float32))
        idx = np.concatenate(new_idx)
        order = np.argsort(idx, kind="stable")
        self._pre_idx = idx[order]
        self._pre_unit = np.concatenate(new_unit)[order]
        self._pre_amp = np.concatenate(new_amp)[order]
        self._pre_horizon = horizon

    def _draw_spont(self, after: float) -> float:
        if self._target_rate_hz <= 0:
            return math.inf
        return after + self._rng_post.exponential(self.fs_hz / self._target_rate_hz)

    def _extend_spont(self, upto: int) -> None:
        while self._next_spont < upto:   # ~1 event per second: a loop over events
            self._add_post(int(round(self._next_spont)), "spontaneous")
            self._next_spont = self._draw_spont(self._next_spont + self._refr_n)

    def _add_post(self, idx: int, cause: str) -> None:
        bisect.insort(self._post, (int(idx), cause))
        pos = bisect.bisect_left(self._post, (int(idx), cause))
        if pos < self._post_done:
            # Landed before already-processed spikes (late delivery): process it next, in order of arrival.
            self._post.pop(pos)
            self._post.insert(self._post_done, (int(idx), cause))

    # ------------------------------------------------------------------ plasticity
    def _run_events(self, s1: int) -> None:
        """Process true pre/post spikes with index < ``s1`` in time order: STDP and synaptic drive."""
        while True:
            ip = self._pre_done
            jp = self._post_done
            t_pre = self._pre_idx[ip] if ip < self._pre_idx.size and self._pre_idx[ip] < s1 else None
            t_post = self._post[jp][0] if jp < len(self._post) and self._post[jp][0] < s1 else None
            if t_pre is None and t_post is None:
                break
            if t_post is None or (t_pre is not None and t_pre <= t_post):
                self._pre_done += 1
                self._on_pre(int(t_pre))
            else:
                self._post_done += 1
                self._on_post(int(t_post))

    def _advance(self, t_s: float) -> None:
        """Decay traces to ``t_s``; with reward modulation integrate dw = gain·c·d in closed form."""
        dt = t_s - self._t_trace
        if dt <= 0:
            return
        r = self.rule
        rp = self.reward_params
        if rp is not None:
            # Dopamine pulses due in (t_trace, t_s] are applied at their own time.
            while self._rewards and self._rewards[0][0] <= t_s:
                tr, amount = self._rewards.pop(0)
                if tr > self._t_trace:
                    self._advance(tr)
                self._dopa += amount
            dt = t_s - self._t_trace
            tau = rp.tau_c_s * rp.tau_d_s / (rp.tau_c_s + rp.tau_d_s)
            dw = rp.gain_per_um_s * self._elig * self._dopa * tau * (1.0 - math.exp(-dt / tau))
            self._set_w(self.w + dw, t_s)
            self._elig *= math.exp(-dt / rp.tau_c_s)
            self._dopa *= math.exp(-dt / rp.tau_d_s)
        self._r1 *= math.exp(-dt / r.tau_plus_s)
        self._r2 *= math.exp(-dt / r.tau_x_s)
        self._o1 *= math.exp(-dt / r.tau_minus_s)
        self._o2 *= math.exp(-dt / r.tau_y_s)
        self._t_trace = t_s

    def _plastic(self, dw: float, t_s: float) -> None:
        if self.reward_params is not None:
            self._elig += dw
        else:
            self._set_w(self.w + dw, t_s)

    def _set_w(self, w: float, t_s: float) -> None:
        lo, hi = self.w_bounds
        w = min(max(w, lo), hi)
        if w != self.w:
            self.w = w
            self._w_hist.append((t_s, w))

    def _on_pre(self, idx: int) -> None:
        t_s = idx / self.fs_hz
        self._advance(t_s)
        r = self.rule
        span = self.w_bounds[1] - self.w_bounds[0]
        self._plastic(-self._o1 * (r.a2_minus + r.a3_minus * self._r2) * span, t_s)
        if r.pairing == "nearest":
            self._r1 = self._r2 = 1.0
        else:
            self._r1 += 1.0
            self._r2 += 1.0
        # The synapse drives the target with a probability that grows with the weight.
        if self._rng_post.random() < self.syn_prob_max * (self.w - self.w_bounds[0]) / span:
            lat = self._syn_lat_n + self._rng_post.normal(0.0, self._syn_jit_n)
            self._add_post(int(round(idx + max(lat, 1.0))), "synaptic")

    def _on_post(self, idx: int) -> None:
        t_s = idx / self.fs_hz
        self._advance(t_s)
        r = self.rule
        span = self.w_bounds[1] - self.w_bounds[0]
        self._plastic(self._r1 * (r.a2_plus + r.a3_plus * self._o2) * span, t_s)
        if r.pairing == "nearest":
            self._o1 = self._o2 = 1.0
        else:
            self._o1 += 1.0
            self._o2 += 1.0

    # ------------------------------------------------------------------ ground truth
    def ground_truth(self) -> dict:
        """Everything true so far (times in s from the first sample, up to :attr:`t`).

        ``trigger_spikes``: ``t_s``, ``unit``, ``channel``, ``amplitude_uv`` arrays;
        ``target_spikes``: ``t_s`` and ``cause`` (spontaneous, synaptic, evoked);
        ``pulses``: one dict per delivered burst (``t_s``, ``t_received``, params,
        ``artifact_s``, ``late_samples``); ``weight``: ``t_s``, ``w`` arrays.
        """
        n = self.n_samples
        k = np.searchsorted(self._pre_idx, n, "left")
        post = [p for p in self._post if p[0] < n]
        wt = np.array(self._w_hist, dtype=np.float64).reshape(-1, 2)
        return {
            "fs_hz": self.fs_hz, "duration_s": self.t,
            "trigger_spikes": {"t_s": self._pre_idx[:k] / self.fs_hz, "unit": self._pre_unit[:k].copy(),
                               "channel": np.asarray(self.trigger_channels)[self._pre_unit[:k]],
                               "amplitude_uv": self._pre_amp[:k].copy()},
            "target_spikes": {"t_s": np.array([p[0] for p in post], np.float64) / self.fs_hz,
                              "cause": [p[1] for p in post]},
            "pulses": [dict(p) for p in self._pulses],
            "weight": {"t_s": wt[:, 0], "w": wt[:, 1]},
            "w_final": self.w,
        }
