"""The `search` stage: warm-up (optional), R pruning rounds, and the scores file that makes the plan the search's.

Each round trains the surviving supernet, scores every group with its partition's criteria mixed as in mixing.py,
and removes the top `per_round` (or, as the `removal: random` ablation, `per_round` drawn at random: choice.py).
Every rank computes the same removal order from rank-identical statistics; the ranks check each round's choice by
hash. The removal order becomes module scores (kept groups 2, the i-th of N removed (i+1)/(N+1)), with the
planner's module ratio set to the removed share of modules (`plan_prune`), so the shared planner keeps exactly the
search's survivors; this is checked before anything is written.
The stage writes the estimate folder every strategy writes (scores, record, adapter): the adapter is the last round's
supernet, which the prune stage slices to the survivors (used only with `train.warm_start: true`).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from ...adapters.registry import KINDS, ordered, save_adapters
from ...config import PruneConfig, Recipe, recipe_to_dict
from ...errors import LightPeftError
from ...io_utils import atomic_dir, read_json, sha256_file, sha256_json, write_json
from ...keys import keyed_section, without_later_defaults
from ...models.families import config_layer_shapes, head_dim_of
from ...models.loading import fingerprint, load_config, load_tokenizer
from ...pruning.plan import make_plan
from ...pruning.scores import Scores, save_scores
from ...pruning.slicing import prune_checkpoint
from ...rundir import ADAPTER, ESTIMATE_RECORD, SCORE_FILES, RunDir
from ...runtime import Runtime, current
from ...training.zero import prepare_ds_config
from .assignment import choice_counts, fixed_assignment, warmup_assignment
from .choice import round_removal
from .composition import base_plan, base_scores_path, estimate_base, load_base_scores, prunes_base, unslice_lora
from .criteria import prunability, values
from .mixing import group_partitions
from .rounds import balanced_rows, round_rows, step_batches, train_round
from .resume import Progress, load_progress, maybe_fault, save_progress
from .section import PrunePeftConfig
from .supernet import Group, enumerate_groups

log = logging.getLogger(__name__)
BASE_SCORES = "base_unit_scores.safetensors"
TRAIN_ONLY = ("train_lr",)  # section fields the search never reads: they key the train stage only


def search_key(recipe: Recipe, run_dir: Path | None = None) -> str:
    """Model, data, adapters, the section (less its train-only fields, and less the later-added ablation keys while
    they are at their defaults: keys.ADDED_LATER); with base pruning also the base scores' contents and `prune:`."""
    d = recipe_to_dict(recipe)
    inputs = {k: d[k] for k in ("model", "data", "peft", "prunepeft")}
    section = without_later_defaults("prunepeft", d["prunepeft"], skip=TRAIN_ONLY)
    inputs["prunepeft"] = {k: v for k, v in section.items() if k not in TRAIN_ONLY}
    cfg = recipe.section("prunepeft")
    path = base_scores_path(cfg)
    if prunes_base(cfg):
        inputs["base"] = {"scores": sha256_file(path) if path is not None and path.is_file() else d["estimate"],
                          "prune": keyed_section(recipe, "prune")}
    return sha256_json(inputs)[:16]


def check_budget(cfg: PrunePeftConfig, groups: list[Group]) -> None:
    if cfg.rounds * cfg.per_round >= len(groups):
        raise LightPeftError(f"prunepeft.rounds x per_round = {cfg.rounds} x {cfg.per_round} would remove "
                             f"{cfg.rounds * cfg.per_round} of the supernet's {len(groups)} module groups; remove "
                             f"fewer (at most {len(groups) - 1} in all)")


def removal_scores(groups: list[Group], order: list[int]) -> dict[str, float]:
    """Module scores of the search's outcome: survivors 2.0, the i-th removed (i+1)/(N+1), N removed in all."""
    score = {g: 2.0 for g in range(len(groups))}
    for i, g in enumerate(order):
        score[g] = (i + 1) / (len(order) + 1)
    return {key: score[g] for g, group in enumerate(groups) for key in group.keys}


def module_ratio(groups: list[Group], order: list[int]) -> float:
    n_modules = sum(len(g.paths) for g in groups)
    return sum(len(groups[g].paths) for g in order) / n_modules


