"""Spike-timing-dependent plasticity simulators (pair, triplet, reward-modulated).

One event-driven engine covers the three rules. Spike trains of many synapses
(rows) are simulated at once: the Python loop runs over event *columns*, every
update is a NumPy operation over all rows, so thousands of protocols cost about
as much as one (no per-spike Python loop per synapse).

Rules (all facts from REFERENCE.md §7):

* **Pair STDP** (Song, Miller & Abbott 2000): Δw = A+·exp(−Δt/τ+) for
  Δt = t_post − t_pre > 0 and −A−·exp(Δt/τ−) for Δt < 0, τ± = 20 ms,
  A+ = 0.005·g_max, A− = 1.05·A+. Song et al. accumulate the traces
  (every earlier spike counts), so the default pairing here is **all-to-all**;
  ``pairing="nearest"`` resets the trace to 1 at each spike instead, so only the
  nearest earlier spike of the other neuron counts.
* **Triplet STDP** (Pfister & Gerstner 2006): traces r1 (τ+), r2 (τx) of the
  presynaptic and o1 (τ−), o2 (τy) of the postsynaptic neuron;
  at a pre spike w −= o1·(A2− + A3−·r2), at a post spike w += r1·(A2+ + A3+·o2),
  both using the trace values just before the spike's own increment.
  Parameters: the paper's visual-cortex fit (Sjöström et al. 2001 data),
  all-to-all **minimal** model (A3− = 0): τ+ = 16.8 ms, τ− = 33.7 ms,
  τy = 125 ms, A2+ = 5e-10, A3+ = 6.2e-3, A2− = 7e-3 (Pfister & Gerstner 2006,
  J Neurosci 26:9673, Table 4, "visual cortex, all-to-all, minimal"; the table
  number is from memory and unverified; NEST's ``stdp_triplet`` defaults quote
  the same τ values for the full model).
* **Reward-modulated STDP** (after Izhikevich 2007): the STDP updates also feed an
  eligibility trace c (τc = 1 s); a reward raises dopamine d by ``reward_um``
  which decays with τd = 0.2 s; dw/dt = gain·c·d (REFERENCE.md §7). After the
  last spike c and d are pure exponentials, so the reward contribution is the
  closed form gain·R·c_end·exp(−delay/τc)·τc·τd/(τc+τd). A deliberate hybrid:
  here the STDP updates *also* change w directly, so a protocol's Δw is its
  plain STDP plus the dopamine-gated part (the surrogate covers rewarded and
  unrewarded protocols with one rule). Izhikevich's rule has only the c·d path;
  ``hil_sim/spiking.py`` runs that pure form (with reward on, STDP goes only
  into c), so the two differ for a synapse that gets no reward.

Weight bounds: ``bounds="hard"`` clips to [w_min, w_max] after every update
(Song et al. 2000); ``bounds="soft"`` scales LTP by (w_max − w) and LTD by
(w − w_min) (multiplicative rule).

Spikes may carry a *weight* in [0, 1] instead of 0/1: a spike that occurs with
probability p and weight p gives the exact expectation of every term that is
linear in the presynaptic spikes (mean-field use).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "STDPRule", "RewardParams", "PlasticityModel", "SimResult",
    "stdp_window", "simulate_spike_trains", "reward_delta_w", "DEFAULT_MODEL",
]


@dataclass(frozen=True, slots=True)
class STDPRule:
    """Parameters of a (triplet) STDP rule; pair STDP is the case A3± = 0.

    Amplitudes are fractions of the weight range (w_max − w_min) per spike pair.
    """

    a2_plus: float
    a2_minus: float
    tau_plus_s: float
    tau_minus_s: float
    a3_plus: float = 0.0
    a3_minus: float = 0.0
    tau_x_s: float = 0.101
    tau_y_s: float = 0.125
    pairing: str = "all"  # "all" (all-to-all) or "nearest" (nearest-neighbour)
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("tau_plus_s", "tau_minus_s", "tau_x_s", "tau_y_s"):
            v = getattr(self, key)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"STDPRule.{key} = {v!r}: expected a time constant > 0 s")
        for key in ("a2_plus", "a2_minus", "a3_plus", "a3_minus"):
            v = getattr(self, key)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"STDPRule.{key} = {v!r}: expected an amplitude >= 0")
        if self.pairing not in ("all", "nearest"):
            raise ValueError(f"STDPRule.pairing = {self.pairing!r}: expected 'all' or 'nearest'")

    @classmethod
    def song2000(cls, pairing: str = "all", g_max: float = 1.0) -> "STDPRule":
        """Pair STDP of Song, Miller & Abbott 2000 (REFERENCE.md §7)."""
        a_plus = 0.005 * g_max  # REFERENCE.md §7: A+ = 0.005·g_max
        return cls(a2_plus=a_plus, a2_minus=1.05 * a_plus,  # §7: A− = 1.05·A+
                   tau_plus_s=0.020, tau_minus_s=0.020,      # §7: τ± = 20 ms
                   pairing=pairing, name="pair_song2000")

    @classmethod
    def pfister2006_visual_minimal(cls, pairing: str = "all") -> "STDPRule":
        """Triplet STDP, Pfister & Gerstner 2006 visual-cortex all-to-all minimal fit.

        The nearest-neighbour variant reuses these numbers (the paper fitted a
        separate nearest-spike set, not reproduced here).
        """
        return cls(a2_plus=5e-10, a3_plus=6.2e-3, a2_minus=7e-3, a3_minus=0.0,
                   tau_plus_s=0.0168, tau_minus_s=0.0337, tau_x_s=0.101, tau_y_s=0.125,
                   pairing=pairing, name="triplet_pfister2006_vc_min")


@dataclass(frozen=True, slots=True)
class RewardParams:
    """Dopamine-gated plasticity (Izhikevich 2007; τ values REFERENCE.md §7).

    ``gain_per_um_s`` converts c·d (d in µM) to dw/dt; its value is a model
    choice (unverified), set so that a 1 µM reward right after a protocol
    changes w by about the eligibility left at that time.
    """

    tau_c_s: float = 1.0    # REFERENCE.md §7: eligibility τc = 1 s
    tau_d_s: float = 0.2    # REFERENCE.md §7: dopamine τd = 0.2 s
    gain_per_um_s: float = 6.0

    def __post_init__(self) -> None:
        for key in ("tau_c_s", "tau_d_s"):
            v = getattr(self, key)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"RewardParams.{key} = {v!r}: expected a time constant > 0 s")
        if not np.isfinite(self.gain_per_um_s):
            raise ValueError(f"RewardParams.gain_per_um_s = {self.gain_per_um_s!r}: expected a finite number")


@dataclass(frozen=True, slots=True)
class PlasticityModel:
    """A rule, its reward modulation and the weight bounds."""

    rule: STDPRule = field(default_factory=STDPRule.pfister2006_visual_minimal)
    reward: RewardParams = field(default_factory=RewardParams)
    w_min: float = 0.0
    w_max: float = 1.0
    # Soft bounds by default: long protocols approach the bounds smoothly instead
    # of saturating, so baseline_w matters continuously.
    bounds: str = "soft"  # "hard" (clip, Song et al. 2000) or "soft" (multiplicative)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.w_min) and np.isfinite(self.w_max) and self.w_max > self.w_min):
            raise ValueError(f"PlasticityModel bounds [{self.w_min}, {self.w_max}]: expected finite w_min < w_max")
        if self.bounds not in ("hard", "soft"):
            raise ValueError(f"PlasticityModel.bounds = {self.bounds!r}: expected 'hard' or 'soft'")


DEFAULT_MODEL = PlasticityModel()


@dataclass(frozen=True, slots=True)
class SimResult:
    """Outcome per row: final weight, eligibility at the last spike, last spike time."""

    w: np.ndarray
    eligibility: np.ndarray
    t_last_s: np.ndarray


def stdp_window(dt_s: np.ndarray | float, rule: STDPRule | None = None) -> np.ndarray:
    """Pair-STDP window Δw(Δt) for one pre/post pair, Δt = t_post − t_pre in s.

    Δt = 0 counts as pre-before-post (LTP side), matching the engine's ordering
    of simultaneous spikes.
    """
    rule = rule or STDPRule.song2000()
    dt = np.asarray(dt_s, dtype=np.float64)
    ltp = rule.a2_plus * np.exp(-np.abs(dt) / rule.tau_plus_s)
    ltd = -rule.a2_minus * np.exp(-np.abs(dt) / rule.tau_minus_s)
    return np.where(dt >= 0, ltp, ltd)


def _as_2d(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} has shape {a.shape}: expected (n_rows, n_spikes) or (n_spikes,)")
    return a


def simulate_spike_trains(pre_times_s, post_times_s, model: PlasticityModel = DEFAULT_MODEL,
                          w0: np.ndarray | float = 0.5, pre_weights=None, post_weights=None) -> SimResult:
    """Run the plasticity rule over pre/post spike trains of many synapses at once.

    ``pre_times_s`` (rows, P) and ``post_times_s`` (rows, Q) hold spike times in s;
    NaN marks "no spike" (padding). Optional ``*_weights`` in [0, 1] weight each
    spike (1 = a spike, p = a spike with probability p in mean-field mode).
    A pre and a post spike at the same time are processed pre first.
    """
    pre = _as_2d(pre_times_s, "pre_times_s")
    post = _as_2d(post_times_s, "post_times_s")
    if pre.shape[0] != post.shape[0]:
        raise ValueError(f"pre_times_s has {pre.shape[0]} rows, post_times_s {post.shape[0]}: expected equal")
    n_rows = pre.shape[0]
    pw = np.ones_like(pre) if pre_weights is None else _as_2d(pre_weights, "pre_weights")
    qw = np.ones_like(post) if post_weights is None else _as_2d(post_weights, "post_weights")
    if pw.shape != pre.shape or qw.shape != post.shape:
        raise ValueError("spike weights must have the same shape as their spike times")
    if np.any((pw < 0) | (pw > 1)) or np.any((qw < 0) | (qw > 1)):
        raise ValueError("spike weights must lie in [0, 1]")
    w0 = np.broadcast_to(np.asarray(w0, dtype=np.float64), (n_rows,)).copy()
    if np.any((w0 < model.w_min) | (w0 > model.w_max)):
        raise ValueError(f"w0 outside [{model.w_min}, {model.w_max}]: min {w0.min()}, max {w0.max()}")

    times = np.concatenate([pre, post], axis=1)
    weights = np.concatenate([np.where(np.isnan(pre), 0.0, pw), np.where(np.isnan(post), 0.0, qw)], axis=1)
    is_post = np.zeros(times.shape, dtype=bool)
    is_post[:, pre.shape[1]:] = True
    valid = ~np.isnan(times)
    has_any = valid.any(axis=1)
    t_last = np.where(has_any, np.nanmax(np.where(valid, times, -np.inf), axis=1), 0.0)
    # Padding sits at the row's last spike time: dt = 0 and weight 0 make it a no-op,
    # and the eligibility is read exactly at the last real spike.
    times = np.where(valid, times, t_last[:, None])
    # Stable sort keeps pre (left block) before post at equal times.
    order = np.argsort(times, axis=1, kind="stable")
    times = np.take_along_axis(times, order, axis=1)
    weights = np.take_along_axis(weights, order, axis=1)
    is_post = np.take_along_axis(is_post, order, axis=1)
    pre_w = np.where(is_post, 0.0, weights)
    post_w = np.where(is_post, weights, 0.0)

    rule, rw = model.rule, model.reward
    inv = np.array([1 / rule.tau_plus_s, 1 / rule.tau_x_s, 1 / rule.tau_minus_s, 1 / rule.tau_y_s, 1 / rw.tau_c_s])
    traces = np.zeros((5, n_rows))  # r1, r2, o1, o2, c
    decay = np.empty((5, n_rows))
    w = w0
    span = model.w_max - model.w_min
    nearest = rule.pairing == "nearest"
    t_prev = times[:, 0].copy()
    for k in range(times.shape[1]):
        t = times[:, k]
        np.exp(-np.outer(inv, t - t_prev), out=decay)
        traces *= decay
        t_prev = t
        r1, r2, o1, o2 = traces[0], traces[1], traces[2], traces[3]
        s_pre, s_post = pre_w[:, k], post_w[:, k]
        ltd = s_pre * o1 * (rule.a2_minus + rule.a3_minus * r2) * span
        ltp = s_post * r1 * (rule.a2_plus + rule.a3_plus * o2) * span
        if model.bounds == "hard":
            w = np.clip(w + ltp - ltd, model.w_min, model.w_max)
        else:
            w = w + ltp * (model.w_max - w) / span - ltd * (w - model.w_min) / span
        traces[4] += ltp - ltd
        if nearest:
            traces[0] += s_pre * (1.0 - r1)
            traces[1] += s_pre * (1.0 - r2)
            traces[2] += s_post * (1.0 - o1)
            traces[3] += s_post * (1.0 - o2)
        else:
            traces[0] += s_pre
            traces[1] += s_pre
            traces[2] += s_post
            traces[3] += s_post
    return SimResult(w=w, eligibility=traces[4].copy(), t_last_s=t_last)


def reward_delta_w(eligibility: np.ndarray, reward_um, delay_s, model: PlasticityModel = DEFAULT_MODEL) -> np.ndarray:
    """Weight change from a dopamine reward ``delay_s`` after the last spike.

    ∫ gain·c(t)·d(t) dt with c = c_end·exp(−t/τc), d = R·exp(−(t−delay)/τd) for
    t ≥ delay: gain·R·c_end·exp(−delay/τc)·τc·τd/(τc + τd) (Izhikevich 2007).
    """
    delay = np.asarray(delay_s, dtype=np.float64)
    if np.any(delay < 0) or not np.all(np.isfinite(delay)):
        raise ValueError(f"reward delay_s = {delay!r}: expected finite values >= 0 s")
    rw = model.reward
    tau_eff = rw.tau_c_s * rw.tau_d_s / (rw.tau_c_s + rw.tau_d_s)
    return rw.gain_per_um_s * np.asarray(reward_um, dtype=np.float64) * eligibility * np.exp(-delay / rw.tau_c_s) * tau_eff
