"""Learning-rate schedules and the training length, as pure functions of the step.

Why pure functions: a resumed run steps a fresh schedule forward to the checkpoint's position
(checkpoint.restore_checkpoint), so the factor at step s must depend on s alone, never on how the run got there.
Every schedule warms up linearly over `warmup` steps (the recipe's `warmup_ratio` of the steps) and then:
- linear: decays linearly to 0 at `steps` (the reference's schedule);
- cosine: follows half a cosine from 1 to 0 at `steps`;
- constant: stays at 1.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import LightPeftError

log = logging.getLogger(__name__)
SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(kind: str, step: int, steps: int, warmup: int = 0) -> float:
    """The multiplier of the base LR used by optimizer step `step` (0-based) of `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise LightPeftError(f"unknown LR schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, steps: int, warmup: int = 0) -> LambdaLR:
    """A LambdaLR over `lr_factor`; an unknown kind fails here, before any step is taken."""
    if kind not in SCHEDULES:
        raise LightPeftError(f"unknown LR schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    factor: Callable[[int], float] = lambda step: lr_factor(kind, step, steps, warmup)  # noqa: E731
    return LambdaLR(optimizer, factor)


def steps_for(steps: int | None, epochs: int | None, n_examples: int, batch_size: int) -> int:
    """Optimizer steps for `steps`, or for `epochs` passes over `n_examples` rows in global batches of `batch_size`.

    The batch order is an endless stream of per-epoch permutations (data/batches.py), so `epochs` passes are exactly
    epochs x n_examples rows; when that is not a multiple of the batch size the last step takes the remainder from
    the next pass (logged).
    """
    if steps is not None:
        return steps
    if epochs is None:
        raise LightPeftError("set train.steps or train.epochs")
    rows = epochs * n_examples
    out = math.ceil(rows / batch_size)
    spill = out * batch_size - rows
    log.info("train.epochs %d: %d rows x %d passes / global batch %d = %d optimizer steps%s", epochs, n_examples,
             epochs, batch_size, out, f" (the last step takes {spill} rows of pass {epochs + 1})" if spill else "")
    return out
