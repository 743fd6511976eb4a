"""Injected noise. Solvers never call ``torch.randn``: they ask the noise source.

* :class:`SeededNoise` gives every sample its own generator, so a sample's noise (and so its
  result) does not depend on the batch size or its position in the batch.
* :class:`BrownianNoise` draws one Brownian path per sample on a fine time grid; the standard
  normal it returns for a step ``[t0, t1]`` is ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``, so every grid
  made of points of the fine grid sees the same path (what strong-order tests need).

Interface used by solvers: ``increment(t0, t1, like)`` (the normal tied to a step),
``levy_area(t0, t1, like)`` (the normal tied to the step's space-time Levy area, for schemes of
strong order 1.5) and ``randn(like)`` (an extra independent normal, e.g. for Langevin correctors
or churn).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._utils import check_seed


def sample_seeds(seed: int, n: int) -> list[int]:
    """Per-sample seeds derived from one integer seed: sample i gets a seed that depends only on
    ``(seed, i)``. Derived once per ``(seed, n)`` (a bounded cache: 256 seeds cost ~2.5 ms, a
    tenth of a millisecond per step of a 20-step solve of 256 images); a new list each call."""
    return list(_derived_seeds(int(seed), int(n)))


@functools.lru_cache(maxsize=64)
def _derived_seeds(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]) >> 1
                 for i in range(n))


#: a sample's normals are drawn in blocks of ``max(1, min(MAX_BLOCK, BLOCK_ELEMENTS // n))``
#: draws (``n``: elements per sample), so a step costs one slice instead of one generator call
#: per sample; the block length depends only on ``n``, never on the batch
BLOCK_ELEMENTS = 1 << 15
MAX_BLOCK = 64
#: torch's CPU normal generator makes its numbers in groups of 16 (Box-Muller on 16 uniforms),
#: so calls of any multiple of 16 numbers continue one stream alike. Where a sample's draw has
#: ``n`` elements, a multiple of 16 and at least ``PER_STEP_ELEMENTS``, each step's draw is
#: made in place instead, one call per sample into a contiguous ``(batch, *event)`` tensor: the
#: same numbers as the blocks, without a block to stack and keep, at about the cost of one
#: ``randn_like`` (a per-sample call costs little beside 2,048 normals)
PER_STEP_ELEMENTS = 2048


class SeededNoise:
    """Per-sample generators (on the CPU; blocks of draws are moved to the state's device).

    Sample ``i``'s normals are its own generator's stream, drawn ahead in blocks of a length that
    depends only on the state's shape per sample: a sample's noise, and so its result, is the
    same in any batch, and a step's noise costs one indexing op rather than one generator call
    per sample (the block refill, every ``MAX_BLOCK`` steps for small states, costs one call per
    sample). Image-sized states (see :data:`PER_STEP_ELEMENTS`) draw the same numbers step by
    step, one call per sample straight into the step's tensor."""

    def __init__(self, seeds: Sequence[int]) -> None:
        for s in seeds:
            check_seed("seeds", s)
        self._seeds: list[int] | None = [int(s) for s in seeds]
        self._derive: tuple[int, int] | None = None   # (seed, n) of from_seed, until derived
        self.n = len(self._seeds)
        self._gens: list[torch.Generator] | None = None   # made on the first draw
        # (event shape, dtype, device) -> [block of shape (draws, batch, *event), next draw]
        self._blocks: dict[tuple[Any, ...], list[Any]] = {}

    @classmethod
    def from_seed(cls, seed: int, n: int) -> SeededNoise:
        """The noise of ``n`` samples with the seeds :func:`sample_seeds` ``(seed, n)``, derived
        (and their generators made) on the first draw: a deterministic solve pays nothing."""
        check_seed("seed", seed)
        self = cls([])
        self._seeds, self._derive, self.n = None, (int(seed), int(n)), int(n)
        return self

    @property
    def seeds(self) -> list[int]:
        if self._seeds is None:
            assert self._derive is not None  # from_seed set it
            self._seeds = sample_seeds(*self._derive)
        return self._seeds

    @property
    def gens(self) -> list[torch.Generator]:
        """Each sample's generator, seeded with its seed."""
        if self._gens is None:
            self._gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        return self._gens

    def _check(self, like: Tensor) -> None:
        if like.shape[0] != self.n:
            raise ValueError(f"shape mismatch: the noise source has {self.n} per-sample "
                             f"seeds but the state has shape {tuple(like.shape)}")

    def randn(self, like: Tensor) -> Tensor:
        """Standard normals shaped like ``like``, drawn in its dtype (float32 and float64 runs
        therefore see different streams) from each sample's own generator."""
        self._check(like)
        shape = tuple(like.shape[1:])
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        n = math.prod(shape)
        if n % 16 == 0 and n >= PER_STEP_ELEMENTS:
            z = torch.empty((len(self.gens),) + shape, dtype=dtype)
            for part, g in zip(z, self.gens):
                part.normal_(generator=g)
            return z.to(device=like.device, dtype=like.dtype)
        key = (shape, dtype, like.device)
        entry = self._blocks.get(key)
        if entry is None or entry[1] == entry[0].shape[0]:
            draws = max(1, min(MAX_BLOCK, BLOCK_ELEMENTS // max(1, n)))
            block = torch.stack([torch.randn((draws,) + shape, generator=g, dtype=dtype)
                                 for g in self.gens], dim=1).to(like.device)
            entry = self._blocks[key] = [block, 0]
        z = entry[0][entry[1]]   # (batch, *event), contiguous
        entry[1] += 1
        return z.to(dtype=like.dtype)

    def increment(self, t0: Any, t1: Any, like: Tensor) -> Tensor:
        return self.randn(like)

    def levy_area(self, t0: Any, t1: Any, like: Tensor) -> Tensor:
        """The standardised space-time Levy area of the step ``[t0, t1]`` (either order):
        ``H sqrt(12 / h)`` with
        ``H = (1/h) int (W(s) - W(t0) - (s - t0)/(t1 - t0) (W(t1) - W(t0))) ds``
        and ``h = |t1 - t0|``; a standard normal independent of the step's increment (Foster,
        Lyons & Oberhauser 2020). Here a fresh normal from each sample's generator."""
        return self.randn(like)


class BrownianNoise(SeededNoise):
    """One Brownian path per sample on the fine grid ``times`` (any order); queries must use
    times that are points of that grid."""

    def __init__(self, seeds: Sequence[int], times: Any, event_shape: Sequence[int]) -> None:
        super().__init__(seeds)
        t = torch.as_tensor(times, dtype=torch.float64).flatten()
        self.times = torch.sort(t).values
        dt = self.times[1:] - self.times[:-1]
        if not bool((dt > 0).all()):
            raise ValueError("BrownianNoise times must be distinct")
        path_gens = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in self.seeds]
        inc = torch.stack([torch.randn((dt.numel(),) + tuple(event_shape), generator=g,
                                       dtype=torch.float64) for g in path_gens])
        inc = inc * dt.sqrt().reshape((1, -1) + (1,) * len(event_shape))
        self.W = torch.cat([torch.zeros_like(inc[:, :1]), inc.cumsum(1)], 1)  # (B, n, *event)
        self._event_shape = tuple(event_shape)
        self._int_W: Tensor | None = None  # int_{times[0]}^{times[j]} W ds, built on first use

    def _integral(self) -> Tensor:
        """``int_{times[0]}^{times[j]} W(s) ds`` for every grid point j, for the path made of the
        grid values and, between grid points, independent Brownian bridges: each interval adds
        ``h (W_j + W_{j+1}) / 2`` plus its bridge's area, a N(0, h^3/12) drawn from the sample's
        own generator. Every coarser grid's Levy areas then come from this one path."""
        if self._int_W is None:
            h = self.times[1:] - self.times[:-1]
            area_gens = [torch.Generator().manual_seed(s ^ 0x2545F4914F6CDD1D) for s in self.seeds]
            bridge = torch.stack([torch.randn((h.numel(),) + self._event_shape, generator=g,
                                              dtype=torch.float64) for g in area_gens])
            hb = h.reshape((1, -1) + (1,) * len(self._event_shape))
            piece = hb * 0.5 * (self.W[:, 1:] + self.W[:, :-1]) + bridge * (hb ** 3 / 12).sqrt()
            self._int_W = torch.cat([torch.zeros_like(piece[:, :1]), piece.cumsum(1)], 1)
        return self._int_W

    def _index(self, t: Any) -> int:
        t = float(t)
        i = int(torch.searchsorted(self.times, torch.tensor(t, dtype=torch.float64)))
        for j in (i - 1, i):
            if (0 <= j < self.times.numel()
                    and abs(self.times[j].item() - t) <= 1e-12 * (1 + abs(t))):
                return j
        raise ValueError(f"time {t!r} is not a point of the Brownian grid")

    def increment(self, t0: Any, t1: Any, like: Tensor) -> Tensor:
        self._check(like)
        i0, i1 = self._index(t0), self._index(t1)
        dW = self.W[:, i1] - self.W[:, i0]
        return (dW / abs(float(t1) - float(t0)) ** 0.5).to(dtype=like.dtype, device=like.device)

    def levy_area(self, t0: Any, t1: Any, like: Tensor) -> Tensor:
        self._check(like)
        i0, i1 = self._index(t0), self._index(t1)
        h = abs(float(t1) - float(t0))
        dW = self.W[:, i1] - self.W[:, i0]
        C = self._integral()
        # int over the step of (W(s) - W(t0)) ds, whichever way the step runs
        lo, hi = min(i0, i1), max(i0, i1)
        int_dW = C[:, hi] - C[:, lo] - h * self.W[:, i0]
        H = int_dW / h - 0.5 * dW
        return (H * (12 / h) ** 0.5).to(dtype=like.dtype, device=like.device)