def outcome_scores(recipe: Recipe, groups: list[Group], order: list[int], shapes: list[dict],
                   base: Scores | None = None) -> Scores:
    """The base's unit scores (all ones when the base is not pruned) plus the search's module and rank scores."""
    specs = {s.type: s for s in recipe.adapters}
    module = removal_scores(groups, order)
    rank = {key: torch.ones(specs[g.kind].r) for g in groups for key in g.keys}
    if base is not None:
        return Scores(head=base.head, ffn=base.ffn, module=module, rank=rank)
    return Scores(head=[torch.ones(s["num_attention_heads"]) for s in shapes],
                  ffn=[torch.ones(s["intermediate_size"]) for s in shapes], module=module, rank=rank)


def search_prune(recipe: Recipe, ratio: float) -> PruneConfig:
    """The planner's settings for a search outcome: the removed share of modules and every rank; the base pruned at
    the recipe's ratios with `prunepeft.base_scores`, not at all without."""
    update = {"module_ratio": ratio, "rank_ratio": 0.0, "random": False, "random_peft": False}
    if not prunes_base(recipe.section("prunepeft")):
        update.update(attn_ratio=0.0, ffn_ratio=0.0)
    return recipe.prune.model_copy(update=update)


def plan_prune(recipe: Recipe, run_dir: Path) -> PruneConfig:
    record = read_json(RunDir(run_dir).estimate_record, "search record")
    return search_prune(recipe, float(record["prunepeft"]["module_ratio"]))


def _hash(names: list[str]) -> str:
    return sha256_json(names)[:16]


