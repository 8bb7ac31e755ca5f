"""APT's salience of the hidden dimensions (one global residual-stream mask), from the step's own passes.

Hidden dimension i is written by every attention and FFN sublayer: its score per step is

    sum over layers and m in {o_proj, down_proj} of (sum_tokens |Y_m,i|) * (sum_tokens |dL/dY_m,i|)
    + sum over layers and m of sqrt(max(kurtosis of row i of O_m = W_m * mean(x_m), 0))

with Y_m the projection's output, x_m its input (mean over the step's real tokens on every rank, from the
first-order tracker) and the kurtosis across the row's input channels, as the reference's hidden salience. The sums
are over the step's real tokens on every rank before the product (gradients of the step loss: each rank's are
divided by the world size), so every rank holds the same scores.

Why a separate tracker: it hooks the projections' outputs, while the head and neuron salience hooks their inputs;
only `apt.prune_hidden` needs it (docs/method.md, "APT").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...pruning.activation import token_weights
from ...runtime import Runtime

SUBLAYERS = ("o_proj", "down_proj")


class HiddenSalience:
    """Per-step output magnitude x gradient magnitude sums of every o_proj and down_proj, per hidden dimension."""

    def __init__(self, projections: list[nn.Module], hidden_size: int, runtime: Runtime):
        self.runtime, self.hidden_size = runtime, hidden_size
        self.recording = False
        self.token_mask: torch.Tensor | None = None
        n = len(projections)
        self._y_abs = torch.zeros(n, hidden_size, dtype=torch.float64)
        self._g_abs = torch.zeros(n, hidden_size, dtype=torch.float64)
        self._handles = [p.register_forward_hook(self._on_output(j)) for j, p in enumerate(projections)]

    def _on_output(self, j: int):
        def hook(module, args, out):
            if not self.recording or not out.requires_grad:
                return
            w = token_weights(self.token_mask, out, torch.float32).reshape(-1)
            y = out.detach().float().reshape(-1, out.shape[-1])
            self._y_abs[j] += (w @ y.abs()).double().cpu()
            out.register_hook(lambda g: self._add_grad(j, g, w))
        return hook

    def _add_grad(self, j: int, g: torch.Tensor, w: torch.Tensor) -> None:
        self._g_abs[j] += (w @ g.detach().float().reshape(-1, g.shape[-1]).abs()).double().cpu()

    def end_step(self) -> torch.Tensor:
        """This step's first-order hidden salience [hidden_size] (collective: one all-reduce)."""
        reduced = self.runtime.all_reduce_sum(torch.cat([self._y_abs, self._g_abs]))
        n = self._y_abs.shape[0]
        y_abs, g_abs = reduced[:n], reduced[n:] / float(self.runtime.world_size)
        self._y_abs.zero_()
        self._g_abs.zero_()
        return (y_abs * g_abs).sum(0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
