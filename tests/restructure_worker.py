"""Launched by torchrun in tests/test_live_prune.py: the kit's tiny LoRA run on every rank under DeepSpeed, twice:
plainly for 3 steps (to the step after growth), and as APT's gradual mode uses the kit (salience, rank growth after
step 1, a live prune after step 2, checkpoints every 2 steps, so WORKDIR/ckpt holds the state after step 3 for a
resume on another world size).

Usage: restructure_worker.py SOURCE_MODEL WORKDIR DS_CONFIG OUT_DIR

Rank 0 writes OUT_DIR/result.json (both runs' losses, the final structure, the adapter salience) and
OUT_DIR/adapter.safetensors (the final trainable tensors, gathered whole).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightpeft_dist.io_utils import save_tensors
from lightpeft_dist.models.loading import load_config
from lightpeft_dist.runtime import init_distributed, shutdown
from lightpeft_dist.training.checkpoint import Checkpointing
from lightpeft_dist.training.hooks import HookList
from lightpeft_dist.training.loop import run_steps
from lightpeft_dist.training.zero import full_state
from restructure_kit import GRAD_ACCUM, STEPS, Batches, apt_like_hooks, builder, ds_config


def main() -> None:
    source, workdir, ds_path, out = (Path(a) for a in sys.argv[1:5])
    rt = init_distributed(require_group=True)
    try:
        ds_cfg = ds_config(str(ds_path), rt, load_config(str(source)).hidden_size)
        batches = Batches(rt.rank, rt.world_size)
        build = builder(source, workdir / "plain", rt, ds_cfg)
        plain = run_steps(build(), batches, 3, GRAD_ACCUM, rt, "plain", seed=7, rebuild=build).losses  # to step 2

        build = builder(source, workdir / "apt", rt, ds_cfg)
        trainee = build()
        tracker, script = apt_like_hooks(trainee, rt, source)
        apt = run_steps(trainee, batches, STEPS, GRAD_ACCUM, rt, "apt", hooks=HookList([tracker, script]), seed=7,
                        rebuild=build, checkpoint=Checkpointing(workdir / "ckpt", 2, {})).losses
        state = full_state(trainee.named)  # collective
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_tensors(out / "adapter.safetensors", state)
            (out / "result.json").write_text(json.dumps({
                "plain": plain, "apt": apt, "structure": trainee.structure, "world_size": rt.world_size,
                "salience": tracker.module_scores(), "zero_stage": ds_cfg["zero_optimization"]["stage"]}))
        rt.barrier()
    finally:
        shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
