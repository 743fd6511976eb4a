"""Sample-quality metrics, all computed in float64 on flattened samples ``(n, D)``.

* :func:`rms_error`: root-mean-square error per coordinate against reference states of the
  same initial states, ``sqrt(mean_{i,d} (x_id - ref_id)^2)``.
* :func:`frechet_distance` (defined in :mod:`sdekit.analytic.gaussian`): squared 2-Wasserstein
  distance between two Gaussians,
  ``|m1 - m2|^2 + tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2)`` (the FID formula).
* :func:`gaussian_kl`: ``KL(N(m1, S1) || N(m2, S2))`` in nats.
* :func:`sliced_wasserstein`: sliced 2-Wasserstein distance over random unit directions.
* :func:`mmd`: maximum mean discrepancy with a Gaussian kernel (biased V-statistic, so identical
  sets give exactly 0; the bandwidth defaults to the median pairwise distance of ``y``).
* :func:`fit_gaussian`, :func:`affine_gaussian_law`: the Gaussian law of a set of samples, fitted,
  or exact when the outputs are an affine map of Gaussian inputs.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..analytic.gaussian import frechet_distance


def _flat(name: str, x: Any) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim < 2 or t.shape[0] < 1:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected (n, *event_shape) samples")
    return t.reshape(t.shape[0], -1)


def _check_dims(x: Tensor, y: Tensor) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"shape mismatch: x has {x.shape[1]} values per sample but y has "
                         f"{y.shape[1]}")


def rms_error(x: Any, ref: Any) -> float:
    """Per-coordinate RMS of ``x - ref`` (both ``(n, *event_shape)``, paired row by row)."""
    a, b = _flat("x", x), _flat("ref", ref)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: x has shape {tuple(a.shape)} but ref has shape "
                         f"{tuple(b.shape)}")
    return float(((a - b) ** 2).mean().sqrt())


def fit_gaussian(x: Any) -> tuple[Tensor, Tensor]:
    """Sample mean and (unbiased) covariance of ``x``."""
    a = _flat("x", x)
    if a.shape[0] < 2:
        raise ValueError(f"fit_gaussian needs at least 2 samples, got {a.shape[0]}")
    m = a.mean(0)
    c = a - m
    return m, c.T @ c / (a.shape[0] - 1)


def gaussian_kl(m1: Any, S1: Any, m2: Any, S2: Any) -> float:
    """``KL(N(m1, S1) || N(m2, S2))`` in nats; ``inf`` where S1 is singular (S2 must be
    positive definite)."""
    m1, m2 = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (m1, m2))
    S1, S2 = (torch.as_tensor(v, dtype=torch.float64) for v in (S1, S2))
    D = m1.numel()
    if S1.shape != (D, D) or S2.shape != (D, D) or m2.numel() != D:
        raise ValueError(f"shape mismatch: m1 ({D},), m2 ({m2.numel()},), S1 {tuple(S1.shape)}, "
                         f"S2 {tuple(S2.shape)}")
    L2, info = torch.linalg.cholesky_ex(0.5 * (S2 + S2.T))
    if int(info) != 0:
        raise ValueError("gaussian_kl: S2 is not positive definite")
    ev1 = torch.linalg.eigvalsh(0.5 * (S1 + S1.T))
    if float(ev1.min()) <= 0:
        return math.inf
    inv_L2 = torch.linalg.solve_triangular(L2, torch.eye(D, dtype=torch.float64), upper=False)
    dm = inv_L2 @ (m2 - m1)
    tr = (inv_L2 @ S1 @ inv_L2.T).trace()
    logdet2 = 2 * torch.log(torch.diagonal(L2)).sum()
    logdet1 = torch.log(ev1).sum()
    return max(0.0, float(0.5 * (tr + dm @ dm - D + logdet2 - logdet1)))  # >= 0 up to rounding


def random_directions(dim: int, n: int, seed: int = 0) -> Tensor:
    """``n`` unit vectors uniform on the sphere in ``dim`` dimensions (float64, seeded)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _quantiles(p: Tensor, levels: Tensor) -> Tensor:
    """Empirical quantile functions of the columns of ``p`` (sorted along dim 0) at ``levels``."""
    n = p.shape[0]
    pos = levels * n - 0.5
    lo = pos.floor().clamp(0, n - 1).long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.double()).clamp(0, 1)[:, None]
    return p[lo] * (1 - w) + p[hi] * w


class SlicedReference:
    """Sorted projections of a fixed reference set ``y`` on ``projections`` random unit
    directions (or the given ``(L, D)`` directions), so that many sample sets can be compared
    with one reference without re-sorting it (see :func:`sliced_wasserstein`)."""

    def __init__(self, y: Any, projections: int | Tensor = 128, seed: int = 0) -> None:
        b = _flat("y", y)
        if isinstance(projections, Tensor):
            theta = projections.to(torch.float64)
            if theta.ndim != 2 or theta.shape[1] != b.shape[1]:
                raise ValueError(f"projections has shape {tuple(theta.shape)}: expected "
                                 f"(L, {b.shape[1]})")
        else:
            if not (isinstance(projections, int) and projections >= 1):
                raise ValueError(f"projections={projections!r} is invalid: expected an integer "
                                 ">= 1")
            theta = random_directions(b.shape[1], projections, seed)
        self.theta, self.dim = theta, b.shape[1]
        self.sorted, _ = torch.sort(b @ theta.T, dim=0)

    def distance(self, x: Any) -> float:
        a = _flat("x", x)
        if a.shape[1] != self.dim:
            raise ValueError(f"shape mismatch: x has {a.shape[1]} values per sample but the "
                             f"reference has {self.dim}")
        pa, _ = torch.sort(a @ self.theta.T, dim=0)
        pb = self.sorted
        if pa.shape[0] != pb.shape[0]:
            n = max(pa.shape[0], pb.shape[0])
            levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            pa, pb = _quantiles(pa, levels), _quantiles(pb, levels)
        return float(((pa - pb) ** 2).mean().sqrt())


