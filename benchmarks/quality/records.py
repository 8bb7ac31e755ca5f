"""Keep a study's records in the repository, so that its generated section can be rebuilt after `runs/` is gone.

A study folder holds weights (the pruned models, adapters, the estimate's checkpoints) next to small records (every
stage's JSON, the resolved recipes, the invocations). Only the records are needed to aggregate the table, the verdict
and the figure, so `run_quality.py --save-records` copies those into `benchmarks/quality/records/<study>/`, and
`run_quality.py --aggregate-only --out-dir benchmarks/quality/records/<study>` rebuilds the section from the copy.
The copy is written to a temporary folder and renamed into place, so a stopped save leaves the old copy whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightpeft_dist.io_utils import read_json, write_json
from lightpeft_dist.reporting.flops import tensor_numel
from lightpeft_dist.rundir import ESTIMATE_RECORD, RunDir

RECORDS = Path(__file__).resolve().parent / "records"
SUFFIXES = (".json", ".yaml")  # stage records, resolved recipes, invocations; never weights or tensors
MODEL_DIRS = ("pruned_model",)  # a saved HF model: its tokenizer files and prune record are not needed
MAX_BYTES = 1 << 20  # a record is small; anything larger is not one (and would bloat the repository)


def record_files(out_dir: Path) -> list[Path]:
    """The study's record files, relative to `out_dir`, in a stable order. Of a saved model or adapter folder only
    its config is a record (the FLOPs count reads the pruned model's); the rest describes weights that are not kept."""
    def wanted(p: Path) -> bool:
        rel = p.relative_to(out_dir)
        in_model = any(part in MODEL_DIRS for part in rel.parts[:-1])
        return (p.is_file() and p.suffix in SUFFIXES and p.stat().st_size <= MAX_BYTES
                and (not in_model or p.name == "config.json"))

    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*") if wanted(p))


def save(out_dir: Path, dest_root: Path = RECORDS) -> Path:
    """Copy the study's records to `dest_root/<study name>` (replacing an earlier copy) and return that folder."""
    dest = dest_root / out_dir.resolve().name
    if dest.resolve() == out_dir.resolve():
        return dest  # aggregating the copy itself: nothing to save
    files = record_files(out_dir)
    tmp, old = dest.with_name(f".{dest.name}.tmp-{os.getpid()}"), dest.with_name(f".{dest.name}.old-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out_dir / rel, tmp / rel)
            if rel.name == ESTIMATE_RECORD:
                _keep_adapter_size(RunDir((out_dir / rel).parent.parent), tmp / rel)
        if dest.exists():
            os.replace(dest, old)  # the earlier copy (with what aggregating it wrote there) goes whole
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _keep_adapter_size(run: RunDir, record: Path) -> None:
    """The estimate's adapter weights are not copied, but the FLOPs count needs their size
    (lightpeft_dist/reporting/flops.py reads `adapter_params` when the adapter is absent): write it into the copy."""
    if run.estimate_adapter.is_dir():
        write_json(record, {**read_json(record), "adapter_params": tensor_numel(run.estimate_adapter)})
