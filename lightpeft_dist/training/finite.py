"""Stop a diverged run instead of letting NaN or inf flow into scores, plans, models and reported numbers.

A NaN loss does not crash anything by itself: masks become NaN, the planner ranks NaN scores, the exported model is
NaN and evaluation still prints an accuracy (argmax of NaN logits picks a label). So every value that leaves a stage
is checked here, and the first non-finite one ends the run with one `error:` line naming where it was found and the
likely cause (docs/architecture.md, "Guarantees").

The checks are pure functions of values every rank holds alike (the all-reduced loss, gathered scores and adapter
state), so under several ranks they all raise at the same step and none is left waiting in a collective.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from ..errors import LightPeftError

DIVERGED = ("the run diverged; the likely cause is a learning rate too high for this model (lower {stage}.lr), "
            "or too little gradient clipping ({stage}.max_grad_norm)")


def check_loss(stage: str, step: int, loss: float) -> None:
    """Raise if the loss of optimizer step `step` (0-based, as run_steps counts) is NaN or infinite.

    At the first step nothing has been learnt yet, so the message also points at the weights and the data.
    """
    if math.isfinite(loss):
        return
    cause = DIVERGED.format(stage=stage)
    if step == 0:
        cause = ("the first step already fails, so the likely cause is non-finite weights in model.path or a "
                 f"dtype that overflows (model.dtype); otherwise {cause.removeprefix('the run diverged; ')}")
    raise LightPeftError(f"{stage}: the loss is {loss} at step {step + 1}; {cause}; the stage's output was not "
                         "written")


def first_non_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None when all are finite."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, t in items:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def check_tensors(what: str, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                  fix: str) -> None:
    """Raise naming `what` and the first non-finite tensor; `fix` is the sentence telling the user what to do."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise LightPeftError(f"{what} hold non-finite values (NaN or inf, first in {bad}); {fix}")


NON_FINITE_OUTPUTS = ("the evaluated model produces non-finite outputs (a diverged training run or non-finite "
                      "weights), so no metric was reported")


def check_metrics(what: str, metrics: Mapping[str, object]) -> None:
    """Raise if a reported number (loss, accuracy) is NaN or infinite; an infinite perplexity is a real overflow of
    exp(finite loss) and stays."""
    for key, value in metrics.items():
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and key != "perplexity")):
            raise LightPeftError(f"{what}: {key} is {value}; {NON_FINITE_OUTPUTS}")
