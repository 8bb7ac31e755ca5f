"""What a report may read from a run directory: every artefact checked, and only those of the current plan.

A report is how people look at a run, a half-updated or hand-edited one included, so it does not refuse to be
written: a plan or score file that fails its checks (`plan.read_plan`, `scores.load_scores`) is named in one note
line and left out, together with everything drawn from it. Numbers come only from artefacts made from the current
plan (plan.json): after a re-plan, the train and eval records of the previous plan are left out with a note instead
of sitting beside the new plan's counts. Missing stages are None; corrupt JSON records still raise, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from ..adapters.registry import bare_kind
from ..errors import LightPeftError
from ..io_utils import read_json_if_present
from ..pruning.module_keys import upgrade_keys
from ..pruning.plan import read_plan
from ..pruning.scores import Scores, load_scores
from ..rundir import RunDir

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunData:
    """Whatever stages of a run have finished and belong together; `notes` says what was left out and why."""

    run_dir: Path
    scores: Scores | None = None
    estimate: dict | None = None
    plan: dict | None = None
    train: dict | None = None
    eval: dict | None = None
    notes: list[str] = field(default_factory=list)
    baseline: dict | None = None  # D/baseline_lora.json, when it belongs to this run's eval record
    lora: "RunData | None" = None  # the LoRA baseline's own run directory, D/baseline_lora

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunData":
        d = RunDir(run_dir)
        notes: list[str] = []
        estimate = read_json_if_present(d.estimate_record, "estimate record")
        sc = d.scores("masks")
        scores = _checked(lambda: load_scores(sc, estimate), notes, "the score figures are") if sc.is_file() else None
        plan = _checked(lambda: read_plan(d.plan, estimate), notes,
                        "the plan rows, per-layer table and plan figures are") if d.plan.is_file() else None
        train = read_json_if_present(d.train_record, "train record")
        ev = read_json_if_present(d.eval_record, "eval record")
        if plan is not None:
            train_plan = (train or {}).get("plan_hash")
            train = _of_plan(train, train_plan, "train/train.json", plan["hash"], notes)
            # an eval record older than plan hashes in records inherits its train record's plan
            ev = _of_plan(ev, (ev or {}).get("plan_hash", train_plan), "eval.json", plan["hash"], notes)
        bare = bare_kind(estimate)  # an older bottleneck run's bare module keys, as plans write them now
        if scores is not None:
            scores.module, scores.rank = upgrade_keys(scores.module, bare), upgrade_keys(scores.rank, bare)
        if plan is not None and "peft_modules" in plan:
            plan = {**plan, "peft_modules": upgrade_keys(plan["peft_modules"], bare)}
        baseline, lora = _baseline(d, ev, notes)
        return cls(d.root, scores, estimate, plan, train, ev, notes, baseline=baseline, lora=lora)


def _baseline(d: RunDir, ev: dict | None, notes: list[str]) -> tuple[dict | None, "RunData | None"]:
    """The LoRA baseline (report.baseline_lora) and its run, if both still belong to this run's eval record and
    the baseline's own eval record."""
    record = read_json_if_present(d.baseline_record, "baseline record")
    if record is None:
        return None, None
    lora = RunData.load(d.baseline_lora)
    if ev is None or record.get("pruned_eval_key") != ev.get("key") or lora.eval is None or \
            record.get("lora_eval_key") != lora.eval.get("key"):
        notes.append(f"{d.baseline_record.name} was made for an earlier evaluation of this run or of its LoRA "
                     "baseline: the LoRA column is left out; rerun `lightpeft run` to bring it up to date")
        return None, None
    notes.extend(f"baseline: {note}" for note in lora.notes)
    return record, lora


def load(run: str | Path | RunData) -> RunData:
    return run if isinstance(run, RunData) else RunData.load(run)


def _checked(read: Callable[[], T], notes: list[str], left_out: str) -> T | None:
    """`read()`, or None with one note line when the file fails its checks."""
    try:
        return read()
    except LightPeftError as exc:
        notes.append(f"{exc} ({left_out} left out)")
        return None


def _of_plan(record: dict | None, plan_hash: str | None, name: str, current: str, notes: list[str]) -> dict | None:
    """The record if it was made from the current plan (or predates recording its plan), else None and a note."""
    if record is None or plan_hash is None or plan_hash == current:
        return record
    notes.append(f"{name} is from plan {plan_hash}, not the current plan {current} (plan.json): its numbers are "
                 "left out; rerun `lightpeft run` to bring it up to date")
    return None
