"""APT's plan stage: the budgeted search over the calibration scores, written as the shared plan.json.

Why its own plan stage: the shared planner prunes fixed ratios per kind, while APT keeps the most salient blocks per
parameter under one parameter budget (pruning/budget.py). The result is an ordinary plan (pruning/plan.py's format, hash and
summary; checked by `read_plan`), so the shared prune, train, evaluate, export and report stages run unchanged. A
kept KV group keeps all its query heads; every LoRA module keeps all its ranks (APT does not prune PEFT modules).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...config import Recipe
from ...errors import LightPeftError
from ...io_utils import read_json, sha256_file, sha256_json, write_json
from ...keys import without_later_defaults
from ...pruning.plan import PLAN_VERSION, plan_hash, summarize
from ...rundir import RunDir
from ...runtime import Runtime, current
from ...pruning.budget import CostModel, plan_for_budget
from .calibrate import load_apt_scores, scores_path

log = logging.getLogger(__name__)
PLAN_KEYS = ("target_density", "prune_hidden", "mode", "random")


def apt_plan_key(recipe: Recipe, run_dir: Path) -> str:
    apt = recipe.section("apt").model_dump(mode="json")
    return sha256_json({"scores": sha256_file(scores_path(run_dir)),  # random off: the key it had before random
                        "apt": without_later_defaults("apt", {k: apt[k] for k in PLAN_KEYS})})[:16]


def _random_units(kept: list[int], total: int, g: torch.Generator) -> list[int]:
    """As many units as `kept`, drawn uniformly from `total`, sorted."""
    return sorted(torch.randperm(total, generator=g)[:len(kept)].tolist())


def cost_model(record: dict, hidden: bool = False) -> CostModel:
    """The record's cost model; with `hidden` (hidden dimensions pruned) it counts the embeddings and an untied LM
    head too, which shrink with the hidden width (pruning/budget.py)."""
    embedding = 0
    if hidden:
        if "vocab_size" not in record:
            raise LightPeftError("the APT calibration record has no vocab_size (written before hidden-dimension "
                                 "pruning existed); rerun `lightpeft calibrate`")
        embedding = record["vocab_size"] * (1 if record.get("tie_word_embeddings") else 2)
    return CostModel(tuple(record["layer_shapes"]), record["hidden_size"], record["head_dim"],
                     frozenset(record.get("biases", [])), embedding, bool(record.get("head_norms")))


def make_apt_plan(scores: dict, record: dict, target_density: float, random_seed: int | None = None) -> dict:
    """The plan that keeps exactly the blocks `plan_for_budget` chooses; with "hidden" scores, the plan also keeps a
    global set of hidden dimensions (`plan["hidden"]`; plans without it are unchanged). With `random_seed` (APT's
    random control, `apt.random`), every layer keeps as many KV groups and FFN neurons as the scored plan (and as
    many hidden dimensions), drawn at random: the same parameter count, only the choice of units differs."""
    hidden = scores.get("hidden") is not None
    cost = cost_model(record, hidden)
    kept = plan_for_budget(scores, cost, target_density)
    if random_seed is not None:
        g = torch.Generator().manual_seed(random_seed)
        shapes = record["layer_shapes"]
        kept["group"] = [_random_units(k, s["num_key_value_heads"], g) for k, s in zip(kept["group"], shapes)]
        kept["ffn"] = [_random_units(k, s["intermediate_size"], g) for k, s in zip(kept["ffn"], shapes)]
        if hidden:
            kept["hidden"] = _random_units(kept["hidden"], record["hidden_size"], g)
    layers = []
    for i, (groups, ffn) in enumerate(zip(kept["group"], kept["ffn"], strict=True)):
        rep = cost.rep(i)
        layers.append({"q_heads": [g * rep + j for g in groups for j in range(rep)], "kv_heads": groups, "ffn": ffn})
    plan = {"version": PLAN_VERSION, "model_fingerprint": record["model_fingerprint"],
            "prune": {"strategy": "apt", "target_density": target_density,
                      **({"random": True, "random_seed": random_seed} if random_seed is not None else {})},
            "apt": {k: kept[k] for k in ("target_params", "kept_params", "dense_params", "density",
                                         "next_block_params")},
            "layers": layers,
            "peft_modules": {name: list(range(r)) for name, r in record["lora_modules"].items()}}
    if hidden:
        plan["hidden"] = kept["hidden"]
    plan["summary"] = summarize(plan, record["layer_shapes"], record["hidden_size"], record["head_dim"])
    plan["hash"] = plan_hash(plan)
    return plan


def run_apt_plan(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None) -> dict:
    """Every rank computes the plan; they must agree on its hash before rank 0 writes it."""
    rt = runtime or current()
    d = RunDir(run_dir)
    record = read_json(d.estimate_record, "APT calibration record")
    apt = recipe.section("apt")
    # gradual: training starts dense and prunes at its checkpoints (gradual.py); the plan keeps everything
    plan = make_apt_plan(load_apt_scores(run_dir, record, apt.prune_hidden), record,
                         1.0 if apt.mode == "gradual" else apt.target_density, apt.seed if apt.random else None)
    plan["key"] = apt_plan_key(recipe, run_dir)
    rt.agree(plan["hash"], "plan hash")
    if rt.is_main:
        write_json(d.plan, plan)
    rt.barrier()
    s, a = plan["summary"], plan["apt"]
    log.info("APT plan %s: density %.4f of %d %s parameters (target %.4f, budget %d, kept %d); KV heads %d -> %d, "
             "FFN %d -> %d, hidden %d -> %d", plan["hash"], a["density"], a["dense_params"],
             "model" if "hidden" in plan else "decoder", recipe.section("apt").target_density,
             a["target_params"], a["kept_params"], s["before"]["num_key_value_heads"], s["after"]["num_key_value_heads"],
             s["before"]["intermediate_size"], s["after"]["intermediate_size"], record["hidden_size"],
             len(plan.get("hidden", range(record["hidden_size"]))))
    return plan
