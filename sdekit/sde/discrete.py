"""DDPM with a discrete noise table, embedded in continuous time.

Mapping between continuous time and the network's integer timestep (the DPM-Solver convention):
table entry ``n`` (0-based, ``n = 0 .. N-1``) sits at ``t_n = (n + 1) / N``, and
``log alpha(t)`` is interpolated piecewise-linearly between the ``t_n`` with
``log alpha(t_n) = log(alphas_cumprod[n]) / 2``. So the process lives on ``[1/N, 1]`` and the
time passed to the network is ``model_time(t) = N t - 1`` (equal to ``n`` at ``t_n``; fractional
in between). ``timestep_to_t(n) = (n + 1) / N`` is the inverse.

A zero-terminal-SNR table (Lin et al. 2024: the last ``alphas_cumprod`` entry is 0, its last beta
is 1) is accepted: then ``alpha(T) = 0`` and ``lambda(T) = -inf`` exactly, as for flow matching at
t = 1, and on the last interval ``[t_{N-2}, 1]`` alpha (not log alpha, which is -inf at the end)
is interpolated linearly, so that ``log alpha = log alpha_{N-2} + log(1 - w)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import as_tensor, is_real, require
from .base import ForwardSDE


def _table(name: str, values: Any) -> Tensor:
    try:
        v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}={values!r} is invalid: expected a 1-D table of numbers (a "
                        "list or tensor)") from None
    if v.ndim != 1 or v.numel() < 2:
        raise ValueError(f"{name} must be a 1-D table with at least 2 entries, got shape "
                         f"{tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or Inf at index "
                         f"{int((~torch.isfinite(v)).nonzero()[0])}: expected finite values")
    return v


class DiscreteDDPM(ForwardSDE):
    """DDPM-discrete forward process from a ``betas`` or an ``alphas_cumprod`` table.

    With neither given, DDPM's linear table: betas = linspace(beta_start, beta_end, N) with
    1e-4, 0.02 and N = 1000 (Ho et al. 2020). See the module docstring for the time mapping.
    ``f(t)`` is piecewise constant (the right derivative at the knots) and ``g^2 = -2 f``.
    """

    def __init__(self, betas: Sequence[float] | Tensor | None = None,
                 alphas_cumprod: Sequence[float] | Tensor | None = None,
                 num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> None:
        if betas is not None and alphas_cumprod is not None:
            raise ValueError("give either betas or alphas_cumprod, not both")
        if alphas_cumprod is None:
            if betas is None:
                if not (isinstance(num_timesteps, int) and num_timesteps >= 2):
                    raise ValueError(f"num_timesteps={num_timesteps!r} is invalid: expected an "
                                     "integer >= 2")
                for name, v in (("beta_start", beta_start), ("beta_end", beta_end)):
                    require(is_real(v) and 0 < v < 1, name, v, "a number in (0, 1)")
                betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
            b = _table("betas", betas)
            bad = (b <= 0) | (b > 1)
            bad[:-1] |= b[:-1] == 1     # beta = 1 only last: a zero-terminal-SNR table
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"betas[{i}]={b[i].item()!r} is invalid: every beta must lie in "
                                 "the open interval (0, 1) (the last one may be 1: zero terminal "
                                 "SNR)")
            log_ac = torch.cumsum(torch.log1p(-b), 0)
        else:
            ac = _table("alphas_cumprod", alphas_cumprod)
            bad = (ac < 0) | (ac >= 1)
            bad[:-1] |= ac[:-1] == 0    # 0 only last: a zero-terminal-SNR table
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"alphas_cumprod[{i}]={ac[i].item()!r} is invalid: every entry "
                                 "must lie in the open interval (0, 1) (the last one may be 0: "
                                 "zero terminal SNR)")
            if not bool((ac[1:] < ac[:-1]).all()):
                i = int((ac[1:] >= ac[:-1]).nonzero()[0]) + 1
                raise ValueError(f"alphas_cumprod must be strictly decreasing, but "
                                 f"alphas_cumprod[{i}]={ac[i].item()!r} >= "
                                 f"alphas_cumprod[{i - 1}]={ac[i - 1].item()!r}")
            log_ac = torch.log(ac)
        self.N = int(log_ac.numel())
        super().__init__(1.0 / self.N, 1.0)
        self.log_alpha_table = 0.5 * log_ac                      # log alpha at the knots
        self.t_table = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        #: alpha(T) = 0 (lambda(T) = -inf): a zero-terminal-SNR table
        self.zero_terminal_snr = bool(torch.isneginf(self.log_alpha_table[-1]))

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.exp(2 * self.log_alpha_table)

    @classmethod
    def squaredcos(cls, num_timesteps: int = 1000, s: float = 0.008,
                   max_beta: float = 0.999) -> DiscreteDDPM:
        """The improved-DDPM cosine table (Nichol & Dhariwal 2021, Eq. 17), betas clipped at
        ``max_beta``."""
        n = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = torch.cos((n + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        return cls(betas=betas)

    def _segment(self, t: Tensor) -> Tensor:
        knots = self.t_table.to(t.device)
        return (torch.searchsorted(knots, t.detach().contiguous(), right=True) - 1).clamp(
            0, self.N - 2)

    def _log_alpha(self, t: Tensor) -> Tensor:
        la = self.log_alpha_table.to(t.device)
        i = self._segment(t)
        w = (t - self.t_table.to(t.device)[i]) * self.N
        if not self.zero_terminal_snr:
            return la[i] + w * (la[i + 1] - la[i])
        last = i == self.N - 2       # alpha linear on the last interval (no -inf in the graph)
        nxt = torch.where(last, la[i], la[i + 1])
        return torch.where(last, la[i] + torch.log1p(-torch.where(last, w.clamp(max=1), 0 * w)),
                           la[i] + w * (nxt - la[i]))

    def _log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2 * self._log_alpha(t)))

    def _f(self, t: Tensor) -> Tensor:
        la = self.log_alpha_table.to(t.device)
        i = self._segment(t)
        if not self.zero_terminal_snr:
            return (la[i + 1] - la[i]) * self.N
        last = i == self.N - 2
        w = torch.where(last, (t - self.t_table.to(t.device)[i]) * self.N, 0 * t).clamp(max=1)
        return torch.where(last, -self.N / (1 - w), (torch.where(last, la[i], la[i + 1]) - la[i])
                           * self.N)

    def _g2(self, t: Tensor) -> Tensor:
        return -2 * self._f(t)

    def _t_of_lambda(self, lam: Tensor) -> Tensor:
        target = -0.5 * F.softplus(-2 * lam)            # log alpha at that lambda
        la = self.log_alpha_table.to(lam.device)        # decreasing
        j = torch.searchsorted(-la, -target.contiguous()).clamp(1, self.N - 1)
        frac = (target - la[j - 1]) / (la[j] - la[j - 1])
        if self.zero_terminal_snr:    # the last interval is linear in alpha
            frac = torch.where(j == self.N - 1, -torch.expm1(target - la[j - 1]), frac)
        return self.t_table.to(lam.device)[j - 1] + frac / self.N

    @property
    def prior_std(self) -> float:
        return 1.0

    def model_time(self, t: Any) -> Tensor:
        """Continuous t -> the network's (fractional) timestep index ``N t - 1`` in [0, N-1]."""
        tt, dtype = self._time(t)
        return (tt * self.N - 1).to(dtype)

    def timestep_to_t(self, n: Any) -> Tensor:
        """Integer (or fractional) timestep index -> continuous time ``(n + 1) / N``."""
        nn_ = as_tensor(n).double()
        bad = ~((nn_ >= 0) & (nn_ <= self.N - 1))  # NaN is bad too
        if bool(bad.any()):
            val = nn_[bad].flatten()[0].item()
            raise ValueError(f"n={val!r} is invalid: timestep index out of range, expected "
                             f"0 <= n <= {self.N - 1}")
        return (nn_ + 1) / self.N

    def __repr__(self) -> str:
        return f"DiscreteDDPM(N={self.N})"
