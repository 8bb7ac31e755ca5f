"""APT's gradual mode (`apt.mode: gradual`): prune physically at checkpoints while the LoRA tunes.

Why: the dense-start recipe decides what to prune from the salience the tuning itself produces, and prunes in steps
so that the later training runs on the smaller model. The train stage starts from the plan stage's full-density plan;
this hook
- accumulates APT's block salience (salience.py: first-order term + kurtosis, EMA with `apt.beta`) from every
  training step's own forward and backward, on the current (already pruned) model;
- at `apt.checkpoints` pruning checkpoints evenly in the first `apt.window` steps (checkpoint k after step
  round(k * window / N) - 1), computes the cubic density d_k = target + (1 - target) (1 - k/N)^3, so the last
  checkpoint hits `apt.target_density`;
- runs the budget search (pruning/budget.py) over the current blocks with the budget d_k x the *original* dense count, maps
  the kept blocks back to the source model's indices (a plan in the shared format, with the checkpoint's budget in
  `apt` and every earlier checkpoint's in `apt.history`), and returns `pruning.live.live_prune` of it, which the
  loop applies (LoRA weights and AdamW moments sliced, the model rebuilt smaller, on any world size);
- then restarts the salience on the new model (with the mask ramp: carries its EMA over, sliced to the kept
  blocks, since the next ramp's choice may come a step later).
Rank growth (tuning.py) runs at the same checkpoints. Each checkpoint's cost (parameters before and after, training
tokens/s over the steps before and after it; costs.py) goes to train.json's `hooks.apt_gradual_costs`, one INFO line
per checkpoint. With `apt.mask_ramp` (the default) the blocks a checkpoint
removes are chosen `apt.ramp` steps before it (`ramp.ramp_windows`), from the salience at that point, and masked
by a value falling by `apt.mask_ramp_step` per step until the checkpoint removes them physically (ramp.py); the
choice is checkpointed with the hook's state, so a run killed inside a ramp resumes the same ramp. Without it the
blocks are chosen and removed at the checkpoint at once.

With `apt.prune_hidden` the hidden dimensions join all of this: their salience (hidden.py, on the o_proj / down_proj
outputs) accumulates in the same EMA, summed across ranks; the budget search counts them with one-shot's cost model
(embeddings and LM head included, against the original whole-model count); the plan's `hidden` is in source
coordinates, composed across checkpoints like the heads and neurons; the ramp fades the chosen ones with the blocks
(pruning/hidden_mask.py's `HiddenRamp`), and `live_prune` slices the LoRA tensors' residual side and their moments
while the rebuild's slicer cuts the embedding, the norms and the LM head.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import torch

from ...adapters.lora_structure import lora_layout
from ...errors import LightPeftError
from ...io_utils import read_json
from ...models.families import unwrap
from ...pruning.live import PLAN_KEY, live_prune
from ...pruning.plan import PLAN_VERSION, plan_hash, summarize
from ...rundir import RunDir
from ...training.hooks import Restructure, StepHooks, Trainee, Transform
from ..base import TrainContext
from ...pruning.budget import plan_for_budget
from .costs import PruneCosts
from .plan import cost_model
from .ramp import RampMasks, ramp_value, ramp_windows
from .salience import AptSalience
from .section import AptConfig

log = logging.getLogger(__name__)


def checkpoint_steps(window: int, checkpoints: int) -> dict[int, int]:
    """step -> checkpoint number (1-based): evenly in the window, the last one after step window - 1."""
    return {round(k * window / checkpoints) - 1: k for k in range(1, checkpoints + 1)}


def cubic_density(target: float, k: int, n: int) -> float:
    """The scheduled density after checkpoint k of n: from 1 (k = 0) to `target` (k = n), cubic."""
    return target + (1.0 - target) * (1.0 - k / n) ** 3


def base_plan(kept: dict, current: dict, record: dict, extra: dict) -> dict:
    """The source-model plan keeping `kept` (indices into the current, pruned model, whose plan is `current`); with
    kept hidden dimensions (`kept["hidden"]`, current positions), the plan's `hidden` maps them to the source's."""
    shapes = record["layer_shapes"]
    layers = []
    for i, (groups, ffn) in enumerate(zip(kept["group"], kept["ffn"], strict=True)):
        rep = shapes[i]["num_attention_heads"] // shapes[i]["num_key_value_heads"]
        kv = [current["layers"][i]["kv_heads"][g] for g in groups]
        layers.append({"q_heads": [g * rep + j for g in kv for j in range(rep)], "kv_heads": kv,
                       "ffn": [current["layers"][i]["ffn"][j] for j in ffn]})
    plan = {"version": PLAN_VERSION, "model_fingerprint": record["model_fingerprint"],
            "prune": {"strategy": "apt", "mode": "gradual"}, "apt": extra, "layers": layers,
            "peft_modules": current["peft_modules"]}
    if kept.get("hidden") is not None:
        now = current.get("hidden", list(range(record["hidden_size"])))
        plan["hidden"] = [now[j] for j in kept["hidden"]]
    plan["summary"] = summarize(plan, shapes, record["hidden_size"], record["head_dim"])
    plan["hash"] = plan_hash(plan)
    return plan


class GradualPrune(StepHooks):
    """Salience while training, physical pruning at the checkpoints (see the module docstring)."""

    def __init__(self, ctx: TrainContext, apt: AptConfig):
        self.ctx, self.apt = ctx, apt
        if "layers" not in ctx.start_plan:
            raise LightPeftError("APT gradual training needs the plan it starts from: plan.json is not the pruned "
                                 "model's; run `lightpeft prune` (or `lightpeft run`) first")
        self.record = read_json(RunDir(ctx.run_dir).estimate_record, "APT calibration record")
        self.cost = cost_model(self.record, apt.prune_hidden)  # the source's; with hidden: the whole model
        self.dense = self.cost.dense()
        self.checkpoints = {s: k for s, k in checkpoint_steps(apt.window, apt.checkpoints).items() if s < ctx.steps}
        self.salience = self._salience(ctx.trainee.model)
        # ramp start step -> checkpoint step; `chosen`: the blocks being ramped out, their checkpoint, the ramp start
        ramps = ramp_windows(self.checkpoints, apt.ramp) if apt.mask_ramp else {}
        self.ramp_starts = {start: step for step, start in ramps.items()}
        self.chosen: dict | None = None
        self.masks: RampMasks | None = None
        self.costs = PruneCosts()

    def _salience(self, model) -> AptSalience:
        return AptSalience(model, self.ctx.runtime, self.apt.use_kurtosis, beta=self.apt.beta,
                           hidden=self.apt.prune_hidden)

    def before_forward(self, batch: dict) -> None:
        self.salience.recording, self.salience.token_mask = True, batch["attention_mask"]

    def after_forward(self) -> None:
        self.salience.recording = False

    def choose(self, step: int) -> tuple[dict, dict]:
        """The blocks kept at the checkpoint after `step`, by the budget search on the salience now, and its record."""
        k = self.checkpoints[step]
        density = cubic_density(self.apt.target_density, k, self.apt.checkpoints)
        # the current shapes and hidden width, the source's biases and embedding cost per hidden dimension
        cost = replace(self.cost, shapes=tuple(self.salience.shapes),
                       hidden_size=unwrap(self.ctx.trainee.model).config.hidden_size)
        scores = self.salience.scores()
        if "hidden" in scores:
            scores["hidden"] = scores["hidden"][0]  # one global set, as plan_for_budget takes it
        kept = plan_for_budget(scores, cost, density, reference_params=self.dense)
        entry = {"checkpoint": k, "step": step, "scheduled_density": density,
                 **{f: kept[f] for f in ("target_params", "kept_params", "density", "next_block_params")},
                 "dense_params": self.dense}
        if kept["hidden"] is not None:  # only runs that prune hidden dimensions record it: other plans keep their hash
            entry["hidden_size"] = len(kept["hidden"])
        return kept, entry

    def on_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        self.costs.add_step(metrics, self.ctx.trainee.model)

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        self.salience.end_step()  # collective, every step
        if step in self.ramp_starts:
            self._start_ramp(step, self.ramp_starts[step])
        if self.masks is not None:  # the value the next step's forwards use
            self.masks.value = ramp_value(step + 1, self.chosen["start"], self.apt.mask_ramp_step)
        k = self.checkpoints.get(step)
        if k is None:
            return None
        self.costs.checkpoint(k, step, self.ctx.trainee.model)
        current = self.ctx.trainee.structure.get(PLAN_KEY) or self.ctx.start_plan
        if self.chosen is not None and self.chosen["checkpoint_step"] == step:  # chosen at the ramp's start
            kept, entry = self.chosen["kept"], {**self.chosen["entry"], "chosen_after_step": self.chosen["start"]}
        else:
            kept, entry = self.choose(step)
        self._end_ramp()
        earlier = current.get("apt", {}).get("history", []) if self.ctx.trainee.structure.get(PLAN_KEY) else []
        history = [*earlier, entry]
        plan = base_plan(kept, current, self.record, {**entry, "history": history})
        log.info("APT pruning checkpoint %d/%d after step %d: density %.4f (scheduled %.4f), %d of %d parameters%s",
                 k, self.apt.checkpoints, step, kept["density"], entry["scheduled_density"], kept["kept_params"],
                 self.dense, f", hidden size {len(plan['hidden'])}" if "hidden" in plan else "")
        if plan["hash"] == current.get("hash"):
            return None
        action = live_prune(plan, self.ctx.source_config, lora_layout(self.ctx.trainee.model),
                            base_plan=self.ctx.start_plan,
                            reason=f"APT pruning checkpoint {k}/{self.apt.checkpoints}")
        # with the ramp, the next ramp may start right after this checkpoint: keep the salience, sliced to the kept
        # blocks (as the reference does); without it, it starts over (the earlier behaviour)
        return Restructure(_without_salience(action.transform, kept if self.apt.mask_ramp else None), action.reason)

    def _start_ramp(self, start: int, checkpoint_step: int) -> None:
        kept, entry = self.choose(checkpoint_step)
        self.chosen = {"start": start, "checkpoint_step": checkpoint_step, "kept": kept, "entry": entry}
        self._attach()
        log.info("APT mask ramp for checkpoint %d: chosen after step %d, masks fall by %g per step until step %d "
                 "(%d of %d parameters kept)", entry["checkpoint"], start, self.apt.mask_ramp_step, checkpoint_step,
                 kept["kept_params"], self.dense)

    def _attach(self) -> None:
        """Mask hooks on the current model for the blocks (and hidden dimensions) `chosen` removes (the complement
        of its kept ones)."""
        if self.masks is not None:
            self.masks.remove()
        kept = self.chosen["kept"]
        shapes = self.salience.shapes
        drop = lambda keep, n: sorted(set(range(n)) - set(keep))  # noqa: E731
        hidden = None if kept.get("hidden") is None else \
            drop(kept["hidden"], unwrap(self.ctx.trainee.model).config.hidden_size)
        self.masks = RampMasks(self.ctx.trainee.model,
                               [drop(g, s["num_key_value_heads"]) for g, s in zip(kept["group"], shapes, strict=True)],
                               [drop(f, s["intermediate_size"]) for f, s in zip(kept["ffn"], shapes, strict=True)],
                               hidden)

    def _end_ramp(self) -> None:
        if self.masks is not None:
            self.masks.remove()
        self.masks, self.chosen = None, None

    def after_rebuild(self, trainee: Trainee) -> None:
        self.salience.remove()  # a new tracker on the pruned model; load_state_dict then gets its sliced EMA, if any
        self.salience = self._salience(trainee.model)
        if self.chosen is not None:  # a restructure inside a ramp (none in gradual mode today): keep ramping
            value = self.masks.value
            self._attach()
            self.masks.value = value

    def stage_record(self) -> dict:
        return {"apt_gradual_costs": self.costs.finish(self.ctx.trainee.model),
                "apt_gradual_segments": self.costs.segments}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"apt.{k}": v for k, v in self.salience.state_dict().items()} | self.costs.state_dict()
        if self.chosen is not None:  # JSON bytes: the choice and the mask value the next step uses
            text = json.dumps({**self.chosen, "value": self.masks.value}, sort_keys=True)
            state["apt.ramp"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.costs.load_state_dict(state)
        own = {k.removeprefix("apt."): v for k, v in state.items() if k.startswith("apt.")}
        ramp = own.pop("ramp", None)
        if own:  # none after a pruning checkpoint without the ramp (dropped by the transform): it starts over
            self.salience.load_state_dict(own)
        if ramp is not None:
            chosen = json.loads(bytes(ramp.tolist()).decode())
            value = chosen.pop("value")
            self.chosen = chosen
            self._attach()
            self.masks.value = value


def _without_salience(transform: Transform, kept: dict | None = None) -> Transform:
    """The live-prune transform, dropping the hook's state (it indexes the blocks before the prune), or, given the
    `kept` blocks, keeping the block (and hidden) salience sliced to them (the ramp's choice is dropped either way)."""
    def wrapped(tensors: dict[str, torch.Tensor], meta: dict):
        tensors, meta = transform(tensors, meta)
        out = {k: v for k, v in tensors.items() if not k.startswith("extra/apt.")}
        if kept is not None:
            for name, value in tensors.items():
                parts = name.removeprefix("extra/apt.").split(".")
                if not name.startswith("extra/apt.") or parts[0] == "ramp":
                    continue
                if parts[-2:-1] and parts[-2] in ("group", "ffn"):  # [salience|kurtosis.]<kind>.<layer>
                    value = value[torch.as_tensor(kept[parts[-2]][int(parts[-1])], dtype=torch.long)]
                elif parts[-2:-1] and parts[-2] == "hidden":  # [salience|kurtosis.]hidden.0: one global set
                    value = value[torch.as_tensor(kept["hidden"], dtype=torch.long)]
                out[name] = value
        return out, meta

    return wrapped
