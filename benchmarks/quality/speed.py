"""Inference tokens/s of every row, measured round-robin so that all rows see the same machine load.

Each row's evaluate stage times its model once, whenever that row happens to finish; on a shared CPU the load changes
by several times within an hour, so those numbers compare the machine's moods rather than the models. Here every
row's final model (zero-shot: the base; other rows: pruned model + trained adapter) is timed in turn, `rounds` times,
and the median is kept in the row's quality.json (`infer_tokens_per_s`), which the comparison table prefers.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from lightpeft_dist.pipeline.evaluate import eval_split, forward_tokens_per_s
from lightpeft_dist.io_utils import read_json, write_json
from lightpeft_dist.adapters.registry import load_adapters
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pipeline.stages import resolve_recipe
from lightpeft_dist.rundir import RunDir

log = logging.getLogger("quality.speed")


def _load(row: Path, recipe):
    if RunDir(row).pruned_model.is_dir():
        model = load_model(str(RunDir(row).pruned_model), recipe.model.dtype, recipe.model.attn_implementation)
        return load_adapters(model, RunDir(row).train_adapter)  # every kind (LoRA, bottleneck)
    return load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)


def speed_pass(rows: list[Path], base_recipe, rounds: int) -> dict[str, float]:
    """Median forward tokens/s per row over `rounds` interleaved rounds; written into each row's quality.json."""
    times: dict[Path, list[float]] = {r: [] for r in rows}
    tokenizer = load_tokenizer(base_recipe.model)
    for i in range(rounds):
        for row in rows:
            recipe = resolve_recipe(row, None, []) if RunDir(row).recipe.is_file() else base_recipe
            model = _load(row, recipe)
            times[row].append(forward_tokens_per_s(model, tokenizer, recipe, eval_split(recipe)))
            del model
        log.info("speed round %d/%d: %s", i + 1, rounds, {r.name: round(t[-1]) for r, t in times.items()})
    out = {}
    for row, ts in times.items():
        q_path = RunDir(row).quality_record
        q = read_json(q_path)
        q["infer_tokens_per_s"], q["infer_rounds"] = statistics.median(ts), ts
        write_json(q_path, q)
        out[str(row)] = q["infer_tokens_per_s"]
    return out
