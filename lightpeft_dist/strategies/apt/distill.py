"""APT's self-distillation in gradual mode (`apt.distill_weight`), with the weight ramped over the pruning window.

Why: the paper distils while it prunes, with a weight mu rising linearly from 0 to 1 over the pruning window, so
the pruned model is pulled toward the model it started from while its blocks go. We keep that ramp shape, up to
`apt.distill_weight` w (the loss at optimizer step t is (1 - w_t) task + w_t T^2 KL(teacher || student), w_t =
w min(1, t / apt.window), then held), and reuse the existing distillation from the unpruned base
(training/distill.py) as the teacher instead of the paper's self-momentum snapshot of the student's LoRA;
docs/method.md, "APT", says why. The step count is checkpointed, so a resumed run uses the same weights.
"""

from __future__ import annotations

import logging

import torch

from ...training.distill import Distiller, load_teacher
from .section import AptConfig

log = logging.getLogger(__name__)


class RampedDistiller(Distiller):
    """A `Distiller` whose weight is `peak x min(1, step / window)` at optimizer step `step`."""

    def __init__(self, teacher: torch.nn.Module, peak: float, window: int, temperature: float,
                 pad_token_id: int | None):
        super().__init__(teacher, 0.0, temperature, pad_token_id)
        self.peak, self.window = peak, window
        self.weight = self.weight_at(0)

    def weight_at(self, step: int) -> float:
        return self.peak * min(1.0, step / self.window)

    def after_optimizer_step(self, step: int, loss: float) -> None:
        self.step = step
        self.weight = self.weight_at(step + 1)  # what the next step's loss uses
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"apt_distill.step": torch.tensor(getattr(self, "step", -1))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "apt_distill.step" in state:
            self.step = int(state["apt_distill.step"])
            self.weight = self.weight_at(self.step + 1)


def make_apt_distiller(recipe, apt: AptConfig, device: torch.device | str,
                       pad_token_id: int | None) -> RampedDistiller | None:
    """The gradual mode's distiller (None when `apt.distill_weight` is 0)."""
    if apt.distill_weight <= 0:
        return None
    log.info("APT: distillation weight ramped from 0 to %.2f over %d steps, temperature %.2f", apt.distill_weight,
             apt.window, apt.distill_temperature)
    return RampedDistiller(load_teacher(recipe, device), apt.distill_weight, apt.window, apt.distill_temperature,
                           pad_token_id)
