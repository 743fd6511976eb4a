"""An adversarial term for one-pass samplers (issue 18): a small discriminator tells the
teacher's samples from the student's, and the student is pushed toward samples it cannot tell
apart.

A student fitted to teacher trajectories by L2 regresses toward the conditional mean wherever it
cannot fit the map exactly (on states it was not trained on, near the boundaries between
modes), and its samples come out shrunk: on the digits operator the feature variance of its
samples is below the teacher's. The regression term keeps the student's pairing with the
teacher; the adversarial term (non-saturating GAN loss, Goodfellow et al. 2014) is taken on
*fresh* prior draws, which cost no teacher solve, so it acts where the student generalises
rather than where it has memorised its pairs. The real samples are the teacher's own endpoints:
no training data enters.

:class:`AdversarialTerm` owns the discriminator and its Adam optimiser; :meth:`AdversarialTerm.step`
takes one discriminator step on ``(real, fake.detach())`` and returns the student's loss on
``fake``. :meth:`AdversarialTerm.full_state` (the discriminator's and the optimiser's state)
goes into the training checkpoint so that a resumed run continues exactly.

:class:`DistributionMatchingTerm` is the other second-stage term: distribution matching
distillation (DMD, Yin et al. 2024). It needs no discriminator of its own: the teacher's score
is the real law's, and a copy of the teacher's network, trained online with the teacher's own
denoising loss on the student's samples, is the fake law's. Their x0-predictions at a noised
student sample give the gradient of KL(student || teacher) there, a signal the teacher itself
supplies at every noise level, where the small discriminator above told the two laws apart only
barely on digits (57-60%).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from .._utils import append_dims, is_real, require
from ..dynamics.parameterization import DiffusionModel
from ..models.embedding import ScoreNet
from ..sde.base import ForwardSDE
from .losses import DSMLoss


def discriminator(state_shape: Sequence[int], width: int = 64) -> nn.Module:
    """A small discriminator for states of ``state_shape``: three 3x3 convolutions (the last
    two of stride 2) and a linear read-out for images ``(C, H, W)``; a 3-layer MLP otherwise."""
    shape = tuple(int(s) for s in state_shape)
    require(isinstance(width, int) and width >= 1, "width", width, "an integer >= 1")
    act = nn.LeakyReLU(0.2)
    if len(shape) == 3:
        c, h, w = shape
        cells = math.ceil(h / 4) * math.ceil(w / 4)
        return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), act,
                             nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), act,
                             nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), act,
                             nn.Flatten(), nn.Linear(4 * width * cells, 1))
    d = math.prod(shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 4 * width), act,
                         nn.Linear(4 * width, 4 * width), act, nn.Linear(4 * width, 1))


class AdversarialTerm(nn.Module):
    """The discriminator of states of ``state_shape`` and its optimiser (Adam, ``lr``,
    betas (0.5, 0.99), as usual for GANs); built from the current torch seed."""

    def __init__(self, state_shape: Sequence[int], lr: float = 1e-3, width: int = 64) -> None:
        super().__init__()
        require(is_real(lr) and lr > 0, "lr", lr, "a finite number > 0")
        self.disc = discriminator(state_shape, width)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.99))
        self.last_disc_loss = math.nan

    def score(self, x: Tensor) -> Tensor:
        """The discriminator's logit per state (positive: looks like a teacher sample)."""
        return self.disc(x).reshape(-1)

    def step(self, real: Tensor, fake: Tensor) -> Tensor:
        """One discriminator step on ``real`` against ``fake`` (detached), then the student's
        non-saturating loss ``mean softplus(-D(fake))`` (gradients reach ``fake`` only through
        the updated discriminator; its own gradients are cleared at its next step)."""
        loss = softplus(-self.score(real)).mean() + softplus(self.score(fake.detach())).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last_disc_loss = float(loss.detach())
        return softplus(-self.score(fake)).mean()

    def full_state(self) -> dict[str, Any]:
        return {"disc": self.disc.state_dict(), "opt": self.opt.state_dict()}

    def load_full_state(self, state: dict[str, Any]) -> None:
        self.disc.load_state_dict(state["disc"])
        self.opt.load_state_dict(state["opt"])


class DistributionMatchingTerm(nn.Module):
    """The DMD term of a student's samples against a teacher network ``net`` (a ScoreNet of
    the process ``sde``, trained with ``loss``): the fake score is a copy of ``net``, trained
    ``fake_steps`` times per student step with ``loss`` on the student's (detached) samples by
    Adam at ``lr`` (betas (0, 0.99)). ``t_range``: the noise levels of the matching, as
    fractions of ``[t_min, T]`` (DMD's 0.02 to 0.98)."""

    def __init__(self, net: ScoreNet, sde: ForwardSDE, loss: DSMLoss, lr: float = 2e-4,
                 fake_steps: int = 4, t_range: tuple[float, float] = (0.02, 0.98)) -> None:
        super().__init__()
        require(is_real(lr) and lr > 0, "lr", lr, "a finite number > 0")
        require(isinstance(fake_steps, int) and fake_steps >= 1, "fake_steps", fake_steps,
                "an integer >= 1")
        self.sde, self.loss, self.fake_steps, self.t_range = sde, loss, fake_steps, t_range
        self.real = DiffusionModel(net, sde, net.prediction, net.time_input)
        self.fake_net = copy.deepcopy(net).requires_grad_(True)
        self.fake = DiffusionModel(self.fake_net, sde, net.prediction, net.time_input)
        self.opt = torch.optim.Adam(self.fake_net.parameters(), lr=lr, betas=(0.0, 0.99))
        self.last_fake_loss = math.nan

    def step(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The student's loss on its samples ``x``: ``0.5 |x - sg(x - w (x0_fake - x0_real))|^2``
        at a noised copy of ``x`` (its gradient is DMD's, normalised per sample by ``w = 1 /
        mean |x - x0_real|``); then ``fake_steps`` updates of the fake score on ``x``."""
        sde, (lo, hi) = self.sde, self.t_range
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        t = sde.t_min + (lo + (hi - lo) * u) * (sde.T - sde.t_min)
        dims = tuple(range(1, x.ndim))
        with torch.no_grad():
            a, s = (append_dims(f(t).to(x), x.ndim) for f in (sde.alpha, sde.sigma))
            xt = a * x + s * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            real = self.real.predict(xt, t, "x0")
            self.fake_net.eval()
            fake = self.fake.predict(xt, t, "x0")
            w = 1 / (x - real).abs().mean(dims, keepdim=True).clamp_min(1e-4)
            target = x - w * (fake - real)
        self.fake_net.train()
        for _ in range(self.fake_steps):
            fl = self.loss(self.fake_net, x.detach(), generator=generator)
            self.opt.zero_grad(set_to_none=True)
            fl.backward()
            self.opt.step()
        self.last_fake_loss = float(fl.detach())
        return 0.5 * (x - target).pow(2).mean()

    def full_state(self) -> dict[str, Any]:
        return {"fake": self.fake_net.state_dict(), "opt": self.opt.state_dict()}

    def load_full_state(self, state: dict[str, Any]) -> None:
        self.fake_net.load_state_dict(state["fake"])
        self.opt.load_state_dict(state["opt"])
