"""Dose–response figure of the simulated patient's response to stimulation.

    python -m hil_sim.dose_response --out docs/dose_response.png

Left: termination probability vs burst charge (model curve) at several delays
after onset, with Monte-Carlo estimates from full simulations (scheduled
seizure, one burst, fraction of seeds where ground truth says
``terminated_by_stim``). Right: probability vs pulse frequency at fixed charge.
"""
from __future__ import annotations

import argparse

import numpy as np

from drivers.params import StimParams
from hil_sim.patient import PatientParams, SimulatedPatient, termination_probability


def _empirical(params: PatientParams, stim: StimParams, delay_s: float, seeds: range) -> float:
    hits = 0
    for seed in seeds:
        pt = SimulatedPatient(128.0, 2, seed=seed, params=params)
        pt.schedule_seizure(1.0)
        pt.step(int((1.0 + delay_s) * 128))
        pt.stimulate(1.0 + delay_s, stim)
        pt.step(int(2.0 * 128))
        hits += pt.ground_truth.seizures[0].terminated_by_stim
    return hits / len(seeds)


def main(argv: list[str] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/dose_response.png")
    ap.add_argument("--seeds", type=int, default=20, help="simulations per Monte-Carlo point")
    a = ap.parse_args(argv)
    p = PatientParams(interictal_spike_rate_per_min=0.0, seizure_rate_per_hour=0.0)
    base = StimParams(channel=0, amplitude_ua=1000.0, pulse_width_us=100.0, frequency_hz=150.0, n_pulses=20)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    amps = np.geomspace(50, 6000, 60)
    q = np.array([base.with_(amplitude_ua=x).burst_charge_uc for x in amps])
    for delay, color in ((1.0, "C0"), (5.0, "C1"), (15.0, "C2")):
        ax1.semilogx(q, [termination_probability(p, base.with_(amplitude_ua=x), delay) for x in amps],
                     color=color, label=f"model, {delay:g} s after onset")
    for amp in (200, 500, 1000, 2500):
        stim = base.with_(amplitude_ua=float(amp))
        ax1.plot(stim.burst_charge_uc, _empirical(p, stim, 1.0, range(a.seeds)), "o", color="C0")
    ax1.plot([], [], "o", color="C0", label=f"simulated, 1 s ({a.seeds} seeds each)")
    ax1.set(xlabel="burst charge (µC, both phases, all pulses)", ylabel="P(seizure terminated)",
            title="charge and timing (150 Hz, 20 pulses, 100 µs)")
    ax1.legend(fontsize=8)
    freqs = np.geomspace(5, 330, 80)
    ax2.semilogx(freqs, [termination_probability(p, base.with_(frequency_hz=f), 1.0) for f in freqs], color="C0")
    ax2.axvspan(*p.stim_freq_band_hz, color="0.9")
    ax2.set(xlabel="pulse frequency (Hz)", ylabel="P(seizure terminated)",
            title=f"frequency (charge {base.burst_charge_uc:g} µC, 1 s after onset)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
