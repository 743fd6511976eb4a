"""A Fourier neural operator over the trajectory-time axis (Zheng et al. 2023, DSNO).

``TrajectoryOperator`` maps an initial state ``x_T`` to the whole probability-flow trajectory at
``K`` fixed output times in one pass:

1. a backbone score network (the MLP for vectors, the U-Net for images, any
   :class:`~sdekit.models.embedding.ScoreNet`) runs on the ``B * K`` stacked slots, slot k
   conditioned on its output time's half-logSNR;
2. its output and ``x_T`` are lifted to ``width`` channels and pass through temporal Fourier
   layers ``h <- h + act(W h + irfft_K(R . rfft_K(h)[:M]))`` mixing the K slots;
3. a projection back to the state's channels, plus a per-slot linear path in ``x_T`` (a full
   ``D x D`` matrix per slot for vectors, ``skip='full'``, or one scalar per slot, ``'scalar'``),
   initialised by least squares on the teacher data, so a linear teacher (Gaussian data) is
   reproduced exactly. With ``experts = E > 1`` the linear path is a mixture of E affine maps,
   weighted per slot by a softmax gate on ``x_T``: the flow map of multi-modal data is close to
   affine on the set of x_T that reaches one mode, and a gate plus E affine maps represents that
   with far fewer hidden units than a plain MLP needs.

With ``start=(alpha_T, sigma_T)`` and ``coeffs=(alphas, sigmas)`` of the output times the
backbone instead runs once, on ``x_T`` at its own noise level (as the teacher would), and each slot
starts from the one-step DDIM estimate ``alpha_k x0_hat + sigma_k eps_hat`` built from that
prediction: a backbone initialised from the teacher then begins as the teacher's 1-NFE DDIM, and
one pass costs one backbone evaluation instead of K. The temporal layers add a learned correction
per slot (a function of that slot's DDIM estimate and ``x_T``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..dynamics.parameterization import from_eps, to_eps


class TemporalSpectralConv(nn.Module):
    """``h (B, K, C_in, *spatial) -> (B, K, C_out, *spatial)``: real FFT along the slot axis, a
    learned complex multiplication ``R in C^{C_in x C_out x M}`` on the lowest ``modes``
    frequencies, inverse FFT. Computed in float32 or float64 (never half precision)."""

    def __init__(self, c_in: int, c_out: int, modes: int) -> None:
        super().__init__()
        if not (isinstance(modes, int) and modes >= 1):
            raise ValueError(f"modes={modes!r} is invalid: expected an integer >= 1")
        self.c_in, self.c_out, self.modes = c_in, c_out, modes
        self.weight = nn.Parameter(torch.randn(c_in, c_out, modes, 2) / (c_in * c_out) ** 0.5)

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[2] != self.c_in:
            raise ValueError(f"shape mismatch: expected {self.c_in} channels at dim 2, got shape "
                             f"{tuple(h.shape)}")
        K = h.shape[1]
        dt = torch.float64 if h.dtype == torch.float64 else torch.float32
        H = torch.fft.rfft(h.to(dt), dim=1)
        m = min(self.modes, H.shape[1])
        W = torch.view_as_complex(self.weight[:, :, :m].to(dt).contiguous())
        out = torch.zeros((h.shape[0], H.shape[1], self.c_out) + tuple(h.shape[3:]),
                          dtype=H.dtype, device=h.device)
        out[:, :m] = torch.einsum("bmi...,iom->bmo...", H[:, :m], W)
        return torch.fft.irfft(out, n=K, dim=1).to(h.dtype)


def _pointwise(lin: nn.Module, h: Tensor) -> Tensor:
    """Apply a Linear over the channel axis (dim 2) of ``(B, K, C, *spatial)``."""
    return lin(h.movedim(2, -1)).movedim(-1, 2)


class TrajectoryOperator(nn.Module):
    """One-pass trajectory operator (see the module docstring).

    Args:
        backbone: a ScoreNet built for the state shape (called as ``backbone(x, lambda)``).
        state_shape: the shape of one state, e.g. ``(2,)`` or ``(1, 8, 8)``.
        lambdas: half-logSNR of the K output times (the last one is the sample).
        width, layers, modes: temporal Fourier layers.
        skip: ``'full'`` (a D x D linear map per slot; vectors) or ``'scalar'``.
        experts: number of gated affine maps in the linear path (1: one affine map per slot).
        gate_width: hidden width of the gate (an MLP on flattened ``x_T``) when experts > 1.
        start: ``(alpha_T, sigma_T)`` of the start time: run the backbone once there (see the
            module docstring); requires ``coeffs``.
        coeffs: ``(alphas, sigmas)`` of the K output times (with ``start``).
        fold_time: with ``start``, fold the backbone's noise-level conditioning (constant at
            the start time) into per-block constants
            (:meth:`~sdekit.models.embedding.ScoreNet.fix_noise_level`): fewer parameters and
            MACs, the same function at the start time. Load teacher weights into the backbone
            before building the operator.
    """

    lambdas: Tensor
    start: Tensor
    coeffs: Tensor
    gate: nn.Sequential | None

    def __init__(self, backbone: nn.Module, state_shape: Sequence[int], lambdas: Sequence[float],
                 width: int = 64, layers: int = 2, modes: int = 2, skip: str = "full",
                 experts: int = 1, gate_width: int = 256,
                 start: Sequence[float] | None = None,
                 coeffs: Sequence[Sequence[float]] | None = None,
                 fold_time: bool = False) -> None:
        super().__init__()
        if (start is None) != (coeffs is None):
            raise ValueError("start and coeffs go together: give both (one backbone pass at "
                             "the start time) or neither (one per output time)")
        if skip not in ("full", "scalar"):
            raise ValueError(f"skip={skip!r} is invalid: expected 'full' or 'scalar'")
        if not (isinstance(experts, int) and experts >= 1):
            raise ValueError(f"experts={experts!r} is invalid: expected an integer >= 1")
        self.backbone = backbone
        self.state_shape = tuple(int(s) for s in state_shape)
        self.register_buffer("lambdas", torch.as_tensor(lambdas, dtype=torch.float32))
        K, C = len(lambdas), self.state_shape[0]
        D = math.prod(self.state_shape)
        self.lift = nn.Linear(2 * C, width)
        self.specs = nn.ModuleList(TemporalSpectralConv(width, width, modes) for _ in range(layers))
        self.mix = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.proj = nn.Linear(width, C)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.at_start = start is not None
        if start is not None and coeffs is not None:
            if len(start) != 2 or len(coeffs) != 2 or any(len(c) != K for c in coeffs):
                raise ValueError(f"start={start!r} must be (alpha_T, sigma_T) and coeffs two "
                                 f"sequences of {K} values (alphas, sigmas of the output times)")
            self.register_buffer("start", torch.as_tensor(start, dtype=torch.float64))
            self.register_buffer("coeffs", torch.as_tensor(coeffs, dtype=torch.float64))
        self.skip, self.experts = skip, experts
        self.gate = None
        self.fold_time = bool(fold_time)
        if fold_time:
            if start is None:
                raise ValueError("fold_time=True needs start=: only a backbone run at one "
                                 "fixed time (the start) can fold its noise-level input")
            fold = getattr(backbone, "fix_noise_level", None)
            if not callable(fold):
                raise ValueError(f"fold_time=True needs a ScoreNet backbone (one with "
                                 f"fix_noise_level), not {type(backbone).__name__}")
            fold(float(self._time_input(torch.tensor(self._start_lambda(),
                                                     dtype=torch.float64))))
        if self.at_start:  # the DDIM estimates replace the linear path
            if experts != 1:
                raise ValueError(f"experts={experts} needs the linear path: with start= the "
                                 "slots start from the DDIM estimates (use experts=1)")
            return
        shape = (experts, K, D, D) if skip == "full" else (experts, K)
        self.skip_weight = nn.Parameter(torch.zeros(shape))
        self.skip_bias = nn.Parameter(torch.zeros(experts, K, D))
        if experts > 1:  # softmax weights over the experts, per slot, from x_T
            last = nn.Linear(gate_width, K * experts)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.gate = nn.Sequential(nn.Linear(D, gate_width), nn.SiLU(), last)

    @property
    def slots(self) -> int:
        return self.lambdas.numel()

    def linear_path(self, x_T: Tensor) -> Tensor:
        """The per-slot affine maps of ``x_T`` (mixed by the gate when ``experts > 1``)."""
        B, K = x_T.shape[0], self.slots
        flat = x_T.reshape(B, -1)
        if self.skip == "full":
            out = torch.einsum("ekdi,bi->bekd", self.skip_weight, flat)
        else:
            out = self.skip_weight[None, :, :, None] * flat[:, None, None, :]
        out = out + self.skip_bias                                   # (B, E, K, D)
        if self.gate is None:
            out = out[:, 0]
        else:
            w = self.gate(flat).reshape(B, K, self.experts).softmax(-1)
            out = torch.einsum("bke,bekd->bkd", w, out)
        return out.reshape((B, K) + self.state_shape)

    def forward(self, x_T: Tensor) -> Tensor:
        if tuple(x_T.shape[1:]) != self.state_shape:
            raise ValueError(f"shape mismatch: the operator was built for states of shape "
                             f"{self.state_shape} but got x_T of shape {tuple(x_T.shape)}")
        B, K = x_T.shape[0], self.slots
        xs = x_T.unsqueeze(1).expand((B, K) + self.state_shape)
        if self.at_start:
            base = self._ddim_from_start(x_T)
            h = _pointwise(self.lift, torch.cat([base, xs], 2))
        else:
            feat = self._backbone(xs.reshape((B * K,) + self.state_shape),
                                  self.lambdas.to(x_T).repeat(B))
            h = _pointwise(self.lift, torch.cat([feat.reshape((B, K) + self.state_shape), xs], 2))
        for spec, mix in zip(self.specs, self.mix):
            h = h + nn.functional.silu(spec(h) + _pointwise(mix, h))
        out = _pointwise(self.proj, h)
        return base + out if self.at_start else self.linear_path(x_T) + out

    def _backbone(self, x: Tensor, lam: Tensor) -> Tensor:
        """The backbone at half-logSNR ``lam`` (see :meth:`_time_input`)."""
        return self.backbone(x, self._time_input(lam))

    def _time_input(self, lam: Tensor) -> Tensor:
        """The backbone's declared time input at half-logSNR ``lam``: lambda, or
        sigma_tilde = exp(-lambda) for an EDM-preconditioned denoiser (so a teacher's own
        network can start the backbone)."""
        denoiser = getattr(self.backbone, "time_input", "lambda") != "lambda"
        return (-lam).exp() if denoiser else lam

    def _start_lambda(self) -> float:
        """Half-logSNR of the start time (``start=`` operators)."""
        return math.log(float(self.start[0] / self.start[1]))

    def _ddim_from_start(self, x_T: Tensor) -> Tensor:
        """``(B, K, *shape)``: the one-step DDIM estimates from one backbone pass at x_T."""
        a_T, s_T = (v.to(x_T) for v in self.start)
        kind = getattr(self.backbone, "prediction", "eps")
        lam = torch.full((x_T.shape[0],), self._start_lambda(),
                         dtype=x_T.dtype, device=x_T.device)
        out = self._backbone(x_T / a_T if kind == "denoiser" else x_T, lam)
        eps = to_eps(kind, out, x_T, a_T, s_T)
        x0 = out if kind in ("x0", "denoiser") else from_eps("x0", eps, x_T, a_T, s_T)
        shape = (1, -1) + (1,) * len(self.state_shape)
        a, s = (c.to(x_T).reshape(shape) for c in self.coeffs)
        return a * x0.unsqueeze(1) + s * eps.unsqueeze(1)

    def fit_linear_path(self, x_T: Tensor, traj: Tensor, ridge: float = 1e-8, seed: int = 0,
                        gate_steps: int = 1000) -> None:
        """Least-squares fit of the per-slot affine maps to teacher data (exact for a linear
        teacher, such as Gaussian data). With several experts, the teacher's endpoints are first
        split by k-means, each expert is fitted to one cluster, and the gate is fitted as a
        classifier of the cluster an ``x_T`` reaches (``gate_steps`` Adam steps on the
        cross-entropy); training then refines both."""
        if self.at_start:
            raise ValueError("this operator has no linear path to fit: its slots start from the "
                             "DDIM estimates of its backbone at the start time")
        labels = self._fit_experts(x_T, traj, ridge, seed)
        if self.gate is None or gate_steps <= 0:
            return
        g = torch.Generator().manual_seed(seed)
        flat = x_T.reshape(x_T.shape[0], -1).to(self.skip_weight)
        opt = torch.optim.Adam(self.gate.parameters(), lr=3e-3)
        for _ in range(gate_steps):
            idx = torch.randint(0, flat.shape[0], (min(512, flat.shape[0]),), generator=g)
            logits = self.gate(flat[idx]).reshape(-1, self.experts)
            loss = nn.functional.cross_entropy(logits, labels[idx].repeat_interleave(self.slots))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def _fit_experts(self, x_T: Tensor, traj: Tensor, ridge: float, seed: int) -> Tensor:
        B = x_T.shape[0]
        X = torch.cat([x_T.reshape(B, -1).double(), torch.ones(B, 1, dtype=torch.float64)], 1)
        Y = traj.reshape(B, self.slots, -1).double()
        labels = (kmeans(Y[:, -1], self.experts, seed) if self.experts > 1
                  else torch.zeros(B, dtype=torch.long))
        for e in range(self.experts):
            Xe, Ye = X[labels == e], Y[labels == e]
            for k in range(self.slots):
                if self.skip == "full":
                    A = Xe.T @ Xe
                    A = A + (ridge * max(1.0, float(A.diagonal().mean()))
                             * torch.eye(X.shape[1], dtype=torch.float64))
                    coef = torch.linalg.solve(A, Xe.T @ Ye[:, k])          # (D+1, D)
                    self.skip_weight[e, k] = coef[:-1].T.to(self.skip_weight)
                    self.skip_bias[e, k] = coef[-1].to(self.skip_bias)
                else:
                    x = Xe[:, :-1].reshape(-1)
                    y = Ye[:, k].reshape(-1)
                    a = float((x * y).sum() / (x * x).sum().clamp_min(1e-30))
                    self.skip_weight[e, k] = a
                    self.skip_bias[e, k] = (Ye[:, k] - a * Xe[:, :-1]).mean(0).to(self.skip_bias)
        return labels


def kmeans(y: Tensor, k: int, seed: int = 0, iters: int = 25) -> Tensor:
    """Cluster labels of the rows of ``y`` (k-means++ seeding, then Lloyd iterations)."""
    if y.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} points, got {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    centers = y[torch.randint(0, y.shape[0], (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(y, centers).min(1).values ** 2
        centers = torch.cat([centers, y[torch.multinomial(d2 + 1e-30, 1, generator=g)]])
    for _ in range(iters):
        labels = torch.cdist(y, centers).argmin(1)
        centers = torch.stack([y[labels == j].mean(0) if (labels == j).any() else centers[j]
                               for j in range(k)])
    return torch.cdist(y, centers).argmin(1)
