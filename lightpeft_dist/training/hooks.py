"""Step hooks: what a strategy adds to the one training loop, in one object instead of loose callables.

Why: the estimate (masks, L1, importance tracking), the train stage (distillation, periodic eval) and the methods
still to come (APT's pruning and LoRA rank growth during tuning, PrunePEFT's module dropping between rounds) all need
the same few points of the loop. A `StepHooks` subclass overrides the ones it needs; a `HookList` composes several in
order. A hook may also ask for a structural change at an optimizer-step boundary by returning a `Restructure` from
`after_optimizer_step`; the loop honours it through the world-size-independent checkpoint (see docs/hooks.md), so a
change made on 2 ZeRO-3 ranks is the same change made in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..errors import LightPeftError

# (tensors, meta) -> (tensors, meta). Tensors are the checkpoint's, by name: "param/<name>", "exp_avg/<name>",
# "exp_avg_sq/<name>" (full fp32 values, gathered from any ZeRO partitioning) and "extra/<key>" (hook state).
# `meta` is JSON-able: at least {"step": the optimizer step just taken}; the rebuild callback receives it.
Transform = Callable[[dict[str, torch.Tensor], dict[str, Any]], tuple[dict[str, torch.Tensor], dict[str, Any]]]


@dataclass
class Trainee:
    """What the loop trains and may replace on a restructure: the model, its engine, its trainable parameters.

    Code that outlives a restructure (hooks, the caller after the loop) reads these fields instead of keeping its
    own references, which would point at the discarded model.
    """

    model: torch.nn.Module
    engine: Any
    named: list[tuple[str, torch.Tensor]]
    structure: dict[str, Any] = field(default_factory=dict)  # meta["structure"] it was last rebuilt from


class StepAction:
    """Something a hook asks the loop to do at an optimizer-step boundary."""


@dataclass(frozen=True)
class Restructure(StepAction):
    """Save the trainable state, apply `transform` to it, rebuild model + optimizer + engine, restore.

    The loop gathers every trainable tensor and its AdamW moments whole (as a checkpoint does), calls
    `transform(tensors, meta)`, hands the new meta to the caller's `rebuild(meta) -> Trainee` and loads the new
    tensors into what it returns: parameters and moments by name, the optimizer step count and the LR schedule
    position kept. A name missing from the tensors after the transform is an error, so a transform that adds
    parameters (new LoRA rank rows) must add their values and zero moments too.
    """

    transform: Transform
    reason: str = ""


def compose(actions: Iterable[StepAction]) -> StepAction | None:
    """One action for the loop: several restructures at the same step apply their transforms in order."""
    actions = [a for a in actions if a is not None]
    if not actions:
        return None
    if len(actions) == 1:
        return actions[0]
    if not all(isinstance(a, Restructure) for a in actions):
        raise LightPeftError(f"cannot combine step actions {[type(a).__name__ for a in actions]}")

    def transform(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        for a in actions:
            tensors, meta = a.transform(tensors, meta)
        return tensors, meta

    return Restructure(transform, "; ".join(a.reason for a in actions if a.reason))


class StepHooks:
    """No-op defaults; the loop calls, per optimizer step `step` and micro-batch:

    before_forward(batch) -> forward -> loss(batch, output, output.loss) -> after_forward() -> backward ->
    after_backward(step, micro); then before_optimizer_step(step) -> optimizer step -> on_metrics(step, metrics) ->
    after_optimizer_step(step, loss) (may return a StepAction) -> periodic checkpoint (with state_dict()).
    """

    def before_forward(self, batch: dict) -> None:
        pass

    def extra_loss(self, batch: dict, output: Any) -> torch.Tensor | None:
        """A term added to the loss (an L1 penalty, an auxiliary loss); None adds nothing."""
        return None

    def loss(self, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        """The loss after this hook, given the loss so far; by default `loss + extra_loss(...)`.

        Override it instead of `extra_loss` to reweight rather than add (distillation scales the loss so far)."""
        extra = self.extra_loss(batch, output)
        return loss if extra is None else loss + extra

    def after_forward(self) -> None:
        pass

    def after_backward(self, step: int, micro: int) -> None:
        pass

    def before_optimizer_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int, loss: float) -> StepAction | None:
        return None

    def on_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        """After each optimizer step, before `after_optimizer_step`: the loop's numbers for that step (loss, lr,
        grad_norm, tokens_per_s, tokens, peak_memory_bytes), the same on every rank; metric sinks listen here."""

    def after_rebuild(self, trainee: Trainee) -> None:
        """After a restructure, before the state is restored: re-attach to the new model (module hooks etc.)."""

    def stage_record(self) -> dict:
        """After the last step, on every rank: what the hook adds to the stage's record (JSON-able, keyed by names
        of its own; the train stage writes it as train.json's "hooks")."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint with the model (saved as "extra/<key>"); keys must not clash with other hooks."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Receives every hook's saved state (the keys it wrote are among them)."""


@dataclass
class HookList(StepHooks):
    """Several hooks, called in order; `loss` chains (each hook gets the loss so far), actions compose."""

    hooks: list[StepHooks] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hooks = [h for h in self.hooks if h is not None]

    def before_forward(self, batch: dict) -> None:
        for h in self.hooks:
            h.before_forward(batch)

    def loss(self, batch: dict, output: Any, loss: torch.Tensor) -> torch.Tensor:
        for h in self.hooks:
            loss = h.loss(batch, output, loss)
        return loss

    def after_forward(self) -> None:
        for h in self.hooks:
            h.after_forward()

    def after_backward(self, step: int, micro: int) -> None:
        for h in self.hooks:
            h.after_backward(step, micro)

    def before_optimizer_step(self, step: int) -> None:
        for h in self.hooks:
            h.before_optimizer_step(step)

    def after_optimizer_step(self, step: int, loss: float) -> StepAction | None:
        return compose([h.after_optimizer_step(step, loss) for h in self.hooks])

    def on_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        for h in self.hooks:
            h.on_metrics(step, metrics)

    def after_rebuild(self, trainee: Trainee) -> None:
        for h in self.hooks:
            h.after_rebuild(trainee)

    def stage_record(self) -> dict:
        out: dict = {}
        for h in self.hooks:
            part = h.stage_record()
            if out.keys() & part.keys():
                raise LightPeftError(f"hooks {[type(x).__name__ for x in self.hooks]} both record "
                                     f"{sorted(out.keys() & part.keys())}; give each hook's record keys of its own")
            out.update(part)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for h in self.hooks:
            state = h.state_dict()
            clash = out.keys() & state.keys()
            if clash:
                raise LightPeftError(f"hooks {[type(x).__name__ for x in self.hooks]} both save {sorted(clash)[:3]}; "
                                     "give each hook's state keys a prefix of its own")
            out.update(state)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for h in self.hooks:
            h.load_state_dict(state)
