"""Stage 4: fine-tuning the pruned model's adapters (LoRA, or whichever kinds the recipe has).

Starts from the pruned checkpoint and, by default, the sliced estimation adapters (warm start, as the reference does;
`train.warm_start: false` re-initialises them with the same per-module ranks and sizes). Masks and importance
tracking are off here: the reference left tracking on in stage 2, which slowed it and leaked memory (docs/method.md).

With `train.checkpoint_every` the stage checkpoints to D/train.ckpt (the estimate's world-size-independent format)
and a rerun with the same train key resumes from it on any world size, so Slurm requeues and Ray restarts continue
training instead of starting over. Metrics go to D/logs/train/ (`logging.report_to`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..adapters.registry import count_parameters, load_adapters, save_adapters, saved_kinds
from ..config import Recipe, recipe_to_dict
from ..keys import keyed_section, without_later_defaults
from ..errors import LightPeftError
from ..training.checkpoint import Checkpointing, remove_checkpoints, resume
from ..training.distill import make_distiller
from ..models.fastpath import prepare_for_training
from ..io_utils import atomic_dir, read_json, read_json_if_present, sha256_json, write_json
from ..training.finite import DIVERGED, check_tensors
from ..training.hooks import HookList, StepHooks, Trainee
from ..training.loop import LoopStats, make_engine, peak_memory_bytes, run_steps, train_batches
from ..training.reporters import open_reporter
from ..training.schedules import make_schedule, steps_for
from .train_eval import PeriodicEval
from .train_optimizer import make_optimizer
from ..models.loading import load_config, load_model, load_tokenizer
from ..data.packing import packed_batches
from ..pruning.live import LORA_KEY, PLAN_KEY
from ..rundir import RunDir
from ..runtime import Runtime, current, job_peak_memory, reset_peak_memory
from ..strategies.base import TrainContext
from ..strategies.registry import strategy_for
from .train_structure import (final_plan, fits, remove_live_models, restore_start, started_plan_hash,
                              structured_loader, write_final_model)
from ..training.zero import full_state, prepare_ds_config, zero3_loading

log = logging.getLogger(__name__)


def train_key(recipe: Recipe, run_dir: Path) -> str:
    """The plan training starts from (the prune stage's, even after a training that pruned replaced pruned_model),
    the train and data sections, and the strategy section's fields its train hooks read (`Strategy.train_keys`)."""
    prune_record = read_json(RunDir(run_dir).prune_record, "prune record")
    parts = {"plan": started_plan_hash(prune_record), "train": keyed_section(recipe, "train"),
             "data": keyed_section(recipe, "data")}
    strategy = strategy_for(recipe)
    if strategy.train_keys:  # absent for strategies without train hooks, so their keys are unchanged
        section = without_later_defaults(strategy.section, recipe.section(strategy.section).model_dump(mode="json"))
        picked = {k: section[k] for k in strategy.train_keys if k in section}
        if picked:  # a field added later and switched off leaves the key as it was (keys.ADDED_LATER)
            parts[strategy.section] = picked
    return sha256_json(parts)[:16]


def trained(run_dir: Path) -> str | None:
    """The train stage's recorded key, once its whole output is written: the record's plan_hash (the plan of the model
    its adapter belongs to) is pruned_model/'s, which a training that pruned physically replaces after writing train/
    (docs/architecture.md, "Pruning inside training")."""
    d = RunDir(run_dir)
    try:
        record = read_json_if_present(d.train_record)
        prune_record = read_json_if_present(d.prune_record)
    except LightPeftError:
        return None
    if not record or not prune_record:
        return None
    trained_on = record.get("plan_hash")  # None: a record from before plans were recorded
    return record.get("key") if trained_on in (None, prune_record.get("plan_hash")) else None


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
    t_stage = time.time()
    reset_peak_memory()
    cfg = recipe.train
    # read before training: the record must name the plan of the model actually trained, even if re-pruned meanwhile
    key, start_plan = train_key(recipe, run_dir), restore_start(recipe, run_dir, rt)
    plan_hash = start_plan["hash"]
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    pruned_config = load_config(str(RunDir(run_dir).pruned_model))
    ds_cfg = prepare_ds_config(deepspeed, cfg, recipe.model.dtype, pruned_config.hidden_size, None, rt.world_size)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)
    if cfg.packing:  # batch_size then counts packed rows of seq_len tokens
        batches = packed_batches(batches, cfg.seq_len, tokenizer.pad_token_id)
    steps = steps_for(cfg.steps, cfg.epochs, len(batches.dataset), cfg.batch_size)

    def load(model_dir: str) -> torch.nn.Module:
        model = load_model(model_dir, recipe.model.dtype, recipe.model.attn_implementation,
                           load_in_4bit=cfg.load_in_4bit)
        return prepare_for_training(model, cfg)

    structured = structured_loader(recipe, run_dir, start_plan, rt, load)
    strategy = strategy_for(recipe)
    kind_lrs = strategy.kind_lrs(recipe) if strategy.kind_lrs else None  # None: one group at train.lr
    if kind_lrs:
        log.info("train: learning rate per adapter kind %s (the schedule scales them all)", kind_lrs)

    def build(meta: dict | None = None) -> Trainee:
        """The pruned model with its adapters, or, after a restructure (meta["structure"]), the model it made."""
        structure = (meta or {}).get("structure") or {}
        with zero3_loading(ds_cfg):
            model = structured(structure) if structure else load_trainable(run_dir, recipe)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            optimizer = make_optimizer(named, cfg.lr, cfg.weight_decay, kind_lrs)
            scheduler = make_schedule(optimizer, cfg.lr_scheduler, steps, warmup=int(cfg.warmup_ratio * steps))
            engine = make_engine(model, optimizer, scheduler, cfg.grad_accum, cfg.max_grad_norm, ds_cfg, rt)
        return Trainee(model, engine, named, dict(structure))

    trainee = build()
    params = count_parameters(trainee.model)
    d = RunDir(run_dir)
    periodic_eval = PeriodicEval(trainee, tokenizer, recipe, steps)
    distiller = make_distiller(recipe, rt.device, tokenizer.pad_token_id)
    own = strategy.train_hooks(TrainContext(recipe, Path(run_dir), rt, trainee, start_plan,
                                            load_config(recipe.model.path), steps)) if strategy.train_hooks else None
    all_hooks, stats = HookList([distiller, periodic_eval, own, hooks]), LoopStats()
    start = resume(d.checkpoint("train"), trainee, all_hooks, rt, "training", accept=_same_key(key), rebuild=build,
                   loop=stats)
    log.info("train: steps %d..%d on the pruned model (%s params, %s trainable)", start, steps,
             f"{params['total']:,}", f"{params['trainable']:,}")
    reporter = open_reporter(recipe.logging.report_to, d.stage_logs("train"), "train", rt, start,
                             config=recipe_to_dict(recipe))
    periodic_eval.reporter = reporter
    all_hooks.hooks.append(reporter)
    t0 = time.time()
    try:
        stats = run_steps(trainee, batches, steps, cfg.grad_accum, rt, "train", seed=cfg.seed, rebuild=build,
                          hooks=all_hooks, start_step=start, stats=stats,
                          checkpoint=Checkpointing(d.checkpoint("train"), cfg.checkpoint_every, {"key": key},
                                                   keep=cfg.keep_checkpoints))
    finally:
        reporter.close()
    if on_trained is not None:
        on_trained(trainee.engine.module)
    model, named = trainee.model, trainee.named
    adapter_state = full_state(named)  # collective under ZeRO-3: the saved adapter is complete, never shape [0]
    check_tensors("the trained adapter's weights", adapter_state, DIVERGED.format(stage="train"))  # on every rank
    end_plan = final_plan(trainee.structure, start_plan)
    wall = time.time() - t0
    record = {"key": key, "steps": steps, "epochs": cfg.epochs, "lr_scheduler": cfg.lr_scheduler,
              "resumed_from_step": start, "losses": stats.losses,
              "plan_hash": (end_plan or start_plan)["hash"], "start_plan_hash": plan_hash,
              "structure": _described(trainee.structure),
              "tokens": stats.job_tokens, "train_seconds": stats.seconds,
              "tokens_per_s": stats.job_tokens / max(stats.seconds, 1e-9),
              "wall_seconds": wall, "params": params, "evals": periodic_eval.evals, "hooks": all_hooks.stage_record(),
              "best": periodic_eval.best, "world_size": rt.world_size,
              "peak_memory_bytes": peak_memory_bytes(), "deepspeed": ds_cfg,
              "stage_seconds": time.time() - t_stage, "peak_memory": job_peak_memory(rt),
              "estimate_budget": estimate_budget(d, steps, stats.job_tokens, wall), "kind_lrs": kind_lrs,
              "distill": None if distiller is None else {"weight": cfg.distill_weight,
                                                         "temperature": cfg.distill_temperature,
                                                         "teacher": recipe.model.path, "last_kl": distiller.last_kl}}
    if rt.is_main:
        kinds = [kind for kind, _ in saved_kinds(d.pruned_adapter)]  # saved in the layout they were loaded from
        with atomic_dir(d.train) as tmp:
            save_adapters(tmp / d.train_adapter.name, model, adapter_state, kinds)
            if periodic_eval.best is not None and fits(periodic_eval.best_state, adapter_state):
                save_adapters(tmp / d.train_best_adapter.name, model, periodic_eval.best_state, kinds)
            elif periodic_eval.best is not None:  # chosen before a restructure: it does not fit the final model
                log.warning("train: the best adapter (step %d) predates the last restructure and is not kept; "
                            "eval.adapter best is unavailable for this run", periodic_eval.best["step"])
                record["best"] = None
            write_json(tmp / d.train_record.name, record)
        if end_plan is not None:  # after train/: a crash in between retrains (trained() is None), never mixes
            write_final_model(recipe, run_dir, start_plan, end_plan, key)
        remove_checkpoints(d.checkpoint("train"))
        remove_live_models(run_dir)
        log.info("train finished: loss %.4f -> %.4f, %.0f tokens/s%s", stats.losses[0], stats.losses[-1],
                 record["tokens_per_s"], "" if periodic_eval.best is None else
                 f"; best adapter at step {periodic_eval.best['step']} ({periodic_eval.best['metric']} "
                 f"{periodic_eval.best['value']:.4f})")
    rt.barrier()
    return record


