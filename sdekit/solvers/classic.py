"""Stochastic samplers of the reverse-time SDE (Song et al. 2021): Euler-Maruyama, the
reverse-diffusion predictor, predictor-corrector with Langevin correctors, and torchsde."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..dynamics.reverse import reverse_drift
from .base import Problem, Solver
from .registry import get_solver, register


def _drift(p: Problem, x: Tensor, t: Any) -> Tensor:
    """The reverse-time SDE's drift from one counted, checked model call."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return reverse_drift(p.sde, x, t, p.predict(x, t, "eps"))


@register("euler_maruyama")
class EulerMaruyama(Solver):
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
        g = p.sde.g(t0)
        return x + _drift(p, x, t0) * float(dt) + p.bcast(g * torch.sqrt(-dt), x) * z, state


@register("reverse_diffusion")
class ReverseDiffusion(Solver):
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
        score = -p.predict(x, p.times[i], "eps") / p.bcast(p.sigma[i], x)
        z = p.noise.increment(p.times[i], p.times[i + 1], x)
        return p.bcast(2 - a, x) * x + p.bcast(G2, x) * score + p.bcast(G2.sqrt(), x) * z, state


CORRECTORS = ("langevin", "ald", "none")


@register("pc", predictor="reverse_diffusion", corrector="langevin")
@register("pc_ald", predictor="reverse_diffusion", corrector="ald")
class PredictorCorrector(Solver):
    """Predictor-corrector sampling (Song et al. 2021, Alg. 1-3): at each time, ``n_corrector``
    Langevin steps ``x <- x + e s + sqrt(2 e) z`` and then one predictor step (any registered
    fixed-grid solver). ``corrector='langevin'``: ``e = 2 a (snr |z| / |s|)^2``; with
    ``step_norm='batch'`` (default, score-SDE's rule) the norms are averaged over the batch, so a
    sample depends on its batch; ``step_norm='sample'`` uses each sample's own norms (batch
    invariant; sensible only in high dimension, where the norms concentrate: in 2-D a sample near
    a mode gets a huge step). ``'ald'`` (annealed Langevin, NCSN): ``e = 2 a (snr sigma_t)^2``,
    per sample by construction. ``a`` is the one-step ratio ``(alpha_i / alpha_{i+1})^2``
    (1 - beta_i for VP, 1 for VE). Ito SDE; NFE per step = predictor's + n_corrector. No
    ODE/strong order is declared: the corrector targets the marginal, not the path."""

    family = "predictor-corrector"
    stochastic = True
    default_grid = "uniform"
    paper = "Song et al. 2021, Score-Based Generative Modeling through SDEs, Alg. 1-3"

    def __init__(self, predictor: str | Solver = "reverse_diffusion", corrector: str = "langevin",
                 snr: float = 0.16, n_corrector: int = 1, step_norm: str = "batch") -> None:
        if step_norm not in ("batch", "sample"):
            raise ValueError(f"step_norm={step_norm!r} is invalid: expected 'batch' or 'sample'")
        if corrector not in CORRECTORS:
            raise ValueError(f"corrector={corrector!r} is invalid: expected one of {CORRECTORS}")
        if not (isinstance(snr, (int, float)) and snr > 0 and math.isfinite(snr)):
            raise ValueError(f"snr={snr!r} is invalid: expected a finite number > 0")
        if not (isinstance(n_corrector, int) and n_corrector >= 0):
            raise ValueError(f"n_corrector={n_corrector!r} is invalid: expected an integer >= 0")
        self.predictor = get_solver(predictor)
        if self.predictor.adaptive:
            raise ValueError(f"predictor={predictor!r} is adaptive: expected a fixed-grid solver")
        self.corrector, self.snr, self.step_norm = corrector, float(snr), step_norm
        self.per_sample_noise = not (corrector == "langevin" and step_norm == "batch")
        self.n_corrector = 0 if corrector == "none" else n_corrector
        self.nfe_per_step = self.predictor.nfe_per_step + self.n_corrector
        self.min_steps = self.predictor.min_steps

    def init(self, p: Problem, x: Tensor) -> Any:
        return self.predictor.init(p, x)

    def step(self, p: Problem, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        t = p.times[i]
        a = (p.alpha[i] / p.alpha[i + 1]) ** 2
        for _ in range(self.n_corrector):
            score = -p.predict(x, t, "eps") / p.bcast(p.sigma[i], x)
            z = p.noise.randn(x)
            if self.corrector == "langevin":
                zn = z.flatten(1).norm(dim=1)
                sn = score.flatten(1).norm(dim=1).clamp_min(1e-30)
                if self.step_norm == "batch":
                    zn, sn = zn.mean(), sn.mean()
                e = 2 * a.to(x) * (self.snr * zn / sn) ** 2
            else:
                e = (2 * a * (self.snr * p.sigma[i]) ** 2).to(x)
            e = p.bcast(e, x)
            x = x + e * score + torch.sqrt(2 * e) * z
        return self.predictor.step(p, i, x, state)


@register("torchsde", method="euler")
@register("torchsde_milstein", method="milstein")
@register("torchsde_srk", method="srk")
class TorchSDE(Solver):
    """The reverse-time SDE solved by torchsde (Li et al. 2020) with one of its Ito methods
    (``euler``, ``milstein``, ``srk``) on a uniform grid, with torchsde's own Brownian interval
    (so noise is per batch, not per sample). Time is reversed (u = -t) because torchsde integrates
    forward. Strong order: euler and milstein 1.0 here (additive noise), srk 1.5. NFE: torchsde
    evaluates the drift once more than the scheme needs (euler, milstein: steps + 1; srk, its
    Roessler SRI scheme as torchsde implements it: 10 steps + 1)."""

    family = "torchsde"
    external_loop = True
    stochastic = True
    default_grid = "uniform"
    max_lambda_step_ratio = math.inf  # the backend steps uniformly in t: no other grid
    per_sample_noise = False
    paper = "Li et al. 2020, Scalable Gradients for SDEs (torchsde)"
    _ORDERS = {"euler": 1.0, "milstein": 1.0, "srk": 1.5}
    _NFE = {"euler": 1, "milstein": 1, "srk": 10}

    def __init__(self, method: str = "euler") -> None:
        if method not in self._ORDERS:
            raise ValueError(f"method={method!r} is invalid: expected one of {sorted(self._ORDERS)}")
        self.method = method
        self.strong_order = self._ORDERS[method]
        self.order = 1
        self.nfe_per_step = self._NFE[method]

    def expected_nfe(self, steps: int) -> int:
        return steps * self.nfe_per_step + 1

    def integrate(self, p: Problem, x: Tensor) -> Tensor:
        import torchsde

        dt = (p.times[1:] - p.times[:-1]).neg()
        if float(dt.max() - dt.min()) > 1e-9 * float(dt.mean()):
            raise ValueError("the torchsde backend needs a uniform grid: pass grid='uniform'")
        shape = x.shape
        seed = int(p.noise.seeds[0]) if hasattr(p.noise, "seeds") else 0

        class _Reverse(torch.nn.Module):
            noise_type, sde_type = "diagonal", "ito"

            def f(self, u: Tensor, y: Tensor) -> Tensor:
                t = (-u.double()).clamp(p.sde.t_min, p.sde.T)
                return -_drift(p, y.reshape(shape), t).reshape(y.shape)

            def g(self, u: Tensor, y: Tensor) -> Tensor:
                t = (-u.double()).clamp(p.sde.t_min, p.sde.T)
                return p.sde.g(t).to(y) * torch.ones_like(y)

        y0 = x.reshape(shape[0], -1)
        ts = torch.stack([-p.times[0], -p.times[-1]]).to(y0)
        bm = torchsde.BrownianInterval(t0=float(ts[0]), t1=float(ts[1]), size=y0.shape,
                                       dtype=y0.dtype, device=y0.device, entropy=seed,
                                       levy_area_approximation="space-time"
                                       if self.method == "srk" else "none")
        # a hair over the step so rounding never adds a sliver of a step at the end
        ys = torchsde.sdeint(_Reverse(), y0, ts, method=self.method, dt=float(dt[0]) * (1 + 100 * torch.finfo(y0.dtype).eps),
                             bm=bm)
        return ys[-1].reshape(shape)
