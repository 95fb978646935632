"""Stimulation protocols turned into pre/post spike trains, and their expected Δw.

Model of a protocol (assumptions of this package, not published facts):

* Each stimulation *event* k (a pulse, a sine peak, a TI envelope peak)
  recruits the pathway with probability p. A recruited event gives one
  **presynaptic** spike at the event time and one **postsynaptic** spike at
  event time + ``timing_ms`` (Δt = t_post − t_pre, the pairing the protocol
  imposes, e.g. stimulation timed off a detected spike). An event that does not
  recruit gives neither, so a stimulus that drives nothing changes nothing.
* **pulsed**: recruitment probability is a Hill function of the charge per
  phase Q = amplitude × pulse width: p = Q^2 / (Q^2 + Q50^2), Q50 = 100 nC
  (unverified model choice); events at k / frequency.
* **sine** (tACS): the membrane low-passes the current (τm = 10 ms, gain
  1/√(1 + (2π f τm)²)); spikes are phase-locked at the peaks k/f + 1/(4f) with
  probability Hill(amplitude × gain, I50 = 500 µA). A kHz sine barely drives.
* **ti** (temporal interference): carriers f1 = carrier_hz and f2 = f1 + frequency_hz.
  The neuron follows the envelope |f2 − f1| = frequency_hz, not the carrier
  (REFERENCE.md §7): events at the envelope peaks k/frequency, with the sine
  drive evaluated at the envelope frequency. The carrier itself adds the
  drive of a kHz sine, i.e. almost nothing.
* Spike-time jitter: Gaussian, σ = 1 ms, on each spike (Monte Carlo mode).

``expected_delta_w`` averages ``n_trials`` Monte Carlo realizations (seeded,
deterministic for a given seed).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from models.plasticity.stdp import DEFAULT_MODEL, PlasticityModel, reward_delta_w, simulate_spike_trains

__all__ = ["Protocol", "WAVEFORMS", "recruitment_probability", "protocol_arrays",
           "spike_trains", "expected_delta_w", "expected_delta_w_arrays"]

WAVEFORMS = ("pulsed", "sine", "ti")
Q50_NC = 100.0          # charge per phase for 50 % recruitment (model choice, unverified)
HILL_N = 2.0
I50_UA = 500.0          # sine/TI peak current for 50 % phase-locked firing (model choice, unverified)
TAU_MEMBRANE_S = 0.010  # membrane low-pass (model choice, unverified)
JITTER_S = 0.001        # spike-time jitter σ (model choice, unverified)

# Validation ranges of a Protocol (wider than the surrogate's training ranges).
_RANGES = {
    "frequency_hz": (0.01, 20_000.0),
    "pulse_width_us": (1.0, 10_000.0),
    "timing_ms": (-500.0, 500.0),
    "n_pulses": (1, 10_000),
    "reward": (-10.0, 10.0),
    "reward_delay_s": (0.0, 60.0),
    "baseline_w": (0.0, 1.0),
    "carrier_hz": (100.0, 100_000.0),
    "amplitude_ua": (0.0, 20_000.0),
}


@dataclass(frozen=True, slots=True)
class Protocol:
    """A stimulation protocol paired with a postsynaptic spike.

    ``timing_ms`` is Δt = t_post − t_pre: > 0 means the stimulation-evoked
    presynaptic spike precedes the postsynaptic one. ``reward`` is a dopamine
    increment in µM delivered ``reward_delay_s`` after the last spike
    (``None`` = no reward; a non-zero ``reward`` needs it). ``carrier_hz`` is
    used by ``waveform="ti"`` only.
    """

    frequency_hz: float
    waveform: str = "pulsed"
    pulse_width_us: float = 200.0
    timing_ms: float = 10.0
    n_pulses: int = 60
    reward_delay_s: float | None = None
    reward: float = 0.0
    baseline_w: float = 0.5
    carrier_hz: float = 2000.0
    amplitude_ua: float = 1000.0

    def __post_init__(self) -> None:
        if self.waveform not in WAVEFORMS:
            raise ValueError(f"Protocol.waveform = {self.waveform!r}: expected one of {WAVEFORMS}")
        for key, (lo, hi) in _RANGES.items():
            v = getattr(self, key)
            if v is None and key == "reward_delay_s":
                continue
            if not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"Protocol.{key} = {v!r}: expected a number in [{lo}, {hi}]")
        if int(self.n_pulses) != self.n_pulses:
            raise ValueError(f"Protocol.n_pulses = {self.n_pulses!r}: expected an integer")
        if self.reward_delay_s is None and self.reward != 0:
            # Without a delay there is no reward in the simulation or in the surrogate's inputs:
            # it used to be dropped silently, so Δw was predicted for an unrewarded protocol.
            raise ValueError(f"Protocol.reward = {self.reward!r} without reward_delay_s: expected reward_delay_s "
                             "(s after the last spike) with a non-zero reward, or reward = 0 for no reward")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Protocol":
        """Build from a dict; unknown keys are an error naming them."""
        known = set(cls.__dataclass_fields__)
        extra = set(d) - known
        if extra:
            raise ValueError(f"Protocol fields {sorted(extra)} unknown: expected a subset of {sorted(known)}")
        return cls(**d)


def _hill(x: np.ndarray, x50: float) -> np.ndarray:
    x = np.maximum(np.asarray(x, dtype=np.float64), 0.0)
    xn = x ** HILL_N
    return xn / (xn + x50 ** HILL_N)


def _membrane_gain(f_hz: np.ndarray) -> np.ndarray:
    return 1.0 / np.sqrt(1.0 + (2 * np.pi * np.asarray(f_hz) * TAU_MEMBRANE_S) ** 2)


def protocol_arrays(protocols: list[Protocol]) -> dict[str, np.ndarray]:
    """Column arrays of a list of protocols (waveform as code 0 pulsed, 1 sine, 2 ti)."""
    if not protocols:
        raise ValueError("protocols is empty: expected at least one Protocol")
    cols = {
        "frequency_hz": [p.frequency_hz for p in protocols],
        "waveform": [WAVEFORMS.index(p.waveform) for p in protocols],
        "pulse_width_us": [p.pulse_width_us for p in protocols],
        "timing_ms": [p.timing_ms for p in protocols],
        "n_pulses": [p.n_pulses for p in protocols],
        "reward": [0.0 if p.reward_delay_s is None else p.reward for p in protocols],
        "reward_delay_s": [0.0 if p.reward_delay_s is None else p.reward_delay_s for p in protocols],
        "baseline_w": [p.baseline_w for p in protocols],
        "carrier_hz": [p.carrier_hz for p in protocols],
        "amplitude_ua": [p.amplitude_ua for p in protocols],
    }
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def recruitment_probability(arr: dict[str, np.ndarray]) -> np.ndarray:
    """Probability that one stimulation event evokes the presynaptic spike."""
    wf = arr["waveform"]
    q_nc = arr["amplitude_ua"] * arr["pulse_width_us"] * 1e-3  # µA·µs = pC → nC
    p_pulsed = _hill(q_nc, Q50_NC)
    # sine: the drive is the sine at its own frequency; TI: the envelope at the beat
    # frequency drives (REFERENCE.md §7), the carrier adds only its low-passed remnant.
    p_sine = _hill(arr["amplitude_ua"] * _membrane_gain(arr["frequency_hz"]), I50_UA)
    p_ti = _hill(arr["amplitude_ua"] * (_membrane_gain(arr["frequency_hz"]) + _membrane_gain(arr["carrier_hz"])), I50_UA)
    return np.clip(np.select([wf == 0, wf == 1], [p_pulsed, p_sine], p_ti), 0.0, 1.0)


def spike_trains(arr: dict[str, np.ndarray], n_trials: int, rng: np.random.Generator):
    """Pre/post spike times (rows = protocol × trial, NaN = no spike).

    Row order: protocol-major (protocol i, trial j → row i·n_trials + j).
    """
    n = arr["n_pulses"].astype(np.int64)
    f = arr["frequency_hz"]
    n_max = int(n.max())
    k = np.arange(n_max, dtype=np.float64)
    offset = np.where(arr["waveform"] == 1, 0.25 / f, 0.0)  # sine peaks a quarter period in
    ev = k[None, :] / f[:, None] + offset[:, None]
    ev[k[None, :] >= n[:, None]] = np.nan
    p = recruitment_probability(arr)
    pre = np.repeat(ev, n_trials, axis=0)
    post = pre + np.repeat(arr["timing_ms"] * 1e-3, n_trials)[:, None]
    missed = rng.random(pre.shape) >= np.repeat(p, n_trials)[:, None]
    pre += rng.normal(0.0, JITTER_S, pre.shape)
    post += rng.normal(0.0, JITTER_S, post.shape)
    pre[missed] = np.nan
    post[missed] = np.nan
    return pre, post


def expected_delta_w_arrays(arr: dict[str, np.ndarray], model: PlasticityModel = DEFAULT_MODEL,
                            n_trials: int = 16, seed: int = 0, batch_rows: int = 20_000, progress=None) -> np.ndarray:
    """Expected Δw for protocols given as column arrays (see ``protocol_arrays``).

    Protocols are processed in batches sorted by ``n_pulses`` so that padding is
    small. ``progress(done, total)`` is called after each batch when given.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials = {n_trials}: expected >= 1")
    n_prot = arr["n_pulses"].shape[0]
    trials = n_trials
    rng = np.random.default_rng(seed)
    out = np.empty(n_prot)
    order = np.argsort(arr["n_pulses"], kind="stable")
    per_batch = max(1, batch_rows // trials)
    done = 0
    for start in range(0, n_prot, per_batch):
        idx = order[start:start + per_batch]
        sub = {k: v[idx] for k, v in arr.items()}
        pre, post = spike_trains(sub, trials, rng)
        w0 = np.repeat(sub["baseline_w"], trials)
        res = simulate_spike_trains(pre, post, model, w0=w0)
        w_da = reward_delta_w(res.eligibility, np.repeat(sub["reward"], trials),
                              np.repeat(sub["reward_delay_s"], trials), model)
        w_end = np.clip(res.w + w_da, model.w_min, model.w_max)
        out[idx] = (w_end - w0).reshape(len(idx), trials).mean(axis=1)
        done += len(idx)
        if progress is not None:
            progress(done, n_prot)
    return out


def expected_delta_w(protocols: list[Protocol] | Protocol, model: PlasticityModel = DEFAULT_MODEL,
                     n_trials: int = 16, seed: int = 0) -> np.ndarray:
    """Expected weight change Δw = w_end − baseline_w of each protocol (deterministic per seed)."""
    if isinstance(protocols, Protocol):
        protocols = [protocols]
    return expected_delta_w_arrays(protocol_arrays(protocols), model, n_trials, seed)
