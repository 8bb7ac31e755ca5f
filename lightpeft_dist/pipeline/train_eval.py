"""Evaluation while fine-tuning (`train.eval_every`), and the best adapter it finds.

Why keep a best adapter: on small data the last step is often not the best one, and a cluster job should not have
to be rerun to get the adapter it already passed through. Every `eval_every` steps, and after the last step (so the
last adapter competes on the same footing), the eval split is scored; the adapter with the best validation metric
(accuracy for classification, else loss on the supervised tokens) is kept in memory and written next to the last one
as D/train/best_adapter/. Its state, the eval records and the best adapter's tensors, is part of every checkpoint,
so a resumed run ends with the same best adapter as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..config import Recipe
from ..training.hooks import StepHooks, Trainee
from ..training.zero import full_state
from .evaluate import task_metrics

log = logging.getLogger(__name__)
_RECORDS, _BEST = "eval.records", "eval.best."


def selection_metric(recipe: Recipe) -> tuple[str, bool]:
    """(metric name, higher is better) that picks the best adapter."""
    return ("accuracy", True) if recipe.data.format == "classification" else ("loss", False)


class PeriodicEval(StepHooks):
    """Task metrics on the eval split every `train.eval_every` optimizer steps and after the last one, on whatever
    model the trainee holds then; tracks the best adapter. `reporter` (set by the stage) logs the metrics."""

    def __init__(self, trainee: Trainee, tokenizer: Any, recipe: Recipe, steps: int):
        self.trainee, self.tokenizer, self.recipe, self.steps = trainee, tokenizer, recipe, steps
        self.evals: list[dict] = []
        self.best: dict | None = None  # {"step", "metric", "value"}
        self.best_state: dict[str, torch.Tensor] = {}
        self.reporter = None

    def due(self, step: int) -> bool:
        every = self.recipe.train.eval_every
        return bool(every and self.recipe.data.eval_file) and ((step + 1) % every == 0 or step + 1 == self.steps)

    def after_optimizer_step(self, step: int, loss: float) -> None:
        if not self.due(step):
            return
        model = self.trainee.model
        metrics = task_metrics(model, self.tokenizer, self.recipe, "eval")
        model.train()
        self.evals.append({"step": step + 1, **metrics})
        log.info("step %d eval: %s", step + 1, self.evals[-1])
        if self.reporter is not None:
            self.reporter.log({f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                              step + 1)
        name, higher = selection_metric(self.recipe)
        value = float(metrics[name])
        if self.best is None or (value > self.best["value"] if higher else value < self.best["value"]):
            self.best = {"step": step + 1, "metric": name, "value": value}
            self.best_state = full_state(self.trainee.named)  # collective under ZeRO-3, like the final adapter
            log.info("step %d: best adapter so far (%s %.4f)", step + 1, name, value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        record = json.dumps({"evals": self.evals, "best": self.best}).encode()
        return {_RECORDS: torch.tensor(list(record), dtype=torch.uint8),
                **{_BEST + k: v for k, v in self.best_state.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if _RECORDS not in state:
            return
        record = json.loads(bytes(state[_RECORDS].tolist()).decode())
        self.evals, self.best = record["evals"], record["best"]
        self.best_state = {k.removeprefix(_BEST): v.clone() for k, v in state.items() if k.startswith(_BEST)}
