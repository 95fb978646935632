"""Wendling et al. 2002 neural-mass model, vectorized over P independent populations.

Model (REFERENCE.md §6): the Jansen-Rit column (pyramidal cells, excitatory
interneurons, slow dendritic inhibition) plus a fast somatic inhibitory
population. Five second-order synaptic kernels h(t) = G·c·t·exp(−c·t), written as
pairs (y_k, y_{k+5}):

    y0'' = A a S(y1 − y2 − y3)                 − 2a y0' − a² y0
    y1'' = A a (p(t) + C2 S(C1 y0))           − 2a y1' − a² y1
    y2'' = B b C4 S(C3 y0)                     − 2b y2' − b² y2
    y3'' = G g C7 S(C5 y0 − C6 y4)             − 2g y3' − g² y3
    y4'' = B b S(C3 y0)                        − 2b y4' − b² y4

S(v) = 2 e0 / (1 + exp(r (v0 − v))). The LFP-like output is y1 − y2 − y3 (mV).

Integration: fixed-step Euler–Maruyama in its exponential form: the linear
part of every kernel (which is what makes the system stiff: g = 500 s⁻¹) is
propagated exactly with its matrix exponential, the sigmoid drive and the
noisy input p(t) are held over the step (zero-order hold). With a plain Euler
step g·dt must stay well below 1; the exact propagator keeps the scheme stable
at any dt and accurate for dt ≤ ~1 ms.

Noise: p(t) = p_mean + p_sd · ξ(t), ξ white. The variance of the held input
is scaled by dt_ref/dt (dt_ref = 1 ms), so ``p_sd`` is the standard deviation
of p held over 1 ms steps (Wendling's original per-step draw at ~1 kHz) and the
statistics do not depend on the internal dt.

Speed: the per-step work is 4 NumPy calls on small arrays (two matrix–vector
products, one tanh, one add) whatever P is; everything else (noise, input
vectors, output) is computed per block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm

__all__ = ["WendlingConstants", "WendlingBank", "sigmoid", "DEFAULT_CONSTANTS"]


@dataclass(frozen=True, slots=True)
class WendlingConstants:
    """Fixed constants of the Wendling 2002 model (REFERENCE.md §6)."""

    a_per_s: float = 100.0   # §6 Jansen-Rit a
    b_per_s: float = 50.0    # §6 Jansen-Rit b
    g_per_s: float = 500.0   # §6 Wendling g (fast somatic inhibition)
    v0_mv: float = 6.0       # §6 sigmoid threshold
    e0_per_s: float = 2.5    # §6 half of the maximal firing rate
    r_per_mv: float = 0.56   # §6 sigmoid slope
    c: float = 135.0         # §6 connectivity C; C1..C7 below are fractions of it
    c1: float = 1.0
    c2: float = 0.8
    c3: float = 0.25
    c4: float = 0.25
    c5: float = 0.3          # §6 Wendling C5 = 0.3C
    c6: float = 0.1          # §6 Wendling C6 = 0.1C
    c7: float = 0.8          # §6 Wendling C7 = 0.8C
    p_mean: float = 90.0     # §6 input mean
    # Not in §6: Wendling 2002 draws p as white noise of roughly 30–150 pulses/s;
    # sd 30 is the value most reimplementations use.
    p_sd: float = 30.0
    dt_ref_s: float = 1e-3   # step length p_sd refers to (see module docstring)


DEFAULT_CONSTANTS = WendlingConstants()


def sigmoid(v_mv: np.ndarray | float, k: WendlingConstants = DEFAULT_CONSTANTS) -> np.ndarray:
    """Wave-to-pulse sigmoid S(v) = 2 e0 / (1 + exp(r (v0 − v))) in pulses/s."""
    return 2.0 * k.e0_per_s / (1.0 + np.exp(k.r_per_mv * (k.v0_mv - np.asarray(v_mv, dtype=float))))


def _kernel_propagator(rate_per_s: float, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact 2×2 propagator of y'' = u − 2c y' − c² y and its zero-order-hold input vector."""
    a_cont = np.array([[0.0, 1.0], [-rate_per_s**2, -2.0 * rate_per_s]])
    # Augmented exponential gives both exp(A dt) and ∫0^dt exp(A s) ds · [0, 1].
    aug = np.zeros((3, 3))
    aug[:2, :2] = a_cont
    aug[1, 2] = 1.0
    e = expm(aug * dt_s)
    return e[:2, :2], e[:2, 2]


