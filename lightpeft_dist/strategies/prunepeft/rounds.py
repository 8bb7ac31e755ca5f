"""One round of the search: build the supernet of the surviving groups, train it briefly, measure the criteria.

Both reference implementations rebuild the supernet from scratch every round (fresh backbone, fresh PEFT init, the
same seed); `between_rounds: warm_start` instead carries the survivors' trained weights into the next round.
Round training follows the port: AdamW, constant LR per kind (`prunepeft.lr`), gradient clipping.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import datasets
import torch

from ...adapters.bottleneck import PEFT_PREFIX
from ...config import Recipe
from ...data.batches import Collator, StepBatches, encode_split, load_rows
from ...errors import LightPeftError
from ...runtime import Runtime
from ...training.hooks import Trainee
from ...training.loop import make_engine, run_steps
from ...training.schedules import make_schedule
from ...training.zero import full_state, gathered, zero3_loading
from .criteria import GroupStats
from .section import PrunePeftConfig
from .stats import RoundStats
from .supernet import Group, build_supernet

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    stats: GroupStats
    state: dict[str, torch.Tensor]  # full trained adapter values, by name relative to the causal-LM model
    model: torch.nn.Module
    saved: dict[str, torch.Tensor]  # the same values under the model's own parameter names (for saving)
    losses: list[float]
    tokens: int
    seconds: float


def kind_of_param(name: str) -> str:
    return "lora" if "lora_" in name else "bottleneck"


def round_rows(recipe: Recipe, cfg: PrunePeftConfig) -> datasets.Dataset:
    """The rows the rounds train on: all, or a seeded `data_fraction` of them (low fidelity)."""
    rows = load_rows(recipe.data, "train")
    if cfg.data_fraction < 1.0:
        n = max(cfg.batch_size, math.ceil(cfg.data_fraction * len(rows)))
        rows = rows.shuffle(seed=cfg.seed).select(range(min(n, len(rows))))
    return rows


def balanced_rows(recipe: Recipe, n: int) -> datasets.Dataset:
    """About `n` rows keeping every label's share (classification; the first n rows otherwise). Unlike the official
    code, every label is kept, not only 0 and 1 (docs/method.md)."""
    rows = load_rows(recipe.data, "train")
    if recipe.data.format != "classification" or n >= len(rows):
        return rows.select(range(min(n, len(rows))))
    labels = [str(x) for x in rows["label"]]
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    picked = []
    for lab, idx in by_label.items():
        picked += idx[:max(1, round(n * len(idx) / len(rows)))]
    return rows.select(sorted(picked))


def step_batches(rows: datasets.Dataset, recipe: Recipe, cfg: PrunePeftConfig, tokenizer, rt: Runtime) -> StepBatches:
    if cfg.batch_size % (cfg.grad_accum * rt.world_size):
        raise LightPeftError(f"prunepeft.batch_size {cfg.batch_size} is not divisible by grad_accum x world size "
                             f"({cfg.grad_accum} x {rt.world_size}); choose a batch_size that is")
    encoded = encode_split(rows, recipe.data, tokenizer, cfg.seq_len)
    return StepBatches(encoded, cfg.batch_size // cfg.grad_accum, cfg.seed, rt.rank, rt.world_size,
                       collator=Collator(tokenizer.pad_token_id))


def _load_values(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in named:
            key = name.removeprefix(PEFT_PREFIX)
            if key in state:
                with gathered([p], modifier_rank=0):
                    p.copy_(state[key].to(p.dtype))


def train_round(recipe: Recipe, cfg: PrunePeftConfig, alive: list[Group], batches: StepBatches, steps: int,
                ds_cfg: dict | None, rt: Runtime, desc: str, state: dict[str, torch.Tensor] | None = None,
                model_path: str | None = None) -> RoundResult:
    """Train the supernet of `alive` for `steps` and return its per-group statistics (collective)."""
    torch.manual_seed(cfg.seed)  # every round starts from the same initialisation stream, as the references do
    with zero3_loading(ds_cfg):
        model = build_supernet(recipe, alive, model_path)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if state:
            _load_values(model, named, state)
        by_kind: dict[str, list[torch.Tensor]] = {}
        for n, p in named:
            by_kind.setdefault(kind_of_param(n), []).append(p)
        optimizer = torch.optim.AdamW([{"params": ps, "lr": cfg.lr[k], "name": k} for k, ps in by_kind.items()],
                                      weight_decay=0.0)
        engine = make_engine(model, optimizer, make_schedule(optimizer, "constant", steps), cfg.grad_accum,
                             cfg.max_grad_norm, ds_cfg, rt)
    collector = RoundStats(model, alive, rt, deepspeed=ds_cfg is not None)
    trainee = Trainee(model, engine, named)
    loop = run_steps(trainee, batches, steps, cfg.grad_accum, rt, desc, hooks=collector, seed=cfg.seed)
    stats = collector.finish(cfg.threshold)
    saved = full_state(trainee.named)
    new_state = {n.removeprefix(PEFT_PREFIX): v for n, v in saved.items()}
    engine.close()
    log.info("%s: %d groups, loss %.4f -> %.4f", desc, len(alive), loop.losses[0], loop.losses[-1])
    return RoundResult(stats, new_state, trainee.model, saved, loop.losses, loop.job_tokens, loop.seconds)
