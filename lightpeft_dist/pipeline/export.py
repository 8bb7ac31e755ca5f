"""Stage 6: the deliverable. Merge the trained adapters (LoRA) into the pruned model and save one HF checkpoint.

Serving stacks and other trainers want a plain `from_pretrained` folder, not a base plus an adapter with per-module
ranks. The merge happens in float32 (the pruned base is read from disk in full precision, also after QLoRA
training, whose 4-bit base is only a training-time view of the same weights) and is cast to the recipe's dtype
afterwards. A uniform plan exports a stock config that loads with plain transformers; per-layer shapes export the
`lightpeft_<family>` config, which loads after `import lightpeft_dist`. A kind that cannot be merged (the bottleneck
adapter is nonlinear) makes the export a one-line error: its registry entry says why (adapters/registry.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..adapters.registry import count_parameters, saved_kinds
from ..config import Recipe
from ..errors import LightPeftError
from ..io_utils import atomic_dir, read_json, sha256_file, sha256_json, write_json
from ..rundir import EXPORT_RECORD, RunDir
from ..training.finite import check_tensors
from .evaluate import trained_plan
from ..models.loading import DTYPES, load_model, load_tokenizer

log = logging.getLogger(__name__)


def export_key(recipe: Recipe, run_dir: Path) -> str:
    train = read_json(RunDir(run_dir).train_record, "train record")
    which = {"adapter": "best"} if recipe.eval.adapter == "best" else {}  # last: the key runs always had
    return sha256_json({"train": train["key"], "dtype": recipe.model.dtype, **which})[:16]


def run_export(recipe: Recipe, run_dir: Path) -> Path:
    from .evaluate import chosen_adapter

    adapter, chosen = chosen_adapter(recipe, run_dir)
    log.info("exporting the %s adapter (%s, step %s)", chosen["which"], adapter, chosen["step"])
    kinds = saved_kinds(adapter)
    stuck = [kind for kind, _ in kinds if not kind.mergeable]
    if stuck:
        raise LightPeftError(f"a {stuck[0].name} adapter {stuck[0].not_mergeable}; serve D/pruned_model with "
                             "lightpeft_dist.adapters.registry.load_adapters(model, D/train/adapter) instead of "
                             "exporting")
    if not kinds:
        raise LightPeftError(f"no trained adapter at {adapter}; run the train stage first")
    key = export_key(recipe, run_dir)
    trained_plan(run_dir)  # a clear error, not a size mismatch, when the model was re-pruned since training
    plan_hash = read_json(RunDir(run_dir).prune_record, "prune record")["plan_hash"]
    merged = load_model(str(RunDir(run_dir).pruned_model), "float32", "sdpa")
    for kind, path in kinds:
        merged = kind.merge(merged, path)
    merged = merged.to(DTYPES[recipe.model.dtype])
    out = RunDir(run_dir).export
    check_tensors("the merged model's weights", merged.state_dict(), "the pruned model or the trained adapter "
                  "is not finite; rerun train (with a lower train.lr if it diverged)")
    params = count_parameters(merged)["total"]
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(recipe.model).save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        write_json(tmp / EXPORT_RECORD, {
            "key": key, "dtype": recipe.model.dtype, "architecture": type(merged).__name__,
            "model_type": merged.config.model_type, "params": params,
            "plan_hash": plan_hash, "adapter": chosen,
            "weights_sha256": {name: sha256_file(tmp / name)[:16] for name in weights}})
    needs = "plain transformers" if not getattr(merged.config, "layer_shapes", None) else "`import lightpeft_dist` first"
    log.info("exported the merged model to %s (%s, %s params, %s; loads with %s)", out, type(merged).__name__,
             f"{params:,}", recipe.model.dtype, needs)
    del merged
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out
