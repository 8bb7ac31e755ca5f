"""Every path in a run directory, named once.

Stages talk only through files in the run directory, so its layout is the contract between them, the launchers,
the reports and the benchmarks. Each artefact's path is spelled here and nowhere else; everything else asks a
`RunDir` for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Unit-score files that an estimate writes, by `prune.unit_scores` (every estimate writes all of them).
SCORE_FILES = {"masks": "scores.safetensors", "activation": "activation_scores.safetensors"}
ESTIMATE_RECORD = "estimate.json"  # inside the estimate folder, next to the score files


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory (`root`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # the recipe the run was started with
    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    # estimate (Light-PEFT's scoring stage)
    @property
    def estimate(self) -> Path:
        return self.root / "estimate"

    @property
    def estimate_record(self) -> Path:
        return self.estimate / ESTIMATE_RECORD

    @property
    def estimate_adapter(self) -> Path:
        return self.estimate / "adapter"

    def scores(self, unit_scores: str = "masks") -> Path:
        return self.estimate / SCORE_FILES[unit_scores]

    def checkpoint(self, stage: str) -> Path:
        """A collective stage's resumable mid-run checkpoint, the latest (`slurm/_launch.sh` spells it
        `$RUN_DIR/$STAGE.ckpt`); older kept ones lie beside it as `<stage>.ckpt.step-NNNNNNN`."""
        return self.root / f"{stage}.ckpt"

    # plan and prune
    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def pruned_model(self) -> Path:
        return self.root / "pruned_model"

    @property
    def prune_record(self) -> Path:
        return self.pruned_model / "lightpeft_prune.json"

    @property
    def pruned_adapter(self) -> Path:
        return self.root / "pruned_adapter"

    # train
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_record(self) -> Path:
        return self.train / "train.json"

    @property
    def train_adapter(self) -> Path:
        return self.train / "adapter"

    @property
    def train_best_adapter(self) -> Path:
        """The adapter with the best validation metric (train.eval_every), next to the last one."""
        return self.train / "best_adapter"

    def adapter(self, which: str = "last") -> Path:
        """The trained adapter that `eval.adapter` names: the last step's or the best one."""
        return self.train_best_adapter if which == "best" else self.train_adapter

    # metric logs: one folder of event files per stage (`tensorboard --logdir D/logs`); Slurm's pipeline.sh also
    # writes its job logs (*.out) into D/logs
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def stage_logs(self, stage: str) -> Path:
        return self.logs / stage

    # evaluate, export, report
    @property
    def eval_record(self) -> Path:
        return self.root / "eval.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_record(self) -> Path:
        return self.export / "lightpeft_export.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def ray(self) -> Path:
        """Ray Train's own records and checkpoint copies (launchers/ray_train.py)."""
        return self.root / "ray"

    @property
    def quality_record(self) -> Path:
        """Written by the quality study (benchmarks/quality) next to a row's eval.json."""
        return self.root / "quality.json"
