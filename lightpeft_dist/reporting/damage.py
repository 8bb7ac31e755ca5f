"""Perplexity damage of the pruned base model, per unit-score kind, before any fine-tuning (`lightpeft report
--damage`).

Why: a plan that breaks the base model leaves fine-tuning little to recover, and the quality study showed plans
whose accuracy sat at random's (docs/results.md). For every score file of the estimate (and the random control at
the same ratios) this plans with the run's prune settings and that kind's scores, prunes the base checkpoint into a
temporary folder exactly as `lightpeft prune` does, and measures the perplexity of the pruned model on held-out
text (data/heldout.py; by default the task's validation split, every token scored). It costs one pruned checkpoint
and one pass over the held-out text per kind, which is why it is opt-in.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from ..config import FIRST_ORDER_SCORES, Recipe
from ..data.heldout import heldout_examples
from ..errors import LightPeftError
from ..models.loading import load_model, load_tokenizer
from ..pruning.plan import make_plan
from ..pruning.scores import Scores
from ..pruning.slicing import prune_checkpoint
from ..training.lm_eval import perplexity

log = logging.getLogger(__name__)
DAMAGE_EXAMPLES = 64  # held-out examples (or windows of seq_len tokens) scored per model
BATCH = 4


def pruned_perplexity(recipe: Recipe, record: dict, scores: Scores, prune_cfg, examples: list[dict],
                      tokenizer) -> tuple[float, dict]:
    """(perplexity, plan) of the base checkpoint pruned by `scores` under `prune_cfg`."""
    plan = make_plan(scores, record["layer_shapes"], prune_cfg, record["model_fingerprint"], record["hidden_size"],
                     record["head_dim"])
    tmp = Path(tempfile.mkdtemp(prefix="lightpeft-damage."))
    try:
        prune_checkpoint(recipe.model.path, plan, tmp / "model")
        model = load_model(str(tmp / "model"), recipe.model.dtype, recipe.model.attn_implementation)
        return perplexity(model, tokenizer, examples, BATCH)["perplexity"], plan
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def damage(recipe: Recipe, record: dict, scores: dict[str, Scores], text: str = "validation",
           count: int = DAMAGE_EXAMPLES) -> dict:
    """Unpruned and per-kind pruned perplexity on `text` ('validation', 'brown' or a text file); the random control
    is seeded with prune.seed and keeps the masks' PEFT choices (the PEFT choices do not touch the base anyway)."""
    if not scores:
        raise LightPeftError("no score files to measure damage for; run `lightpeft estimate` first")
    tokenizer = load_tokenizer(recipe.model)
    examples, described = heldout_examples(text, recipe.data, tokenizer, recipe.estimate.seq_len, count)
    base = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
    base_ppl = perplexity(base, tokenizer, examples, BATCH)["perplexity"]
    del base
    log.info("damage: unpruned perplexity %.3f on %s", base_ppl, described)
    rows = []
    first = next(iter(scores))
    runs = [(kind, s, {"unit_scores": kind, "random": False, "random_peft": False}) for kind, s in scores.items()]
    runs.append(("random", scores[first], {"unit_scores": first, "random": True, "random_peft": False}))
    for name, kind_scores, update in runs:
        if recipe.prune.allocation == "budget" and update["unit_scores"] not in FIRST_ORDER_SCORES:
            update = {**update, "allocation": "layerwise"}  # the budget search needs first-order scores (config.py)
        cfg = recipe.prune.model_copy(update=update)
        ppl, plan = pruned_perplexity(recipe, record, kind_scores, cfg, examples, tokenizer)
        rows.append({"scores": name, "perplexity": ppl, "allocation": cfg.allocation,
                     "fraction_pruned": plan["summary"]["prunable_fraction_pruned"]})
        log.info("damage: %s-ranked plan, perplexity %.3f (%.2fx unpruned)", name, ppl, ppl / base_ppl)
    return {"text": described, "source": text, "base": base_ppl, "attn_ratio": recipe.prune.attn_ratio,
            "ffn_ratio": recipe.prune.ffn_ratio, "rows": rows}
