"""The one training loop behind `estimate` and `train`.

It talks to an engine with DeepSpeed's surface (`backward(loss)`, `step()`), so the DeepSpeed path swaps the engine,
not the loop. Batches come from `StepBatches`, a pure function of the step number, which is what makes resuming and
"N ranks == 1 process" comparisons exact. What a stage adds to the loop (extra losses, statistics, checkpointed
state, structural changes between steps) comes in as one `StepHooks` object (hooks.py, docs/hooks.md).
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from ..config import DataConfig
from ..data.batches import Collator, StepBatches, encode_split, load_rows
from ..errors import LightPeftError
from ..data.packing import pop_token_count
from .finite import check_loss
from ..runtime import Runtime, peak_memory
from .checkpoint import Checkpointing, Rebuild, apply_restructure
from .hooks import Restructure, StepAction, StepHooks, Trainee
from .schedules import make_schedule


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0) -> LambdaLR:
    """Linear warm-up, then linear decay to 0 at `steps` (the reference's schedule; docs/method.md)."""
    return make_schedule(optimizer, "linear", steps, warmup)


def train_batches(data: DataConfig, tokenizer, seq_len: int, batch_size: int, grad_accum: int, seed: int,
                  runtime: Runtime) -> StepBatches:
    """The train split as step-indexed micro-batches; `batch_size` is global per optimizer step, for any world size."""
    if batch_size % (grad_accum * runtime.world_size):
        raise LightPeftError(f"batch_size {batch_size} is not divisible by grad_accum x world size "
                             f"({grad_accum} x {runtime.world_size}); choose a batch_size that is")
    encoded = encode_split(load_rows(data, "train"), data, tokenizer, seq_len)
    return StepBatches(encoded, batch_size // grad_accum, seed, runtime.rank, runtime.world_size,
                       collator=Collator(tokenizer.pad_token_id))


class PlainEngine:
    """Engine without DeepSpeed: gradient accumulation, clipping, optimizer and schedule steps.

    Under a multi-rank launcher without `--deepspeed` it averages gradients across ranks before clipping (what DDP
    does, without wrapping the model), so every rank takes the same step and N ranks equal one process.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                 grad_accum: int, max_grad_norm: float, runtime: Runtime | None = None):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_accum, self.max_grad_norm = grad_accum, max_grad_norm
        self.runtime = runtime
        self.last_grad_norm: float | None = None  # before clipping, over all trainable parameters

    def forward(self, batch: dict):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.runtime is not None and self.runtime.distributed:
            self._average_gradients(params)
        clip = self.max_grad_norm if self.max_grad_norm and self.max_grad_norm > 0 else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Nothing to release: the model and optimizer go with the last reference to them."""

    def _average_gradients(self, params: list[torch.Tensor]) -> None:
        for p in params:  # every rank must join every reduction, with or without a gradient of its own
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]) if params else torch.zeros(0)
        self.runtime.all_reduce_sum(flat)
        flat /= self.runtime.world_size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


