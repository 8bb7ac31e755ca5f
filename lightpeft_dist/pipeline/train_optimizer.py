"""The train stage's optimizer: one AdamW group at `train.lr`, or one group per adapter kind at its own LR.

Why a module of its own: a strategy may decide that adapter kinds learn at different rates (PrunePEFT's searched
LoRA + bottleneck configuration trains each kind at its kind's LR; docs/method.md, "PrunePEFT"), and the train
stage's rebuilds (restructures, resume) must build the same groups every time. The schedule is a LambdaLR over the
optimizer, so it scales every group's LR by the same factor. Without per-kind LRs the optimizer is built exactly as
before (one group, same parameter order), so such runs stay bit-identical.
"""

from __future__ import annotations

import torch

from ..adapters.registry import KINDS, ordered


def kind_of(name: str) -> str | None:
    """The adapter kind a trainable parameter belongs to (None: no kind claims it)."""
    return next((k.name for k in ordered(KINDS) if k.is_param(name)), None)


def make_optimizer(named: list[tuple[str, torch.Tensor]], lr: float, weight_decay: float,
                   kind_lrs: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over `named`: with `kind_lrs`, a group per adapter kind (attach order, named "lora", "bottleneck", ...)
    at that kind's LR; a parameter of a kind not listed (or of no kind) learns at `lr` in a group named "other"."""
    if not kind_lrs:
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    by_kind: dict[str, list[torch.Tensor]] = {}
    for name, p in named:
        kind = kind_of(name)
        by_kind.setdefault(kind if kind in kind_lrs else "other", []).append(p)
    names = [k.name for k in ordered(KINDS) if k.name in by_kind] + (["other"] if "other" in by_kind else [])
    groups = [{"params": by_kind[k], "lr": kind_lrs.get(k, lr), "name": k} for k in names]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
