"""Launched by torchrun in test_hooks.py: the train stage twice on the same pruned run, once plain and once with a
hook that asks for a no-op restructure after step AT (save, rebuild model + DeepSpeed engine, restore).

Usage: hooks_worker.py RECIPE DS_CONFIG PLAIN_RUN_DIR RESTRUCTURED_RUN_DIR AT

Each rank writes RESTRUCTURED_RUN_DIR/rebuilt.rank<R>.json: how many rebuilds its hook saw (the test checks that
the restructure really happened on every rank, so the equality it asserts is not vacuous).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightpeft_dist.config import load_recipe
from lightpeft_dist.pipeline.train import run_train
from lightpeft_dist.runtime import init_distributed, shutdown
from lightpeft_dist.training.hooks import Restructure, StepHooks, Trainee


class NoOpRestructure(StepHooks):
    """Asks for a restructure whose transform changes nothing, after optimizer step `at`."""

    def __init__(self, at: int):
        self.at, self.rebuilt = at, 0

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        if step != self.at:
            return None
        return Restructure(lambda tensors, meta: ({k: v.clone() for k, v in tensors.items()}, dict(meta)),
                           "no-op, for the test")

    def after_rebuild(self, trainee: Trainee) -> None:
        self.rebuilt += 1


def main() -> None:
    recipe_path, ds_config, plain_run, restructured_run, at = sys.argv[1:6]
    rt = init_distributed(require_group=True)
    recipe = load_recipe(recipe_path)
    try:
        run_train(recipe, Path(plain_run), rt, deepspeed=ds_config)
        hook = NoOpRestructure(int(at))
        run_train(recipe, Path(restructured_run), rt, deepspeed=ds_config, hooks=hook)
        Path(restructured_run, f"rebuilt.rank{rt.rank}.json").write_text(json.dumps({"rebuilt": hook.rebuilt}))
    finally:
        shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
