"""Shared fixtures and helpers for the sdekit test suite.

The forward SDEs every foundation test runs on are built here (``SDE_FACTORIES``), so adding a
process to the package means adding one line below and every property test picks it up.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

from sdekit.sde import (
    EDMSDE,
    VESDE,
    VPSDE,
    CosineVPSDE,
    CustomSDE,
    DiscreteDDPM,
    FlowSDE,
    ForwardSDE,
    SubVPSDE,
    TrigFlowSDE,
)

# Modest example counts and no deadline: the machine running CI is small and shared.
settings.register_profile("sdekit", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sdekit"))


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tests on one intra-op thread (restored afterwards). The foundation tests use
    tiny tensors; on a small shared CPU torch's thread pool makes them ~8x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ schedules
def vp_alpha_fn(beta_min: float = 0.1,
                beta_max: float = 20.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear-VP alpha(t) written out independently of sdekit (Song et al. 2021, Eq. 29)."""
    return lambda t: torch.exp(-0.25 * t * t * (beta_max - beta_min) - 0.5 * t * beta_min)


def vp_sigma_fn(beta_min: float = 0.1,
                beta_max: float = 20.0) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: torch.sqrt(-torch.expm1(-0.5 * t * t * (beta_max - beta_min) - t * beta_min))


def custom_vp() -> CustomSDE:
    return CustomSDE(vp_alpha_fn(), vp_sigma_fn(), t_min=1e-3, T=1.0, prior_std=1.0, name="vp")


def custom_edm() -> CustomSDE:
    """A VE-type custom schedule: constant alpha (its log has no autograd graph)."""
    return CustomSDE(lambda t: torch.ones_like(t), lambda t: t, t_min=0.002, T=80.0, name="edm")


def ddpm_table(n: int = 50) -> torch.Tensor:
    """A non-standard, strictly decreasing alphas_cumprod table (quadratic betas)."""
    betas = torch.linspace(1e-3 ** 0.5, 0.2 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


SDE_FACTORIES: dict[str, Callable[[], ForwardSDE]] = {
    "vp": VPSDE,
    "vp_const_beta": lambda: VPSDE(beta_min=2.0, beta_max=2.0),
    "cosine": CosineVPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "edm": EDMSDE,
    "ddpm": DiscreteDDPM,
    "ddpm_table": lambda: DiscreteDDPM(alphas_cumprod=ddpm_table()),
    "ddpm_squaredcos": DiscreteDDPM.squaredcos,
    "custom_vp": custom_vp,
    "custom_edm": custom_edm,
    "flow": FlowSDE,
    "trigflow": TrigFlowSDE,
}
#: The linear interpolants (flow matching) reach alpha = 0, lambda = -inf at T = 1: the foundation
#: property tests (SDE_NAMES) evaluate lambda, f and g at T and cover the processes where they are
#: finite; tests/test_flow.py holds the interpolants' own, and the registry's generated tests
#: (tests/test_solvers_registry.py) run every solver on them.
INTERPOLANT_NAMES = ["flow", "trigflow"]
SDE_NAMES = [n for n in SDE_FACTORIES if n not in INTERPOLANT_NAMES]
#: Processes whose alpha^2 + sigma^2 != 1 (v-prediction uses alpha^2 + sigma^2 there).
NON_VP_NAMES = ["subvp", "ve", "edm", "custom_edm"]

_CACHE: dict[str, ForwardSDE] = {}


def make_sde(name: str) -> ForwardSDE:
    """A (cached) instance: forward SDEs are immutable, so tests may share them."""
    if name not in _CACHE:
        _CACHE[name] = SDE_FACTORIES[name]()
    return _CACHE[name]


@pytest.fixture(params=SDE_NAMES)
def sde(request) -> ForwardSDE:
    return make_sde(request.param)


def is_discrete(sde: ForwardSDE) -> bool:
    return isinstance(sde, DiscreteDDPM)


def time_at(sde: ForwardSDE, u: float) -> float:
    """Map u in [0, 1] onto [t_min, T] (u = 0 and 1 hit the ends exactly)."""
    if u <= 0:
        return sde.t_min
    if u >= 1:
        return sde.T
    return sde.t_min + u * (sde.T - sde.t_min)


def off_knot_time(sde: ForwardSDE, u: float, frac: float) -> float:
    """For DiscreteDDPM: a time inside segment floor(u (N-1)) at relative position ``frac``
    (kept away from the knots, where f jumps). Other processes: ``time_at(sde, u)``."""
    if not is_discrete(sde):
        return time_at(sde, u)
    n = min(int(u * (sde.N - 1)), sde.N - 2)
    return (n + 1 + frac) / sde.N


def assert_close(actual, expected, rtol: float, atol: float = 0.0, msg: str = "") -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (f"{msg}: shape {tuple(actual.shape)} vs "
                                            f"{tuple(expected.shape)}")
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).flatten().argmax())
        raise AssertionError(f"{msg}: max violation at flat index {i}: actual "
                             f"{actual.flatten()[i].item()!r}, expected "
                             f"{expected.flatten()[i].item()!r}, "
                             f"|err| = {err.flatten()[i].item():.3g} > "
                             f"{bound.flatten()[i].item():.3g}")


def random_spd(dim: int, seed: int, floor: float = 0.05) -> torch.Tensor:
    """A random symmetric positive-definite matrix with eigenvalues spread over ~2 decades."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return A @ A.T / dim + floor * torch.eye(dim, dtype=torch.float64)


def random_vector(dim: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 10_000)
    return scale * torch.randn(dim, generator=g, dtype=torch.float64)


def tol_for(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-4


def finite_diff(fn: Callable[[float], torch.Tensor], t: float, h: float) -> torch.Tensor:
    """Fourth-order central difference of ``fn`` at ``t`` (error O(h^4))."""
    return (-fn(t + 2 * h) + 8 * fn(t + h) - 8 * fn(t - h) + fn(t - 2 * h)) / (12 * h)


__all__ = ["SDE_FACTORIES", "SDE_NAMES", "INTERPOLANT_NAMES", "NON_VP_NAMES", "make_sde",
           "is_discrete", "time_at", "off_knot_time", "assert_close", "random_spd",
           "random_vector", "tol_for",
           "finite_diff", "vp_alpha_fn", "vp_sigma_fn", "ddpm_table", "custom_vp", "custom_edm"]
