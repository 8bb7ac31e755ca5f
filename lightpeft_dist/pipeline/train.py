"""Stage 4: fine-tuning the pruned model's adapters (LoRA, or whichever kinds the recipe has).

Starts from the pruned checkpoint and, by default, the sliced estimation adapters (warm start, as the reference does;
`train.warm_start: false` re-initialises them with the same per-module ranks and sizes). Masks and importance
tracking are off here: the reference left tracking on in stage 2, which slowed it and leaked memory (docs/method.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..adapters.registry import count_parameters, load_adapters, save_adapters, saved_kinds
from ..config import Recipe, keyed_section
from ..errors import LightPeftError
from ..training.distill import make_distiller
from .evaluate import task_metrics
from ..models.fastpath import prepare_for_training
from ..io_utils import atomic_dir, read_json, sha256_json, write_json
from ..training.finite import DIVERGED, check_tensors
from ..training.hooks import HookList, StepHooks, Trainee
from ..training.loop import linear_schedule, make_engine, run_steps, train_batches
from ..models.loading import load_config, load_model, load_tokenizer
from ..data.packing import packed_batches
from ..rundir import ADAPTER, RunDir, TRAIN_RECORD
from ..runtime import Runtime, current
from ..training.zero import full_state, prepare_ds_config, zero3_loading

log = logging.getLogger(__name__)


def train_key(recipe: Recipe, run_dir: Path) -> str:
    prune_record = read_json(RunDir(run_dir).prune_record, "prune record")
    return sha256_json({"plan": prune_record["plan_hash"], "train": keyed_section(recipe, "train"),
                        "data": keyed_section(recipe, "data")})[:16]


def load_trainable(run_dir: Path, recipe: Recipe) -> torch.nn.Module:
    model = load_model(str(RunDir(run_dir).pruned_model), recipe.model.dtype, recipe.model.attn_implementation,
                       load_in_4bit=recipe.train.load_in_4bit)
    model = prepare_for_training(model, recipe.train)  # QLoRA preparation, gradient checkpointing, no KV cache
    return load_adapters(model, RunDir(run_dir).pruned_adapter, trainable=True, weights=recipe.train.warm_start)


def run_train(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None,
              on_trained: Callable[[torch.nn.Module], None] | None = None, hooks: StepHooks | None = None) -> dict:
    """Fine-tune on every rank of the job (collective); rank 0 writes `run_dir/train/`.

    The pruned checkpoint is loaded afresh (under `zero.Init` with a ZeRO-3 config), so its new shapes are
    partitioned over however many ranks this job has, whatever the estimation job had. `on_trained(model)` runs
    on every rank after the last step (e.g. a collective evaluation of the live, partitioned model). `hooks` run
    after the stage's own (distillation, periodic eval); a restructure they ask for rebuilds the same pruned model.
    """
    rt = runtime or current()
    cfg = recipe.train
    # read before training: the record must name the plan of the model actually trained, even if re-pruned meanwhile
    key, plan_hash = train_key(recipe, run_dir), read_json(RunDir(run_dir).prune_record, "prune record")["plan_hash"]
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    pruned_config = load_config(str(RunDir(run_dir).pruned_model))
    ds_cfg = prepare_ds_config(deepspeed, cfg, recipe.model.dtype, pruned_config.hidden_size, None, rt.world_size)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)
    if cfg.packing:  # batch_size then counts packed rows of seq_len tokens
        batches = packed_batches(batches, cfg.seq_len, tokenizer.pad_token_id)

    def build(meta: dict | None = None) -> Trainee:
        if meta and meta.get("structure"):
            raise LightPeftError(f"the train stage rebuilds only the pruned model it was given, not the structure "
                                 f"{sorted(meta['structure'])} a hook asked for")
        with zero3_loading(ds_cfg):
            model = load_trainable(run_dir, recipe)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
            scheduler = linear_schedule(optimizer, cfg.steps, warmup=int(cfg.warmup_ratio * cfg.steps))
            engine = make_engine(model, optimizer, scheduler, cfg.grad_accum, cfg.max_grad_norm, ds_cfg, rt)
        return Trainee(model, engine, named)

    trainee = build()
    params = count_parameters(trainee.model)
    log.info("train: %d steps on the pruned model (%s params, %s trainable)", cfg.steps, f"{params['total']:,}",
             f"{params['trainable']:,}")
    periodic_eval = PeriodicEval(trainee, tokenizer, recipe)
    distiller = make_distiller(recipe, rt.device, tokenizer.pad_token_id)
    t0 = time.time()
    stats = run_steps(trainee, batches, cfg.steps, cfg.grad_accum, rt, "train", seed=cfg.seed, rebuild=build,
                      hooks=HookList([distiller, periodic_eval, hooks]))
    evals = periodic_eval.evals
    if on_trained is not None:
        on_trained(trainee.engine.module)
    model, named = trainee.model, trainee.named
    adapter_state = full_state(named)  # collective under ZeRO-3: the saved adapter is complete, never shape [0]
    check_tensors("the trained adapter's weights", adapter_state, DIVERGED.format(stage="train"))  # on every rank
    record = {"key": key, "steps": cfg.steps, "losses": stats.losses, "plan_hash": plan_hash,
              "tokens": stats.tokens * rt.world_size, "train_seconds": stats.seconds,
              "tokens_per_s": stats.tokens * rt.world_size / max(stats.seconds, 1e-9),
              "wall_seconds": time.time() - t0, "params": params, "evals": evals, "world_size": rt.world_size,
              "peak_memory_bytes": peak_memory_bytes(), "deepspeed": ds_cfg,
              "distill": None if distiller is None else {"weight": cfg.distill_weight,
                                                         "temperature": cfg.distill_temperature,
                                                         "teacher": recipe.model.path, "last_kl": distiller.last_kl}}
    if rt.is_main:
        with atomic_dir(RunDir(run_dir).train) as tmp:
            kinds = [kind for kind, _ in saved_kinds(RunDir(run_dir).pruned_adapter)]
            save_adapters(tmp / ADAPTER, model, adapter_state, kinds)  # the layout it was loaded from
            write_json(tmp / TRAIN_RECORD, record)
        log.info("train finished: loss %.4f -> %.4f, %.0f tokens/s", stats.losses[0], stats.losses[-1],
                 record["tokens_per_s"])
    rt.barrier()
    return record


class PeriodicEval(StepHooks):
    """Task metrics on the eval split every `train.eval_every` optimizer steps (not after the last: the evaluate
    stage does that), on whatever model the trainee holds then."""

    def __init__(self, trainee: Trainee, tokenizer, recipe: Recipe):
        self.trainee, self.tokenizer, self.recipe = trainee, tokenizer, recipe
        self.evals: list[dict] = []

    def after_optimizer_step(self, step: int, loss: float) -> None:
        every, steps = self.recipe.train.eval_every, self.recipe.train.steps
        if every and (step + 1) % every == 0 and step + 1 < steps and self.recipe.data.eval_file:
            model = self.trainee.model
            self.evals.append({"step": step + 1, **task_metrics(model, self.tokenizer, self.recipe, "eval")})
            model.train()
            log.info("step %d eval: %s", step + 1, self.evals[-1])


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
