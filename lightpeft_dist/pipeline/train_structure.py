"""The train stage's side of restructures: rebuilding a restructured model, and what a run that pruned while
training leaves behind.

Why: a strategy's step hooks may grow LoRA ranks and prune physically during `lightpeft train` (the restructure kit,
docs/hooks.md). The loop carries the new shape in `meta["structure"]`; this module turns it back into a model (for
the restructure itself and for a resume from a checkpoint written after one, on any world size), and, when training
pruned, makes the run directory say so: `pruned_model/` becomes the finally pruned model and `plan.json` the final
plan, so evaluate, export and report run unchanged. The prune stage's own output is put back before training
starts again. docs/architecture.md, "Pruning inside training", explains the choice and the order of the writes.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..adapters.lora_structure import structured_model
from ..config import Recipe
from ..io_utils import read_json, read_json_if_present, write_json
from ..pruning.live import PLAN_KEY
from ..pruning.plan import read_plan
from ..pruning.slicing import model_reference, prune_checkpoint
from ..models.loading import load_config
from ..rundir import RunDir
from ..runtime import Runtime

log = logging.getLogger(__name__)
TRAINED_FROM = "trained_from"  # prune-record field: the plan hash training started from (pruned_model replaced)
START_PLAN = "start_plan"  # prune-record field: that whole plan, so a retraining can put it back


def started_plan_hash(prune_record: dict) -> str:
    """The plan the train stage starts from: the prune stage's, even after training replaced pruned_model."""
    return prune_record.get(TRAINED_FROM, prune_record["plan_hash"])


def restore_start(recipe: Recipe, run_dir: Path, rt: Runtime) -> dict:
    """Collective: the plan training starts from, with `pruned_model/` and `plan.json` put back to it when an earlier
    training had replaced them by its final pruned model (rank 0 re-slices the base; the slicer is deterministic)."""
    d = RunDir(run_dir)
    record = read_json(d.prune_record, "prune record")
    if TRAINED_FROM in record and record["plan_hash"] != record[TRAINED_FROM]:
        start = record[START_PLAN]
        if rt.is_main:
            log.info("train: putting back the prune stage's model (plan %s) that an earlier training replaced by "
                     "its final pruned model (plan %s)", start["hash"], record["plan_hash"])
            prune_checkpoint(recipe.model.path, start, d.pruned_model)
            write_json(d.plan, start)
        rt.barrier()
        return start
    plan = read_json_if_present(d.plan, "plan")
    if plan is None or plan.get("hash") != record["plan_hash"]:  # plan.json re-planned but not pruned yet
        return {"hash": record["plan_hash"]}
    return read_plan(d.plan, model_reference(load_config(recipe.model.path)))


def structured_loader(recipe: Recipe, run_dir: Path, start_plan: dict, rt: Runtime,
                      load: Callable[[str], torch.nn.Module]) -> Callable[[dict], torch.nn.Module]:
    """structure -> model (collective): the base at the structure's plan (pruned_model/ itself while the plan is still
    the one training started from; else a copy under D/live_models), with LoRA of its layout attached."""
    d = RunDir(run_dir)

    def build(structure: dict) -> torch.nn.Module:
        plan = structure.get(PLAN_KEY)
        if not plan or plan["hash"] == start_plan["hash"]:
            return structured_model({**structure, PLAN_KEY: None}, str(d.pruned_model), d.live_models, rt, load)
        return structured_model(structure, recipe.model.path, d.live_models, rt, load)

    return build


def final_plan(structure: dict, start_plan: dict) -> dict | None:
    """The plan training ended at, when it pruned physically (None: the model kept the start plan's shape)."""
    plan = structure.get(PLAN_KEY)
    return None if not plan or plan["hash"] == start_plan["hash"] else plan


def write_final_model(recipe: Recipe, run_dir: Path, start_plan: dict, plan: dict, train_key: str) -> None:
    """Rank 0, after train/ is written: pruned_model/ becomes the final pruned model (its record names the start),
    then plan.json the final plan (keeping the plan stage's key, so the plan and prune stages stay up to date)."""
    d = RunDir(run_dir)
    prune_checkpoint(recipe.model.path, plan, d.pruned_model,
                     record_extra={TRAINED_FROM: start_plan["hash"], START_PLAN: start_plan, "train_key": train_key})
    final = {k: v for k, v in plan.items() if k != "key"}
    if "key" in start_plan:
        final["key"] = start_plan["key"]
    write_json(d.plan, final)
    remove_live_models(run_dir)
    s = plan["summary"]["after"]
    log.info("train: pruned_model/ and plan.json are now the final plan %s (%d heads, %d KV heads, %d FFN neurons)",
             plan["hash"], s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"])


def remove_live_models(run_dir: Path) -> None:
    """Delete the live-pruned copies (only the `live-*` folders we write, then the folder if it is empty)."""
    folder = RunDir(run_dir).live_models
    if folder.is_dir():
        for old in folder.glob("live-*"):
            shutil.rmtree(old, ignore_errors=True)
        try:
            folder.rmdir()
        except OSError:
            log.warning("left %s in place: it holds files we did not write", folder)


def fits(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    """Whether a saved adapter state has the final model's names and shapes (a best adapter from before a
    restructure does not)."""
    return set(state) == set(reference) and all(state[k].shape == reference[k].shape for k in state)