def run_search(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None) -> dict:
    """The search on every rank (collective); rank 0 writes `run_dir/estimate/`."""
    rt = runtime or current()
    cfg: PrunePeftConfig = recipe.section("prunepeft")
    key = search_key(recipe)
    base_config = load_config(recipe.model.path)
    shapes = config_layer_shapes(base_config)
    groups = enumerate_groups(recipe, base_config, len(shapes))
    check_budget(cfg, groups)
    partitions = group_partitions([(g.kind, g.layer) for g in groups], len(shapes), cfg.partitions)
    tokenizer = load_tokenizer(recipe.model)
    base, bplan, model_path, path, work = None, None, None, None, RunDir(run_dir).checkpoint("search")
    if prunes_base(cfg):
        path = base_scores_path(cfg) or estimate_base(recipe, work, rt, deepspeed)
        base = load_base_scores(path, shapes)
        bplan = base_plan(base, shapes, search_prune(recipe, 0.0), base_config)
        model_path = str(work / "base_model")
        if rt.is_main:
            prune_checkpoint(recipe.model.path, bplan, Path(model_path))
        rt.barrier()
        log.info("prunepeft: searching on the base pruned by %s (plan %s)", cfg.base_scores, bplan["hash"])
    ds_cfg = prepare_ds_config(deepspeed, cfg, recipe.model.dtype, base_config.hidden_size, None, rt.world_size)
    t0, steps, tokens, seconds = time.time(), 0, 0, 0.0
    record: dict = {"groups": [g.name for g in groups], "partitions": partitions, "rounds": [],
                    "base_scores": cfg.base_scores, "base_plan_hash": None if bplan is None else bplan["hash"]}
    names_all = [g.name for g in groups]
    done = load_progress(work, key, names_all)  # a killed search resumes after its last finished round
    record["resumed_from_round"] = None if done is None else done.rounds_done

    if done is not None:
        record.update(done.record)
        steps, tokens, seconds = done.counters["steps"], done.counters["tokens"], done.counters["seconds"]
        t0 -= done.counters.get("wall_seconds", 0.0)  # the wall time before the kill counts as the search's
        assigned = record["assignment"]
    elif cfg.assignment == "warmup":
        batches = step_batches(balanced_rows(recipe, cfg.warmup_examples), recipe, cfg, tokenizer, rt)
        res = train_round(recipe, cfg, groups, batches, cfg.warmup_steps, ds_cfg, rt, "prunepeft warm-up",
                          model_path=model_path)
        steps, tokens, seconds = steps + cfg.warmup_steps, tokens + res.tokens, seconds + res.seconds
        counts = choice_counts(prunability(res.stats), partitions, cfg.warmup_top or max(1, len(groups) // 2))
        assigned = warmup_assignment(counts)
        record["warmup"] = {"counts": counts, "losses": res.losses}
        del res
    else:
        assigned = fixed_assignment(cfg, [s.type for s in recipe.adapters])
    if done is None:
        record["assignment"] = {p: assigned[p] for p in dict.fromkeys(partitions)}
    log.info("prunepeft: %d groups in %d partitions; criteria %s", len(groups), len(set(partitions)),
             record["assignment"])

    def progress(rounds_done: int, state: dict | None) -> Progress:
        kept = {k: record[k] for k in ("warmup", "assignment", "rounds") if k in record}
        return Progress(rounds_done, [groups[g].name for g in order], kept,
                        {"steps": steps, "tokens": tokens, "seconds": seconds, "wall_seconds": time.time() - t0},
                        dict(state or {}))

    batches = step_batches(round_rows(recipe, cfg), recipe, cfg, tokenizer, rt)
    order = [] if done is None else [names_all.index(n) for n in done.order]
    alive, state, last = [g for g in range(len(groups)) if g not in order], None, None
    if done is None and cfg.assignment == "warmup":
        save_progress(work, key, progress(0, None), rt)
    if done is not None and cfg.between_rounds == "warm_start":
        state = done.state or None
    for r in range(0 if done is None else done.rounds_done, cfg.rounds):
        last = train_round(recipe, cfg, [groups[g] for g in alive], batches, cfg.steps, ds_cfg, rt,
                           f"prunepeft round {r + 1}/{cfg.rounds}",
                           state if cfg.between_rounds == "warm_start" else None, model_path)
        maybe_fault(r + 1, rt)
        steps, tokens, seconds = steps + cfg.steps, tokens + last.tokens, seconds + last.seconds
        picked, mixed = round_removal(cfg, prunability(last.stats), [partitions[g] for g in alive], assigned, r + 1)
        removed = [alive[i] for i in picked]
        rt.agree(_hash([groups[g].name for g in removed]), f"prunepeft round {r + 1} removal")
        record["rounds"].append({"alive": [groups[g].name for g in alive],
                                 "values": {m: v.tolist() for m, v in values(last.stats).items()},
                                 "scores": None if mixed is None else mixed.tolist(),
                                 "removed": [groups[g].name for g in removed],
                                 "losses": last.losses})
        log.info("prunepeft round %d: removed %s", r + 1, [groups[g].name for g in removed])
        order += removed
        alive = [g for g in alive if g not in removed]
        state = last.state
        if r + 1 < cfg.rounds:  # the last round's outcome is the stage's output itself
            save_progress(work, key, progress(r + 1, state if cfg.between_rounds == "warm_start" else None), rt)

    names = [groups[g].name for g in order]
    record.update({"removal_order": names, "order_hash": _hash(names), "kept": [groups[g].name for g in alive],
                   "module_ratio": module_ratio(groups, order)})
    rt.agree(record["order_hash"], "prunepeft removal order")
    scores = outcome_scores(recipe, groups, order, shapes, base)
    plan = make_plan(scores, shapes, search_prune(recipe, record["module_ratio"]), fingerprint(base_config),
                     base_config.hidden_size, head_dim_of(base_config))
    expect = sorted(k for g in alive for k in groups[g].keys)
    if sorted(plan["peft_modules"]) != expect or (bplan is not None and plan["layers"] != bplan["layers"]):
        # the planner must reproduce the search exactly
        raise LightPeftError("the planner does not reproduce the PrunePEFT search's survivors; this is a bug, "
                             "please report it with the run's estimate/estimate.json")
    out = {"key": key, "strategy": "prunepeft", "model_path": recipe.model.path,
           "model_fingerprint": fingerprint(base_config), "layer_shapes": shapes,
           "hidden_size": base_config.hidden_size, "head_dim": head_dim_of(base_config),
           "steps": steps, "tokens": tokens, "train_seconds": seconds, "seed": cfg.seed, "world_size": rt.world_size, "deepspeed": ds_cfg,
           "wall_seconds": time.time() - t0, "prunepeft": record, "recipe": recipe_to_dict(recipe)}
    if rt.is_main:
        kinds = ordered({groups[g].kind: KINDS[groups[g].kind] for g in alive + order[-cfg.per_round:]})
        with atomic_dir(RunDir(run_dir).estimate) as tmp:
            save_scores(tmp / SCORE_FILES["masks"], scores, metadata={"strategy": "prunepeft", "units": "search"})
            saved = last.saved if bplan is None else unslice_lora(last.saved, bplan, shapes, base_config)
            save_adapters(tmp / ADAPTER, last.model, saved, kinds)
            write_json(tmp / ESTIMATE_RECORD, out)
            if path is not None:  # the base's unit scores, kept with the search's outcome
                shutil.copyfile(path, tmp / BASE_SCORES)
        if work.exists():
            shutil.rmtree(work)  # the pruned base was the rounds' working copy
    rt.barrier()
    log.info("prunepeft: kept %d of %d groups (%s); search %d steps, %.0f s", len(alive), len(groups),
             record["kept"], steps, out["wall_seconds"])
    return out
