"""Shared test helpers: problems with exact answers and slope fitting."""
from __future__ import annotations

import math

import numpy as np
import torch

import sdekit
from sdekit.analytic import GaussianData
from sdekit.solvers import LearnedSampler

ORDER_SDES = {
    "vp": lambda: sdekit.VPSDE(),
    "cosine": lambda: sdekit.CosineVPSDE(),
    "subvp": lambda: sdekit.SubVPSDE(),
    "ve": lambda: sdekit.VESDE(),
    "ddpm": lambda: sdekit.DiscreteDDPM(),
    "flow": lambda: sdekit.FlowSDE(),
    "trigflow": lambda: sdekit.TrigFlowSDE(),
}
#: Where a solver that cannot start at alpha = 0 starts on a flow process (lambda there: -4.6 for
#: rectified flow, -4.2 for the trigonometric interpolant; VP's lambda(T) is -5.0).
FLOW_T_START = 0.99


def start_for(solver, sde) -> float:
    """The time a generated test starts ``solver`` at on ``sde``: ``T``, or :data:`FLOW_T_START`
    where alpha(T) = 0 and the solver cannot step from there (it says so: tests/test_flow.py).
    A learned sampler does not step: it starts where it was distilled, T (sdekit.distill's
    teacher starts at alpha = 0: tests/test_distill_flow.py)."""
    if (sde.alpha_zero_at_T and not solver.starts_at_alpha_zero
            and not isinstance(solver, LearnedSampler)):
        return FLOW_T_START
    return sde.T


def model_kind(sde) -> str:
    """The network output a generated test uses: ``flow`` on a flow process (eps is undefined
    at alpha = 0), else eps."""
    return "flow" if sde.alpha_zero_at_T else "eps"


def gaussian_problem(sde, dim: int = 4, eig_min: float = 1e-2, seed: int = 1) -> GaussianData:
    return GaussianData.random(sde, dim=dim, eig_max=1.0, eig_min=eig_min, seed=seed,
                               mean_scale=1.0)


def fitted_slope(hs, errs) -> float:
    """Least-squares slope of log(err) against log(h)."""
    return float(np.polyfit(np.log(np.asarray(hs, float)), np.log(np.asarray(errs, float)), 1)[0])


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(float((a.double() - b.double()).pow(2).mean()))


# flags of a tiny, fast `sdekit train` run
TINY_TRAIN = ["--width", "16", "--depth", "1", "--batch-size", "32", "--sample-n", "16",
              "--sample-steps", "2", "--device", "cpu", "--quiet"]


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``sdekit argv`` run in this process."""
    from sdekit.cli.main import main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def load_k_diffusion(module: str = "sampling"):
    """``k_diffusion.<module>`` (``sampling`` or ``external``), or None where it does not load.

    k-diffusion's package ``__init__`` imports its training stack (torchvision, scikit-image, ...);
    installed with ``pip install --no-deps k-diffusion`` only ``sampling.py`` and ``external.py``
    are usable, so where the plain import fails they are loaded under a bare package object with a
    ``utils`` stand-in providing the one helper they use, ``append_dims``."""
    import importlib
    import importlib.util
    import sys
    import types
    try:
        return importlib.import_module(f"k_diffusion.{module}")
    except Exception:  # noqa: BLE001, S110  (missing optional dependencies of the package)
        pass
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
        del sys.modules[name]            # a half-imported package from the failed attempt
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        return importlib.import_module(f"k_diffusion.{module}")
    except Exception:  # noqa: BLE001
        return None