class WendlingBank:
    """P independent Wendling 2002 populations integrated together.

    ``A``, ``B``, ``G`` (mV, shape (P,)) may be changed between calls to
    :meth:`run` (e.g. to move a population along a seizure path); the state is
    kept. ``run(n)`` advances ``n`` internal steps of ``dt_s`` and returns the
    LFP-like output y1 − y2 − y3 in mV, shape (n, P), for the state at the
    start of each step.
    """

    N_VARS = 10

    def __init__(self, n_pop: int, dt_s: float, rng: np.random.Generator,
                 A: float | np.ndarray = 5.0, B: float | np.ndarray = 50.0, G: float | np.ndarray = 15.0,
                 constants: WendlingConstants = DEFAULT_CONSTANTS) -> None:
        if int(n_pop) < 1:
            raise ValueError(f"WendlingBank n_pop={n_pop!r}: expected an integer >= 1")
        if not (0.0 < dt_s <= 2e-3):
            raise ValueError(f"WendlingBank dt_s={dt_s!r}: expected 0 < dt_s <= 0.002 s "
                             "(the fast inhibitory kernel has a 2 ms time constant)")
        self.n_pop = P = int(n_pop)
        self.dt_s = float(dt_s)
        self.k = k = constants
        self.rng = rng
        self.A = np.broadcast_to(np.asarray(A, dtype=float), (P,)).copy()
        self.B = np.broadcast_to(np.asarray(B, dtype=float), (P,)).copy()
        self.G = np.broadcast_to(np.asarray(G, dtype=float), (P,)).copy()

        # State layout: x[var*P + pop]; var 0..4 = y0..y4, var 5..9 = y5..y9 (derivatives).
        nx, ns = 10 * P, 4 * P
        self._nx, self._ns = nx, ns
        C = k.c
        rates = (k.a_per_s, k.a_per_s, k.b_per_s, k.g_per_s, k.b_per_s)  # kernel rate of y0..y4
        self._M = np.zeros((nx, nx))
        gam = np.zeros((5, 2))  # ZOH input vector per kernel (y, y')
        for kern, c_rate in enumerate(rates):
            m, gvec = _kernel_propagator(c_rate, self.dt_s)
            gam[kern] = gvec
            for p in range(P):
                i_y, i_d = kern * P + p, (5 + kern) * P + p
                self._M[np.ix_([i_y, i_d], [i_y, i_d])] = m
        self._gam = gam
        self._rates = rates

        # Sigmoid arguments. s_j = 1/(1+exp(z_j)) = 0.5 − 0.5·tanh(z_j/2), so we
        # compute h = tanh(z/2) directly: W gives z/2 from [x; h; 1].
        # Sigmoid j: 0: S(y1−y2−y3) → y0 (gain A, ·C? no: A a)
        #            1: S(C1 y0) → y1 (A a C2)
        #            2: S(C3 y0) → y2 (B b C4) and y4 (B b)
        #            3: S(C5 y0 − C6 y4) → y3 (G g C7)
        self._W = np.zeros((ns, nx + ns + 1))
        r, v0 = k.r_per_mv, k.v0_mv
        for p in range(P):
            y = lambda var: var * P + p  # noqa: E731
            self._W[0 * P + p, y(1)] = -r / 2
            self._W[0 * P + p, y(2)] = r / 2
            self._W[0 * P + p, y(3)] = r / 2
            self._W[1 * P + p, y(0)] = -r * k.c1 * C / 2
            self._W[2 * P + p, y(0)] = -r * k.c3 * C / 2
            self._W[3 * P + p, y(0)] = -r * k.c5 * C / 2
            self._W[3 * P + p, y(4)] = r * k.c6 * C / 2
        self._W[:, -1] = r * v0 / 2

        self._xs = np.zeros(nx + ns + 1)
        self._xs[-1] = 1.0
        self._MK = np.zeros((nx, nx + ns + 1))
        self._MK[:, :nx] = self._M
        self._const = np.zeros(nx)    # drive from the constant half of the sigmoids
        self._p_vec = np.zeros(nx)    # state increment per unit of p(t)
        self._xn = np.zeros(nx)
        self._gains_dirty = True
        self._settle_state()

    # -- parameters --------------------------------------------------------------------------------
    def set_gains(self, A: np.ndarray | float | None = None, B: np.ndarray | float | None = None,
                  G: np.ndarray | float | None = None) -> None:
        """Change synaptic gains (mV) of all populations; takes effect at the next step."""
        for name, val in (("A", A), ("B", B), ("G", G)):
            if val is None:
                continue
            arr = np.broadcast_to(np.asarray(val, dtype=float), (self.n_pop,))
            if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 200):
                raise ValueError(f"WendlingBank {name}={val!r}: expected finite gains in [0, 200] mV")
            getattr(self, name)[:] = arr
        self._gains_dirty = True

    def _rebuild(self) -> None:
        P, nx, k, C = self.n_pop, self._nx, self.k, self.k.c
        a, b, g = k.a_per_s, k.b_per_s, k.g_per_s
        two_e0 = 2.0 * k.e0_per_s
        K = np.zeros((nx, self._ns))
        for p in range(P):
            A_, B_, G_ = self.A[p], self.B[p], self.G[p]
            # (target kernel, sigmoid column, drive gain per unit sigmoid output in pulses/s)
            links = ((0, 0, A_ * a), (1, 1, A_ * a * k.c2 * C), (2, 2, B_ * b * k.c4 * C),
                     (4, 2, B_ * b), (3, 3, G_ * g * k.c7 * C))
            for kern, col, gain in links:
                K[kern * P + p, col * P + p] += gain * self._gam[kern, 0]
                K[(5 + kern) * P + p, col * P + p] += gain * self._gam[kern, 1]
            self._p_vec[1 * P + p] = A_ * a * self._gam[1, 0]
            self._p_vec[6 * P + p] = A_ * a * self._gam[1, 1]
        # S = 2e0·(0.5 − 0.5·h): the constant half becomes a fixed drive, h enters with −e0.
        self._MK[:, nx:nx + self._ns] = -0.5 * two_e0 * K
        self._const = 0.5 * two_e0 * K.sum(axis=1)
        self._gains_dirty = False

    def _settle_state(self) -> None:
        # Start near the noise-free fixed point so the first seconds are not a transient.
        self._rebuild()
        self.run(int(round(2.0 / self.dt_s)), noise=False)

    # -- integration -------------------------------------------------------------------------------
    def run(self, n_steps: int, noise: bool = True) -> np.ndarray:
        """Advance ``n_steps`` internal steps; return LFP y1 − y2 − y3 (mV), shape (n_steps, P)."""
        n = int(n_steps)
        if n < 0:
            raise ValueError(f"WendlingBank.run n_steps={n_steps!r}: expected >= 0")
        P, nx = self.n_pop, self._nx
        if self._gains_dirty:
            self._rebuild()
        k = self.k
        if noise:
            sd = k.p_sd * np.sqrt(k.dt_ref_s / self.dt_s)
            p = k.p_mean + sd * self.rng.standard_normal((n, P))
        else:
            p = np.full((n, P), k.p_mean)
        # u[i] = constant sigmoid drive + p(t) drive; only the y1/y6 rows vary with p.
        U = np.empty((n, nx))
        U[:] = self._const
        U[:, 1 * P:2 * P] += p * self._p_vec[1 * P:2 * P]
        U[:, 6 * P:7 * P] += p * self._p_vec[6 * P:7 * P]

        Z = np.empty((n, self._ns))
        xs, W, MK, xn = self._xs, self._W, self._MK, self._xn
        h_view = xs[nx:nx + self._ns]
        x_view = xs[:nx]
        matmul, tanh, add = np.matmul, np.tanh, np.add
        # The one per-step loop: the model is a nonlinear recursion, each step needs the last.
        for i in range(n):
            zi = Z[i]
            matmul(W, xs, out=zi)
            tanh(zi, out=h_view)
            matmul(MK, xs, out=xn)
            add(xn, U[i], out=x_view)
        # Z[:, :P] = r (v0 − v)/2 with v = y1 − y2 − y3 at the start of each step.
        return k.v0_mv - (2.0 / k.r_per_mv) * Z[:, :P]

    def equilibrium_lfp(self) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free fixed point of each population at the current gains.

        Returns (LFP y1 − y2 − y3 in mV, stable: bool) per population; with
        several fixed points the one nearest the current y0 is taken. Stable
        fixed points are where the noisy process fluctuates around (its mean);
        in oscillatory regimes (spike-wave) the fixed point is unstable and
        says little about the mean. Used to remove DC jumps between regimes.
        """
        if self._gains_dirty:
            self._rebuild()
        k, C, P = self.k, self.k.c, self.n_pop
        y0 = np.linspace(0.0, self.A.max() / k.a_per_s * 2 * k.e0_per_s, 1201)[:, None]   # (n, 1)
        A, B, G = self.A[None, :], self.B[None, :], self.G[None, :]
        y1 = A / k.a_per_s * (k.p_mean + k.c2 * C * sigmoid(k.c1 * C * y0, k))
        y2 = B / k.b_per_s * k.c4 * C * sigmoid(k.c3 * C * y0, k)
        y4 = B / k.b_per_s * sigmoid(k.c3 * C * y0, k)
        y3 = G / k.g_per_s * k.c7 * C * sigmoid(k.c5 * C * y0 - k.c6 * C * y4, k)
        v = y1 - y2 - y3
        f = A / k.a_per_s * sigmoid(v, k) - y0
        cross = np.signbit(f[:-1]) != np.signbit(f[1:])                # (n−1, P) sign changes
        y0_now = self._xs[:P]
        best = np.empty(P, dtype=int)
        for p in range(P):
            idx = np.flatnonzero(cross[:, p])
            best[p] = (np.argmin(np.abs(f[:, p])) if idx.size == 0
                       else idx[np.argmin(np.abs(y0[idx, 0] - y0_now[p]))])
        cols = np.arange(P)
        x_fp = np.zeros(self._nx)
        for var, arr in enumerate((np.broadcast_to(y0, v.shape), y1, y2, y3, y4)):
            x_fp[var * P:(var + 1) * P] = arr[best, cols]
        # Jacobian of the one-step map x → M x − e0 K tanh(W x + w) at the fixed point.
        h = np.tanh(self._W[:, :self._nx] @ x_fp + self._W[:, -1])
        jac = self._M + self._MK[:, self._nx:self._nx + self._ns] @ ((1 - h * h)[:, None] * self._W[:, :self._nx])
        stable = np.empty(P, dtype=bool)
        for p in range(P):
            idx = np.arange(10) * P + p   # populations are uncoupled: per-population blocks
            stable[p] = np.max(np.abs(np.linalg.eigvals(jac[np.ix_(idx, idx)]))) < 1.0
        return v[best, cols], stable

    @property
    def state(self) -> np.ndarray:
        """Copy of the state, shape (10, P): rows y0..y9 (mV and mV/s)."""
        return self._xs[:self._nx].reshape(10, self.n_pop).copy()
