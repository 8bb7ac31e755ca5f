"""LoRA rank growth during training (APT's adaptive tuning), as a `Restructure` through the checkpoint path.

Why here: growing a rank changes parameter shapes, which a live (possibly ZeRO-3-partitioned) optimizer cannot do in
place. `grow` returns a restructure whose transform appends to the gathered state (docs/hooks.md):
- new rows of A with LoRA's own init (kaiming-uniform, a = sqrt(5), as PEFT), drawn from a generator seeded by
  (seed, step, module), so every rank and every world size draws the same values;
- new columns of B of zeros, so the adapter's output, hence the logits and the next loss, do not change;
- zero AdamW moments for the new entries; the old entries keep theirs;
- alpha scaled with r (`alpha_pattern`), so the scale alpha / r stays constant.
The optimizer step count and the LR schedule position are restored by the loop, so the schedule is not reset (the
reference's stale scheduler is not copied; docs/method.md). The budget rule (`growth_targets`) is the reference's
"top half" rule: the total budget grows linearly to `rank_growth` x the initial over the growth events.
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Any

import torch
import torch.nn as nn

from ..errors import LightPeftError
from ..pruning.live import LORA_KEY, STATE_KINDS, lora_tensor_names, structure_and_layout
from ..training.hooks import Restructure, Transform
from .lora_structure import Layout, lora_layout

log = logging.getLogger(__name__)


def new_a_rows(rows: int, d_in: int, seed: int, step: int, module: str) -> torch.Tensor:
    """LoRA's A init for `rows` new ranks, the same on every rank and world size (fan-in is d_in either way)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{step}:{module}".encode()))
    out = torch.empty(rows, d_in)
    nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=g)
    return out


def _append(tensors: dict[str, torch.Tensor], name: str, dim: int, new_param: torch.Tensor) -> None:
    for kind in STATE_KINDS:
        key = f"{kind}/{name}"
        add = new_param if kind == "param" else torch.zeros_like(new_param)
        tensors[key] = torch.cat([tensors[key], add.to(tensors[key].dtype)], dim=dim).contiguous()


def grow_transform(new_ranks: dict[str, int], seed: int, lora: Layout | None = None) -> Transform:
    """A transform growing each named LoRA module to its new rank (see the module docstring).

    `lora` is the layout when `meta["structure"]` holds none yet (the first restructure of a run); later ones read
    the structure, so growth composes with live pruning at the same step in either order.
    """
    def transform(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        structure, layout = structure_and_layout(meta, lora, "rank growth")
        tensors = dict(tensors)
        names = lora_tensor_names(tensors)
        for module in sorted(new_ranks):
            r_new = int(new_ranks[module])
            if module not in names or module not in layout["ranks"]:
                raise LightPeftError(f"cannot grow {module}: the model has no LoRA module of that name")
            r_old = int(layout["ranks"][module])
            a_name, b_name = names[module]["A"], names[module]["B"]
            if int(tensors[f"param/{a_name}"].shape[0]) != r_old:
                raise LightPeftError(f"{module} has rank {tensors[f'param/{a_name}'].shape[0]} but its layout says "
                                     f"{r_old}")
            if r_new < r_old:
                raise LightPeftError(f"rank growth cannot shrink {module} from {r_old} to {r_new}")
            if r_new == r_old:
                continue
            d_in = int(tensors[f"param/{a_name}"].shape[1])
            d_out = int(tensors[f"param/{b_name}"].shape[0])
            _append(tensors, a_name, 0, new_a_rows(r_new - r_old, d_in, seed, int(meta["step"]), module))
            _append(tensors, b_name, 1, torch.zeros(d_out, r_new - r_old))
            layout["alphas"][module] = layout["alphas"][module] * r_new / r_old
            layout["ranks"][module] = r_new
        structure[LORA_KEY] = layout
        return tensors, {**meta, "structure": structure}

    return transform


def grow(model: nn.Module, new_ranks: dict[str, int], seed: int, reason: str = "") -> Restructure | None:
    """What a step hook returns to grow LoRA ranks after this step; None when no module's rank changes."""
    layout = lora_layout(model)
    changed = {m: r for m, r in new_ranks.items() if int(r) != layout["ranks"].get(m)}
    if not changed:
        return None
    total = sum(layout["ranks"].values()) + sum(int(r) - layout["ranks"].get(m, 0) for m, r in changed.items())
    why = reason or f"LoRA rank growth of {len(changed)} modules, {sum(layout['ranks'].values())} -> {total} ranks"
    return Restructure(grow_transform(changed, seed, layout), why)


# --- the budget rule ---------------------------------------------------------------------------------------------

def lora_budget(ranks: dict[str, int], cost: dict[str, int] | None = None) -> int:
    """Total LoRA budget: sum of rank x cost per rank (cost 1: ranks; cost d_in + d_out: parameters)."""
    return sum(int(r) * (1 if cost is None else int(cost[m])) for m, r in ranks.items())


def budget_at(initial: float, rank_growth: float, event: int, events: int) -> float:
    """The budget after growth event `event` of `events` (1-based): linear from `initial` to rank_growth x initial."""
    if events < 1 or not 0 <= event <= events:
        raise LightPeftError(f"growth event {event} of {events} is out of range")
    return initial + (rank_growth - 1.0) * initial * event / events


def growth_targets(ranks: dict[str, int], scores: dict[str, float], budget: float, max_rank: int,
                   cost: dict[str, int] | None = None) -> dict[str, int]:
    """New ranks for a total `budget`: the top half of adapters by score absorb the whole increase.

    As the reference: candidates are the adapters with 0 < r < max_rank; the top floor(n/2) of them by score (n =
    all adapters; at least one) grow by the common rate (budget - current) / sum(cost x r of the selected) + 1, each
    to min(int(r x rate), max_rank); the others keep r. Ties in score go to the module path that sorts first.
    """
    if any(int(r) > max_rank for r in ranks.values()):
        worst = max(ranks, key=lambda m: ranks[m])
        raise LightPeftError(f"max_rank {max_rank} is below the rank {ranks[worst]} of {worst}; raise apt.max_rank")
    missing = sorted(set(ranks) - set(scores))
    if missing:
        raise LightPeftError(f"no salience score for LoRA module {missing[0]}")
    current = lora_budget(ranks, cost)
    out = {m: int(r) for m, r in ranks.items()}
    if budget <= current:
        return out
    candidates = sorted((m for m, r in ranks.items() if 0 < r < max_rank), key=lambda m: (-float(scores[m]), m))
    selected = candidates[:max(1, len(ranks) // 2)]
    denom = lora_budget({m: ranks[m] for m in selected}, cost)
    if denom == 0:
        return out
    rate = (budget - current) / denom + 1.0
    for m in selected:
        out[m] = min(int(ranks[m] * rate), max_rank)
    log.info("rank growth: budget %s -> %.0f; %d of %d adapters grow by x%.3f", current, budget, len(selected),
             len(ranks), rate)
    return out
