"""Every path in a run directory, named once.

Stages talk only through files in the run directory, so its layout is the contract between them, the launchers,
the reports and the benchmarks. Each artefact's path is spelled here and nowhere else; everything else asks a
`RunDir` for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Unit-score files that an estimate writes, by `prune.unit_scores` (every estimate writes all of them).
SCORE_FILES = {"masks": "scores.safetensors", "activation": "activation_scores.safetensors",
               "taylor": "taylor_scores.safetensors", "movement": "movement_scores.safetensors",
               "salience": "salience_scores.safetensors"}
ESTIMATE_RECORD = "estimate.json"  # inside the estimate folder, next to the score files
PRUNE_RECORD = "lightpeft_prune.json"  # inside a pruned model folder (wherever prune_checkpoint writes one)
TRAIN_RECORD = "train.json"  # inside the train folder
EXPORT_RECORD = "lightpeft_export.json"  # inside the export folder
ADAPTER = "adapter"  # a stage folder's adapter (estimate/adapter, train/adapter)
CHECKPOINT_RECORD = "state.json"  # inside a stage checkpoint folder, next to its tensors
# Inside every folder that io_utils.atomic_dir publishes: the entries we wrote, so that replacing the folder deletes
# nothing else (docs/architecture.md, Guarantees).
MANIFEST = ".lightpeft-manifest.json"


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
        return self.estimate / ADAPTER

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
        return self.pruned_model / PRUNE_RECORD

    @property
    def pruned_adapter(self) -> Path:
        return self.root / "pruned_adapter"

    @property
    def live_models(self) -> Path:
        """The base model at each live-pruning plan's shape while training prunes physically
        (`pruning.live.live_model_dir` writes `live-<plan hash>` here); removed when training finishes."""
        return self.root / "live_models"

    # train
    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def train_record(self) -> Path:
        return self.train / TRAIN_RECORD

    @property
    def train_adapter(self) -> Path:
        return self.train / ADAPTER

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
        return self.export / EXPORT_RECORD

    @property
    def logs(self) -> Path:
        """Event files and job logs (slurm/pipeline.sh writes its job logs here)."""
        return self.root / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # `report.baseline_lora`: LoRA on the unpruned model, a run directory of its own inside this one
    # (pipeline/baseline.py), and the record that puts it beside this run (side-by-side inference speed)
    @property
    def baseline_lora(self) -> Path:
        return self.root / "baseline_lora"

    @property
    def baseline_record(self) -> Path:
        return self.root / "baseline_lora.json"

    @property
    def ray(self) -> Path:
        """Ray Train's own records and checkpoint copies (launchers/ray_train.py)."""
        return self.root / "ray"

    @property
    def quality_record(self) -> Path:
        """Written by the quality study (benchmarks/quality) next to a row's eval.json."""
        return self.root / "quality.json"

    @property
    def logs(self) -> Path:
        """Slurm's job logs (slurm/pipeline.sh spells it `$run_dir/logs`); written by Slurm, not by us."""
        return self.root / "logs"

    # ownership and concurrency (ownership.py, docs/architecture.md: Guarantees)
    @property
    def marker(self) -> Path:
        """Says that we made (or adopted) this folder as a run directory."""
        return self.root / ".lightpeft-run.json"

    @property
    def lock(self) -> Path:
        """Held (flock) by the one process that writes the run directory now; it names that process."""
        return self.root / ".lightpeft-run.lock"

    def top_level_names(self) -> frozenset[str]:
        """Every top-level name of an artefact above, taken from the properties so that a new one counts at once
        (stage checkpoints, `<stage>.ckpt`, are matched by `is_checkpoint_name`)."""
        names = {getattr(self, attr) for attr, value in vars(RunDir).items() if isinstance(value, property)}
        return frozenset(path.relative_to(self.root).parts[0] for path in names)

    def replaced_folders(self) -> dict[str, str]:
        """The folders that a stage replaces as a whole (io_utils.atomic_dir), each with the record that every
        version of lightpeft left in it (how a folder from before manifests is recognised); checkpoints apart."""
        records = (self.estimate_record, self.prune_record, self.pruned_adapter / "adapter_config.json",
                   self.train_record, self.export_record)
        return {record.parent.name: record.name for record in records}

    @staticmethod
    def is_checkpoint_name(name: str) -> bool:
        return name.endswith(".ckpt") and len(name) > len(".ckpt")
