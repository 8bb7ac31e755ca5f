"""The run directory as a chain of resumable stages.

Each stage records a key (a hash of exactly the inputs it consumed) next to its output; `run` skips a stage whose
recorded key matches what it would compute now, and redoes it and everything after it otherwise. Re-planning at new
ratios therefore reuses the estimate, and changing only `train.*` reuses estimate, plan and prune.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from ..adapters.registry import bare_kind, kinds_of, saved_kinds, upgrade_keys
from ..config import Recipe, apply_overrides, load_recipe, recipe_from_dict, recipe_to_dict
from ..errors import LightPeftError
from ..io_utils import read_json, sha256_file, sha256_json, write_json
from ..runtime import Runtime, current
from ..pruning.scores import load_scores

log = logging.getLogger(__name__)
STAGES = ("estimate", "plan", "prune", "train", "evaluate", "export", "report")


def recipe_path(run_dir: Path) -> Path:
    return run_dir / "recipe.yaml"


def resolve_recipe(run_dir: Path, config: str | None, overrides: list[str]) -> Recipe:
    """The recipe given on the command line, else the one the run directory was started with."""
    if config:
        return load_recipe(config, overrides)
    saved = recipe_path(run_dir)
    if not saved.is_file():
        raise LightPeftError(f"no recipe in {run_dir}; pass --config R.yaml (or run estimate there first)")
    raw = apply_overrides(yaml.safe_load(saved.read_text()), overrides)
    return recipe_from_dict(raw, source=str(saved))


def save_recipe(run_dir: Path, recipe: Recipe) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = recipe_path(run_dir).with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    os.replace(tmp, recipe_path(run_dir))


def scores_path(recipe: Recipe, run_dir: Path) -> Path:
    """The estimate's scores file that `prune.unit_scores` selects."""
    from ..strategies.lightpeft import SCORE_FILES

    path = run_dir / "estimate" / SCORE_FILES[recipe.prune.unit_scores]
    if not path.is_file() and (run_dir / "estimate" / "estimate.json").is_file():
        raise LightPeftError(f"{path} not found: this estimate predates prune.unit_scores="
                             f"{recipe.prune.unit_scores}; delete {path.parent} and rerun `lightpeft estimate`")
    return path


def plan_key(recipe: Recipe, run_dir: Path) -> str:
    return sha256_json({"scores": sha256_file(scores_path(recipe, run_dir)),
                        "prune": recipe_to_dict(recipe)["prune"]})[:16]


def run_plan(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None) -> dict:
    """Every rank computes the plan; they must agree on its hash before rank 0 writes it."""
    from ..pruning.plan import make_plan

    rt = runtime or current()
    est = read_json(run_dir / "estimate" / "estimate.json", "estimate record")
    scores = load_scores(scores_path(recipe, run_dir))
    bare = bare_kind(est)  # an older bottleneck run's bare keys are qualified (adapters/registry.py)
    scores.module, scores.rank = upgrade_keys(scores.module, bare), upgrade_keys(scores.rank, bare)
    plan = make_plan(scores, est["layer_shapes"], recipe.prune, est["model_fingerprint"], est["hidden_size"],
                     est["head_dim"])
    plan["key"] = plan_key(recipe, run_dir)
    rt.agree(plan["hash"], "plan hash")
    if rt.is_main:
        write_json(run_dir / "plan.json", plan)
    rt.barrier()
    s = plan["summary"]
    log.info("plan %s: heads %d -> %d, KV heads %d -> %d, FFN %d -> %d, prunable params -%.1f%%, "
             "PEFT modules kept %d, ranks kept %d", plan["hash"], s["before"]["num_attention_heads"],
             s["after"]["num_attention_heads"], s["before"]["num_key_value_heads"], s["after"]["num_key_value_heads"],
             s["before"]["intermediate_size"], s["after"]["intermediate_size"], 100 * s["prunable_fraction_pruned"],
             s["peft_modules_kept"], s["lora_ranks_kept"])
    return plan


def _record_key(path: Path, field: str = "key") -> str | None:
    try:
        return read_json(path).get(field)
    except LightPeftError:
        return None


def stage_done(stage: str, recipe: Recipe, run_dir: Path) -> bool:
    from ..strategies.lightpeft import estimate_key
    from .evaluate import eval_key
    from .export import RECORD, export_key
    from .train import train_key

    try:
        if stage == "estimate":
            return _record_key(run_dir / "estimate" / "estimate.json") == estimate_key(recipe)
        if stage == "plan":
            return _record_key(run_dir / "plan.json") == plan_key(recipe, run_dir)
        if stage == "prune":
            plan_hash = _record_key(run_dir / "plan.json", "hash")
            return (plan_hash is not None and bool(saved_kinds(run_dir / "pruned_adapter"))
                    and _record_key(run_dir / "pruned_model" / "lightpeft_prune.json", "plan_hash") == plan_hash)
        if stage == "train":
            return _record_key(run_dir / "train" / "train.json") == train_key(recipe, run_dir)
        if stage == "evaluate":
            return _record_key(run_dir / "eval.json") == eval_key(recipe, run_dir)
        if stage == "export":
            return _record_key(run_dir / "export" / RECORD) == export_key(run_dir, recipe)
    except (LightPeftError, FileNotFoundError):
        return False
    return False


DISTRIBUTED_STAGES = ("estimate", "train")


def run_stage(stage: str, recipe: Recipe, run_dir: Path, deepspeed: str | None = None) -> None:
    """Run one stage. Under a multi-rank launcher, estimate and train run on every rank; plan is computed on every
    rank and checked to agree; prune, evaluate and report run on rank 0 while the others wait."""
    rt = current()
    if stage == "estimate":
        from ..strategies.lightpeft import run_estimate

        if rt.is_main:
            save_recipe(run_dir, recipe)
        run_estimate(recipe, run_dir, rt, deepspeed=deepspeed)
    elif stage == "train":
        from .train import run_train

        run_train(recipe, run_dir, rt, deepspeed=deepspeed)
    elif stage == "plan":
        run_plan(recipe, run_dir, rt)
    elif rt.is_main:
        _run_single(stage, recipe, run_dir)
    rt.barrier()


def _run_single(stage: str, recipe: Recipe, run_dir: Path) -> None:
    if stage == "prune":
        from ..pruning.slicing import run_prune

        run_prune(run_dir, recipe.model.path)
    elif stage == "evaluate":
        from .evaluate import run_evaluate

        run_evaluate(recipe, run_dir)
    elif stage == "export":
        from .export import run_export

        run_export(recipe, run_dir)
    elif stage == "report":
        from ..reporting.report import write_report

        write_report(run_dir)


def stages_for(recipe: Recipe) -> list[str]:
    """The stages `run` goes through: all of them, except export when a kind cannot be merged (bottleneck)."""
    stuck = [kind.name for kind in kinds_of(recipe.peft) if not kind.mergeable]
    if stuck:
        log.info("stage export: left out, a %s adapter cannot be merged into the weights", " or ".join(stuck))
        return [s for s in STAGES if s != "export"]
    return list(STAGES)


def run_all(recipe: Recipe, run_dir: Path, deepspeed: str | None = None) -> None:
    rt = current()
    if rt.is_main:
        save_recipe(run_dir, recipe)
    rt.barrier()
    stale = False
    for stage in stages_for(recipe):
        done = stage != "report" and not stale and stage_done(stage, recipe, run_dir)
        if all(rt.all_gather_object(done)):
            log.info("stage %s: up to date, skipped", stage)
            continue
        stale = True
        log.info("stage %s: running", stage)
        run_stage(stage, recipe, run_dir, deepspeed=deepspeed)
