"""Time discretisations, separate from solvers (so benchmarks sweep solver x grid x steps).

Every grid is a float64 tensor of ``steps + 1`` strictly decreasing times from ``t_start``
(default ``sde.T``) to ``t_end`` (default ``sde.t_min``), usable with any forward SDE.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._utils import is_real
from .sde.base import ForwardSDE, check_forward_sde


def uniform_t(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """Uniform in t."""
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def quadratic_t(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """Uniform in sqrt(t) (the DDIM / DEIS "quadratic" schedule): dense near t_end."""
    return torch.linspace(t_start ** 0.5, t_end ** 0.5, steps + 1, dtype=torch.float64) ** 2


def _infinite_start(fn: Callable[..., Tensor], sde: ForwardSDE, steps: int, t_start: float,
                    t_end: float, **kwargs: Any) -> Tensor:
    """A grid whose variable is infinite at ``t_start`` (lambda = -inf, sigma_tilde = inf where
    alpha(t_start) = 0, e.g. flow matching at t = 1): the first interval runs from ``t_start`` to
    the first interior point of the uniform-in-t grid, ``t_1 = t_start - (t_start - t_end) /
    steps`` (the step from alpha = 0 is first order in alpha_1 = alpha(t_1), so alpha_1 = O(1/steps)
    keeps it at the size of the other steps' errors); the remaining ``steps - 1`` intervals are
    the named grid on ``[t_1, t_end]``."""
    if steps == 1:
        return torch.tensor([t_start, t_end], dtype=torch.float64)
    t1 = t_start - (t_start - t_end) / steps
    return torch.cat([torch.tensor([t_start], dtype=torch.float64),
                      fn(sde, steps - 1, t1, t_end, **kwargs)])


def uniform_logsnr(sde: ForwardSDE, steps: int, t_start: float, t_end: float,
                   lambda_floor: float | None = None) -> Tensor:
    """Uniform in the half-logSNR lambda (DPM-Solver's recommended grid). From a start where
    lambda = -inf (alpha = 0, flow matching at t = 1) see :func:`_infinite_start`.

    ``lambda_floor``: where ``lambda(t_start) < lambda_floor < lambda(t_end)`` (and steps > 1),
    the first step runs from ``t_start`` straight to ``lambda = lambda_floor`` and the other
    ``steps - 1`` are uniform in lambda from there to ``t_end`` (also from lambda = -inf);
    elsewhere the plain grid. Below the floor the signal-to-
    noise ratio ``exp(2 lambda)`` is small against data of unit scale (``exp(-5) = 0.007`` at
    -2.5): the data prediction there is close to the data mean, so one first-order step covers
    that stretch and the steps a plain logsnr grid spends on it go where the trajectory
    bends (the option-free default's grid, see :func:`sdekit.solvers.default_config`)."""
    l0, l1 = float(sde.lambda_(t_start)), float(sde.lambda_(t_end))
    if lambda_floor is not None:
        if not is_real(lambda_floor):
            raise ValueError(f"lambda_floor={lambda_floor!r} is invalid: expected a finite "
                             "number (a half-logSNR)")
        if l0 < lambda_floor < l1 and steps > 1:
            lam = torch.linspace(float(lambda_floor), l1, steps, dtype=torch.float64)
            t = torch.cat([torch.tensor([t_start], dtype=torch.float64), sde.t_of_lambda(lam)])
            t[-1] = t_end
            return t
    if not math.isfinite(l0):
        return _infinite_start(uniform_logsnr, sde, steps, t_start, t_end)
    lam = torch.linspace(l0, l1, steps + 1, dtype=torch.float64)
    t = sde.t_of_lambda(lam)
    t[0], t[-1] = t_start, t_end  # exact endpoints (no round-off through lambda and back)
    return t


def karras(sde: ForwardSDE, steps: int, t_start: float, t_end: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 Eq. 5 in the VE-equivalent sigma = exp(-lambda):
    ``sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``. From a
    start where sigma_tilde = inf (alpha = 0) see :func:`_infinite_start`."""
    if not (is_real(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} is invalid: expected a number > 0")
    if not math.isfinite(float(sde.sigma_tilde(t_start))):
        return _infinite_start(karras, sde, steps, t_start, t_end, rho=rho)
    smax, smin = float(sde.sigma_tilde(t_start)), float(sde.sigma_tilde(t_end))
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    sig = (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = sde.t_of_sigma_tilde(sig)
    t[0], t[-1] = t_start, t_end
    return t


def polyexponential(sde: ForwardSDE, steps: int, t_start: float, t_end: float,
                    rho: float = 2.0) -> Tensor:
    """Polyexponential in the VE-equivalent sigma = exp(-lambda): ``log sigma_i = log sigma_min +
    (1 - i/N)^rho (log sigma_max - log sigma_min)``, i.e. the half-logSNR ``lambda_i =
    lambda_end + (1 - i/N)^rho (lambda_start - lambda_end)`` (k-diffusion's
    ``get_sigmas_polyexponential``, Crowson 2022). ``rho = 1`` is the uniform-logSNR grid;
    ``rho > 1`` moves steps towards low noise. From a start where lambda = -inf see
    :func:`_infinite_start`."""
    if not (is_real(rho) and rho > 0):
        raise ValueError(f"rho={rho!r} is invalid: expected a number > 0")
    l0, l1 = float(sde.lambda_(t_start)), float(sde.lambda_(t_end))
    if not math.isfinite(l0):
        return _infinite_start(polyexponential, sde, steps, t_start, t_end, rho=rho)
    ramp = torch.linspace(1, 0, steps + 1, dtype=torch.float64) ** rho
    t = sde.t_of_lambda(l1 + ramp * (l0 - l1))
    t[0], t[-1] = t_start, t_end
    return t


def kl_optimal(sde: ForwardSDE, steps: int, t_start: float, t_end: float) -> Tensor:
    """The KL-optimal schedule of Sabour et al. 2024 (Align Your Steps, Sec. 3.3): uniform in
    ``arctan`` of the VE-equivalent sigma, ``sigma_i = tan((1 - i/N) atan(sigma_max) + i/N
    atan(sigma_min))``; finite at a start with sigma = inf (alpha = 0: atan = pi/2)."""
    a0 = math.atan(float(sde.sigma_tilde(t_start)))
    a1 = math.atan(float(sde.sigma_tilde(t_end)))
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    sig = torch.tan(a0 + r * (a1 - a0))
    t = torch.empty_like(sig)
    t[1:-1] = sde.t_of_sigma_tilde(sig[1:-1])
    t[0], t[-1] = t_start, t_end
    return t


def interpolated(sde: ForwardSDE, steps: int, t_start: float, t_end: float,
                 base: Any = None) -> Tensor:
    """A stored grid ``base`` (decreasing times, e.g. an Align Your Steps schedule or a tuned
    grid) carried to another step count as AYS does (Sabour et al. 2024, App. B): its
    half-logSNR, linear in the normalised index ``i / (len(base) - 1)``, is interpolated at
    ``steps + 1`` equally spaced points; the ends are ``base``'s, which must match ``t_start``
    and ``t_end`` (leave those at their defaults or give base's ends). A start where lambda =
    -inf is kept and the rest interpolated."""
    if base is None:
        raise ValueError("grid 'interpolated' needs grid_options={'base': <decreasing times>}")
    b = torch.as_tensor(base, dtype=torch.float64).flatten()
    if b.numel() < 2:
        raise ValueError(f"base must hold at least 2 times, got {b.numel()}")
    validate_grid(sde, b)
    for name, v, bv in (("t_start", t_start, b[0]), ("t_end", t_end, b[-1])):
        if abs(v - float(bv)) > 1e-9:
            raise ValueError(f"{name}={v!r} differs from the base grid's end {float(bv)!r}: the "
                             "interpolated grid keeps base's range")
    lam = sde.lambda_(b)
    head = []
    if not math.isfinite(float(lam[0])):   # keep the alpha = 0 start as its own point
        if steps == 1 or b.numel() == 2:
            return torch.tensor([float(b[0]), float(b[-1])], dtype=torch.float64)
        head, lam, steps = [float(b[0])], lam[1:], steps - 1
    xs = torch.linspace(0, 1, lam.numel(), dtype=torch.float64)
    new = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    j = torch.searchsorted(xs, new, right=True).clamp(1, xs.numel() - 1)
    w = (new - xs[j - 1]) / (xs[j] - xs[j - 1])
    t = sde.t_of_lambda(lam[j - 1] + w * (lam[j] - lam[j - 1]))
    t[-1] = float(b[-1])
    t[0] = float(b[1]) if head else float(b[0])
    return torch.cat([torch.tensor(head, dtype=torch.float64), t])


GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_t, "quadratic": quadratic_t, "logsnr": uniform_logsnr, "karras": karras,
    "polyexponential": polyexponential, "kl_optimal": kl_optimal, "interpolated": interpolated,
}
#: the grids ``sdekit bench`` sweeps when none are named (``interpolated`` needs a base grid)
BENCH_GRIDS = ("uniform", "quadratic", "logsnr", "karras")

# ------------------------------------------------------------------------------ timestep shift
#: grid options that apply to every named grid (handled by make_grid, see shift_times)
SHIFT_OPTIONS = ("shift", "mu", "image_seq_len", "shift_type")
SHIFT_TYPES = ("exponential", "linear")


def flux_mu(image_seq_len: float, base_seq_len: float = 256, max_seq_len: float = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift parameter of Flux (Black Forest Labs' reference sampler,
    ``get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15)``; diffusers' ``calculate_shift``):
    ``mu`` linear in the image's sequence length (number of latent patches), through
    ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``."""
    for name, v in (("image_seq_len", image_seq_len), ("base_seq_len", base_seq_len),
                    ("max_seq_len", max_seq_len), ("base_shift", base_shift),
                    ("max_shift", max_shift)):
        if not is_real(v):
            raise ValueError(f"{name}={v!r} is invalid: expected a finite number")
    if not image_seq_len > 0:
        raise ValueError(f"image_seq_len={image_seq_len!r} is invalid: expected a number > 0")
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len!r} must differ from base_seq_len")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + m * (image_seq_len - base_seq_len))


def shift_factor(shift: float | None = None, mu: float | None = None,
                 image_seq_len: float | None = None, shift_type: str = "exponential") -> float:
    """The factor ``s`` of a timestep shift, validated: ``shift`` itself (SD3, Esser et al.
    2024, Eq. 23: ``sigma' = s sigma / (1 + (s - 1) sigma)``), or Flux's dynamic shift from
    ``mu`` (or from ``image_seq_len`` through :func:`flux_mu`): ``shift_type='exponential'``,
    ``sigma' = e^mu / (e^mu + (1/sigma - 1))``, is ``s = e^mu``; ``'linear'``,
    ``sigma' = mu / (mu + (1/sigma - 1))``, is ``s = mu`` (diffusers' ``time_shift_type``)."""
    if shift_type not in SHIFT_TYPES:
        raise ValueError(f"shift_type={shift_type!r} is invalid: expected one of {SHIFT_TYPES}")
    given = [k for k, v in (("shift", shift), ("mu", mu), ("image_seq_len", image_seq_len))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"grid_options {given} are exclusive: give a static shift, or mu, or "
                         "image_seq_len (Flux's dynamic shift)")
    if shift is not None:
        if not (is_real(shift) and shift > 0):
            raise ValueError(f"shift={shift!r} is invalid: expected a finite number > 0 "
                             "(1 = no shift; SD3 uses 3.0)")
        return float(shift)
    if image_seq_len is not None:
        mu = flux_mu(image_seq_len)
    if mu is None:
        return 1.0
    if not is_real(mu):
        raise ValueError(f"mu={mu!r} is invalid: expected a finite number")
    if shift_type == "linear":
        if not mu > 0:
            raise ValueError(f"mu={mu!r} is invalid for shift_type='linear': expected mu > 0")
        return float(mu)
    return math.exp(mu)


def shift_times(sde: ForwardSDE, times: Tensor, s: float) -> Tensor:
    """Shift every time of a grid by the factor ``s`` towards noise (``s > 1``) or data
    (``s < 1``). For flow matching (sigma = t) this is SD3's ``sigma' = s sigma / (1 + (s - 1)
    sigma)`` (Esser et al. 2024, Eq. 23), computed so. That map multiplies the noise-to-signal
    ratio ``sigma / alpha`` by ``s``, i.e. translates the half-logSNR: ``lambda' = lambda -
    log s``, which is how it is applied to any other forward SDE. t = 1 of flow matching
    (lambda = -inf) stays at 1. Uniform-logSNR and Karras grids are translation- (scale-)
    invariant, so for them the shift only moves the grid's range (its ends included, as in
    diffusers' schedulers; finish at sigma = 0 with ``final_to_zero`` / ``denoise``)."""
    from .sde.flow import FlowSDE
    if s == 1.0:
        return times
    if isinstance(sde, FlowSDE):
        out = s * times / (1 + (s - 1) * times)
    else:
        lam = sde.lambda_(times) - math.log(s)
        lo, hi = sde.lambda_min, sde.lambda_max
        if bool((lam < lo).any() | (lam > hi).any()):
            raise ValueError(f"shift={s:g} moves the grid outside the time range of {sde!r} "
                             f"(half-logSNR {float(lam.min()):.4g} .. {float(lam.max()):.4g}, "
                             f"valid {lo:.4g} .. {hi:.4g}): use a smaller shift or a narrower "
                             "t_start / t_end")
        out = sde.t_of_lambda(lam)
    if bool((out < sde.t_min).any()):
        raise ValueError(f"shift={s:g} moves t_end={float(times[-1]):.6g} to "
                         f"{float(out[-1]):.6g}, below t_min={sde.t_min:g} of {sde!r}: use a "
                         "larger t_end or a shift >= 1")
    return out


def grid_option_names(name: str) -> list[str]:
    """The options of the named grid ``name``: its own, then the timestep shift's."""
    return list(inspect.signature(GRIDS[name]).parameters)[4:] + list(SHIFT_OPTIONS)


def parse_grid(spec: str) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` of a named grid written ``name`` or ``name(key=value, ...)``, the
    form the benchmark tables print (``logsnr(lambda_floor=-2.5)``, ``uniform(shift=3.0)``);
    values are numbers, or words for ``shift_type``. Raises ValueError for an unknown name,
    an option the grid does not take or a malformed spec."""
    text = spec.strip()
    name, paren, rest = text.partition("(")
    name = name.strip()
    if name not in GRIDS:
        raise ValueError(f"unknown grid {spec!r}: expected one of {sorted(GRIDS)} (options as "
                         "name(key=value, ...)), an array of times or a tuned grid file (.json, "
                         "made by sdekit tune)")
    opts: dict[str, Any] = {}
    if not paren:
        return name, opts
    if not rest.endswith(")"):
        raise ValueError(f"grid {spec!r} is malformed: expected {name}(key=value, ...)")
    for item in filter(str.strip, rest[:-1].split(",")):
        key, eq, val = (part.strip() for part in item.partition("="))
        if not eq or not key or not val:
            raise ValueError(f"grid {spec!r} is malformed at {item.strip()!r}: expected "
                             f"{name}(key=value, ...)")
        if key not in grid_option_names(name):
            raise ValueError(f"grid option {key!r} does not apply to grid {name!r}: its "
                             f"options are {grid_option_names(name)}")
        if key in opts:
            raise ValueError(f"grid {spec!r} gives {key!r} twice")
        try:
            opts[key] = int(val) if val.lstrip("+-").isdigit() else float(val)
        except ValueError:
            opts[key] = val.strip("'\"")
    return name, opts


def is_grid_spec(spec: Any) -> bool:
    """Whether ``spec`` is a string :func:`parse_grid` accepts."""
    if not isinstance(spec, str):
        return False
    try:
        parse_grid(spec)
    except ValueError:
        return False
    return True


def make_grid(sde: ForwardSDE, grid: str | Tensor | Any = "logsnr", steps: int | None = None,
              t_start: float | None = None, t_end: float | None = None, **kwargs: Any) -> Tensor:
    """Build a validated time grid.

    Args:
        grid: a name in :data:`GRIDS`, optionally with options as the tables print them
            (``"logsnr(lambda_floor=-2.5)"``, :func:`parse_grid`), or an explicit array of times
            (then ``steps`` must be None or equal ``len(grid) - 1``).
        steps: number of intervals.
        t_start, t_end: defaults ``sde.T`` and ``sde.t_min``.
        kwargs: grid options (``rho`` for ``karras``), and for every named grid a timestep
            shift (:func:`shift_times`): ``shift`` (SD3's static factor), or Flux's dynamic
            shift from ``mu`` or ``image_seq_len`` with ``shift_type`` ``'exponential'``
            (default) or ``'linear'`` (:func:`shift_factor`).
    """
    for name, v in (("t_start", t_start), ("t_end", t_end)):
        if v is not None and not is_real(v):
            raise ValueError(f"{name}={v!r} is invalid: expected a finite number")
    check_forward_sde(sde)
    t_start = sde.T if t_start is None else float(t_start)
    t_end = sde.t_min if t_end is None else float(t_end)
    if isinstance(grid, str):
        grid, given = parse_grid(grid)
        both = sorted(set(given) & set(kwargs))
        if both:
            raise ValueError(f"grid option(s) {both} given twice: in the grid's name and in "
                             "grid_options")
        kwargs = {**given, **kwargs}
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid: expected an integer >= 1")
        if not t_start > t_end:
            raise ValueError(f"t_start={t_start!r} must be greater than t_end={t_end!r}")
        sde.lambda_(torch.tensor([t_start, t_end], dtype=torch.float64))  # range check
        fn = GRIDS[grid]
        unknown = sorted(set(kwargs) - set(grid_option_names(grid)))
        if unknown:
            raise ValueError(f"grid_options {unknown} do not apply to grid {grid!r}: its options "
                             f"are {grid_option_names(grid)}")
        s = shift_factor(**{k: kwargs.pop(k) for k in SHIFT_OPTIONS if k in kwargs})
        times = shift_times(sde, fn(sde, steps, t_start, t_end, **kwargs), s)
    else:
        if kwargs:
            raise ValueError(f"grid_options {sorted(kwargs)} do not apply to an explicit grid")
        try:
            times = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"grid of type {type(grid).__name__} is invalid: expected a grid "
                             f"name ({sorted(GRIDS)}), a 1-D array of times, a tuned grid file "
                             "(.json) or the TunedGrid that sdekit.tune returns") from None
        if times.ndim != 1 or times.numel() < 2:
            raise ValueError(f"grid must be a 1-D array of at least 2 times, got shape "
                             f"{tuple(times.shape)}")
        if steps is not None and steps != times.numel() - 1:
            raise ValueError(f"steps={steps!r} disagrees with the given grid of "
                             f"{times.numel()} times ({times.numel() - 1} steps)")
    validate_grid(sde, times)
    return times


def validate_grid(sde: ForwardSDE, times: Tensor) -> None:
    """Raise unless ``times`` is finite, inside the SDE's range and strictly decreasing in t
    and in lambda (two steps at the same lambda would be a zero-length step)."""
    if not bool(torch.isfinite(times).all()):
        raise ValueError("grid contains NaN or Inf")
    lam = sde.lambda_(times)  # raises for times outside [t_min, T]
    dt = times[1:] - times[:-1]
    if not bool((dt < 0).all()):
        i = int((dt >= 0).nonzero()[0])
        raise ValueError(f"grid must be strictly decreasing (from T towards t_min), but "
                         f"times[{i}]={times[i].item():.6g} and times[{i + 1}]="
                         f"{times[i + 1].item():.6g}")
    dl = lam[1:] - lam[:-1]
    if not bool((dl > 0).all()):
        i = int((dl <= 0).nonzero()[0])
        raise ValueError(f"grid puts steps {i} and {i + 1} at the same half-logSNR lambda="
                         f"{lam[i].item():.6g}: use fewer steps or another grid")
