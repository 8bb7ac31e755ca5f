"""PrunePEFT on a pruned base: heads and FFN neurons planned from another strategy's unit scores, then the PEFT
module search on the sliced model (`prunepeft.base_scores`; docs/method.md, "PrunePEFT").

Why this shape: the shared planner must reproduce both choices from one scores file. The search's scores file
therefore carries the base file's head and FFN scores unchanged, and the plan is made with the recipe's
`prune.attn_ratio` / `ffn_ratio` (and the rest of `prune:`), exactly as the search made its base plan. The pruned
base the rounds train on is sliced with the shared slicer into the search's working folder and removed afterwards.
The estimation adapter is saved at the full model's shapes (the rounds' LoRA weights scattered back to the kept
rows and columns, zeros elsewhere), so the shared prune stage slices it back to exactly what the search trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import PruneConfig, Recipe
from ...errors import LightPeftError
from ...models.families import family_for, head_dim_of
from ...pruning.plan import make_plan
from ...pruning.scores import Scores, load_scores
from ...pruning.slicing import ADAPTER_PREFIX, slicing_table
from ...models.loading import fingerprint
from .section import PrunePeftConfig


from ...rundir import SCORE_FILES

UNIT_SCORES = tuple(SCORE_FILES)  # Light-PEFT's estimate writes every one of them (strategies/lightpeft.py)


def base_scores_path(cfg: PrunePeftConfig) -> Path | None:
    """The unit-scores file named by `base_scores` (None: no base pruning, or Light-PEFT's estimate run inline)."""
    return None if cfg.base_scores == "none" or cfg.base_scores in UNIT_SCORES else Path(cfg.base_scores).resolve()


def prunes_base(cfg: PrunePeftConfig) -> bool:
    return cfg.base_scores != "none"


def estimate_base(recipe: Recipe, work: Path, rt, deepspeed: str | None) -> Path:
    """Light-PEFT's masked estimate (the recipe's `estimate:` and `peft:`) in the search's working folder; the
    unit-scores file that `base_scores` names."""
    from ..lightpeft import run_estimate
    from ...rundir import RunDir

    run_estimate(recipe, work / "base", rt, deepspeed)
    return RunDir(work / "base").scores(recipe.section("prunepeft").base_scores)


def load_base_scores(path: Path, shapes: list[dict]) -> Scores:
    if not path.is_file():
        raise LightPeftError(f"prunepeft.base_scores: no scores file at {path}; give a unit-scores file such as "
                             "another run's estimate/taylor_scores.safetensors, or none")
    scores = load_scores(path, {"layer_shapes": shapes})
    return Scores(head=scores.head, ffn=scores.ffn)


def base_plan(scores: Scores, shapes: list[dict], prune: PruneConfig, config) -> dict:
    """Heads and FFN neurons kept on the base (no PEFT modules): what the final plan's layers must equal."""
    return make_plan(Scores(head=scores.head, ffn=scores.ffn), shapes, prune, fingerprint(config), config.hidden_size,
                     head_dim_of(config))


def _full_width(shape: dict, unit: str, head_dim: int) -> int:
    if unit == "ffn":
        return shape["intermediate_size"]
    return head_dim * shape["num_attention_heads" if unit == "q_heads" else "num_key_value_heads"]


def unslice_lora(state: dict[str, torch.Tensor], plan: dict, shapes: list[dict], config) -> dict[str, torch.Tensor]:
    """LoRA tensors of the pruned base placed at the full model's shapes (zeros at pruned rows/columns), so that
    slicing them with `plan` (pruning/slicing.py `prune_adapter`) gives them back exactly."""
    spec, hd = family_for(config), head_dim_of(config)
    table = slicing_table(spec, plan, hd)
    out = {}
    for name, value in state.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            out[name] = value
            continue
        module = name.removeprefix(ADAPTER_PREFIX).split(".lora_")[0]
        layer, proj = int(module.split(".")[-3]), module.split(".")[-1]
        side, unit = spec.slicing[proj]
        _, idx = table[module]
        width = _full_width(shapes[layer], unit, hd)
        if side == "out" and ".lora_B." in name:
            full = value.new_zeros(width, value.shape[1])
            full[idx] = value
        elif side == "in" and ".lora_A." in name:
            full = value.new_zeros(value.shape[0], width)
            full[:, idx] = value
        else:
            full = value
        out[name] = full
    return out


def check_base_recipe(recipe: Recipe) -> None:
    """With base_scores the base is pruned at the recipe's attn/ffn ratios; without, those must stay unset."""
    cfg: PrunePeftConfig = recipe.section("prunepeft")
    if cfg.base_scores == "none":
        defaults = PruneConfig()
        for key in ("attn_ratio", "ffn_ratio"):
            if getattr(recipe.prune, key) != getattr(defaults, key):
                raise ValueError(f"prune.{key} prunes the base model, which needs unit scores: set "
                                 f"prunepeft.base_scores to a unit-scores file, or remove prune.{key}")
