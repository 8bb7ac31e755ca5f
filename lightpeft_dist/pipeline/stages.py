"""The run directory as a chain of resumable stages, and the registry every entry point walks.

Each stage records a key (a hash of exactly the inputs it consumed) next to its output; `run` skips a stage whose
recorded key matches what it would compute now, and redoes it and everything after it otherwise. Re-planning at new
ratios therefore reuses the estimate, and changing only `train.*` reuses estimate, plan and prune.

A run's stages are its strategy's own (Light-PEFT: `estimate`) followed by the shared ones below. `lightpeft run`,
the per-stage CLI, Slurm (through the CLI) and the Ray launcher all take them from `stages_for` and `run_pending`,
so which stages exist, which are collective, and when one is up to date is said here once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import yaml

from ..adapters.registry import bare_kind, kinds_of, saved_kinds
from ..config import Recipe, apply_overrides, load_recipe, read_recipe_file, recipe_from_dict, recipe_to_dict
from ..keys import keyed_section, without_later_defaults
from ..pruning.module_keys import upgrade_keys
from ..errors import LightPeftError
from ..io_utils import read_json, read_json_if_present, sha256_file, sha256_json, write_json, write_text
from ..pruning.scores import load_scores
from ..rundir import RunDir
from ..runtime import Runtime, current
from ..strategies.base import Stage, Strategy
from ..strategies.registry import strategy_for

log = logging.getLogger(__name__)


def resolve_recipe(run_dir: Path, config: str | None, overrides: list[str]) -> Recipe:
    """The recipe given on the command line, else the one the run directory was started with."""
    if config:
        return load_recipe(config, overrides)
    saved = RunDir(run_dir).recipe
    if not saved.is_file():
        raise LightPeftError(f"no recipe in {run_dir}; pass --config R.yaml (or run estimate there first)")
    raw = read_recipe_file(saved, "saved recipe", " or pass --config R.yaml to start from a recipe again")
    return recipe_from_dict(apply_overrides(raw, overrides), source=str(saved))


def save_recipe(run_dir: Path, recipe: Recipe) -> None:
    write_text(RunDir(run_dir).recipe, yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def _scoring(recipe: Recipe) -> Strategy:
    strategy = strategy_for(recipe)
    if strategy.scores is None:
        raise LightPeftError(f"strategy {strategy.name} writes its own plan; the shared planner has no scores to read")
    return strategy


def plan_settings(recipe: Recipe, run_dir: Path):
    """The planner's settings: the recipe's `prune:`, or the strategy's own where it decides them (PrunePEFT)."""
    decide = _scoring(recipe).plan_prune
    return recipe.prune if decide is None else decide(recipe, run_dir)


def plan_key(recipe: Recipe, run_dir: Path) -> str:
    scores, _ = _scoring(recipe).scores(recipe, run_dir)
    prune = keyed_section(recipe, "prune")
    if _scoring(recipe).plan_prune is not None:
        prune = without_later_defaults("prune", plan_settings(recipe, run_dir).model_dump(mode="json"))
    return sha256_json({"scores": sha256_file(scores), "prune": prune})[:16]


def run_plan(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None) -> dict:
    """Every rank computes the plan; they must agree on its hash before rank 0 writes it."""
    from ..pruning.plan import make_plan

    rt = runtime or current()
    scores_file, record_file = _scoring(recipe).scores(recipe, run_dir)
    est = read_json(record_file, "estimate record")
    scores = load_scores(scores_file, est)
    bare = bare_kind(est)  # an older bottleneck run's bare keys are qualified (adapters/registry.py)
    scores.module, scores.rank = upgrade_keys(scores.module, bare), upgrade_keys(scores.rank, bare)
    plan = make_plan(scores, est["layer_shapes"], plan_settings(recipe, run_dir), est["model_fingerprint"], est["hidden_size"],
                     est["head_dim"])
    plan["key"] = plan_key(recipe, run_dir)
    rt.agree(plan["hash"], "plan hash")
    s = plan["summary"]
    if rt.is_main:
        write_json(RunDir(run_dir).plan, plan)
        from ..training.reporters import log_once

        log_once(recipe.logging.report_to, RunDir(run_dir).stage_logs("plan"), {
            **{f"plan/kept_{k}": float(v) for k, v in s["after"].items() if isinstance(v, (int, float))},
            "plan/peft_modules_kept": float(s["peft_modules_kept"]), "plan/lora_ranks_kept": float(s["lora_ranks_kept"]),
            "plan/prunable_fraction_pruned": float(s["prunable_fraction_pruned"])})
    rt.barrier()
    log.info("plan %s: heads %d -> %d, KV heads %d -> %d, FFN %d -> %d, prunable params -%.1f%%, "
             "PEFT modules kept %d, ranks kept %d", plan["hash"], s["before"]["num_attention_heads"],
             s["after"]["num_attention_heads"], s["before"]["num_key_value_heads"], s["after"]["num_key_value_heads"],
             s["before"]["intermediate_size"], s["after"]["intermediate_size"], 100 * s["prunable_fraction_pruned"],
             s["peft_modules_kept"], s["lora_ranks_kept"])
    return plan


