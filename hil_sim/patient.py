"""Simulated epilepsy patient: multichannel iEEG from Wendling neural masses.

A few neural-mass sources (source 0 is the epileptogenic focus) are mixed into
``n_channels`` electrodes, with 1/f background noise, line noise and sensor
noise on top (and, when ``alpha_uv`` is set, a narrowband alpha-like rhythm).
Seizures (spontaneous, Poisson with a refractory interval, or scheduled) move
the focus, and partly its neighbours, along a path of Wendling
parameters (REFERENCE.md §6): background (B=50, G=15) → low-voltage fast onset
(B=5, G=25, 10–20 Hz) → rhythmic spike-wave (B=25, 3–6 Hz) → background.
Stimulation bursts write artifacts into the signal and may end a seizure with
a probability that depends on charge, timing and frequency (docs/hil_sim.md).

Everything is deterministic given ``seed`` and the sequence of calls. The
output does not depend on how ``step`` calls are chunked: parameters change on
a fixed grid of patient time and every noise source has its own generator.
The object never reads a clock: patient time is the sample count / fs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

from drivers.params import StimParams
from hil_sim.brain.wendling import WendlingBank

__all__ = ["PatientParams", "SimulatedPatient", "GroundTruth", "SeizureRecord", "StimRecord",
           "termination_probability"]

# Pink (1/f) noise filter (J. O. Smith, "Spectral Audio Signal Processing": 3-pole/3-zero
# approximation, within ±0.3 dB of 1/f over ~3 decades of normalized frequency).
_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])


@dataclass(frozen=True)
class PatientParams:
    """Everything that makes one simulated patient (defaults: a typical patient).

    Geometry: electrodes sit evenly on a line (positions 0..1); source k sits at
    ``source_positions[k]`` (source 0 is the focus) and reaches electrode e
    with weight exp(−|x_e − x_k| / spatial_spread). ``mixing`` (n_channels ×
    n_sources) and ``channel_gain_uv`` (µV per mV of source LFP, one per
    channel) override the geometry when given. ``anatomy_seed`` draws the
    per-channel gains and line-noise phases, so a patient's anatomy does not
    change with the noise seed.
    """

    # sources and mixing
    n_sources: int = 3
    source_positions: tuple[float, ...] = (0.2, 0.55, 0.9)
    spatial_spread: float = 0.15
    mixing: tuple[tuple[float, ...], ...] | None = None
    channel_gain_uv: tuple[float, ...] | None = None
    gain_uv_per_mv: float = 140.0     # background source LFP sd ≈ 0.24 mV → ≈ 35 µV on the focus channel
    gain_cv: float = 0.2              # per-channel gain spread (lognormal sd)
    anatomy_seed: int = 0
    # Wendling gains (mV), REFERENCE.md §6: A = 5 in all regimes quoted there
    a_mv: float = 5.0
    background_b: float = 50.0        # §6 background
    background_g: float = 15.0
    onset_b: float = 5.0              # §6 low-voltage fast activity 10–20 Hz
    onset_g: float = 25.0
    ictal_b: float = 25.0             # §6 spike-wave 3–6 Hz
    ictal_g: float = 15.0
    onset_duration_s: float = 3.0     # low-voltage fast phase, from onset
    transition_s: float = 1.0         # ramp between phases
    termination_s: float = 1.0        # ramp back to background at a spontaneous end
    stim_termination_s: float = 0.75  # ramp back to background after a successful burst
    neighbour_involvement: float = 0.2  # fraction of the focus excursion the other sources follow
    # seizure timing
    seizure_rate_per_hour: float = 2.0
    min_interval_s: float = 120.0     # onset-to-onset refractory interval
    seizure_duration_s: tuple[float, float] = (10.0, 30.0)
    # interictal spikes: brief excursions of the focus toward §6 "B = 40 sporadic spikes";
    # 40 only fires now and then, so a short excursion goes to 35 to fire reliably.
    interictal_spike_rate_per_min: float = 4.0
    spike_b: float = 35.0
    spike_duration_s: float = 0.15
    # noise (µV rms per channel)
    pink_noise_uv: float = 10.0
    pink_corner_hz: float = 30.0      # 1st-order roll-off above: iEEG spectra fall faster than 1/f there
    sensor_noise_uv: float = 1.0
    line_freq_hz: float = 50.0
    line_noise_uv: float = 2.0
    highpass_hz: float = 1.0          # AC coupling of the amplifier (2nd-order Butterworth)
    # A narrowband rhythm on every channel, as a posterior alpha for tACS at the individual peak
    # frequency: the Wendling background (B=50, G=15) has no spectral peak. Off by default, so the
    # cohort the seizure model was trained on is unchanged.
    alpha_uv: float = 0.0             # rms µV; 0: off
    alpha_hz: float = 10.0            # centre frequency
    alpha_bandwidth_hz: float = 1.0   # -3 dB width of the band-pass that shapes it from white noise
    # response to stimulation (see termination_probability)
    stim_q50_uc: float = 2.0          # burst charge with p = 0.5 at onset, in band, at the focus
    stim_slope: float = 2.0           # logit per e-fold of charge
    stim_sensitivity: float = 1.0     # multiplies the effective charge (patient variability)
    stim_timing_scale_s: float = 10.0  # logit drops by 1 per this many seconds after onset
    stim_freq_band_hz: tuple[float, float] = (100.0, 200.0)
    stim_freq_penalty: float = 4.0    # logit per octave² outside the band
    stim_site_positions: tuple[float, ...] = (0.2, 0.25, 0.15, 0.3)  # stimulator channel k → position
    stim_distance_scale: float = 0.2  # effective charge × exp(−|site − focus| / this)
    # stimulation artifacts
    artifact_uv_per_ua: float = 2.0   # peak on the channel at the stimulation site
    artifact_spread: float = 0.1      # spatial decay (positions)
    artifact_tau_base_s: float = 0.002
    artifact_tau_per_pulse_width: float = 20.0  # τ = base + this × pulse width
    # numerics
    max_dt_s: float = 1e-3            # internal Euler–Maruyama step bound

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        def need(ok: bool, name: str, value, expected: str) -> None:
            if not ok:
                raise ValueError(f"PatientParams.{name}={value!r}: expected {expected}")

        need(isinstance(self.n_sources, int) and 1 <= self.n_sources <= 16, "n_sources", self.n_sources, "int in [1, 16]")
        need(len(self.source_positions) == self.n_sources, "source_positions", self.source_positions,
             f"{self.n_sources} positions (one per source)")
        need(all(0.0 <= x <= 1.0 for x in self.source_positions), "source_positions", self.source_positions,
             "values in [0, 1]")
        need(self.spatial_spread > 0, "spatial_spread", self.spatial_spread, "> 0")
        need(self.gain_uv_per_mv > 0, "gain_uv_per_mv", self.gain_uv_per_mv, "> 0")
        need(0 <= self.gain_cv <= 2, "gain_cv", self.gain_cv, "in [0, 2]")
        for name in ("a_mv", "background_b", "background_g", "onset_b", "onset_g", "ictal_b", "ictal_g", "spike_b"):
            v = getattr(self, name)
            need(0 <= v <= 200, name, v, "a gain in [0, 200] mV")
        lo, hi = self.seizure_duration_s
        need(0 < lo <= hi, "seizure_duration_s", self.seizure_duration_s, "(min, max) with 0 < min <= max")
        shortest = self.onset_duration_s + self.transition_s + self.termination_s
        need(lo >= shortest, "seizure_duration_s", self.seizure_duration_s,
             f"min >= onset_duration_s + transition_s + termination_s = {shortest} s")
        need(self.seizure_rate_per_hour >= 0, "seizure_rate_per_hour", self.seizure_rate_per_hour, ">= 0")
        need(self.min_interval_s > hi, "min_interval_s", self.min_interval_s,
             f"> the longest seizure ({hi} s) so spontaneous seizures never overlap")
        if self.seizure_rate_per_hour > 0:
            need(3600.0 / self.seizure_rate_per_hour > self.min_interval_s, "seizure_rate_per_hour",
                 self.seizure_rate_per_hour, f"< 3600 / min_interval_s = {3600.0 / self.min_interval_s:.3g} per hour")
        need(0 <= self.neighbour_involvement <= 1, "neighbour_involvement", self.neighbour_involvement, "in [0, 1]")
        need(self.interictal_spike_rate_per_min >= 0, "interictal_spike_rate_per_min",
             self.interictal_spike_rate_per_min, ">= 0")
        need(0 < self.spike_duration_s <= 1, "spike_duration_s", self.spike_duration_s, "in (0, 1] s")
        for name in ("pink_noise_uv", "sensor_noise_uv", "line_noise_uv", "artifact_uv_per_ua"):
            need(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        need(self.line_freq_hz in (50.0, 60.0), "line_freq_hz", self.line_freq_hz, "50 or 60")
        need(1 <= self.pink_corner_hz <= 1000, "pink_corner_hz", self.pink_corner_hz, "in [1, 1000] Hz")
        need(0 < self.highpass_hz < 10, "highpass_hz", self.highpass_hz, "in (0, 10) Hz")
        need(0 <= self.alpha_uv <= 1000, "alpha_uv", self.alpha_uv, "in [0, 1000] µV rms")
        need(0.1 <= self.alpha_bandwidth_hz <= 10, "alpha_bandwidth_hz", self.alpha_bandwidth_hz, "in [0.1, 10] Hz")
        need(self.alpha_bandwidth_hz < self.alpha_hz <= 100, "alpha_hz", self.alpha_hz,
             f"in ({self.alpha_bandwidth_hz}, 100] Hz (above its bandwidth)")
        need(self.stim_q50_uc > 0, "stim_q50_uc", self.stim_q50_uc, "> 0")
        need(self.stim_sensitivity >= 0, "stim_sensitivity", self.stim_sensitivity, ">= 0")
        need(self.stim_timing_scale_s > 0, "stim_timing_scale_s", self.stim_timing_scale_s, "> 0")
        flo, fhi = self.stim_freq_band_hz
        need(0 < flo <= fhi, "stim_freq_band_hz", self.stim_freq_band_hz, "(lo, hi) with 0 < lo <= hi")
        need(len(self.stim_site_positions) >= 1, "stim_site_positions", self.stim_site_positions, "at least one site")
        need(0 < self.max_dt_s <= 2e-3, "max_dt_s", self.max_dt_s, "in (0, 0.002] s")

    def to_dict(self) -> dict:
        """Plain-JSON copy of all fields."""
        return asdict(self)


class SeizureRecord(NamedTuple):
    """One seizure: onset, offset (None while it lasts), ended by a stimulation burst."""

    onset_s: float
    offset_s: float | None
    terminated_by_stim: bool


class StimRecord(NamedTuple):
    """One stimulation as received by the patient (patient time, StimParams.to_dict())."""

    t: float
    params: dict


@dataclass
class GroundTruth:
    """What really happened in the simulated patient, in patient time (s)."""

    seizures: list[SeizureRecord] = field(default_factory=list)
    stim: list[StimRecord] = field(default_factory=list)
    stim_effects: list[dict] = field(default_factory=list)  # per burst: p_terminate, terminated, ...
    interictal_spikes: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "seizures": [r._asdict() for r in self.seizures],
            "stim": [{"t": r.t, "params": r.params} for r in self.stim],
            "stim_effects": [dict(e) for e in self.stim_effects],
            "interictal_spikes": list(self.interictal_spikes),
        }

    def seizure_mask(self, times_s: np.ndarray, until_s: float = math.inf) -> np.ndarray:
        """Boolean array: True where ``times_s`` falls inside a seizure (open ones end at ``until_s``)."""
        times_s = np.asarray(times_s, dtype=float)
        mask = np.zeros(times_s.shape, dtype=bool)
        for r in self.seizures:
            end = r.offset_s if r.offset_s is not None else until_s
            mask |= (times_s >= r.onset_s) & (times_s < end)
        return mask


def termination_probability(params: PatientParams, stim: StimParams, since_onset_s: float) -> float:
    """Probability that ``stim`` delivered ``since_onset_s`` after seizure onset ends the seizure.

    logit = slope · ln(Q_eff / q50) − since_onset / timing_scale − penalty · (octaves outside the band)²,
    Q_eff = burst charge × sensitivity × exp(−|site − focus| / distance_scale). Continuous
    waveforms (sine, DC, TI) do not terminate seizures in this model (p = 0).
    """
    if not stim.is_pulsed or stim.amplitude_ua <= 0 or stim.n_pulses <= 0 or stim.frequency_hz <= 0:
        return 0.0
    site = params.stim_site_positions[stim.channel % len(params.stim_site_positions)]
    q_eff = (stim.burst_charge_uc * params.stim_sensitivity
             * math.exp(-abs(site - params.source_positions[0]) / params.stim_distance_scale))
    if q_eff <= 0:
        return 0.0
    flo, fhi = params.stim_freq_band_hz
    octaves_out = max(0.0, math.log2(flo / stim.frequency_hz), math.log2(stim.frequency_hz / fhi))
    logit = (params.stim_slope * math.log(q_eff / params.stim_q50_uc)
             - max(0.0, since_onset_s) / params.stim_timing_scale_s
             - params.stim_freq_penalty * octaves_out**2)
    return 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0


@dataclass
class _Burst:
    pulse_t: np.ndarray     # pulse onset times (s)
    amp_uv: np.ndarray      # (n_channels,) peak per channel
    tau_s: float
    channel: int = 0        # stimulator channel that delivered it


class SimulatedPatient:
    """A simulated patient producing multichannel iEEG in µV (see module docstring).

    ``t`` is the patient time (s) of the next sample ``step`` will produce.
    ``stimulate(t, params)`` tells the patient a burst was delivered at patient
    time ``t`` (late deliveries still count, but the artifact samples already
    produced are not rewritten).
    """

    _GRID_HZ = 64.0  # parameter paths and events are evaluated on this grid of patient time

    def __init__(self, fs_hz: float = 512.0, n_channels: int = 16, seed: int = 0,
                 params: PatientParams | None = None) -> None:
        if not (isinstance(fs_hz, (int, float)) and 64.0 <= fs_hz <= 20_000.0):
            raise ValueError(f"SimulatedPatient fs_hz={fs_hz!r}: expected a number in [64, 20000] Hz")
        if not (isinstance(n_channels, int) and 1 <= n_channels <= 512):
            raise ValueError(f"SimulatedPatient n_channels={n_channels!r}: expected an int in [1, 512]")
        self.params = p = params if params is not None else PatientParams()
        p.validate()
        self.fs_hz = float(fs_hz)
        self.n_channels = n_channels
        self.seed = int(seed)
        self.channel_names = [f"E{i + 1:02d}" for i in range(n_channels)]
        self.ground_truth = GroundTruth()
        self._n = 0

        ss = np.random.SeedSequence([self.seed, 0x5EED])
        # Children keep their keys whatever their number: a seventh leaves the first six as they were.
        (rng_neural, self._rng_pink, self._rng_sensor, self._rng_seizure,
         self._rng_spike, self._rng_stim, self._rng_alpha) = (np.random.default_rng(s) for s in ss.spawn(7))
        anatomy = np.random.default_rng(np.random.SeedSequence([p.anatomy_seed, 0xA4A7]))

        # --- geometry: mixing (n_ch, n_src) × gain → µV per mV of source LFP
        self._ch_pos = (np.arange(n_channels) + 0.5) / n_channels
        src_pos = np.asarray(p.source_positions)
        if p.mixing is not None:
            mixing = np.asarray(p.mixing, dtype=float)
            if mixing.shape != (n_channels, p.n_sources):
                raise ValueError(f"PatientParams.mixing shape {mixing.shape}: expected "
                                 f"(n_channels, n_sources) = ({n_channels}, {p.n_sources})")
        else:
            mixing = np.exp(-np.abs(self._ch_pos[:, None] - src_pos[None, :]) / p.spatial_spread)
        gains_drawn = p.gain_uv_per_mv * anatomy.lognormal(0.0, p.gain_cv, n_channels)
        if p.channel_gain_uv is not None:
            gain = np.asarray(p.channel_gain_uv, dtype=float)
            if gain.shape != (n_channels,):
                raise ValueError(f"PatientParams.channel_gain_uv length {gain.size}: expected n_channels = {n_channels}")
        else:
            gain = gains_drawn
        self._mix_uv = np.ascontiguousarray((mixing * gain[:, None]).T)  # (n_src, n_ch)
        self._line_phase = anatomy.uniform(0, 2 * np.pi, n_channels)
        self._line_amp = p.line_noise_uv * np.sqrt(2.0) * anatomy.uniform(0.5, 1.5, n_channels)

        # --- neural masses: internal step = fs / k with k the smallest integer keeping dt <= max_dt_s
        self._k_sub = max(1, math.ceil(1.0 / (self.fs_hz * p.max_dt_s) - 1e-9))
        self._bank = WendlingBank(p.n_sources, 1.0 / (self.fs_hz * self._k_sub), rng_neural,
                                  A=p.a_mv, B=p.background_b, G=p.background_g)
        self._bg = np.array([p.background_b, p.background_g])
        self._gains = np.array([p.background_b, p.background_g])  # focus (B, G) of the current grid cell
        self._cell = max(1, int(round(self.fs_hz / self._GRID_HZ)))
        # The LFP's DC level jumps by ~10 mV between regimes (e.g. 50/15 → 5/25); an
        # AC-coupled amplifier would turn that into a huge slow transient at every
        # onset, so the stable fixed-point level is removed before the high-pass.
        self._bg_level = self._bank.equilibrium_lfp()[0]
        self._level = self._bg_level.copy()

        # --- filters with state (streaming, chunk-independent)
        self._hp_sos = butter(2, p.highpass_hz, btype="highpass", fs=self.fs_hz, output="sos")
        self._hp_zi = np.zeros((self._hp_sos.shape[0], 2, p.n_sources))  # level removed: rest is 0
        b_lp, a_lp = butter(1, min(p.pink_corner_hz, 0.45 * self.fs_hz), fs=self.fs_hz)
        self._pink_b, self._pink_a = np.convolve(_PINK_B, b_lp), np.convolve(_PINK_A, a_lp)
        h = lfilter(self._pink_b, self._pink_a, np.r_[1.0, np.zeros(int(50 * self.fs_hz) - 1)])
        self._pink_scale = p.pink_noise_uv / math.sqrt(float(np.sum(h * h)))
        if p.alpha_uv > 0:
            lo, hi = p.alpha_hz - p.alpha_bandwidth_hz / 2, p.alpha_hz + p.alpha_bandwidth_hz / 2
            if hi >= 0.45 * self.fs_hz:
                raise ValueError(f"PatientParams.alpha_hz={p.alpha_hz!r}: its band reaches {hi:g} Hz, above "
                                 f"0.45 × fs = {0.45 * self.fs_hz:g} Hz")
            self._alpha_sos = butter(2, [lo, hi], btype="bandpass", fs=self.fs_hz, output="sos")
            h = sosfilt(self._alpha_sos, np.r_[1.0, np.zeros(int(60 * self.fs_hz) - 1)])
            self._alpha_scale = p.alpha_uv / math.sqrt(float(np.sum(h * h)))
            burn = self._rng_alpha.standard_normal(int(20 * self.fs_hz))   # start it stationary, as the pink noise
            self._alpha_zi = sosfilt(self._alpha_sos, burn, zi=np.zeros((self._alpha_sos.shape[0], 2)))[1]
        # Start the pink filter in a stationary state rather than at zero.
        burn = self._rng_pink.standard_normal((int(20 * self.fs_hz), n_channels))
        self._pink_zi = lfilter(self._pink_b, self._pink_a, burn, axis=0,
                                zi=np.zeros((len(self._pink_a) - 1, n_channels)))[1]

        # --- events
        self._path_t = np.array([0.0])        # knots of the focus (B, G) path
        self._path_bg = self._bg[None, :].copy()
        self._active: int | None = None       # index into ground_truth.seizures
        self._active_offset = 0.0             # planned offset of the active seizure
        self._active_terminating = False
        self._scheduled: list[float] = []
        self._next_spont = self._draw_interval(0.0)
        self._next_spike = self._draw_spike(0.0)
        self._pending_effects: list[tuple[float, float, StimParams, int]] = []  # (t_effect, t, params, stim idx)
        self._bursts: list[_Burst] = []

    # ---------------------------------------------------------------- public API
    @property
    def t(self) -> float:
        """Patient time (s) of the next sample to be produced."""
        return self._n / self.fs_hz

    @property
    def n_samples(self) -> int:
        """Number of samples produced so far."""
        return self._n

    def in_seizure(self) -> bool:
        """True while the patient is in a seizure (onset ≤ t < offset, termination ramp included)."""
        return self._active is not None

    def schedule_seizure(self, onset_s: float) -> None:
        """Start a seizure at patient time ``onset_s`` (ignored if one is already running then)."""
        if not (isinstance(onset_s, (int, float)) and math.isfinite(onset_s)) or onset_s < self.t:
            raise ValueError(f"schedule_seizure onset_s={onset_s!r}: expected a finite time >= t = {self.t:.6f} s")
        self._scheduled.append(float(onset_s))
        self._scheduled.sort()

    def stimulate(self, t: float, params: StimParams) -> None:
        """A burst ``params`` was delivered at patient time ``t`` (s)."""
        if not isinstance(params, StimParams):
            raise TypeError(f"stimulate params={params!r}: expected drivers.params.StimParams")
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"stimulate t={t!r}: expected a finite patient time >= 0 s")
        p = self.params
        if not 0 <= params.channel < len(p.stim_site_positions):
            raise ValueError(f"stimulate params.channel={params.channel!r}: expected 0..{len(p.stim_site_positions) - 1} "
                             "(PatientParams.stim_site_positions)")
        idx = len(self.ground_truth.stim)
        self.ground_truth.stim.append(StimRecord(float(t), params.to_dict()))
        if params.is_pulsed and params.amplitude_ua > 0 and params.n_pulses > 0 and params.frequency_hz > 0:
            site = p.stim_site_positions[params.channel]
            amp = (p.artifact_uv_per_ua * params.amplitude_ua
                   * np.exp(-np.abs(self._ch_pos - site) / p.artifact_spread))
            tau = p.artifact_tau_base_s + p.artifact_tau_per_pulse_width * params.pulse_width_us * 1e-6
            self._bursts.append(_Burst(t + np.arange(params.n_pulses) / params.frequency_hz, amp, tau, params.channel))
        # The burst acts on the seizure once fully delivered.
        self._pending_effects.append((t + params.burst_duration_s, float(t), params, idx))
        self._pending_effects.sort(key=lambda e: e[0])

    def stop_stimulation(self, t: float, channels) -> None:
        """The stimulator stopped what it was delivering on ``channels`` at patient time ``t`` (STOP,
        its watchdog, a HELLO): pulses after ``t`` never came, and a cut burst acts on the seizure
        with what it delivered, at ``t``. The ground truth keeps the cut (``stopped_at_s``,
        ``n_pulses_delivered`` or ``duration_delivered_s``)."""
        chans = set(int(c) for c in channels)
        for b in self._bursts:
            if b.channel in chans:
                b.pulse_t = b.pulse_t[b.pulse_t < t]
        kept = []
        for t_eff, t_stim, params, idx in self._pending_effects:
            if params.channel not in chans or not t_stim <= t < t_eff:
                kept.append((t_eff, t_stim, params, idx))
                continue
            rec = self.ground_truth.stim[idx]
            if params.is_pulsed:
                k = int(np.count_nonzero(t_stim + np.arange(params.n_pulses) / params.frequency_hz < t))
                cut = params.with_(n_pulses=k) if k else None
                self.ground_truth.stim[idx] = StimRecord(rec.t, {**rec.params, "stopped_at_s": float(t),
                                                                  "n_pulses_delivered": k})
            else:
                cut = params.with_(duration_s=t - t_stim) if t > t_stim else None
                self.ground_truth.stim[idx] = StimRecord(rec.t, {**rec.params, "stopped_at_s": float(t),
                                                                  "duration_delivered_s": float(t - t_stim)})
            if cut is not None:
                kept.append((float(t), t_stim, cut, idx))
        self._pending_effects = sorted(kept, key=lambda e: e[0])

    def step(self, n: int) -> np.ndarray:
        """Produce the next ``n`` samples: (n, n_channels) float32 µV; advances ``t``."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"SimulatedPatient.step n={n!r}: expected an int >= 0")
        n = int(n)
        if n == 0:
            return np.zeros((0, self.n_channels), dtype=np.float32)
        p = self.params
        n0 = self._n
        src = self._sources(n0, n)                                   # (n, n_src) mV, high-passed
        out = src @ self._mix_uv                                     # (n, n_ch) µV
        white = self._rng_pink.standard_normal((n, self.n_channels))
        pink, self._pink_zi = lfilter(self._pink_b, self._pink_a, white, axis=0, zi=self._pink_zi)
        out += self._pink_scale * pink
        if p.sensor_noise_uv > 0:
            out += p.sensor_noise_uv * self._rng_sensor.standard_normal((n, self.n_channels))
        if p.alpha_uv > 0:
            alpha, self._alpha_zi = sosfilt(self._alpha_sos, self._rng_alpha.standard_normal(n), zi=self._alpha_zi)
            out += self._alpha_scale * alpha[:, None]
        ts = (n0 + np.arange(n)) / self.fs_hz
        if p.line_noise_uv > 0 and p.line_freq_hz < 0.45 * self.fs_hz:  # else the anti-alias filter removed it
            out += self._line_amp * np.sin(2 * np.pi * p.line_freq_hz * ts[:, None] + self._line_phase)
        if self._bursts and n:
            self._add_artifacts(out, ts)
        self._n = n0 + n
        return out.astype(np.float32)

    # ---------------------------------------------------------------- internals
    def _draw_interval(self, after_s: float) -> float:
        p = self.params
        if p.seizure_rate_per_hour <= 0:
            return math.inf
        mean_extra = 3600.0 / p.seizure_rate_per_hour - p.min_interval_s
        return after_s + p.min_interval_s + float(self._rng_seizure.exponential(mean_extra))

    def _draw_spike(self, after_s: float) -> float:
        rate = self.params.interictal_spike_rate_per_min / 60.0
        return after_s + float(self._rng_spike.exponential(1.0 / rate)) if rate > 0 else math.inf

    def _set_path(self, knots_t: list[float], knots_bg: list[tuple[float, float]]) -> None:
        self._path_t = np.asarray(knots_t, dtype=float)
        self._path_bg = np.asarray(knots_bg, dtype=float)

    def _path_at(self, t: float) -> np.ndarray:
        return np.array([np.interp(t, self._path_t, self._path_bg[:, 0]),
                         np.interp(t, self._path_t, self._path_bg[:, 1])])

    def _start_seizure(self, onset: float) -> None:
        p = self.params
        dur = float(self._rng_seizure.uniform(*p.seizure_duration_s))
        bg, on, ic = tuple(self._bg), (p.onset_b, p.onset_g), (p.ictal_b, p.ictal_g)
        t1 = onset + min(p.transition_s, p.onset_duration_s) / 2
        self._set_path([onset, t1, onset + p.onset_duration_s, onset + p.onset_duration_s + p.transition_s,
                        onset + dur - p.termination_s, onset + dur],
                       [bg, on, on, ic, ic, bg])
        self._active = len(self.ground_truth.seizures)
        self._active_offset = onset + dur
        self._active_terminating = False
        self.ground_truth.seizures.append(SeizureRecord(onset, None, False))

    def _update_events(self, tc: float) -> None:
        """Advance the event state machine to grid time ``tc``."""
        p, gt = self.params, self.ground_truth
        # stimulation effects that completed before this cell
        while self._pending_effects and self._pending_effects[0][0] <= tc:
            t_eff, t_stim, stim, idx = self._pending_effects.pop(0)
            u = float(self._rng_stim.uniform())  # drawn for every burst: outcomes stay reproducible
            effect = {"stim_index": idx, "t": t_stim, "t_effect": t_eff, "in_seizure": False,
                      "p_terminate": 0.0, "terminated": False}
            if self._active is not None and not self._active_terminating and t_stim >= gt.seizures[self._active].onset_s:
                since = t_stim - gt.seizures[self._active].onset_s
                prob = termination_probability(p, stim, since)
                # Only a burst that lands before the seizure's own wind-down and ends it sooner can
                # terminate it; otherwise it would lengthen the seizure and be credited with its end.
                shortens = (t_eff < self._active_offset - p.termination_s
                            and t_eff + p.stim_termination_s < self._active_offset)
                effect.update(in_seizure=True, since_onset_s=since, p_terminate=prob, terminated=shortens and u < prob)
                if not shortens:
                    effect["ending_anyway"] = True
                if shortens and u < prob:
                    now_bg = tuple(self._path_at(t_eff))
                    self._set_path([t_eff, t_eff + p.stim_termination_s], [now_bg, tuple(self._bg)])
                    self._active_offset = t_eff + p.stim_termination_s
                    self._active_terminating = True
                    r = gt.seizures[self._active]
                    gt.seizures[self._active] = SeizureRecord(r.onset_s, None, True)
            gt.stim_effects.append(effect)
        # seizure end
        if self._active is not None and tc >= self._active_offset:
            r = gt.seizures[self._active]
            gt.seizures[self._active] = SeizureRecord(r.onset_s, self._active_offset, r.terminated_by_stim)
            self._active = None
        # seizure onsets (spontaneous or scheduled); any onset falling inside a seizure is dropped
        while True:
            sched = self._scheduled[0] if self._scheduled else math.inf
            onset = min(sched, self._next_spont)
            if onset > tc:
                break
            if onset == sched:
                self._scheduled.pop(0)
            else:
                self._next_spont = self._draw_interval(onset)
            if self._active is None:
                self._start_seizure(onset)
        # interictal spikes, only between seizures
        while self._next_spike <= tc:
            ts = self._next_spike
            self._next_spike = self._draw_spike(ts)
            if self._active is None and tc - ts < 1.0 / self._GRID_HZ + 1e-9:
                gt.interictal_spikes.append(ts)
                bg, sp = tuple(self._bg), (p.spike_b, p.background_g)
                ramp = 0.25 * p.spike_duration_s
                self._set_path([ts, ts + ramp, ts + p.spike_duration_s, ts + p.spike_duration_s + ramp],
                               [bg, sp, sp, bg])

    def _source_gains(self, focus_bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        dev = focus_bg - self._bg
        scale = np.full(p.n_sources, p.neighbour_involvement)
        scale[0] = 1.0
        return self._bg[0] + scale * dev[0], self._bg[1] + scale * dev[1]

    def _sources(self, n0: int, n: int) -> np.ndarray:
        """High-passed source LFP (mV), (n, n_sources), for samples n0 .. n0+n−1."""
        k, cell = self._k_sub, self._cell
        pieces = []
        seg_start, s = n0, n0
        end = n0 + n
        while s < end:
            if s % cell == 0:
                tc = s / self.fs_hz
                self._update_events(tc)
                gains = self._path_at(tc)
                if not np.array_equal(gains, self._gains):
                    if s > seg_start:
                        pieces.append(self._bank.run((s - seg_start) * k) - self._level)
                        seg_start = s
                    self._gains = gains
                    B, G = self._source_gains(gains)
                    self._bank.set_gains(B=B, G=G)
                    level, stable = self._bank.equilibrium_lfp()
                    self._level = np.where(stable, level, self._bg_level)
            s = min(end, (s // cell + 1) * cell)
        if end > seg_start:
            pieces.append(self._bank.run((end - seg_start) * k) - self._level)
        raw = np.concatenate(pieces) if len(pieces) > 1 else (pieces[0] if pieces else np.zeros((0, self.params.n_sources)))
        if k > 1:
            raw = raw.reshape(n, k, self.params.n_sources).mean(axis=1)  # box average: cheap anti-alias before decimation
        y, self._hp_zi = sosfilt(self._hp_sos, raw, axis=0, zi=self._hp_zi)
        return y

    def _add_artifacts(self, out: np.ndarray, ts: np.ndarray) -> None:
        t_first, t_last = ts[0], ts[-1]
        fs = self.fs_hz
        keep = []
        for b in self._bursts:
            horizon = 10.0 * b.tau_s + 2.0 / fs
            if not b.pulse_t.size or b.pulse_t[-1] + horizon < t_first:
                continue  # fully in the past (or stopped before its first pulse): drop
            keep.append(b)
            sel = b.pulse_t[(b.pulse_t <= t_last) & (b.pulse_t + horizon >= t_first)]
            if sel.size == 0:
                continue
            d = ts[:, None] - sel[None, :]                        # (n, m) s since each pulse
            k = np.floor(d * fs + 1e-9)
            # Sample 0 after a pulse carries the cathodic phase, later samples the
            # opposite-sign recovery: a biphasic spike decaying with τ(pulse width).
            shape = np.where(k == 0, -1.0, 0.5) * np.exp(-np.clip(d, 0, None) / b.tau_s) * (d >= 0)
            out += shape.sum(axis=1)[:, None] * b.amp_uv[None, :]
        self._bursts = keep