def _described(structure: dict) -> dict | None:
    """What the train record says about a restructured run: the final plan's hash and the LoRA ranks."""
    if not structure:
        return None
    lora = structure.get(LORA_KEY) or {}
    plan = structure.get(PLAN_KEY)
    return {"plan_hash": plan["hash"] if plan else None, "lora_ranks": lora.get("ranks"),
            "lora_rank_total": sum((lora.get("ranks") or {}).values())}


def _same_key(key: str) -> Callable[[dict, dict[str, torch.Tensor]], str | None]:
    """Why a checkpoint is not this training's to resume from (another plan, train or data section), or None."""
    return lambda meta, tensors: None if meta.get("key") == key else \
        f"it was written for another train key ({meta.get('key')}, now {key})"


def estimate_budget(d: RunDir, steps: int, tokens: int, seconds: float | None = None) -> dict | None:
    """The estimate's (or PrunePEFT search's) cost as a share of this training: steps, tokens and, given this
    training's wall `seconds`, wall time; logged and recorded. None without an estimate record."""
    est = read_json_if_present(d.estimate_record, "estimate record")
    if not est or not est.get("steps"):
        return None
    out = {"steps": est["steps"], "tokens": est.get("tokens", 0), "steps_fraction": est["steps"] / max(steps, 1),
           "tokens_fraction": est.get("tokens", 0) / max(tokens, 1)}
    what = "search" if est.get("strategy") == "prunepeft" else "estimation"
    log.info("%s budget: %d steps (%.1f%% of training's %d), %s tokens (%.1f%% of training's %s)", what,
             out["steps"], 100 * out["steps_fraction"], steps, f"{out['tokens']:,}", 100 * out["tokens_fraction"],
             f"{tokens:,}")
    if seconds is not None and est.get("wall_seconds") is not None:
        out.update(seconds=est["wall_seconds"], train_seconds=seconds,
                   seconds_fraction=est["wall_seconds"] / max(seconds, 1e-9))
        log.info("%s wall time: %.1f s (%.1f%% of training's %.1f s)", what, out["seconds"],
                 100 * out["seconds_fraction"], seconds)
    return out