def recorded(path: Callable[[RunDir], Path], field: str = "key") -> Callable[[Path], str | None]:
    """The `recorded` reader of a stage whose finished output is the JSON record at `path(RunDir(run_dir))`."""

    def read(run_dir: Path) -> str | None:
        try:
            return (read_json_if_present(path(RunDir(run_dir))) or {}).get(field)
        except LightPeftError:  # a corrupt record is no finished output
            return None

    return read


def _plan_hash(recipe: Recipe, run_dir: Path) -> str:
    """The prune stage's key: the plan's hash, recomputed (a hand-edited plan must not pass for the one it was)."""
    from ..pruning.plan import read_plan

    return read_plan(RunDir(run_dir).plan)["hash"]


def _pruned(run_dir: Path) -> str | None:
    d = RunDir(run_dir)
    return recorded(lambda r: r.prune_record, "plan_hash")(run_dir) if saved_kinds(d.pruned_adapter) else None


def _on_main(work: Callable[[Recipe, Path], object]) -> Callable[[Recipe, Path, Runtime, str | None], None]:
    return lambda recipe, run_dir, rt, deepspeed: work(recipe, run_dir) and None


def _train_key(recipe: Recipe, run_dir: Path) -> str:
    from .train import train_key

    return train_key(recipe, run_dir)


def _trained(run_dir: Path) -> str | None:
    from .train import trained

    return trained(run_dir)


def _eval_key(recipe: Recipe, run_dir: Path) -> str:
    from .evaluate import eval_key

    return eval_key(recipe, run_dir)


def _export_key(recipe: Recipe, run_dir: Path) -> str:
    from .export import export_key

    return export_key(recipe, run_dir)


def _train(recipe: Recipe, run_dir: Path, rt: Runtime, deepspeed: str | None) -> None:
    from .train import run_train

    run_train(recipe, run_dir, rt, deepspeed=deepspeed)


def _prune(recipe: Recipe, run_dir: Path) -> None:
    from .prune import run_prune

    run_prune(run_dir, recipe.model.path)


def _evaluate(recipe: Recipe, run_dir: Path) -> None:
    from .evaluate import run_evaluate

    run_evaluate(recipe, run_dir)


def _export(recipe: Recipe, run_dir: Path) -> None:
    from .export import run_export

    run_export(recipe, run_dir)


def _baseline_key(recipe: Recipe, run_dir: Path) -> str:
    from .baseline import baseline_key

    return baseline_key(recipe, run_dir)


def _baseline_recorded(run_dir: Path) -> str | None:
    from .baseline import recorded_baseline

    return recorded_baseline(run_dir)


def _baseline(recipe: Recipe, run_dir: Path, rt: Runtime, deepspeed: str | None) -> None:
    from .baseline import run_baseline

    run_baseline(recipe, run_dir, rt, deepspeed=deepspeed)


def _report(recipe: Recipe | None, run_dir: Path) -> None:
    from ..reporting.report import write_report

    write_report(run_dir)


SHARED_STAGES: tuple[Stage, ...] = (
    Stage("plan", plan_key, recorded(lambda d: d.plan), lambda r, d, rt, ds: run_plan(r, d, rt) and None,
          help="plan from the strategy's scores (re-plan at other ratios without re-estimating)"),
    Stage("prune", _plan_hash, _pruned, _on_main(_prune),
          help="slice the base model and the estimation adapter to the plan"),
    Stage("train", _train_key, _trained, _train, collective=True,
          help="fine-tune the pruned model"),
    Stage("evaluate", _eval_key, recorded(lambda d: d.eval_record), _on_main(_evaluate),
          help="accuracy / perplexity, parameters and tokens/s, base vs pruned"),
    Stage("export", _export_key, recorded(lambda d: d.export_record), _on_main(_export),
          help="merge the trained LoRA adapter into the pruned model: one HF checkpoint in RUN_DIR/export"),
    Stage("baseline", _baseline_key, _baseline_recorded, _baseline, collective=True,
          help="LoRA on the unpruned model in RUN_DIR/baseline_lora, timed beside the pruned model "
               "(report.baseline_lora)"),
    Stage("report", lambda r, d: None, lambda d: None, _on_main(_report),
          help="write report/summary.md and print the table"),
)


