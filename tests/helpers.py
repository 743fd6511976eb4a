"""Shared test helpers: problems with exact answers and slope fitting."""
from __future__ import annotations

import math

import numpy as np
import torch

import sdekit
from sdekit.analytic import GaussianData

ORDER_SDES = {
    "vp": lambda: sdekit.VPSDE(),
    "cosine": lambda: sdekit.CosineVPSDE(),
    "subvp": lambda: sdekit.SubVPSDE(),
    "ve": lambda: sdekit.VESDE(),
    "ddpm": lambda: sdekit.DiscreteDDPM(),
}


def gaussian_problem(sde, dim: int = 4, eig_min: float = 1e-2, seed: int = 1) -> GaussianData:
    return GaussianData.random(sde, dim=dim, eig_max=1.0, eig_min=eig_min, seed=seed,
                               mean_scale=1.0)


def fitted_slope(hs, errs) -> float:
    """Least-squares slope of log(err) against log(h)."""
    return float(np.polyfit(np.log(np.asarray(hs, float)), np.log(np.asarray(errs, float)), 1)[0])


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(float((a.double() - b.double()).pow(2).mean()))
