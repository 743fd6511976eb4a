"""Editing and inverse problems with any fixed-grid solver and any forward SDE.

* :func:`sdedit`: SDEdit (Meng et al. 2022).
* :func:`inpaint`: inpainting by replacement of the known region at each step (Song et al.
  2021), with RePaint's resampling (Lugmayr et al. 2022) for ``resample > 1``;
  :func:`replacement`: the same for any noise-free linear measurement with an SVD.
* :func:`dps`: diffusion posterior sampling (Chung et al. 2023) for a differentiable, linear or
  non-linear, measurement ``y = A(x) + noise``.
* :func:`ddrm`: DDRM (Kawar et al. 2022) for a linear operator given by its SVD.
* Operators with an SVD: :class:`Inpainting`, :class:`SuperResolution` (block averaging),
  :class:`Denoising` (identity), :class:`MatrixOperator` (a dense matrix).
"""
from .ddrm import DDRMSolver, ddrm
from .methods import dps, inpaint, replacement, sdedit
from .operators import (
    Denoising,
    Inpainting,
    MatrixOperator,
    SuperResolution,
    SVDOperator,
)

__all__ = ["DDRMSolver", "Denoising", "Inpainting", "MatrixOperator", "SVDOperator",
           "SuperResolution", "ddrm", "dps", "inpaint", "replacement", "sdedit"]
