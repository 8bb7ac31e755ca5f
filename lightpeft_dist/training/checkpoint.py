"""Resumable estimation state in safetensors + JSON, independent of the world size that wrote it.

Only the trainable state is saved: masks and PEFT weights (full fp32 values), their AdamW moments, the step, and
whatever accumulators the caller adds (the importance tracker's). The frozen base is reloaded from its checkpoint.
Because every tensor is stored whole (gathered from ZeRO partitions), a run checkpointed on 2 ranks resumes on 1 or 8,
and no pickle is ever read back (DeepSpeed's own checkpoints are pickles, so we do not use them).

Exactness: the data order is a pure function of the step (StepBatches) and the loop reseeds torch per step, so a
resumed run replays exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..io_utils import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..rundir import CHECKPOINT_RECORD
from ..runtime import Runtime
from .zero import full_value, gathered

log = logging.getLogger(__name__)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# Called as fn(path, step) on every rank after each checkpoint is complete: a launcher that keeps its own copies
# (Ray: ray.train.report) listens here instead of knowing which stage checkpoints.
LISTENERS: list[Callable[[Path, int], None]] = []


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The client torch optimizer (DeepSpeed keeps it, over its flat fp32 partitions, as `.optimizer`)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def _uses_deepspeed(param: torch.Tensor) -> bool:
    return getattr(param, "_z3_optimizer", None) is not None or getattr(param, "_hp_mapping", None) is not None


def _get_state(engine, param: torch.Tensor, key: str) -> torch.Tensor:
    if _uses_deepspeed(param):
        from deepspeed.utils import safe_get_full_optimizer_state

        return safe_get_full_optimizer_state(param, key).detach().float().cpu().clone()
    state = _torch_optimizer(engine).state.get(param, {})
    return state[key].detach().float().cpu().clone() if key in state else torch.zeros(param.shape)


def _set_state(engine, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
    if _uses_deepspeed(param):
        from deepspeed.utils import safe_set_full_optimizer_state

        safe_set_full_optimizer_state(param, value.to(torch.float32), key)
    else:
        _torch_optimizer(engine).state[param][key].copy_(value.view_as(param))


def _init_adam_state(engine, step: int) -> None:
    """Create AdamW's lazily-made state (zeros, step count `step`) so it can be overwritten in place."""
    opt = _torch_optimizer(engine)
    tensors = [p for group in opt.param_groups for p in group["params"]]
    # DeepSpeed puts its flat fp32 partitions into the param groups only for the duration of a step.
    tensors += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))  # ZeRO-3
    tensors += list(getattr(engine.optimizer, "single_partition_of_fp32_groups", []))  # ZeRO-1/2
    for p in {id(t): t for t in tensors}.values():
        state = opt.state[p]
        if not state:
            state.update({k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in ADAM_KEYS})
        state["step"] = torch.tensor(float(step))
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 map each parameter onto its optimizer-state fragment lazily, after the first step; (re)do it now
    so full optimizer states can be read before that step or written after we created the state ourselves."""
    zero_opt = engine.optimizer
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def save_checkpoint(path: Path, engine, named_params: list[tuple[str, torch.Tensor]], step: int,
                    extra: dict[str, torch.Tensor], meta: dict, runtime: Runtime) -> None:
    """Collective: every rank gathers; rank 0 writes `path` atomically (the previous checkpoint stays until then)."""
    tensors: dict[str, torch.Tensor] = {}
    _link_optimizer_state(engine)
    for name, p in named_params:
        tensors[f"param/{name}"] = full_value(p)
        for key in ADAM_KEYS:
            tensors[f"{key}/{name}"] = _get_state(engine, p, key)
    tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    if runtime.is_main:
        with atomic_dir(path) as tmp:
            save_tensors(tmp / "state.safetensors", tensors)
            write_json(tmp / CHECKPOINT_RECORD, {**meta, "step": step, "world_size": runtime.world_size})
        log.info("checkpoint at step %d written to %s", step, path)
    runtime.barrier()
    for listener in LISTENERS:
        listener(path, step)


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    if not (path / CHECKPOINT_RECORD).is_file():
        return None
    return read_json(path / CHECKPOINT_RECORD, "checkpoint record"), load_tensors(path / "state.safetensors")


def restore_checkpoint(engine, named_params: list[tuple[str, torch.Tensor]], meta: dict,
                       tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load params and AdamW moments into a freshly initialised engine; returns the caller's `extra` tensors."""
    step = int(meta["step"]) + 1  # optimizer steps taken so far
    _init_adam_state(engine, step)
    for name, p in named_params:
        value = tensors[f"param/{name}"]
        if _uses_deepspeed(p):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(p, value)
        with gathered([p], modifier_rank=0), torch.no_grad():
            if p.data.numel() == value.numel():  # under ZeRO-3 only the modifier rank sees the full tensor
                p.data.copy_(value.to(p.dtype).view_as(p.data))
        for key in ADAM_KEYS:
            _set_state(engine, p, key, tensors[f"{key}/{name}"])
    if getattr(engine, "scheduler", None) is not None:
        for _ in range(step):
            engine.scheduler.step()
    return {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}
