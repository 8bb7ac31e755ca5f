"""The prune stage: slice the base model to the plan, then each adapter kind's estimation adapter.

The slicing itself is the pruning kit's (pruning/slicing.py for the base, each kind's own slicer for its adapter);
this stage only ties them to the run directory.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.registry import bare_kind, slice_adapters
from ..io_utils import read_json, read_json_if_present
from ..models.loading import load_config
from ..pruning.slicing import prune_checkpoint
from ..rundir import RunDir


def run_prune(run_dir: Path, model_path: str) -> dict:
    """Slice the base model, then each kind's estimation adapter (a plan of an older bottleneck run is upgraded)."""
    plan = read_json(RunDir(run_dir).plan, "plan")
    record = prune_checkpoint(model_path, plan, RunDir(run_dir).pruned_model)  # checks the plan against the model first
    bare = bare_kind(read_json_if_present(RunDir(run_dir).estimate_record, "estimate record"))
    record["adapter"] = slice_adapters(RunDir(run_dir).estimate_adapter, plan, bare, load_config(model_path),
                                       RunDir(run_dir).pruned_model, RunDir(run_dir).pruned_adapter)
    return record
