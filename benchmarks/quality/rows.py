"""The study's rows, each one run directory driven through the project's pipeline stages.

Per seed, one estimation run is shared by every row: the rows' run directories get hard links to its `estimate/`
(same recipe sections model/data/peft/estimate, so `pipeline.stage_done('estimate')` holds and nothing is
re-estimated), then plan -> prune -> train run per row. The zero-shot base model is evaluated once for the study and
its numbers are attached to every row's eval.json as "base" (the evaluate stage would otherwise re-measure the same
base model in every row, which costs minutes per row on a CPU).

Rows: `lora` (all ratios 0: the plan keeps every head, neuron, module and rank, so the "pruned" model is the base
model; LoRA freshly initialised, i.e. the reference's vanilla baseline), `lightpeft` (scored plan at a level) and
`random` (the same ratios with prune.random, seeded per seed), `activation` (the same ratios and the same estimation
run, heads and FFN neurons ranked by prune.unit_scores=activation instead of the masks; PEFT modules and ranks as
Light-PEFT), `taylor` and `movement` (likewise, prune.unit_scores=taylor / movement), and the mask variants
`masks_warmup` and `masks_alltok` (the masks of an estimate with estimate.mask_warmup_steps / loss_on: all_tokens,
run once per seed in its own folder; ESTIMATE_VARIANTS). APT's and PrunePEFT's rows, and the LoRA rows PrunePEFT is
measured against, are in strategy_rows.py; every row goes through `drive_row`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightpeft_dist.pipeline import stages as pipeline
from lightpeft_dist.config import Recipe, recipe_from_dict, recipe_to_dict
from lightpeft_dist.strategies.registry import strategy_for
from lightpeft_dist.pipeline.evaluate import eval_split, evaluate_model, run_evaluate
from lightpeft_dist.io_utils import read_json, remove_owned, sha256_json, write_json
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pruning.plan import read_plan
from lightpeft_dist.reporting import methods
from lightpeft_dist.reporting.report import write_report
from lightpeft_dist.rundir import ESTIMATE_RECORD, RunDir

from .levels import solve_level
from .perplexity import perplexity
from .strategy_rows import LEVEL_ROWS, STRATEGY_ROWS, shares_first_stage, strategy_recipe

log = logging.getLogger("quality.rows")


@dataclass
class Study:
    out_dir: Path
    base: dict  # recipe as a dict, overrides applied
    ppl_windows: list[dict] | None = None
    ppl_info: dict | None = None
    zero_shot: dict = field(default_factory=dict)

    def recipe(self, seed: int, **sections: dict) -> Recipe:
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in self.base.items()}
        for sec in ("estimate", "train", "prune"):
            raw.setdefault(sec, {})["seed"] = seed
        for sec, values in sections.items():
            raw.setdefault(sec, {}).update(values)
        return recipe_from_dict(raw, source="quality study recipe")


def _ppl_key(study: Study, what: str) -> str | None:
    return sha256_json({"what": what, "ppl": study.ppl_info})[:16] if study.ppl_info else None


def _model_ppl(study: Study, recipe: Recipe, path: str) -> float | None:
    if study.ppl_windows is None:
        return None
    model = load_model(path, recipe.model.dtype, recipe.model.attn_implementation)
    tok = load_tokenizer(recipe.model)
    # batch of 4: the logits of 4 windows x 256 tokens x 49k vocab are already 200 MB
    return perplexity(model, tok, study.ppl_windows, min(4, recipe.eval.batch_size))["perplexity"]


def run_zero_shot(study: Study) -> dict:
    """Evaluate the unpruned base model once (task metric, parameters, tokens/s, Brown perplexity)."""
    recipe = study.recipe(0)
    d = study.out_dir / "zero-shot"
    d_raw = recipe_to_dict(recipe)
    key = sha256_json({k: d_raw[k] for k in ("model", "data", "eval")} | {"seq": recipe.train.seq_len,
                                                                          "ppl": study.ppl_info})[:16]
    ev = read_json(RunDir(d).eval_record) if RunDir(d).eval_record.is_file() else {}
    if ev.get("key") != key:
        log.info("zero-shot: evaluating the unpruned base model")
        model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
        split = eval_split(recipe)
        ev = {"key": key, "split": split, "format": recipe.data.format,
              "base": evaluate_model(model, load_tokenizer(recipe.model), recipe, split)}
        del model
        d.mkdir(parents=True, exist_ok=True)
        ppl = _model_ppl(study, recipe, recipe.model.path)
        write_json(RunDir(d).quality_record, {"method": "zero-shot", "label": methods.label("zero-shot"),
                                        "level": None, "seed": None, "uses_estimate": False,
                                        "ppl": {"pruned_base": ppl, **(study.ppl_info or {})}})
        write_json(RunDir(d).eval_record, ev)
    study.zero_shot = ev["base"]
    return ev


def run_estimate(study: Study, seed: int, estimate: dict | None = None, name: str = "estimate-run",
                 recipe: Recipe | None = None) -> Path:
    """The seed's shared estimation run, or with `estimate` a variant's in folder `name`, or with `recipe` that
    recipe's first stage (APT's calibration); skipped when its recorded key still matches."""
    recipe = recipe or study.recipe(seed, **({"estimate": estimate} if estimate else {}))
    d = study.out_dir / f"seed{seed}" / name
    first = _first_stage(recipe)
    if pipeline.stage_done(first, recipe, d):
        log.info("seed %d: %s in %s up to date, reused", seed, first, name)
    else:
        log.info("seed %d: %s in %s", seed, first, name)
        pipeline.run_stage(first, recipe, d)
    return RunDir(d).estimate


def _link_estimate(shared: Path, row_dir: Path, recipe: Recipe) -> None:
    """Hard-link a shared first-stage folder (Light-PEFT's estimate, APT's calibration) into a row's run directory,
    unless the row already holds that very folder for its current key."""
    target = RunDir(row_dir).estimate
    key = strategy_for(recipe).stages[0].key(recipe, row_dir)
    if target.exists() or target.is_symlink():
        try:
            if read_json(target / ESTIMATE_RECORD).get("key") == key and \
                    (target / ESTIMATE_RECORD).samefile(shared / ESTIMATE_RECORD):
                return
        except Exception:  # noqa: BLE001 - anything unreadable is replaced below
            pass
        remove_owned(target)  # refuses a link or a folder holding files we did not write
    row_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(shared, target, copy_function=os.link)


def row_specs(level_ratios: dict[float, dict], peft_ratios: dict,
              rounded_ratios: dict[float, dict] | None = None) -> list[tuple[str, float | None, dict, dict]]:
    """(method, level, prune section, train section) for every row of one seed. `rounded_ratios` are the levels
    solved again with ROUNDED's multiple_of, so the rounded row prunes the same share of parameters."""
    rows = [("lora", None, {"attn_ratio": 0.0, "ffn_ratio": 0.0, "module_ratio": 0.0, "rank_ratio": 0.0,
                            "random": False}, {"warm_start": False, "distill_weight": 0.0})]
    for level, ratios in level_ratios.items():
        rows.append(("lightpeft", level, {**ratios, **peft_ratios, "random": False}, {}))
        rows.append(("activation", level, {**ratios, **peft_ratios, "random": False, "unit_scores": "activation"},
                     {}))
        rows.append(("random", level, {**ratios, **peft_ratios, "random": True}, {}))
        for method, scores in (("taylor", "taylor"), ("movement", "movement")):  # same estimate, other unit scores
            rows.append((method, level, {**ratios, **peft_ratios, "random": False, "unit_scores": scores}, {}))
        for method in ESTIMATE_VARIANTS:  # mask-ranked plans from an estimate of their own (run_seed)
            rows.append((method, level, {**ratios, **peft_ratios, "random": False}, {}))
        for method, extra in BUDGET.items():  # the same ratios' parameter count, spent across layers
            rows.append((method, level, {**ratios, **peft_ratios, "random": False, **extra}, {}))
        if rounded_ratios:
            for method, extra in ROUNDED.items():
                rows.append((method, level, {**rounded_ratios[level], **peft_ratios, "random": False, **extra}, {}))
    return rows


