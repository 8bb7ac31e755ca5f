"""Per-rank salience of LoRA modules during training: an EMA of |sum_j A_kj dL/dA_kj| per rank (APT's adapter score).

Why a step hook: the score comes from the training step's own forward and backward, with no extra pass. It is
computed in its activation form: with h = A(dropout(x)), sum_j A_kj dL/dA_kj = sum over tokens of h_k dL/dh_k, so a
forward hook on lora_A and a gradient hook on its output give it without reading `param.grad` (which ZeRO
partitions, and the engine zeroes). The loss the engine backpropagates is already divided by the accumulation steps,
so the micro-batch sums add up to the step's gradient. Each rank's sum is linear in its gradient, so the sum across
ranks divided by the world size is the sum of the job's (averaged) gradient: every rank gets the same number, equal
to one process's. The abs is taken after that reduction, once per optimizer step, then the EMA (beta 0.85) per rank;
an adapter's score is the mean of its ranks' EMA (docs/method.md, APT). Under DeepSpeed fp16 the gradients carry the
dynamic loss scale, so the scores do too; fp32 and bf16 (no loss scaling) give the plain values.
"""

from __future__ import annotations

import logging

import torch

from ..pruning.importance import lora_modules
from ..runtime import Runtime
from ..training.hooks import StepHooks, Trainee

log = logging.getLogger(__name__)


class LoraRankSalience(StepHooks):
    """EMA per LoRA rank of |sum_j A_kj dL/dA_kj|, from the loop's own backward, reduced across ranks."""

    def __init__(self, trainee: Trainee, runtime: Runtime, beta: float = 0.85, adapter: str = "default",
                 key: str = "lora_salience"):
        self.runtime, self.beta, self.adapter, self.key = runtime, beta, adapter, key
        self.recording = False
        self.ema: dict[str, torch.Tensor] = {}
        self.steps = 0
        self._handles: list = []
        self._attach(trainee.model)

    # --- hooks on the model ----------------------------------------------------------------------------------------

    def _attach(self, model: torch.nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.modules = lora_modules(model, self.adapter)
        self._sum = {n: torch.zeros(m.r[self.adapter], dtype=torch.float64) for n, m in self.modules}
        self.ema = {n: self.ema.get(n, torch.zeros(0, dtype=torch.float64)) for n, _ in self.modules}
        self.ema = {n: _fit(v, len(self._sum[n])) for n, v in self.ema.items()}
        for name, layer in self.modules:
            self._handles.append(layer.lora_A[self.adapter].register_forward_hook(self._on_a(name)))

    def _on_a(self, name: str):
        def hook(module, args, out):
            if not self.recording or not out.requires_grad:
                return  # a gradient-checkpointing recompute runs outside before_forward/after_forward
            h = out.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                self._sum[name] += (h.double() * grad.double()).flatten(0, -2).sum(0).cpu()

            out.register_hook(grad_hook)
        return hook

    # --- the loop's calls ------------------------------------------------------------------------------------------

    def before_forward(self, batch: dict) -> None:
        self.recording = True

    def after_forward(self) -> None:
        self.recording = False

    def before_optimizer_step(self, step: int) -> None:
        names = list(self._sum)
        if not names:
            return
        flat = torch.cat([self._sum[n] for n in names])
        flat = self.runtime.all_reduce_sum(flat.to(self.runtime.device)).cpu() / self.runtime.world_size
        offset = 0
        for n in names:
            r = len(self._sum[n])
            self.ema[n] = self.beta * self.ema[n] + (1 - self.beta) * flat[offset:offset + r].abs()
            offset += r
            self._sum[n].zero_()
        self.steps += 1

    def after_rebuild(self, trainee: Trainee) -> None:
        self._attach(trainee.model)

    # --- results ---------------------------------------------------------------------------------------------------

    def rank_scores(self) -> dict[str, torch.Tensor]:
        """Per module, the EMA vector (one entry per rank)."""
        return {n: v.clone() for n, v in self.ema.items()}

    def module_scores(self) -> dict[str, float]:
        """Per module, the mean over its ranks of the EMA: the adapter score rank growth sorts by."""
        return {n: float(v.mean()) if len(v) else 0.0 for n, v in self.ema.items()}

    def reset(self) -> None:
        """Zero every EMA (the reference resets the adapter scores after each growth event; docs/method.md)."""
        self.ema = {n: torch.zeros_like(v) for n, v in self.ema.items()}

    # --- checkpoint state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.key}.ema.{n}": v.clone() for n, v in self.ema.items()}
        state[f"{self.key}.steps"] = torch.tensor(self.steps)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A module's saved EMA is padded with zeros when its rank grew since; a module without one starts at 0."""
        if f"{self.key}.steps" in state:
            self.steps = int(state[f"{self.key}.steps"])
        for n in self.ema:
            saved = state.get(f"{self.key}.ema.{n}")
            if saved is not None:
                self.ema[n] = _fit(saved.to(torch.float64), len(self.ema[n]))


def _fit(v: torch.Tensor, r: int) -> torch.Tensor:
    """An EMA vector for r ranks: new ranks start at 0; a longer one (ranks cut since) starts over."""
    if len(v) == r:
        return v.clone()
    if len(v) < r:
        return torch.cat([v, torch.zeros(r - len(v), dtype=torch.float64)])
    log.warning("a LoRA module lost ranks since its salience was saved; its salience starts over")
    return torch.zeros(r, dtype=torch.float64)
