"""Shared by tests/test_lora_growth.py, tests/test_live_prune.py and tests/restructure_worker.py: a tiny LoRA run
that trains from a model on disk, grows ranks and prunes physically while it trains, on one process or under ZeRO-3.

Everything is a pure function of its arguments (seeded init, step-indexed batches without padding), so a run on 2
ranks must match one process, and a resumed run an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from peft import get_peft_model

from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.adapters.lora_growth import budget_at, grow, growth_targets, lora_budget
from lightpeft_dist.adapters.lora_salience import LoraRankSalience
from lightpeft_dist.adapters.lora_structure import lora_layout, structured_model
from lightpeft_dist.config import PeftConfig, PruneConfig
from lightpeft_dist.models.families import config_layer_shapes, head_dim_of
from lightpeft_dist.models.loading import fingerprint, load_config, load_model
from lightpeft_dist.pruning.live import live_prune
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.scores import Scores
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.training.hooks import Restructure, StepHooks, Trainee
from lightpeft_dist.training.loop import linear_schedule, make_engine
from lightpeft_dist.training.zero import prepare_ds_config, zero3_loading
from tiny import randomize_lora, tiny_model

STEPS, GRAD_ACCUM, ROWS, SEQ = 5, 2, 4, 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_source(path: Path, layout: str = "llama-gqa") -> Path:
    tiny_model(layout).save_pretrained(path)
    return path


class Batches:
    """Step-indexed batches of ROWS full-length rows (no padding, so a rank's token mean averages exactly), this
    rank's share of them."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def batch_for_step(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 60, (ROWS, SEQ), generator=torch.Generator().manual_seed(i))
        per = ROWS // self.world
        ids = ids[self.rank * per:(self.rank + 1) * per]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def ds_config(path: str | None, rt: Runtime, hidden: int) -> dict | None:
    stage = SimpleNamespace(batch_size=ROWS * GRAD_ACCUM, grad_accum=GRAD_ACCUM, max_grad_norm=1.0)
    return prepare_ds_config(path, stage, "float32", hidden, None, rt.world_size)


def builder(source: Path, workdir: Path, rt: Runtime, ds_cfg: dict | None = None, dropout: float = 0.0,
            steps: int = STEPS) -> Callable[[dict | None], Trainee]:
    """build(meta) -> Trainee: the initial LoRA model (meta None or without structure) or the restructured one."""
    def load(model_dir: str) -> torch.nn.Module:
        model = load_model(model_dir)
        model.config.use_cache = False
        return model

    def build(meta: dict | None = None) -> Trainee:
        structure = (meta or {}).get("structure") or {}
        with zero3_loading(ds_cfg):
            if structure:
                model = structured_model(structure, str(source), workdir, rt, load)
            else:
                model = get_peft_model(load(str(source)), lora_config(PeftConfig(r=4, alpha=8, dropout=dropout,
                                                                                  targets=TARGETS)))
                randomize_lora(model)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.01)
            engine = make_engine(model, optimizer, linear_schedule(optimizer, steps, warmup=1), GRAD_ACCUM, 1.0,
                                 ds_cfg, rt)
        return Trainee(model, engine, named, dict(structure))

    return build


def make_test_plan(source: Path, attn_ratio: float = 0.34, ffn_ratio: float = 0.3, seed: int = 0,
                   peft: dict[str, int] | None = None) -> dict:
    """A plan from the shared planner over seeded random unit scores; `peft` (module -> rank) keeps every rank."""
    config = load_config(str(source))
    shapes = config_layer_shapes(config)
    g = torch.Generator().manual_seed(seed)
    scores = Scores([torch.rand(s["num_attention_heads"], generator=g) for s in shapes],
                    [torch.rand(s["intermediate_size"], generator=g) for s in shapes],
                    {m: 1.0 for m in peft or {}}, {m: torch.ones(r) for m, r in (peft or {}).items()})
    cfg = PruneConfig(attn_ratio=attn_ratio, ffn_ratio=ffn_ratio, module_ratio=0.0, rank_ratio=0.0,
                      ffn_scope="layerwise")
    return make_plan(scores, shapes, cfg, fingerprint(config), config.hidden_size, head_dim_of(config))


class Scripted(StepHooks):
    """Returns `actions[step](trainee)` after that optimizer step."""

    def __init__(self, trainee: Trainee, actions: dict[int, Callable[[Trainee], Restructure | None]]):
        self.trainee, self.actions = trainee, actions

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        act = self.actions.get(step)
        return act(self.trainee) if act else None


def apt_like_hooks(trainee: Trainee, rt: Runtime, source: Path, grow_at: int = 1, prune_at: int = 2,
                   max_rank: int = 12) -> tuple[LoraRankSalience, Scripted]:
    """What APT's gradual mode does with the kit: track salience; grow the top half by it (budget x2 over one
    event), reset the scores; prune physically to a plan one step later."""
    tracker = LoraRankSalience(trainee, rt)
    config = load_config(str(source))

    def growth(t: Trainee) -> Restructure | None:
        ranks = lora_layout(t.model)["ranks"]
        new = growth_targets(ranks, tracker.module_scores(), budget_at(lora_budget(ranks), 2.0, 1, 1), max_rank)
        tracker.reset()
        return grow(t.model, new, seed=11)

    def prune(t: Trainee) -> Restructure:
        return live_prune(make_test_plan(source), config, lora_layout(t.model))

    return tracker, Scripted(trainee, {grow_at: growth, prune_at: prune})