# Rows whose estimate differs from the seed's shared one (docs/method.md, "Mask variants"): the estimate section
# they add. Each gets its own estimation run per seed, shared by its levels.
ESTIMATE_VARIANTS: dict[str, dict] = {"masks_warmup": {"mask_warmup_steps": 10},
                                      "masks_alltok": {"loss_on": "all_tokens"}}


# Rows whose kept widths are rounded for matrix kernels (prune.multiple_of, docs/method.md): Taylor-ranked like the
# taylor row, with the level solved again under the rounding so both prune the same share of parameters.
ROUNDED: dict[str, dict] = {"taylor_m64": {"unit_scores": "taylor", "multiple_of": 64}}


# Rows that spend the ratios' parameter count across layers and kinds by score per parameter
# (prune.allocation: budget, lightpeft_dist/pruning/allocation.py), and their random control: the scored plan's
# per-layer counts with random units in each layer.
BUDGET: dict[str, dict] = {"taylor_budget": {"unit_scores": "taylor", "allocation": "budget"},
                           "random_budget": {"unit_scores": "taylor", "allocation": "budget", "random": True},
                           "salience_budget": {"unit_scores": "salience", "allocation": "budget"},
                           "random_salience_budget": {"unit_scores": "salience", "allocation": "budget",
                                                      "random": True}}


