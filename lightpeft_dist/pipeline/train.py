"""Stage 4: LoRA fine-tuning of the pruned model.

Starts from the pruned checkpoint and, by default, the sliced estimation adapter (warm start, as the reference does;
`train.warm_start: false` re-initialises LoRA with the same per-module ranks). Masks and importance tracking are off
here: the reference left tracking on in stage 2, which slowed it and leaked memory (spec 6.1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..adapters.bottleneck import adapter_config, load_bottleneck, save_bottleneck
from ..config import Recipe, keyed_section
from ..training.distill import make_distiller
from .evaluate import task_metrics
from ..models.fastpath import prepare_for_training
from ..io_utils import atomic_dir, read_json, sha256_json, write_json
from ..training.loop import linear_schedule, make_engine, run_steps, train_batches
from ..models.loading import count_parameters, load_config, load_model, load_tokenizer
from ..data.packing import packed_batches
from ..rundir import RunDir
from ..runtime import Runtime, current
from ..training.zero import full_state, prepare_ds_config, zero3_loading

log = logging.getLogger(__name__)


def train_key(recipe: Recipe, run_dir: Path) -> str:
    prune_record = read_json(RunDir(run_dir).prune_record, "prune record")
    return sha256_json({"plan": prune_record["plan_hash"], "train": keyed_section(recipe, "train"),
                        "data": keyed_section(recipe, "data")})[:16]


def load_trainable(run_dir: Path, recipe: Recipe) -> PeftModel:
    model = load_model(str(run_dir / "pruned_model"), recipe.model.dtype, recipe.model.attn_implementation,
                       load_in_4bit=recipe.train.load_in_4bit)
    model = prepare_for_training(model, recipe.train)  # QLoRA preparation, gradient checkpointing, no KV cache
    adapter = run_dir / "pruned_adapter"
    if recipe.peft.type == "adapter":  # bottleneck adapter, our own format (bottleneck.py)
        return load_bottleneck(model, adapter, trainable=True, weights=recipe.train.warm_start)
    if recipe.train.warm_start:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    cfg = read_json(adapter / "adapter_config.json", "pruned adapter config")
    fields = {k: cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern")}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **fields))


def run_train(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None,
              on_trained: Callable[[torch.nn.Module], None] | None = None) -> dict:
    """Fine-tune on every rank of the job (collective); rank 0 writes `run_dir/train/`.

    The pruned checkpoint is loaded afresh (under `zero.Init` with a ZeRO-3 config), so its new shapes are
    partitioned over however many ranks this job has, whatever the estimation job had. `on_trained(model)` runs
    on every rank after the last step (e.g. a collective evaluation of the live, partitioned model).
    """
    rt = runtime or current()
    cfg = recipe.train
    # read before training: the record must name the plan of the model actually trained, even if re-pruned meanwhile
    key, plan_hash = train_key(recipe, run_dir), read_json(RunDir(run_dir).prune_record, "prune record")["plan_hash"]
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    pruned_config = load_config(str(run_dir / "pruned_model"))
    ds_cfg = prepare_ds_config(deepspeed, cfg, recipe.model.dtype, pruned_config.hidden_size, None, rt.world_size)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)
    if cfg.packing:  # batch_size then counts packed rows of seq_len tokens
        batches = packed_batches(batches, cfg.seq_len, tokenizer.pad_token_id)
    with zero3_loading(ds_cfg):
        model = load_trainable(run_dir, recipe)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = linear_schedule(optimizer, cfg.steps, warmup=int(cfg.warmup_ratio * cfg.steps))
        engine = make_engine(model, optimizer, scheduler, cfg.grad_accum, cfg.max_grad_norm, ds_cfg, rt)
    params = count_parameters(model)
    log.info("train: %d steps on the pruned model (%s params, %s trainable)", cfg.steps, f"{params['total']:,}",
             f"{params['trainable']:,}")
    evals: list[dict] = []

    def after_step(step: int, loss: float) -> None:
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and recipe.data.eval_file:
            evals.append({"step": step + 1, **task_metrics(model, tokenizer, recipe, "eval")})
            model.train()
            log.info("step %d eval: %s", step + 1, evals[-1])

    distiller = make_distiller(recipe, rt.device, tokenizer.pad_token_id)
    t0 = time.time()
    stats = run_steps(model, engine, batches, cfg.steps, cfg.grad_accum, rt, "train", after_step=after_step,
                      seed=cfg.seed, loss_fn=distiller)
    if on_trained is not None:
        on_trained(engine.module)
    adapter_state = full_state(named)  # collective under ZeRO-3: the saved adapter is complete, never shape [0]
    record = {"key": key, "steps": cfg.steps, "losses": stats.losses, "plan_hash": plan_hash,
              "tokens": stats.tokens * rt.world_size, "train_seconds": stats.seconds,
              "tokens_per_s": stats.tokens * rt.world_size / max(stats.seconds, 1e-9),
              "wall_seconds": time.time() - t0, "params": params, "evals": evals, "world_size": rt.world_size,
              "peak_memory_bytes": peak_memory_bytes(), "deepspeed": ds_cfg,
              "distill": None if distiller is None else {"weight": cfg.distill_weight,
                                                         "temperature": cfg.distill_temperature,
                                                         "teacher": recipe.model.path, "last_kl": distiller.last_kl}}
    if rt.is_main:
        with atomic_dir(run_dir / "train") as tmp:
            if recipe.peft.type == "adapter":
                save_bottleneck(tmp / "adapter", adapter_state, adapter_config(model))
            else:
                model.save_pretrained(tmp / "adapter", state_dict=adapter_state, safe_serialization=True)
            write_json(tmp / "train.json", record)
        log.info("train finished: loss %.4f -> %.4f, %.0f tokens/s", stats.losses[0], stats.losses[-1],
                 record["tokens_per_s"])
    rt.barrier()
    return record


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
