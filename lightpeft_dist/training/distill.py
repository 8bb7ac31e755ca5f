"""Knowledge distillation from the unpruned base model while the pruned model is fine-tuned (opt-in).

Why: in a classification recipe the task loss sees one label token per example, so fine-tuning repairs the pruned
model only where the label is predicted. Pruning 35% of a small model breaks its language modelling everywhere
(Brown perplexity 52 -> ~370 for SmolLM2-135M), and the label token is read off those broken representations.
Matching the unpruned model's next-token distribution on every real token of the same batches gives the repair a
dense signal at no extra data cost; pruning-then-distilling is how Minitron and Sheared-LLaMA recover pruned models.
This is not in the Light-PEFT reference (its stage 2 is plain PEFT training); it is off unless
`train.distill_weight > 0`, and the loss is then

    (1 - w) * task loss + w * T^2 * KL(teacher_T || student_T), averaged over the batch's attended tokens,

where `_T` means softmax at temperature T. The teacher is the recipe's `model.path`, frozen, held whole on every
rank (it is not partitioned under ZeRO-3: budget one extra copy of the base model per rank, or distil on fewer,
larger GPUs).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .hooks import StepHooks

log = logging.getLogger(__name__)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, per attended position, averaged over those positions."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    keep = attention_mask.to(per_token.dtype)
    return (per_token * keep).sum() / keep.sum().clamp_min(1.0) * (t * t)


class Distiller(StepHooks):
    """The training loss with distillation, as a loop hook: it reweights the loss so far (the task loss when it
    comes first) and adds the KL term, which an additive `extra_loss` could not do bit for bit."""

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float, pad_token_id: int | None):
        self.teacher, self.weight, self.temperature = teacher.eval(), weight, temperature
        self.pad_token_id = pad_token_id
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.last_kl = float("nan")

    def loss(self, batch: dict, output, loss: torch.Tensor) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # packed rows carry position_ids, no mask
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        mask = batch.get("attention_mask")
        if mask is None:  # packed rows: every token but the tail padding is real
            mask = batch["input_ids"] != self.pad_token_id
        kl = distill_kl(output.logits, teacher_logits.to(output.logits.device), mask, self.temperature)
        self.last_kl = float(kl.detach())
        return (1.0 - self.weight) * loss + self.weight * kl


def make_distiller(recipe, device: torch.device | str, pad_token_id: int | None) -> Distiller | None:
    """The recipe's distiller, with the unpruned base as teacher; None when `train.distill_weight` is 0."""
    cfg = recipe.train
    if cfg.distill_weight <= 0:
        return None
    teacher = load_teacher(recipe, device)
    log.info("train: distilling with weight %.2f, temperature %.1f", cfg.distill_weight, cfg.distill_temperature)
    return Distiller(teacher, cfg.distill_weight, cfg.distill_temperature, pad_token_id)


def load_teacher(recipe, device: torch.device | str) -> torch.nn.Module:
    """The unpruned base model (`model.path`), whole on this rank, as a distillation teacher."""
    from ..models.loading import load_model

    teacher = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation).to(device)
    n = sum(p.numel() for p in teacher.parameters())
    log.info("train: distilling from the unpruned base %s (%s params)", recipe.model.path, f"{n:,}")
    return teacher
