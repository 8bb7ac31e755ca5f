"""Resumable estimation state in safetensors + JSON, independent of the world size that wrote it.

Only the trainable state is saved: masks and PEFT weights (full fp32 values), their AdamW moments, the step, and
whatever accumulators the caller adds (the importance tracker's). The frozen base is reloaded from its checkpoint.
Because every tensor is stored whole (gathered from ZeRO partitions), a run checkpointed on 2 ranks resumes on 1 or 8,
and no pickle is ever read back (DeepSpeed's own checkpoints are pickles, so we do not use them).

Exactness: the data order is a pure function of the step (StepBatches) and the loop reseeds torch per step, so a
resumed run replays exactly the steps an uninterrupted one would have taken. The same whole-tensor state, held in
memory, carries training across a structural change a step hook asks for (save, transform, rebuild, restore;
docs/hooks.md), which is why such a change needs no ZeRO-specific code.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..errors import LightPeftError
from ..io_utils import atomic_dir, load_tensors, read_json, remove_owned, save_tensors, write_json
from ..rundir import CHECKPOINT_RECORD
from ..runtime import Runtime
from .hooks import Restructure, StepHooks, Trainee
from .zero import full_value, gathered

log = logging.getLogger(__name__)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
Rebuild = Callable[[dict[str, Any]], Trainee]  # meta -> a fresh model, optimizer, schedule and engine
# Called as fn(path, step) on every rank after each checkpoint is complete: a launcher that keeps its own copies
# (Ray: ray.train.report) listens here instead of knowing which stage checkpoints.
LISTENERS: list[Callable[[Path, int], None]] = []


class LoopState(Protocol):
    """What the loop keeps across a resume besides model and hooks (its loss history and token count)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


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


def _local_partition(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of a full value, zero-padded as ZeRO-3 pads the last rank's partition.

    DeepSpeed's own full-value setters (`safe_set_full_*`, 0.19) cut the unpadded value and fail on the last rank
    whenever a parameter's size is not a multiple of the world size, so ZeRO-3 restores set local partitions.
    """
    import torch.distributed as dist

    size = param.partition_numel()
    start = size * dist.get_rank(group=getattr(param, "ds_process_group", None))
    flat = value.reshape(-1).to(torch.float32)[start:start + size]
    return torch.cat([flat, flat.new_zeros(size - flat.numel())])


def _set_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """The optimizer's fp32 master copy of a DeepSpeed-managed parameter."""
    if getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(param, _local_partition(param, value))
    elif _uses_deepspeed(param):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value)


