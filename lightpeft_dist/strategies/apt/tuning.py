"""APT's step hooks in the train stage: LoRA rank growth (both modes).

Why: APT's adaptive tuning grows the LoRA budget while it tunes; the growth is a restructure (adapters/lora_growth.py)
that the shared train stage carries through its checkpoints (docs/hooks.md). Growth events: `apt.checkpoints` of them,
evenly inside the first `apt.window` training steps (event k after step round(k * W / (N + 1)) - 1, W = min(window,
steps), so tuning continues after the last one). At event k the total rank budget is linear from the initial one to
`apt.rank_growth` x it (`budget_at`), the top half of adapters by `LoraRankSalience` absorb the increase, capped at
`apt.max_rank`; the salience EMA starts over after each event. docs/method.md, "APT", says how this differs from
the reference.
"""

from __future__ import annotations

import logging

from ...adapters.lora_growth import budget_at, grow, growth_targets, lora_budget
from ...adapters.lora_salience import LoraRankSalience
from ...adapters.lora_structure import lora_layout
from ...training.hooks import HookList, Restructure, StepHooks
from ..base import TrainContext
from .section import AptConfig

log = logging.getLogger(__name__)
TRAIN_KEYS = ("mode", "rank_growth", "max_rank", "window", "checkpoints", "beta", "target_density", "use_kurtosis",
              "mask_ramp", "mask_ramp_step", "ramp", "distill_weight", "distill_temperature")


def event_steps(window: int, events: int, steps: int) -> dict[int, int]:
    """step -> event number (1-based) of the growth events, evenly inside min(window, steps) steps, none at the end."""
    span = min(window, steps)
    out = {}
    for k in range(1, events + 1):
        step = round(k * span / (events + 1)) - 1
        if 0 <= step < steps - 1 and step not in out:
            out[step] = k
    return out


class RankGrowth(StepHooks):
    """Grows LoRA ranks at the scheduled steps (see the module docstring); reads `tracker`'s module scores."""

    def __init__(self, ctx: TrainContext, apt: AptConfig, tracker: LoraRankSalience, events: dict[int, int]):
        self.ctx, self.apt, self.tracker, self.events = ctx, apt, tracker, events
        self.initial = lora_budget(lora_layout(ctx.trainee.model)["ranks"])  # built before any resume: the start

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        event = self.events.get(step)
        if event is None or self.apt.rank_growth <= 1.0:
            return None
        ranks = lora_layout(self.ctx.trainee.model)["ranks"]
        budget = budget_at(self.initial, self.apt.rank_growth, event, self.apt.checkpoints)
        new = growth_targets(ranks, self.tracker.module_scores(), budget, self.apt.max_rank)
        self.tracker.reset()
        log.info("APT growth event %d/%d after step %d: LoRA ranks %d -> %d (budget %.0f)", event,
                 self.apt.checkpoints, step, sum(ranks.values()), sum(new.values()), budget)
        return grow(self.ctx.trainee.model, new, seed=self.apt.seed,
                    reason=f"APT rank growth {event}/{self.apt.checkpoints}")


def apt_train_hooks(ctx: TrainContext) -> StepHooks | None:
    """The hooks `strategy: apt` adds to the train stage: distillation with a ramped weight and gradual pruning
    (gradual mode), and rank growth (at the pruning checkpoints in gradual mode, at `event_steps` in one-shot
    mode)."""
    from .gradual import GradualPrune, checkpoint_steps

    apt: AptConfig = ctx.recipe.section("apt")
    hooks: list[StepHooks] = []
    if apt.mode == "gradual":
        if apt.distill_weight > 0:  # first: it reweights the task loss
            from ...models.loading import load_tokenizer
            from .distill import make_apt_distiller

            hooks.append(make_apt_distiller(ctx.recipe, apt, ctx.runtime.device,
                                            load_tokenizer(ctx.recipe.model).pad_token_id))
        hooks.append(GradualPrune(ctx, apt))
        events = {s: k for s, k in checkpoint_steps(apt.window, apt.checkpoints).items() if s < ctx.steps - 1}
    else:
        events = event_steps(apt.window, apt.checkpoints, ctx.steps)
    if apt.rank_growth > 1.0:
        tracker = LoraRankSalience(ctx.trainee, ctx.runtime, beta=apt.beta)
        hooks += [tracker, RankGrowth(ctx, apt, tracker, events)]
    return HookList(hooks) if hooks else None
