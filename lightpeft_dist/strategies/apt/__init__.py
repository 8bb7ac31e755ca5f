"""APT (Zhao, Hajishirzi, Cao, ICML 2024) as a strategy: `strategy: apt`, recipe section `apt:`.

One-shot mode (the paper's LLaMA recipe): `calibrate` scores KV groups and FFN neurons with APT's kurtosis-aware
salience over `apt.calibration_samples` examples, then APT's own `plan` stage keeps the most salient blocks per
parameter within `apt.target_density` of the decoder's parameters. From there the shared stages (prune, train,
evaluate, export, report) run unchanged; in the train stage APT's hooks grow the LoRA ranks (tuning.py). Modules: section.py (schema), salience.py + kurtosis.py (scores),
pruning/budget.py (cost model and search, shared with Light-PEFT's `prune.allocation: budget`; `plan_for_budget` is what a gradual schedule calls), calibrate.py, plan.py.
docs/method.md, "APT", lists what we implement and every deviation from the reference.
"""

from __future__ import annotations

from ..base import Stage, Strategy
from .calibrate import calibrate_key, recorded_key, run_calibrate
from .plan import apt_plan_key, run_apt_plan
from .section import AptConfig
from .tuning import TRAIN_KEYS, apt_train_hooks


def _recorded_plan(run_dir):
    from ...io_utils import read_json_if_present
    from ...errors import LightPeftError
    from ...rundir import RunDir

    try:
        return (read_json_if_present(RunDir(run_dir).plan) or {}).get("key")
    except LightPeftError:
        return None


def _no_pruning(raw: dict) -> None:
    """The LoRA baseline's APT settings: keep every block (density 1), no rank growth, no distillation; the
    calibration settings stay, so the run's calibration folder serves the baseline as it is."""
    raw["apt"].update({"mode": "one_shot", "target_density": 1.0, "rank_growth": 1.0, "distill_weight": 0.0})


def _check(recipe) -> None:
    recipe.section("apt").check_recipe(recipe)


STRATEGY = Strategy(
    name="apt", label="APT", color="#c53030", section="apt", section_model=AptConfig, check=_check,
    train_hooks=apt_train_hooks, train_keys=TRAIN_KEYS, baseline=_no_pruning,
    stages=(Stage("calibrate", calibrate_key, recorded_key,
                  lambda recipe, run_dir, rt, deepspeed: run_calibrate(recipe, run_dir, rt, deepspeed) and None,
                  collective=True, help="APT: score KV groups and FFN neurons on calibration examples (salience + "
                                        "kurtosis)"),
            Stage("plan", apt_plan_key, _recorded_plan,
                  lambda recipe, run_dir, rt, deepspeed: run_apt_plan(recipe, run_dir, rt) and None,
                  help="APT: keep the most salient blocks per parameter within apt.target_density")))
