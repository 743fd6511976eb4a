"""Stochastic samplers of the reverse-time SDE (Song et al. 2021): Euler-Maruyama, the
reverse-diffusion predictor, predictor-corrector with Langevin correctors, and torchsde."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..dynamics.reverse import ReverseSDE
from .base import ExternalSolver, FixedGridSolver, Problem, Solver
from .registry import get_solver, register


def _drift(p: Problem, x: Tensor, t: Any, coeffs: Any = None) -> Tensor:
    """The reverse-time SDE's drift (:class:`~sdekit.dynamics.ReverseSDE`) from one counted,
    checked model call (``coeffs``: the grid's alpha and sigma at ``t``, where it is a grid
    point)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return ReverseSDE(p.sde).drift(x, t, p.predict(x, t, "eps", coeffs))


@register("euler_maruyama")
class EulerMaruyama(FixedGridSolver):
    """Euler-Maruyama on the reverse-time SDE: ``x <- x + (f x - g^2 s) dt + g sqrt(|dt|) z``
    with dt < 0. Ito SDE; order 1 (its drift part), strong order 1 here (additive noise),
    1 NFE per step. Song et al. 2021, Eq. 6 and App. G (the EM predictor)."""

    family = "sde"
    order = 1
    strong_order = 1.0
    stochastic = True
    default_grid = "uniform"
    paper = "Song et al. 2021, Score-Based Generative Modeling through SDEs, Eq. 6"

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        t0, t1 = p.times[i], p.times[i + 1]
        dt = t1 - t0
        z = p.noise.increment(t0, t1, x)
        g = ReverseSDE(p.sde).diffusion(t0)
        drift = _drift(p, x, t0, p.coeffs(i))
        return x + drift * float(dt) + p.bcast(g * torch.sqrt(-dt), x) * z, state


@register("reverse_diffusion")
class ReverseDiffusion(FixedGridSolver):
    """The reverse-diffusion predictor (Song et al. 2021, Eq. 46): discretise the forward SDE as
    ``x_i = a x_{i+1} + G z`` with the exact one-step marginal coefficients
    ``a = alpha_i / alpha_{i+1}``, ``G^2 = sigma_i^2 - a^2 sigma_{i+1}^2`` (DDPM's beta for VP,
    ``sigma_i^2 - sigma_{i+1}^2`` for VE), then step ``x <- x - (a - 1) x + G^2 s + G z``.
    Ito SDE; order 1, strong order 1 here; 1 NFE per step."""

    family = "sde"
    order = 1
    strong_order = 1.0
    stochastic = True
    default_grid = "uniform"
    paper = "Song et al. 2021, Score-Based Generative Modeling through SDEs, Eq. 46"

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        a = p.alpha[i] / p.alpha[i + 1]
        G2 = (p.sigma[i] ** 2 - a * a * p.sigma[i + 1] ** 2).clamp_min(0)
        score = p.predict(x, p.times[i], "score", p.coeffs(i))
        z = p.noise.increment(p.times[i], p.times[i + 1], x)
        return p.bcast(2 - a, x) * x + p.bcast(G2, x) * score + p.bcast(G2.sqrt(), x) * z, state


CORRECTORS = ("langevin", "ald", "none")
STEP_NORMS = ("sample", "batch")


