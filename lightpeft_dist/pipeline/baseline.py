"""`report.baseline_lora`: LoRA on the unpruned model, trained in the same run, reported beside the pruned model.

Whether early pruning pays off is a comparison with what a user would do without it: LoRA on the whole model, same
data, same number of steps, fresh initialisation. The baseline stage runs that as a run directory of its own,
`D/baseline_lora/` (its own marker, lock, recipe and stage keys, so it resumes like any run), through the same plan,
prune, train and evaluate stages, with a recipe derived from the run's: every pruning ratio 0 (the plan keeps every
head, neuron, module and rank, so the "pruned" model is the base model tensor for tensor) and `train.warm_start:
false` (the LoRA weights start fresh, with the estimate's ranks and targets). Its `estimate/` is a set of hard links
to the run's own: prune reads the estimation adapter's layout and the plan reads the layer shapes, and nothing is
estimated twice. Its evaluate stage leaves the zero-shot base out (the run's eval.json has it).

The stage then times the three final models (unpruned base, LoRA, pruned + LoRA) in turn in one process, median of
`report.speed_rounds` rounds, so that the inference tokens/s share the machine's load, and writes
`D/baseline_lora.json`; the report's three-column table reads it (reporting/report.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
from pathlib import Path

from ..adapters.registry import load_adapters
from ..config import Recipe, recipe_from_dict, recipe_to_dict
from ..errors import LightPeftError
from ..io_utils import read_json, read_json_if_present, remove_owned, sha256_json, write_json
from ..keys import keyed_section
from ..models.loading import load_model, load_tokenizer
from ..ownership import open_run_dir
from ..rundir import ESTIMATE_RECORD, RunDir
from ..runtime import Runtime, current
from ..strategies.base import Stage
from .evaluate import chosen_adapter, eval_split, forward_tokens_per_s, run_evaluate
from ..strategies.registry import strategy_for
from .stages import SHARED_STAGES, pending, run_stage, save_recipe

log = logging.getLogger(__name__)
KEYED = ("model", "data", "peft", "prune", "train", "eval")  # the baseline recipe's sections its key hashes
NO_PRUNING = {"attn_ratio": 0.0, "ffn_ratio": 0.0, "module_ratio": 0.0, "rank_ratio": 0.0, "random": False,
              "random_peft": False, "uniform": False, "multiple_of": 1}
FRESH_LORA = {"warm_start": False, "distill_weight": 0.0}
COLUMNS = ("zero-shot", "lora", "pruned")  # the record's names for the three models, in table order


def baseline_recipe(recipe: Recipe) -> Recipe:
    """The run's recipe with nothing pruned and a freshly initialised adapter; the rest (data, steps, LR, seed,
    targets, rank) unchanged, so the two trainings differ only in the model they start from."""
    raw = recipe_to_dict(recipe)
    raw["prune"].update(NO_PRUNING)
    raw["train"].update(FRESH_LORA)
    no_pruning = strategy_for(recipe).baseline
    if no_pruning is not None:  # a strategy that prunes through its own section (APT) says how to prune nothing
        no_pruning(raw)
    raw["report"]["baseline_lora"] = False  # the baseline has no baseline of its own
    return recipe_from_dict(raw, source="the LoRA baseline's recipe (derived from the run's)")


def baseline_key(recipe: Recipe, run_dir: Path) -> str:
    """The pruned side through the run's eval key (which chains train, plan and estimate), the LoRA side through
    the sections of its derived recipe, and the timing rounds."""
    pruned_eval = read_json(RunDir(run_dir).eval_record, "eval record")["key"]
    lora = baseline_recipe(recipe)
    return sha256_json({"pruned_eval": pruned_eval, "lora": {s: keyed_section(lora, s) for s in KEYED},
                        "speed_rounds": recipe.report.speed_rounds})[:16]


def recorded_baseline(run_dir: Path) -> str | None:
    """The finished baseline's key, while the baseline's eval record is still the one it was made with."""
    d = RunDir(run_dir)
    try:
        record = read_json_if_present(d.baseline_record) or {}
        lora_eval = read_json_if_present(RunDir(d.baseline_lora).eval_record) or {}
    except LightPeftError:
        return None
    return record.get("key") if lora_eval.get("key") == record.get("lora_eval_key") else None


def link_estimate(run_dir: Path, baseline_dir: Path) -> None:
    """`baseline_dir/estimate` as hard links to the run's estimate (kept when they still are that estimate)."""
    shared, target = RunDir(run_dir).estimate, RunDir(baseline_dir).estimate
    if not (shared / ESTIMATE_RECORD).is_file():
        raise LightPeftError(f"the LoRA baseline needs the run's estimate, and {shared} has none; run the estimate "
                             "stage first")
    if target.is_dir() and not target.is_symlink() and (target / ESTIMATE_RECORD).is_file() and \
            (target / ESTIMATE_RECORD).samefile(shared / ESTIMATE_RECORD):
        return
    remove_owned(target)  # refuses a link, or a folder holding files we did not write
    shutil.copytree(shared, target, copy_function=os.link)
    log.info("baseline: %s links to the run's estimate", target)