def all_stages() -> dict[str, Stage]:
    """Every stage any strategy can run, by name: the CLI offers one subcommand each (a strategy's stage that
    replaces a shared one, such as APT's plan, is found per recipe by `stage_named`)."""
    from ..strategies.registry import STRATEGIES

    out: dict[str, Stage] = {}
    for strategy in STRATEGIES.values():
        out.update({s.name: s for s in strategy.stages})
    out.update({s.name: s for s in SHARED_STAGES})
    return out


def _shared_for(strategy: Strategy) -> list[Stage]:
    """The shared stages a strategy runs: all of them, except those it replaces with a stage of the same name (APT
    writes its own plan in the shared format)."""
    own = {s.name for s in strategy.stages}
    return [s for s in SHARED_STAGES if s.name not in own]


def stages_for(recipe: Recipe) -> list[Stage]:
    """The stages `run` goes through: the strategy's, then the shared ones; export is left out when an adapter kind
    cannot be merged into the weights (bottleneck), the LoRA baseline unless `report.baseline_lora` is on."""
    strategy = strategy_for(recipe)
    stages = [*strategy.stages, *_shared_for(strategy)]
    if not recipe.report.baseline_lora:
        stages = [s for s in stages if s.name != "baseline"]
    stuck = [kind.name for kind in kinds_of(recipe.peft) if not kind.mergeable]
    if stuck:
        log.info("stage export: left out, a %s adapter cannot be merged into the weights", " or ".join(stuck))
        stages = [s for s in stages if s.name != "export"]
    return stages


def stage_named(name: str, recipe: Recipe) -> Stage:
    for stage in [*strategy_for(recipe).stages, *SHARED_STAGES]:
        if stage.name == name:
            return stage
    raise LightPeftError(f"stage {name} is not a stage of strategy {recipe.strategy}; its stages are "
                         f"{[s.name for s in stages_for(recipe)]}")


def stage_done(name: str, recipe: Recipe, run_dir: Path) -> bool:
    return stage_named(name, recipe).done(recipe, run_dir)


def run_stage(name: str, recipe: Recipe, run_dir: Path, deepspeed: str | None = None,
              runtime: Runtime | None = None, stage: Stage | None = None) -> None:
    """Run one stage. A collective stage runs on every rank; the others run on rank 0 while the rest wait (the plan
    is the exception: every rank computes it and the ranks check that they agree). A strategy's first stage records
    the recipe, so the later stages find it in the run directory."""
    rt = runtime or current()
    stage = stage or stage_named(name, recipe)
    if rt.is_main and stage is strategy_for(recipe).stages[0]:
        save_recipe(run_dir, recipe)
    if stage.collective or stage.name == "plan":
        stage.run(recipe, run_dir, rt, deepspeed)
    elif rt.is_main:
        stage.run(recipe, run_dir, rt, deepspeed)
    rt.barrier()


def pending(recipe: Recipe, run_dir: Path, stages: list[Stage] | None = None,
            runtime: Runtime | None = None) -> Iterator[Stage]:
    """The stages still to run, in order: everything from the first stage that is not up to date (on every rank
    alike) onwards. Report always runs."""
    rt = runtime or current()
    stale = False
    for stage in stages or stages_for(recipe):
        done = stage.name != "report" and not stale and stage.done(recipe, run_dir)
        if all(rt.all_gather_object(done)):
            log.info("stage %s: up to date, skipped", stage.name)
            continue
        stale = True
        log.info("stage %s: running", stage.name)
        yield stage


def run_all(recipe: Recipe, run_dir: Path, deepspeed: str | None = None) -> None:
    rt = current()
    if rt.is_main:
        save_recipe(run_dir, recipe)
    rt.barrier()
    for stage in pending(recipe, run_dir, runtime=rt):
        run_stage(stage.name, recipe, run_dir, deepspeed=deepspeed, runtime=rt, stage=stage)