@register("pc", predictor="reverse_diffusion", corrector="langevin")
@register("pc_ald", predictor="reverse_diffusion", corrector="ald")
class PredictorCorrector(FixedGridSolver):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3): at each time, ``n_corrector``
    Langevin steps ``x <- x + e s + sqrt(2 e) z`` and then one predictor step (any registered
    fixed-grid solver). ``a`` below is the one-step ratio ``(alpha_i / alpha_{i+1})^2``
    (1 - beta_i for VP, 1 for VE).

    ``corrector='langevin'`` sets ``e = 2 a (snr |z| / |s|)^2`` (score-SDE's Alg. 4), which makes
    the step's signal-to-noise ratio ``|e s| / |sqrt(2 e) z|`` equal to ``snr``:

    * ``step_norm='sample'`` (default; batch invariant) replaces ``|z|^2`` and ``|s|^2`` by
      values that depend on neither the batch nor the sample's position: ``d`` (the dimension,
      ``E|z|^2``) and ``d / sigma_t^2``, the upper bound of ``E|s|^2`` (``E|s|^2 = (d - E tr
      Cov[eps | x]) / sigma_t^2``), so ``e = 2 a (snr sigma_t)^2``. A step that depends on the
      sample's own position ``x`` cannot be used: Langevin with a state-dependent step ``e(x)``
      and no ``grad e`` drift leaves ``p / e`` invariant, not ``p``; with ``e ~ 1/|s(x)|^2``
      that is ``p |s|^2``, which empties the modes. Measured with the exact score of a Gaussian
      (VP and VE, 100 steps), the largest covariance z-score: in 2-D (4,000 samples) 426-752
      with the sample's own norms, 227-262 with ``|z| = sqrt(d)``, 1.4-2.3 for this rule and
      2.0-3.1 for the batch rule; at d = 16 (2,000 samples) 7.3-8.5, 4.5-4.6, 3.3-3.8 and
      2.5-2.9. Since the Hessian of
      ``-log p_t`` is at most ``1 / sigma_t^2`` (``p_t`` is the data convolved with
      ``N(0, sigma_t^2 I)``), this step is stable for any data (``e L <= 2 a snr^2``). It is the
      rule of annealed Langevin dynamics, so ``pc`` and ``pc_ald`` then coincide; it corrects
      less than the batch rule where the data spread is much larger than ``sigma_t``.
    * ``step_norm='batch'`` (score-SDE's code) averages ``|z|`` and ``|s|`` over the batch: an
      x-independent step adapted to the data, but a sample then depends on its batch
      (``batch_invariant`` is False).

    ``corrector='ald'`` (annealed Langevin, NCSN): ``e = 2 a (snr sigma_t)^2``, whatever
    ``step_norm``. Ito SDE; NFE per step = predictor's + n_corrector. No ODE/strong order is
    declared: the corrector targets the marginal, not the path."""

    family = "predictor-corrector"
    stochastic = True
    default_grid = "uniform"
    paper = "Song et al. 2021, Score-Based Generative Modeling through SDEs, Alg. 1-3"

    def __init__(self, predictor: str | Solver = "reverse_diffusion", corrector: str = "langevin",
                 snr: float = 0.16, n_corrector: int = 1, step_norm: str = "sample") -> None:
        if step_norm not in STEP_NORMS:
            raise ValueError(f"step_norm={step_norm!r} is invalid: expected one of {STEP_NORMS}")
        if corrector not in CORRECTORS:
            raise ValueError(f"corrector={corrector!r} is invalid: expected one of {CORRECTORS}")
        if not (isinstance(snr, (int, float)) and snr > 0 and math.isfinite(snr)):
            raise ValueError(f"snr={snr!r} is invalid: expected a finite number > 0")
        if not (isinstance(n_corrector, int) and n_corrector >= 0):
            raise ValueError(f"n_corrector={n_corrector!r} is invalid: expected an integer >= 0")
        pr = get_solver(predictor)
        if not isinstance(pr, FixedGridSolver):
            raise ValueError(f"predictor={predictor!r} runs its own loop (adaptive or external): "
                             "expected a fixed-grid solver")
        self.predictor = pr
        self.corrector, self.snr, self.step_norm = corrector, float(snr), step_norm
        self.n_corrector = 0 if corrector == "none" else n_corrector
        self.batch_norm = corrector == "langevin" and step_norm == "batch" and self.n_corrector > 0
        self.batch_invariant = self.predictor.batch_invariant if not self.batch_norm else False
        self.nfe_per_step = self.predictor.nfe_per_step + self.n_corrector
        self.min_steps = self.predictor.min_steps

    def init(self, p: Problem, x: Tensor) -> Any:
        return self.predictor.init(p, x)

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        t = p.times[i]
        a = (p.alpha[i] / p.alpha[i + 1]) ** 2
        for _ in range(self.n_corrector):
            score = p.predict(x, t, "score", p.coeffs(i))
            z = p.noise.randn(x)
            if self.batch_norm:
                zn = z.flatten(1).norm(dim=1).mean()
                sn = score.flatten(1).norm(dim=1).mean().clamp_min(1e-30)
                e = p.bcast(2 * a.to(x) * (self.snr * zn / sn) ** 2, x)
            else:
                e = p.bcast(2 * a * (self.snr * p.sigma[i]) ** 2, x)
            x = x + e * score + torch.sqrt(2 * e) * z
        return self.predictor.step(p, i, x, state)


def _noise_brownian(p: Problem, like: Tensor, levy: bool) -> Any:
    """A torchsde Brownian motion (its ``BaseBrownian`` interface) read from sdekit's noise
    source, in the backend's time ``s`` = the grid index (unit steps, see :class:`TorchSDE`):
    the increment over grid step k is ``p.noise.increment(t_k, t_{k+1})`` (the standard normal
    Euler-Maruyama draws for that step), so a sample's path depends only on its own seed and,
    with a :class:`~sdekit.noise.BrownianNoise`, every grid made of its points sees one path.
    ``levy``: also the space-time Levy area ``U = int (W(s) - W(s_a)) ds`` from
    ``p.noise.levy_area`` (what torchsde's SRK scheme needs). Queries must be grid indices."""
    from torchsde import BaseBrownian

    B = like.shape[0]

    class NoiseBrownian(BaseBrownian):
        def __init__(self) -> None:
            self._cache: dict[int, tuple[Tensor, Tensor | None]] = {}

        def _index(self, v: Any) -> int:
            k = round(float(v))
            if 0 <= k <= p.steps and abs(float(v) - k) <= 1e-7:
                return k
            raise ValueError(f"torchsde queried the Brownian motion at s={float(v)!r}, which is "
                             "not a grid index")

        def _step(self, k: int) -> tuple[Tensor, Tensor | None]:
            """(dW, U) of grid step k, drawn once."""
            if k not in self._cache:
                t0, t1 = p.times[k], p.times[k + 1]
                dW = p.noise.increment(t0, t1, like)   # unit step in s
                U = None
                if levy:
                    U = (0.5 * dW + p.noise.levy_area(t0, t1, like) * 12 ** -0.5).reshape(B, -1)
                self._cache[k] = (dW.reshape(B, -1), U)
            return self._cache[k]

        def __call__(self, ta: Any, tb: Any = None, return_U: bool = False,
                     return_A: bool = False) -> Any:
            if return_A or (return_U and not levy):
                raise ValueError(f"the noise-driven Brownian motion gives "
                                 f"{'the space-time Levy area only' if levy else 'no Levy area'}"
                                 f" (asked for return_U={return_U}, return_A={return_A})")
            a, b = (0, self._index(ta)) if tb is None else (self._index(ta), self._index(tb))
            if a > b:
                raise ValueError(f"torchsde queried an interval backwards: ta={ta}, tb={tb}")
            W = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
            U = torch.zeros_like(W)
            for k in range(a, b):   # U over [a, b] = sum of h_k (W(u_k) - W(u_a)) + U_k
                dW, Uk = self._step(k)
                if return_U and Uk is not None:
                    U = U + W + Uk
                W = W + dW
            for k in [k for k in self._cache if k < a]:   # queries move forward: drop old steps
                del self._cache[k]
            return (W, U) if return_U else W

        def __repr__(self) -> str:
            return f"NoiseBrownian({type(p.noise).__name__}, steps={p.steps})"

        dtype = property(lambda self: like.dtype)
        device = property(lambda self: like.device)
        shape = property(lambda self: torch.Size((B, like[0].numel())))
        levy_area_approximation = property(lambda self: "space-time" if levy else "none")

    return NoiseBrownian()


@register("torchsde", method="euler")
@register("torchsde_milstein", method="milstein")
@register("torchsde_srk", method="srk")
class TorchSDE(ExternalSolver):
    """The reverse-time SDE solved by torchsde (Li et al. 2020) with one of its Ito methods
    (``euler``, ``milstein``, ``srk``) on any grid, driven by sdekit's noise source (see
    :func:`_noise_brownian`: per sample, so a sample never depends on its batch, and one path
    across nested grids with a BrownianNoise); srk also takes the space-time Levy area from it.
    torchsde steps uniformly and forward in its own time, so the SDE is handed over after the
    time change ``t = tau(s)``, ``s`` in ``[0, steps]``, with ``tau`` the monotone cubic (PCHIP)
    interpolant of the grid (``tau(k) = t_k``): drift ``tau'(s) b(x, tau(s))`` and diffusion
    ``g(tau(s)) sqrt(|tau'(s)|)`` (Oksendal 2003, Thm. 8.5.7), stepped with ``ds = 1``. On a
    uniform grid ``tau`` is linear and this is the plain solve in t (euler is then
    Euler-Maruyama step for step); on another grid it is a smooth reparametrisation, so the
    orders hold. Strong order: euler and milstein 1.0 here (additive noise), srk 1.5 (2 where
    the drift is linear in x, e.g. Gaussian data: the order-2 stochastic terms vanish). NFE:
    torchsde evaluates the drift once more than the scheme needs (euler, milstein: steps + 1;
    srk, its Roessler SRI scheme as torchsde implements it: 10 steps + 1)."""

    family = "torchsde"
    stochastic = True
    default_grid = "uniform"
    paper = "Li et al. 2020, Scalable Gradients for SDEs (torchsde)"
    _ORDERS: ClassVar[dict[str, float]] = {"euler": 1.0, "milstein": 1.0, "srk": 1.5}
    _NFE: ClassVar[dict[str, int]] = {"euler": 1, "milstein": 1, "srk": 10}

    def __init__(self, method: str = "euler") -> None:
        if not isinstance(method, str) or method not in self._ORDERS:
            raise ValueError(f"method={method!r} is invalid: expected one of "
                             f"{sorted(self._ORDERS)}")
        self.method = method
        self.strong_order = self._ORDERS[method]
        self.order = 1
        self.nfe_per_step = self._NFE[method]

    def expected_nfe(self, steps: int) -> int:
        return steps * self.nfe_per_step + 1

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        import torchsde
        from scipy.interpolate import PchipInterpolator

        levy = self.method == "srk"
        if levy and not callable(getattr(p.noise, "levy_area", None)):
            raise ValueError(f"solver {self.name!r} needs the space-time Levy area: the noise "
                             f"source {type(p.noise).__name__} has no levy_area(t0, t1, like)")
        shape = x.shape
        tau = PchipInterpolator(range(p.steps + 1), p.times.numpy())
        dtau = tau.derivative()

        def at(s: Tensor) -> tuple[Tensor, float]:
            """(t, dt/ds) at backend time s, within the grid's range."""
            v = min(max(float(s), 0.0), float(p.steps))
            t = torch.tensor(float(tau(v)), dtype=torch.float64).clamp(p.sde.t_min, p.sde.T)
            return t, float(dtau(v))

        class _Reverse(torch.nn.Module):
            noise_type, sde_type = "diagonal", "ito"

            def f(self, s: Tensor, y: Tensor) -> Tensor:
                t, d = at(s)
                return (_drift(p, y.reshape(shape), t) * d).reshape(y.shape)

            def g(self, s: Tensor, y: Tensor) -> Tensor:
                t, d = at(s)
                return (ReverseSDE(p.sde).diffusion(t) * abs(d) ** 0.5).to(y) * torch.ones_like(y)

        y0 = x.reshape(shape[0], -1)
        ts = torch.tensor([0.0, float(p.steps)], dtype=torch.float64)
        # a hair over the unit step so that rounding never adds a sliver of a step at the end;
        # torchsde stops exactly at ts[-1]
        ys = torchsde.sdeint(_Reverse(), y0, ts, method=self.method, dt=1 + 1e-11,
                             bm=_noise_brownian(p, x, levy))
        return ys[-1].reshape(shape)
