"""The prune stage: slice the base model to the plan, then each adapter kind's estimation adapter.

The slicing itself is the pruning kit's (pruning/slicing.py for the base, each kind's own slicer for its adapter);
this stage only ties them to the run directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..adapters.registry import bare_kind, slice_adapters
from ..io_utils import read_json_if_present
from ..models.loading import load_config
from ..pruning.plan import read_plan
from ..pruning.slicing import check_plan, model_reference, prune_checkpoint
from ..rundir import RunDir


def run_prune(run_dir: Path, model_path: str) -> dict:
    """Slice the model, then each kind's estimation adapter, to the run's plan, checked against the model before
    anything is written (a plan of an older bottleneck run is upgraded). The previous plan's pruned adapter is removed
    first: a crash between the model and the adapter must not leave a new model beside an old adapter that the prune
    stage would then take for finished."""
    d = RunDir(run_dir)
    config = load_config(model_path)
    plan = read_plan(d.plan, model_reference(config))
    check_plan(plan, config)
    if d.pruned_adapter.exists():
        shutil.rmtree(d.pruned_adapter)
    record = prune_checkpoint(model_path, plan, d.pruned_model)
    bare = bare_kind(read_json_if_present(d.estimate_record, "estimate record"))
    record["adapter"] = slice_adapters(d.estimate_adapter, plan, bare, config, d.pruned_model, d.pruned_adapter)
    return record