def sliced_wasserstein(x: Any, y: Any, projections: int | Tensor = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance ``sqrt(mean_theta W2^2(theta.x, theta.y))`` over
    ``projections`` random unit directions (or the given ``(L, D)`` directions). Equal sample
    sizes use sorted pairs exactly; unequal sizes compare quantile functions."""
    a, b = _flat("x", x), _flat("y", y)
    _check_dims(a, b)
    return SlicedReference(b, projections, seed).distance(a)


def median_bandwidth(y: Any, max_points: int = 2000) -> float:
    """The median pairwise Euclidean distance within ``y`` (its first ``max_points`` rows)."""
    b = _flat("y", y)[:max_points]
    if b.shape[0] < 2:
        raise ValueError("median_bandwidth needs at least 2 samples")
    d = torch.cdist(b, b)
    iu = torch.triu_indices(b.shape[0], b.shape[0], 1)
    h = float(d[iu[0], iu[1]].median())
    return h if h > 0 else 1.0


def mmd(x: Any, y: Any, bandwidth: float | None = None, kyy: float | None = None) -> float:
    """Maximum mean discrepancy ``sqrt(max(0, mean k(x,x') + mean k(y,y') - 2 mean k(x,y)))``
    with ``k(u, v) = exp(-|u - v|^2 / (2 h^2))``: the biased (V-statistic) estimate, exactly 0
    for identical sets, with a positive Monte-Carlo floor of order ``n^-1/2`` otherwise.
    ``h`` defaults to :func:`median_bandwidth` of ``y``; pass it explicitly to compare several
    ``x`` against one ``y`` on the same scale (and ``kyy``, the mean of ``k(y, y')`` from
    :func:`mmd_self_term`, to skip recomputing it)."""
    a, b = _flat("x", x), _flat("y", y)
    _check_dims(a, b)
    h = median_bandwidth(b) if bandwidth is None else float(bandwidth)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"bandwidth={bandwidth!r} is invalid: expected a finite number > 0")

    kbb = _kernel_mean(b, b, h) if kyy is None else kyy
    return math.sqrt(max(0.0, _kernel_mean(a, a, h) + kbb - 2 * _kernel_mean(a, b, h)))


def _kernel_mean(u: Tensor, v: Tensor, h: float) -> float:
    return float(torch.exp(-torch.cdist(u, v).pow(2) / (2 * h * h)).mean())


def mmd_self_term(y: Any, bandwidth: float) -> float:
    """The mean kernel value within ``y`` (the part of :func:`mmd` that only depends on y)."""
    b = _flat("y", y)
    return _kernel_mean(b, b, float(bandwidth))


def affine_gaussian_law(x_in: Any, y_out: Any, mean_in: Any, cov_in: Any,
                        tol: float = 1e-3) -> tuple[Tensor, Tensor, float] | None:
    """The exact law of ``y_out`` when it is an affine function of Gaussian ``x_in``.

    Fits ``y = A x + b`` by least squares on the pairs (needs ``n > D + 1``) and, if the relative
    residual ``|Y - fit| / |Y - mean(Y)|`` is below ``tol`` (the map is affine up to rounding, as
    for any deterministic fixed-step solver on a linear model), returns the pushed-forward law
    ``(A mean_in + b, A cov_in A^T)`` and the residual. Returns None otherwise (e.g. a stochastic
    solver, whose injected noise is not a function of ``x_in``)."""
    X, Y = _flat("x_in", x_in), _flat("y_out", y_out)
    n, D = X.shape
    if n != Y.shape[0]:
        raise ValueError(f"x_in has {n} samples but y_out has {Y.shape[0]}")
    if n <= D + 1:
        return None
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    # by QR, not torch.linalg.lstsq: on CPU lstsq is not bitwise deterministic between calls
    Q, R = torch.linalg.qr(Xa)
    W = torch.linalg.solve_triangular(R, Q.T @ Y, upper=True)
    resid = float((Y - Xa @ W).norm() / (Y - Y.mean(0)).norm().clamp_min(1e-300))
    if not resid < tol:
        return None
    A, b = W[:-1].T, W[-1]
    m = torch.as_tensor(mean_in, dtype=torch.float64).reshape(-1)
    C = torch.as_tensor(cov_in, dtype=torch.float64)
    return A @ m + b, A @ C @ A.T, resid


__all__ = ["rms_error", "fit_gaussian", "frechet_distance", "gaussian_kl", "random_directions",
           "SlicedReference", "sliced_wasserstein", "mmd_self_term", "median_bandwidth", "mmd",
           "affine_gaussian_law"]
