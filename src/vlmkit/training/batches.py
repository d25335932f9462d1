"""Which rows of the training set make up each micro-batch: a pure function of the seed and the step.

Because batches depend on nothing but (seed, step, micro), a resumed run sees exactly the
data an uninterrupted run would have seen. Under torchrun each rank takes its share of rows.
"""
from __future__ import annotations

import numpy as np
import torch

from vlmkit.training import distributed


class BatchPlan:
    """Micro-batch (step, micro) -> row indices, epoch by epoch through a seeded permutation."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int):
        if n < batch_size:
            raise ValueError(f"the training set has {n} examples, fewer than train.batch_size {batch_size}")
        if batch_size % distributed.world_size():
            raise ValueError(f"train.batch_size {batch_size} does not divide among {distributed.world_size()} "
                             f"processes; the batch is global: make it a multiple of the process count")
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.per_epoch = n // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, step: int, micro: int) -> torch.Tensor:
        """This rank's rows of micro-batch (step, micro)."""
        rows = self.global_rows(step, micro)
        return torch.from_numpy(rows[distributed.rank():: distributed.world_size()].copy())

    def global_rows(self, step: int, micro: int) -> np.ndarray:
        """Every rank's rows of micro-batch (step, micro), together."""
        epoch, pos = divmod(step * self.grad_accum + micro, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1][pos * self.batch_size: (pos + 1) * self.batch_size]
