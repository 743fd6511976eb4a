"""Exact oracles for testing solvers: Gaussian and Gaussian-mixture data."""
from .gaussian import GaussianData, GaussianMixtureData

__all__ = ["GaussianData", "GaussianMixtureData"]
