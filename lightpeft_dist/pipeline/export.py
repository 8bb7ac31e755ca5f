"""Stage 6: the deliverable. Merge the trained LoRA adapter into the pruned model and save one HF checkpoint.

Serving stacks and other trainers want a plain `from_pretrained` folder, not a base plus an adapter with per-module
ranks. The merge happens in float32 (the pruned base is read from disk in full precision, also after QLoRA
training, whose 4-bit base is only a training-time view of the same weights) and is cast to the recipe's dtype
afterwards. A uniform plan exports a stock config that loads with plain transformers; per-layer shapes export the
`lightpeft_<family>` config, which loads after `import lightpeft_dist`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..adapters.bottleneck import is_bottleneck_dir
from ..config import Recipe
from ..errors import LightPeftError
from ..io_utils import atomic_dir, read_json, sha256_file, sha256_json, write_json
from ..rundir import RunDir
from ..models.loading import DTYPES, count_parameters, load_model, load_tokenizer

log = logging.getLogger(__name__)


def export_key(recipe: Recipe, run_dir: Path) -> str:
    train = read_json(RunDir(run_dir).train_record, "train record")
    which = {"adapter": "best"} if recipe.eval.adapter == "best" else {}  # last: the key runs always had
    return sha256_json({"train": train["key"], "dtype": recipe.model.dtype, **which})[:16]


def run_export(recipe: Recipe, run_dir: Path) -> Path:
    from peft import PeftModel

    from .evaluate import chosen_adapter

    adapter, chosen = chosen_adapter(recipe, run_dir)
    log.info("exporting the %s adapter (%s, step %s)", chosen["which"], adapter, chosen["step"])
    if is_bottleneck_dir(adapter):
        raise LightPeftError("a bottleneck adapter (peft.type: adapter) is a nonlinear module and cannot be merged "
                             "into the weights; serve D/pruned_model with lightpeft_dist.adapters.bottleneck.load_bottleneck "
                             "(D/train/adapter) instead of exporting")
    if not (adapter / "adapter_config.json").is_file():
        raise LightPeftError(f"no trained adapter at {adapter}; run the train stage first")
    key = export_key(recipe, run_dir)
    base = load_model(str(run_dir / "pruned_model"), "float32", "sdpa")
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged = merged.to(DTYPES[recipe.model.dtype])
    out = run_dir / "export"
    params = count_parameters(merged)["total"]
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        load_tokenizer(recipe.model).save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        write_json(tmp / RunDir(run_dir).export_record.name, {
            "key": key, "dtype": recipe.model.dtype, "architecture": type(merged).__name__,
            "model_type": merged.config.model_type, "params": params,
            "plan_hash": read_json(run_dir / "plan.json", "plan").get("hash"), "adapter": chosen,
            "weights_sha256": {name: sha256_file(tmp / name)[:16] for name in weights}})
    needs = "plain transformers" if not getattr(merged.config, "layer_shapes", None) else "`import lightpeft_dist` first"
    log.info("exported the merged model to %s (%s, %s params, %s; loads with %s)", out, type(merged).__name__,
             f"{params:,}", recipe.model.dtype, needs)
    del merged, base
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out
