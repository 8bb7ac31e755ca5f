"""PrunePEFT (Yu et al. 2025) as a strategy: search which PEFT modules, of which kind, in which layers, by iterative
hybrid pruning of a LoRA + bottleneck supernet; then the shared pipeline plans, slices and trains the survivors from
a fresh initialisation (docs/method.md, "PrunePEFT").

Modules: section.py (recipe schema and checks), supernet.py (groups, model), stats.py and criteria.py (the six
criteria), assignment.py and mixing.py (partitions, hybrid score), choice.py (which groups a round removes:
hybrid or random), rounds.py (one round), search.py (the stage).
"""

from __future__ import annotations

from pathlib import Path

from ...config import Recipe
from ...io_utils import read_json_if_present
from ...errors import LightPeftError
from ...rundir import RunDir
from ..base import Stage, Strategy
from .section import PrunePeftConfig, check_recipe, kind_lrs


def _key(recipe: Recipe, run_dir: Path) -> str:
    from .search import search_key

    return search_key(recipe)


def _recorded(run_dir: Path) -> str | None:
    try:
        record = read_json_if_present(RunDir(run_dir).estimate_record) or {}
    except LightPeftError:
        return None
    return record.get("key") if record.get("strategy") == "prunepeft" else None


def _run(recipe: Recipe, run_dir: Path, rt, deepspeed: str | None) -> None:
    from .search import run_search

    run_search(recipe, run_dir, rt, deepspeed)


def _scores(recipe: Recipe, run_dir: Path) -> tuple[Path, Path]:
    d = RunDir(run_dir)
    return d.scores("masks"), d.estimate_record


def _plan_prune(recipe: Recipe, run_dir: Path):
    from .search import plan_prune

    return plan_prune(recipe, run_dir)


STRATEGY = Strategy(
    name="prunepeft", label="PrunePEFT", color="#c05621", section="prunepeft",
    stages=(Stage("search", _key, _recorded, _run, collective=True,
                  help="PrunePEFT: prune a LoRA + bottleneck supernet in rounds to choose the PEFT modules"),),
    section_model=PrunePeftConfig, scores=_scores, check=check_recipe, plan_prune=_plan_prune,
    train_keys=("train_lr", "lr"), kind_lrs=kind_lrs)
