"""What a search round records while it trains: per-group output magnitudes, gradient sums and weights.

Activations are hooked on each group's output modules (LoRA's B projection times its scaling, the bottleneck
adapter) while `recording` is set (forward only, never a gradient-checkpointing recompute), summed over real tokens
per rank, and all-reduced at the end of the round. Gradient statistics are taken once per optimizer step, before the
step, from the full averaged gradient every rank holds alike (PyTorch: all-reduced here; DeepSpeed: its full-grad
accessor, collective under ZeRO-3), so N ranks give one process's sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...pruning.activation import token_weights
from ...runtime import Runtime
from ...training.hooks import StepHooks
from ...training.zero import full_value
from .criteria import GroupStats, weight_stats
from .supernet import Group, group_parameters, output_modules


class RoundStats(StepHooks):
    def __init__(self, model: nn.Module, groups: list[Group], runtime: Runtime, deepspeed: bool):
        self.groups, self.runtime, self.deepspeed = groups, runtime, deepspeed
        self.params = group_parameters(model, groups)
        n = len(groups)
        self.act_abs = torch.zeros(n, dtype=torch.float64)
        self.act_count = torch.zeros(n, dtype=torch.float64)
        self.grad_abs = torch.zeros(n, dtype=torch.float64)
        self.snip = torch.zeros(n, dtype=torch.float64)
        self.steps = 0
        self.recording = False
        self.token_mask: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._hook(g, scale))
                         for g, group in enumerate(groups) for m, scale in output_modules(model, group)]

    def _hook(self, g: int, scale: float):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if not self.recording:
                return
            w = token_weights(self.token_mask, out)
            self.act_abs[g] += float((out.detach().double().abs().sum(-1) * w).sum()) * abs(scale)
            self.act_count[g] += float(w.sum()) * out.shape[-1]
        return hook

    def before_forward(self, batch: dict) -> None:
        self.recording, self.token_mask = True, batch.get("attention_mask")

    def after_forward(self) -> None:
        self.recording = False

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
            return torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape) if g is None else g.detach().cpu()
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.detach().double().clone()
        if self.runtime.distributed:  # the plain engine averages only inside its step
            g = self.runtime.all_reduce_sum(g) / self.runtime.world_size
        return g.cpu()

    def before_optimizer_step(self, step: int) -> None:
        for g, params in enumerate(self.params):  # same order on every rank: the accessors are collective
            for _, p in params:
                grad = self._grad(p).double()
                w = full_value(p).double()
                self.grad_abs[g] += grad.abs().sum()
                self.snip[g] += (grad * w).abs().sum()
        self.steps += 1

    def finish(self, threshold: float) -> GroupStats:
        """Close the round (collective): reduce activation sums, read the final weights, remove the hooks."""
        for h in self._handles:
            h.remove()
        rt = self.runtime
        act = rt.all_reduce_sum(torch.stack([self.act_abs, self.act_count]))
        weights = [[full_value(p) for _, p in params] for params in self.params]
        n, sq, zeros, below = weight_stats(weights, threshold)
        return GroupStats(n_params=n, sq_weight=sq, zeros=zeros, below=below, act_abs=act[0], act_count=act[1],
                          grad_abs=self.grad_abs.clone(), snip=self.snip.clone(), steps=self.steps)