@dataclass
class LoopStats:
    """The loop's record: the loss of every step (a resumed run's includes the steps before the checkpoint, which
    the checkpoint carries), this rank's tokens and the seconds spent stepping."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    job_tokens: int = 0  # all ranks' tokens (exact, summed with the loss each step)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": torch.tensor(self.losses, dtype=torch.float64), "tokens": torch.tensor(self.tokens),
                "seconds": torch.tensor(self.seconds, dtype=torch.float64),
                "job_tokens": torch.tensor(self.job_tokens)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "losses" in state:  # checkpoints written before the loop kept its history have none
            self.losses = [float(v) for v in state["losses"].tolist()]
            self.tokens, self.seconds = int(state["tokens"]), float(state["seconds"])
            self.job_tokens = int(state["job_tokens"])


def peak_memory_bytes() -> int:
    """Peak memory of this process since its stage began (runtime.peak_memory says what is measured)."""
    return peak_memory()["bytes"]


def _current_lr(engine) -> float:
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        return float(scheduler.get_last_lr()[0])
    return float(engine.optimizer.param_groups[0]["lr"])


def _grad_norm(engine) -> float | None:
    norm = getattr(engine, "last_grad_norm", None)
    return None if norm is None or not math.isfinite(float(norm)) else float(norm)


def run_steps(trainee: Trainee, batches, steps: int, grad_accum: int, runtime: Runtime, desc: str,
              hooks: StepHooks | None = None, start_step: int = 0, seed: int = 0,
              checkpoint: Checkpointing | None = None, rebuild: Rebuild | None = None,
              stats: LoopStats | None = None) -> LoopStats:
    """Steps `start_step..steps-1`; torch is reseeded per step (dropout), so a resumed run replays the same steps.

    `hooks` add to the loop (the order of calls is in hooks.py); the loss minimised is `hooks.loss(batch, output,
    output.loss)`. A `Restructure` a hook returns is applied through `rebuild(meta)` (docs/hooks.md), and
    `trainee` is updated in place, so after the loop it holds the model that was trained last. `stats` continues a
    resumed run's record (checkpoint.resume fills it); checkpoints carry it. After every step the hooks get the
    step's metrics (`on_metrics`: loss, lr, grad_norm, tokens_per_s, tokens, peak_memory_bytes).
    """
    hooks = StepHooks() if hooks is None else hooks
    stats = LoopStats() if stats is None else stats
    trainee.model.train()
    bar = tqdm(range(start_step, steps), desc=desc, unit="step", disable=not runtime.is_main, dynamic_ncols=True,
               initial=start_step, total=steps)
    for step in bar:
        t0, step_loss, step_tokens = time.perf_counter(), 0.0, 0
        torch.manual_seed(seed * 1_000_003 + step)
        engine = trainee.engine
        for micro in range(grad_accum):
            batch = {k: v.to(runtime.device) for k, v in batches.batch_for_step(step * grad_accum + micro).items()}
            n_tokens = pop_token_count(batch)  # packed batches carry it; never passed to the model
            hooks.before_forward(batch)
            output = engine.forward(batch)
            loss = hooks.loss(batch, output, output.loss)
            hooks.after_forward()
            engine.backward(loss)
            hooks.after_backward(step, micro)
            step_loss += float(loss.detach()) / grad_accum
            step_tokens += n_tokens
        stats.tokens += step_tokens
        hooks.before_optimizer_step(step)
        lr = _current_lr(engine)  # the LR this step uses; the schedule moves on inside engine.step()
        engine.step()
        seconds = time.perf_counter() - t0
        stats.seconds += seconds
        job_tokens = step_tokens
        if runtime.distributed:  # the job's loss and tokens, not rank 0's shard of them
            summed = runtime.all_reduce_sum(torch.tensor([step_loss, float(step_tokens)], dtype=torch.float64))
            step_loss, job_tokens = float(summed[0]) / runtime.world_size, int(summed[1])
        stats.job_tokens += job_tokens
        check_loss(desc, step, step_loss)  # every rank holds the same loss here, so all stop together
        stats.losses.append(step_loss if math.isfinite(step_loss) else float("nan"))
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{job_tokens / max(seconds, 1e-9):,.0f}")
        hooks.on_metrics(step, {"loss": step_loss, "lr": lr, "grad_norm": _grad_norm(engine),
                                "tokens_per_s": job_tokens / max(seconds, 1e-9), "tokens": job_tokens,
                                "peak_memory_bytes": peak_memory_bytes()})
        action = hooks.after_optimizer_step(step, step_loss)
        _agree_on_action(action, step, runtime)
        if isinstance(action, Restructure):
            apply_restructure(trainee, action, step, hooks, rebuild, runtime)
            trainee.model.train()
        elif action is not None:
            raise LightPeftError(f"the loop does not know the step action {type(action).__name__}")
        if checkpoint is not None and checkpoint.due(step, steps):
            checkpoint.save(trainee, hooks, step, runtime, loop=stats)
        _maybe_fault(step, runtime)
    return stats


def _agree_on_action(action: StepAction | None, step: int, runtime: Runtime) -> None:
    """A restructure is collective: a rank that asks alone would wait forever in the rebuild's collectives."""
    if not runtime.distributed:
        return
    asked = int(runtime.all_reduce_sum(torch.tensor([int(action is not None)], dtype=torch.int64)))
    if asked not in (0, runtime.world_size):
        raise LightPeftError(f"at step {step} {asked} of {runtime.world_size} ranks asked for a step action; hooks "
                             "must decide from state that every rank shares (e.g. statistics summed across ranks)")


def _maybe_fault(step: int, runtime: Runtime) -> None:
    """Fault injection for resume tests: LIGHTPEFT_FAULT_AFTER="RANK:STEP" SIGKILLs that rank after that step."""
    spec = os.environ.get("LIGHTPEFT_FAULT_AFTER")
    if spec and spec == f"{runtime.rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, grad_accum: int,
                max_grad_norm: float, ds_config: dict | None, runtime: Runtime):
    """PlainEngine for one process without a DeepSpeed config, DeepSpeed's engine (any ZeRO stage) otherwise."""
    if ds_config is None:
        return PlainEngine(model.to(runtime.device), optimizer, scheduler, grad_accum, max_grad_norm, runtime)
    from .zero import DeepSpeedEngine

    return DeepSpeedEngine(model, optimizer, scheduler, ds_config, runtime)
