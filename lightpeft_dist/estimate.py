"""Stage 1, the Light-PEFT scoring strategy: a short masked run that learns what to prune.

Masks on heads and FFN neurons (L1-penalised, their own optimizer groups) train together with LoRA on all target
projections for a fixed step budget with a linearly decaying LR; PEFT module and rank importance are tracked on the
way (see importance.py). The output is a `Scores` file plus the estimation adapter, which warm-starts training after
pruning (spec 3).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .config import Recipe, recipe_to_dict
from .families import head_dim_of, layer_shapes
from .importance import PeftImportanceTracker
from .io_utils import atomic_dir, sha256_json, write_json
from .loop import PlainEngine, linear_schedule, run_steps, train_batches
from .masks import attach_masks, mask_parameters
from .models import attach_lora, fingerprint, load_model, load_tokenizer
from .runtime import Runtime, current
from .scores import Scores, save_scores

log = logging.getLogger(__name__)


def estimate_key(recipe: Recipe) -> str:
    """Hash of everything estimation depends on; a finished estimate with the same key is reused."""
    d = recipe_to_dict(recipe)
    return sha256_json({k: d[k] for k in ("model", "data", "peft", "estimate")})[:16]


def run_estimate(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None) -> dict:
    rt = runtime or current()
    cfg = recipe.estimate
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
    base_config, shapes = model.config, layer_shapes(model)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)

    model = attach_lora(model, recipe.peft).to(rt.device)
    attach_masks(model)
    head_masks, ffn_masks = mask_parameters(model)
    tracker = PeftImportanceTracker(model, cfg.steps, rt)
    peft_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    mask_lr = cfg.lr * cfg.mask_lr_coef
    optimizer = torch.optim.AdamW([
        {"params": peft_params, "lr": cfg.lr, "name": "peft"},
        {"params": head_masks, "lr": mask_lr, "name": "head_masks"},
        {"params": ffn_masks, "lr": mask_lr, "name": "ffn_masks"},
    ], weight_decay=0.0)
    engine = PlainEngine(model, optimizer, linear_schedule(optimizer, cfg.steps), cfg.grad_accum, cfg.max_grad_norm)

    def l1() -> torch.Tensor:  # a sum, not a mean (spec 1.2)
        return cfg.l1 * (sum(m.abs().sum() for m in head_masks) + sum(m.abs().sum() for m in ffn_masks))

    def before_forward(batch: dict) -> None:
        tracker.recording, tracker.token_mask = True, batch["attention_mask"]

    def after_forward() -> None:
        tracker.recording = False

    log.info("estimate: %d steps, batch %d, %d LoRA modules, %d head masks, %d FFN masks", cfg.steps,
             cfg.batch_size, len(tracker.modules), sum(m.numel() for m in head_masks),
             sum(m.numel() for m in ffn_masks))
    t0 = time.time()
    stats = run_steps(model, engine, batches, cfg.steps, cfg.grad_accum, rt, "estimate", extra_loss=l1,
                      before_forward=before_forward, after_forward=after_forward,
                      after_step=lambda step, loss: tracker.end_step(step))
    module_scores, rank_scores = tracker.results()
    tracker.remove()
    scores = Scores(head=[m.detach().float().cpu() for m in head_masks],
                    ffn=[m.detach().float().cpu() for m in ffn_masks], module=module_scores, rank=rank_scores)
    record = {
        "key": estimate_key(recipe), "strategy": "lightpeft", "model_path": recipe.model.path,
        "model_fingerprint": fingerprint(base_config), "layer_shapes": shapes,
        "hidden_size": base_config.hidden_size, "head_dim": head_dim_of(base_config),
        "steps": cfg.steps, "seed": cfg.seed, "world_size": rt.world_size, "losses": stats.losses,
        "tokens": stats.tokens * rt.world_size, "train_seconds": stats.seconds, "wall_seconds": time.time() - t0,
        "recipe": recipe_to_dict(recipe),
    }
    if rt.is_main:
        write_estimate(run_dir / "estimate", scores, model, record)
    rt.barrier()
    return record


def write_estimate(out_dir: Path, scores: Scores, peft_model, record: dict) -> None:
    with atomic_dir(out_dir) as tmp:
        save_scores(tmp / "scores.safetensors", scores, metadata={"strategy": record["strategy"]})
        peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        write_json(tmp / "estimate.json", record)
    masks = torch.cat([*scores.head, *scores.ffn])
    log.info("estimate written to %s: mask range [%.4f, %.4f], mean module score %.4f", out_dir,
             float(masks.min()), float(masks.max()),
             sum(scores.module.values()) / max(1, len(scores.module)))


