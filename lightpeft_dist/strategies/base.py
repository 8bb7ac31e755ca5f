"""What a strategy is: a name, how it shows in tables and figures, its recipe section, and the stages it adds.

Strategies decide *what* to prune. Everything after their own stages is shared (plan, prune, train, evaluate,
export, report; see docs/architecture.md). A strategy plugs in through a `Scores` file that the shared planner
turns into a plan, through a plan of its own, or through step hooks in the one training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..config import PruneConfig, Recipe
    from ..runtime import Runtime
    from ..training.hooks import StepHooks, Trainee

KeyFn = Callable[["Recipe", Path], "str | None"]
RecordedFn = Callable[[Path], "str | None"]
RunFn = Callable[["Recipe", Path, "Runtime", "str | None"], None]


@dataclass(frozen=True)
class Stage:
    """One resumable stage of a run directory.

    `key(recipe, run_dir)` hashes exactly the inputs the stage consumes (None: never up to date, e.g. report);
    `recorded(run_dir)` reads the key its last finished output was made with (None: no finished output).
    `run(recipe, run_dir, runtime, deepspeed)` is called on every rank when `collective` (estimate, train), and
    on rank 0 alone otherwise while the other ranks wait.
    """

    name: str
    key: KeyFn
    recorded: RecordedFn
    run: RunFn
    collective: bool = False
    help: str = ""

    def done(self, recipe: "Recipe", run_dir: Path) -> bool:
        from ..errors import LightPeftError

        try:
            key = self.key(recipe, run_dir)
            return key is not None and self.recorded(run_dir) == key
        except (LightPeftError, FileNotFoundError):
            return False


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy's descriptor: one per strategy module, listed once in strategies/registry.py.

    `label` and `color` are the single source for tables and figures. `section` names the strategy's recipe
    section and `section_model` its schema (None: the section is a core one, such as Light-PEFT's `estimate`).
    `stages` run before the shared ones. `scores(recipe, run_dir)` gives the unit-scores file and the record with
    the model's layer shapes that the shared planner reads (None: the strategy writes its plan itself).
    `check(recipe)` enforces rules across sections (raise ValueError; it may fill defaults the strategy owns);
    `plan_prune(recipe, run_dir)` gives the planner's settings when the strategy decides them (None: `prune:`).
    `train_hooks(context)` gives step hooks the train stage runs (None: none); they may restructure the model (grow
    LoRA ranks, prune physically). `train_keys` names the fields of the strategy's section that the train stage's
    key hashes (what those hooks read), so that changing them retrains. `kind_lrs(recipe)` gives the train stage's
    learning rate per adapter kind (None: every adapter at `train.lr`); the fields it reads belong in `train_keys`.
    `baseline(raw)` edits a recipe dict so that the run prunes nothing and trains a plain LoRA, for the LoRA baseline
    (pipeline/baseline.py; None: all `prune:` ratios 0 are enough).
    """

    name: str
    label: str
    color: str
    section: str | None
    stages: tuple[Stage, ...]
    section_model: "type[BaseModel] | None" = None
    scores: "Callable[[Recipe, Path], tuple[Path, Path]] | None" = None
    check: "Callable[[Recipe], None] | None" = None
    plan_prune: "Callable[[Recipe, Path], PruneConfig] | None" = None
    train_hooks: "Callable[[TrainContext], StepHooks | None] | None" = None
    train_keys: tuple[str, ...] = ()
    kind_lrs: "Callable[[Recipe], dict[str, float] | None] | None" = None
    baseline: "Callable[[dict], None] | None" = None


@dataclass
class TrainContext:
    """What the train stage hands a strategy's `train_hooks` (docs/hooks.md, "Restructures in the train stage").

    `trainee` is the model being trained (read `trainee.model`: a restructure replaces it). `start_plan` is the plan
    the trained model was pruned to by the prune stage (plan.json when training began) and `source_config` the
    unpruned base model's config: plans that hooks hand to live pruning index that base, and must keep a subset of
    `start_plan` (`pruning.live.live_prune(..., base_plan=start_plan)`). `steps` is the number of optimizer steps.
    """

    recipe: "Recipe"
    run_dir: Path
    runtime: "Runtime"
    trainee: "Trainee"
    start_plan: dict
    source_config: object
    steps: int
