"""Benchmarks: sweep solvers x time grids x NFE budgets on a problem and measure quality.

Example::

    from sdekit.bench import SweepConfig, gaussian_problem, run_sweep, write_reports
    res = run_sweep(gaussian_problem(), SweepConfig(solvers=["ddim", "heun"]), "cache")
    write_reports(res, "out")   # bench.json, bench.csv, bench.md, bench.png
"""
from .metrics import (
    affine_gaussian_law,
    fit_gaussian,
    frechet_distance,
    gaussian_kl,
    mmd,
    rms_error,
    sliced_wasserstein,
)
from .problems import (
    PROBLEMS,
    BenchError,
    BenchProblem,
    gaussian_problem,
    gmm_problem,
    problem_from_checkpoint,
    problem_from_factory,
    resolve_problem,
)
from .report import markdown_report, terminal_report, write_reports
from .runner import SweepConfig, compute_cell, plan_cells, run_sweep, steps_for_budget

__all__ = ["rms_error", "fit_gaussian", "frechet_distance", "gaussian_kl", "sliced_wasserstein",
           "mmd", "affine_gaussian_law", "BenchError", "BenchProblem", "PROBLEMS",
           "gaussian_problem", "gmm_problem", "problem_from_checkpoint", "problem_from_factory",
           "resolve_problem", "SweepConfig", "plan_cells", "run_sweep", "compute_cell",
           "steps_for_budget", "terminal_report", "markdown_report", "write_reports"]
