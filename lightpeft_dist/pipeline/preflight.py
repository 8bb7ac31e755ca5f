"""Validation of everything a run will read, before the first stage starts (and before any rank starts work).

Each check used to live where its input was first used, so a bad eval file or an unloadable model surfaced after
minutes or hours of earlier stages, sometimes as a library traceback. Here every input the requested stages need is
looked at once, cheaply (config.json parsed, safetensors headers read, the first row of each data file), and the
first problem is one `error:` line (docs/architecture.md, "Guarantees"). Every rank runs the same checks on the same
files, so under a multi-rank launcher they all stop alike.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import assets
from ..config import Recipe
from ..data.peek import peek_split
from ..errors import LightPeftError
from ..models.loading import load_config, resolve_model_dir
from ..models.weights import check_model_weights

# Shared stages that never read the base model's weights or the data; any other stage (a strategy's own, such as
# Light-PEFT's estimate) is assumed to need both.
_NO_WEIGHTS = {"plan", "train", "export", "report"}
_NO_DATA = {"plan", "prune", "export", "report"}
_NO_MODEL = {"plan", "report"}


def check_run_dir(run_dir: Path) -> None:
    """The run directory is a folder, or can be made one (without making it: a refused run leaves nothing)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LightPeftError(f"run directory {run_dir} is a file, not a folder; pass --run-dir a new or existing "
                             "folder")
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LightPeftError(f"run directory {run_dir} cannot be created: {existing} is a file; pass --run-dir a "
                             "folder elsewhere")
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "written to" if existing == run_dir.absolute() else "created"
        raise LightPeftError(f"run directory {run_dir} cannot be {verb}: {existing} is not writable; pass --run-dir "
                             "a folder you can write to")


def check_model(recipe: Recipe, weights: bool) -> None:
    """config.json that transformers accepts for a supported family, a tokenizer folder, and (when `weights`)
    safetensors shards with readable headers; never a pickle."""
    real = resolve_model_dir(recipe.model.path)
    load_config(recipe.model.path)
    tokenizer = recipe.model.tokenizer or recipe.model.path
    if not Path(assets.resolve(tokenizer)).is_dir():
        raise LightPeftError(f"model.tokenizer {tokenizer} is not a folder; set it to a folder with tokenizer files "
                             "(or leave it unset to use model.path)")
    if weights:
        check_model_weights(real)


def check_inputs(recipe: Recipe, stage: str) -> None:
    """Check every input that `stage` (a stage name, or run/demo/all for the whole pipeline) will read. Data files
    the recipe names are all checked once any stage reads data (train evaluates on data.eval_file mid-run), and
    evaluate needs an eval or test split."""
    from .stages import SHARED_STAGES, strategy_for

    whole = stage in ("run", "demo", "all")
    names = {s.name for s in (*strategy_for(recipe).stages, *SHARED_STAGES)} if whole else {stage}
    if names - _NO_MODEL:
        check_model(recipe, weights=bool(names - _NO_WEIGHTS) or ("train" in names and recipe.train.distill_weight > 0))
    if names - _NO_DATA:
        peek_split(recipe.data, "train")
        for split, key in (("eval", "eval_file"), ("test", "test_file")):
            if getattr(recipe.data, key) is not None:
                peek_split(recipe.data, split)
        if "evaluate" in names and recipe.data.eval_file is None and recipe.data.test_file is None:
            raise LightPeftError("the evaluate stage needs data.eval_file or data.test_file; add one to the recipe")