def _evaluate_without_base(recipe: Recipe, run_dir: Path, rt: Runtime, deepspeed: str | None) -> None:
    if rt.is_main:
        run_evaluate(recipe, run_dir, baseline=False)


def baseline_stages(recipe: Recipe) -> list[Stage]:
    """The stages the baseline runs: the strategy's own after its scoring stage (whose folder is linked; APT's plan),
    then the shared plan (unless the strategy replaces it), prune, train, and evaluate without the zero-shot base."""
    strategy = strategy_for(recipe)
    own = list(strategy.stages[1:])
    shared = [s for s in SHARED_STAGES if s.name in ("plan", "prune", "train", "evaluate")
              and s.name not in {o.name for o in own}]
    return [*own, *(dataclasses.replace(s, run=_evaluate_without_base) if s.name == "evaluate" else s
                    for s in shared)]


def _final_model(recipe: Recipe, run_dir: Path | None):
    """The model a column stands for: the base (run_dir None), or a run's pruned model with its chosen adapter."""
    if run_dir is None:
        return load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
    model = load_model(str(RunDir(run_dir).pruned_model), recipe.model.dtype, recipe.model.attn_implementation)
    return load_adapters(model, chosen_adapter(recipe, run_dir)[0])


def side_by_side_speed(recipe: Recipe, run_dir: Path, rounds: int) -> dict[str, list[float]]:
    """Forward tokens/s of the three final models, timed in turn `rounds` times in this process (evaluate's own
    timing, on the same eval batches)."""
    lora_dir, lora_recipe = RunDir(run_dir).baseline_lora, baseline_recipe(recipe)
    tokenizer, split = load_tokenizer(recipe.model), eval_split(recipe)
    models = {"zero-shot": _final_model(recipe, None), "lora": _final_model(lora_recipe, lora_dir),
              "pruned": _final_model(recipe, run_dir)}
    times: dict[str, list[float]] = {name: [] for name in COLUMNS}
    for i in range(rounds):
        for name in COLUMNS:
            times[name].append(forward_tokens_per_s(models[name], tokenizer, recipe, split))
        log.info("baseline: inference round %d/%d, tokens/s %s", i + 1, rounds,
                 {n: round(t[-1]) for n, t in times.items()})
    return times


def run_baseline(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None) -> None:
    """Run (or resume) the LoRA baseline in D/baseline_lora, then time the three models side by side and write
    D/baseline_lora.json. Collective: the baseline's training runs on every rank of the job."""
    rt = runtime or current()
    d = RunDir(run_dir)
    key, lora = baseline_key(recipe, run_dir), baseline_recipe(recipe)
    log.info("baseline: LoRA on the unpruned model in %s (%d training steps, fresh LoRA)", d.baseline_lora,
             lora.train.steps or 0)
    with open_run_dir(d.baseline_lora, create=True, command="lightpeft baseline", runtime=rt):
        if rt.is_main:
            link_estimate(run_dir, d.baseline_lora)
            save_recipe(d.baseline_lora, lora)
        rt.barrier()
        for stage in pending(lora, d.baseline_lora, stages=baseline_stages(lora), runtime=rt):
            run_stage(stage.name, lora, d.baseline_lora, deepspeed=deepspeed, runtime=rt, stage=stage)
        if rt.is_main:
            times = side_by_side_speed(recipe, run_dir, recipe.report.speed_rounds)
            write_json(d.baseline_record, {
                "key": key, "baseline_run_dir": d.baseline_lora.name,
                "pruned_eval_key": read_json(d.eval_record, "eval record")["key"],
                "lora_eval_key": read_json(RunDir(d.baseline_lora).eval_record, "eval record")["key"],
                "split": eval_split(recipe), "speed_rounds": times,
                "infer_tokens_per_s": {name: statistics.median(ts) for name, ts in times.items()},
                "speed_measure": f"forward tokens/s on eval.speed_batches={recipe.eval.speed_batches} batches of "
                                 f"the {eval_split(recipe)} split, the three models timed in turn in one process, "
                                 f"median of {len(times['pruned'])} rounds"})
        rt.barrier()