def _set_state(engine, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
    if getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_set_local_optimizer_state

        safe_set_local_optimizer_state(param, _local_partition(param, value), key)
    elif _uses_deepspeed(param):
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


def checkpoint_tensors(engine, named_params: list[tuple[str, torch.Tensor]],
                       extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: the whole trainable state by name, on every rank (what a checkpoint file holds)."""
    tensors: dict[str, torch.Tensor] = {}
    _link_optimizer_state(engine)
    for name, p in named_params:
        tensors[f"param/{name}"] = full_value(p)
        for key in ADAM_KEYS:
            tensors[f"{key}/{name}"] = _get_state(engine, p, key)
    tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in extra.items()})
    return tensors


def save_checkpoint(path: Path, engine, named_params: list[tuple[str, torch.Tensor]], step: int,
                    extra: dict[str, torch.Tensor], meta: dict, runtime: Runtime, keep: int = 1,
                    loop: dict[str, torch.Tensor] | None = None) -> None:
    """Collective: every rank gathers; rank 0 writes `path` atomically, keeping `keep` checkpoints in all.

    The previous latest checkpoint is renamed to `<path>.step-NNNNNNN` before the new one takes its place, and only
    then are the ones beyond `keep` deleted, so at every instant some complete checkpoint exists (docs/hooks.md).
    `loop` is the loop's own state (loss history, token count), stored as "loop/<key>".
    """
    tensors = checkpoint_tensors(engine, named_params, extra)
    tensors.update({f"loop/{k}": v.detach().cpu().contiguous() for k, v in (loop or {}).items()})
    if runtime.is_main:
        staging = path.with_name(f".{path.name}.staging")
        with atomic_dir(staging) as tmp:
            save_tensors(tmp / "state.safetensors", tensors)
            write_json(tmp / CHECKPOINT_RECORD, {**meta, "step": step, "world_size": runtime.world_size})
        _publish(staging, path, keep)
        log.info("checkpoint at step %d written to %s", step, path)
    runtime.barrier()
    for listener in LISTENERS:
        listener(path, step)


_OLDER = re.compile(r"\.step-(\d+)$")


def older_checkpoints(path: Path) -> list[tuple[int, Path]]:
    """The kept older checkpoints beside `path` (`<path>.step-N`), newest first."""
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.glob(f"{path.name}.step-*"):
        m = _OLDER.search(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _publish(staging: Path, path: Path, keep: int) -> None:
    if path.is_dir():
        try:
            old_step = int(read_json(path / "state.json", "checkpoint record")["step"])
        except (LightPeftError, KeyError, TypeError, ValueError):
            old_step = -1  # unreadable: rotated out under a name that sorts last, then deleted
        older = path.with_name(f"{path.name}.step-{max(old_step, 0):07d}")
        remove_owned(older)
        os.replace(path, older)
    os.replace(staging, path)
    for _, old in older_checkpoints(path)[max(keep - 1, 0):]:
        remove_owned(old)  # never deletes what we did not write (docs/architecture.md, "Guarantees")


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint: `path`, else the newest kept older one (a crash between the two renames of
    `_publish` leaves only those). Folders being written are hidden temporaries and never count."""
    for candidate in [path, *(p for _, p in older_checkpoints(path))]:
        if (candidate / "state.json").is_file():
            return candidate
    return None


def remove_checkpoints(path: Path) -> None:
    """Delete `path` and the older checkpoints kept beside it (once the stage's output is written)."""
    for p in [path, *(p for _, p in older_checkpoints(path))]:
        remove_owned(p)


def read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(meta, tensors) of the newest complete checkpoint at `path` (or kept beside it), None when there is none;
    an unreadable one is an error naming the folder, never silently skipped."""
    found = latest_checkpoint(path)
    if found is None:
        return None
    meta = read_json(found / CHECKPOINT_RECORD, f"checkpoint record (delete {found} to start over)")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise LightPeftError(f"checkpoint record at {found / CHECKPOINT_RECORD} has no step; delete {found} to start over")
    return meta, load_tensors(found / "state.safetensors", f"checkpoint state (delete {found} to start over)")


def restore_checkpoint(engine, named_params: list[tuple[str, torch.Tensor]], meta: dict,
                       tensors: dict[str, torch.Tensor],
                       source: Path | str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Load params and AdamW moments into a freshly initialised engine; returns the caller's `extra` tensors.

    A checkpoint lacking a tensor is refused before anything is loaded: a parameter left at its fresh value would
    silently resume a different run than the one that was checkpointed."""
    if not isinstance(meta.get("step"), int):
        raise LightPeftError(f"{source} is incomplete: it lacks the step in state.json; delete it to start the "
                             "stage afresh")
    check_shapes(named_params, tensors, source)
    step = int(meta["step"]) + 1  # optimizer steps taken so far
    _init_adam_state(engine, step)
    for name, p in named_params:
        value = tensors[f"param/{name}"]
        _set_value(p, value)
        with gathered([p], modifier_rank=0), torch.no_grad():
            if p.data.numel() == value.numel():  # under ZeRO-3 only the modifier rank sees the full tensor
                p.data.copy_(value.to(p.dtype).view_as(p.data))
        for key in ADAM_KEYS:
            _set_state(engine, p, key, tensors[f"{key}/{name}"])
    if getattr(engine, "scheduler", None) is not None:
        for _ in range(step):
            engine.scheduler.step()
    return {k.removeprefix("extra/"): v for k, v in tensors.items() if k.startswith("extra/")}


def check_shapes(named_params: list[tuple[str, torch.Tensor]], tensors: dict[str, torch.Tensor],
                 source: Path | str = "the checkpoint") -> None:
    """Every parameter must find a value and moments of its own full shape (ZeRO-3 keeps it as `ds_shape`)."""
    for name, p in named_params:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        for key in ("param", *ADAM_KEYS):
            value = tensors.get(f"{key}/{name}")
            if value is None:
                raise LightPeftError(f"{source} is incomplete: it lacks {key}/{name}; delete it to start the "
                                     "stage afresh")
            if tuple(value.shape) != shape:
                got = f"shape {tuple(value.shape)}"
                raise LightPeftError(f"checkpoint state has {got} for {key}/{name}, the model's parameter has shape "
                                     f"{shape}; the model was built for another structure than the saved state")


@dataclass
class Checkpointing:
    """The loop's periodic checkpoints: after every `every`-th optimizer step but the last, to `path`.

    `meta` (JSON) is stored with each; the hooks' `state_dict()` is stored as the "extra/" tensors.
    """

    path: Path
    every: int
    meta: dict[str, Any] = field(default_factory=dict)
    keep: int = 1

    def due(self, step: int, steps: int) -> bool:
        return bool(self.every) and (step + 1) % self.every == 0 and step + 1 < steps

    def save(self, trainee: Trainee, hooks: StepHooks, step: int, runtime: Runtime,
             loop: LoopState | None = None) -> None:
        meta = {**self.meta, **({"structure": trainee.structure} if trainee.structure else {})}
        save_checkpoint(self.path, trainee.engine, trainee.named, step, hooks.state_dict(), meta, runtime,
                        keep=self.keep, loop=None if loop is None else loop.state_dict())


def resume(path: Path, trainee: Trainee, hooks: StepHooks, runtime: Runtime, what: str,
           accept: Callable[[dict, dict[str, torch.Tensor]], str | None] | None = None,
           rebuild: Rebuild | None = None, loop: LoopState | None = None) -> int:
    """The first step to run: 0, or the step after the checkpoint at `path` (restored into `trainee` and `hooks`).

    `accept(meta, tensors)` returns why a checkpoint does not belong to this run (it is then ignored), or None.
    A checkpoint written after a restructure records the structure; the model is then rebuilt for it first.
    `loop` receives the loop's saved state (loss history, tokens), when the checkpoint has one.
    """
    found = read_checkpoint(path)
    if found is None:
        return 0
    meta, tensors = found
    why = accept(meta, tensors) if accept is not None else None
    if why:
        log.warning("ignoring checkpoint %s: %s", path, why)
        return 0
    if meta.get("structure"):
        _rebuild(trainee, meta, hooks, rebuild, f"the checkpoint {path} was written after a restructure")
    hooks.load_state_dict(restore_checkpoint(trainee.engine, trainee.named, meta, tensors, source=path))
    if loop is not None:
        loop.load_state_dict({k.removeprefix("loop/"): v for k, v in tensors.items() if k.startswith("loop/")})
    log.info("resumed %s from %s after step %d (written by %d ranks, now %d)", what, path, meta["step"],
             meta["world_size"], runtime.world_size)
    return int(meta["step"]) + 1


def apply_restructure(trainee: Trainee, action: Restructure, step: int, hooks: StepHooks, rebuild: Rebuild | None,
                      runtime: Runtime) -> None:
    """Collective: snapshot the trainable state whole, transform it, rebuild, restore (docs/hooks.md).

    The state travels in memory in the checkpoint's own form, so this is exactly a save and a resume into a
    new model, with the transform in between; a no-op transform changes nothing, on any world size.
    """
    why = f"a hook asked for a restructure at step {step} ({action.reason or 'no reason given'})"
    if rebuild is None:
        raise LightPeftError(f"{why}, but this stage gave the loop no way to rebuild its model")
    tensors = checkpoint_tensors(trainee.engine, trainee.named, hooks.state_dict())
    meta = {"step": step, "world_size": runtime.world_size, "structure": dict(trainee.structure)}
    tensors, meta = action.transform(tensors, meta)
    if int(meta.get("step", -1)) != step:
        raise LightPeftError(f"{why}: the transform changed meta['step'] ({meta.get('step')}); it must keep it")
    _rebuild(trainee, meta, hooks, rebuild, why)
    extra = restore_checkpoint(trainee.engine, trainee.named, meta, tensors, source="the restructured state")
    hooks.load_state_dict(extra)
    log.info("restructured after step %d: %s; %d trainable tensors", step, action.reason or "no reason given",
             len(trainee.named))


def _rebuild(trainee: Trainee, meta: dict, hooks: StepHooks, rebuild: Rebuild | None, why: str) -> None:
    """Replace the trainee's model and engine by `rebuild(meta)`'s, releasing the old ones first."""
    if rebuild is None:
        raise LightPeftError(f"{why}, but this stage gave the loop no way to rebuild its model")
    close = getattr(trainee.engine, "close", None)
    if close is not None:  # DeepSpeed: removes its hooks and buffers from the old model
        close()
    trainee.model = trainee.engine = None
    trainee.named = []
    gc.collect()
    new = rebuild(meta)
    trainee.model, trainee.engine, trainee.named = new.model, new.engine, new.named
    trainee.structure = dict(meta.get("structure") or {})
    hooks.after_rebuild(trainee)