def row_name(method: str, level: float | None) -> str:
    return method if level is None else f"{method}-{round(100 * level)}"


def run_row(study: Study, seed: int, shared: Path, method: str, level: float | None, prune: dict,
            train: dict, estimate: dict | None = None) -> Path:
    recipe = study.recipe(seed, prune=prune, train=train, **({"estimate": estimate} if estimate else {}))
    return drive_row(study, seed, method, level, recipe, shared)


def _first_stage(recipe: Recipe) -> str:
    return strategy_for(recipe).stages[0].name


def drive_row(study: Study, seed: int, method: str, level: float | None, recipe: Recipe,
              shared: Path | None) -> Path:
    """One row's run directory through its strategy's stages and the shared plan, prune and train (each skipped
    while its key holds), then evaluated against the study's zero-shot numbers. `shared`: an estimate (or APT
    calibration) folder to hard-link in instead of running the first stage."""
    d = study.out_dir / f"seed{seed}" / row_name(method, level)
    if shared is not None:
        _link_estimate(shared, d, recipe)
    pipeline.save_recipe(d, recipe)
    t0, stale = time.time(), False
    names = [s.name for s in pipeline.stages_for(recipe) if s.name not in ("evaluate", "export", "report",
                                                                             "baseline")]
    for stage in names:
        if not stale and pipeline.stage_done(stage, recipe, d):
            continue
        stale = True
        log.info("%s seed %d: stage %s", d.name, seed, stage)
        pipeline.run_stage(stage, recipe, d)
    if stale or not pipeline.stage_done("evaluate", recipe, d):
        result = run_evaluate(recipe, d, baseline=False)
        result["base"], result["base_from"] = study.zero_shot, str(study.out_dir / "zero-shot")
        write_json(RunDir(d).eval_record, result)
    q_path = RunDir(d).quality_record
    plan = read_plan(RunDir(d).plan)
    plan_hash = plan["hash"]
    q = read_json(q_path) if q_path.is_file() else {}
    if stale or q.get("plan_hash") != plan_hash or q.get("ppl_key") != _ppl_key(study, plan_hash):
        label = methods.label(method)
        ppl = _model_ppl(study, recipe, str(RunDir(d).pruned_model))
        q = {"method": method, "label": label, "level": level, "seed": seed, "uses_estimate": method not in PLAIN,
             "strategy": recipe.strategy, "plan_hash": plan_hash, "prune": recipe_to_dict(recipe)["prune"],
             "achieved_fraction": plan["summary"]["prunable_fraction_pruned"],
             "ppl_key": _ppl_key(study, plan_hash), "ppl": {"pruned_base": ppl, **(study.ppl_info or {})},
             "row_seconds": round(time.time() - t0, 1)}
        write_json(q_path, q)
    write_report(d)
    return d


# Rows that stand for plain LoRA (the pipeline estimates to plan, but plain LoRA would not): their cost is training.
PLAIN = ("lora", "lora_qv", "supernet")


def run_seed(study: Study, seed: int, levels: list[float], methods: list[str]) -> list[Path]:
    shared = run_estimate(study, seed)
    base_prune = study.recipe(seed).prune
    peft = {"module_ratio": base_prune.module_ratio, "rank_ratio": base_prune.rank_ratio}
    level_ratios = {lv: solve_level(shared, base_prune, lv)[0] for lv in levels}
    rounded = {lv: solve_level(shared, base_prune.model_copy(update={"multiple_of": ROUNDED[m]["multiple_of"]}),
                               lv)[0] for lv in levels for m in ROUNDED if m in methods}
    dirs = []
    specs = [s for s in row_specs(level_ratios, peft, rounded) if s[0] in methods]
    for i, (method, level, prune, train) in enumerate(specs):
        log.info("seed %d: row %d/%d %s", seed, i + 1, len(specs), row_name(method, level))
        est = ESTIMATE_VARIANTS.get(method)
        own = run_estimate(study, seed, est, f"estimate-run-{method}") if est else shared
        dirs.append(run_row(study, seed, own, method, level, prune, train, est))
    for method in [m for m in STRATEGY_ROWS if m in methods]:  # APT, PrunePEFT and their LoRA rows
        for level in (sorted(levels) if method in LEVEL_ROWS else [None]):
            recipe = strategy_recipe(study.base, method, level, seed, shared, level_ratios.get(level))
            share = shares_first_stage(method)
            log.info("seed %d: row %s", seed, row_name(method, level))
            own = run_estimate(study, seed, name=share, recipe=recipe) if share else None
            dirs.append(drive_row(study, seed, method, level, recipe, own))
    return dirs
