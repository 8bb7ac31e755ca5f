"""Module ("p2") and bottleneck-unit ("first-order") importance for the bottleneck adapter, tracked with hooks.

Same surface and bookkeeping as every kind's tracker (importance.py `ImportanceTracker`: per step, second half,
summed across ranks, hooks record only while `recording`); only what is measured differs.

Module score: per token ||s * up(act(down(h)))|| / ||base output||, averaged over non-pad tokens (docs/method.md, the
output_adapter's denominator is the linear output it is added to).

Unit score, the reference's |mean_j(D_ij dL/dD_ij)| + |mean_k(U_ki dL/dU_ki)| (docs/method.md, weights only, biases not
counted), in an activation form that is exact for this adapter and never reads `param.grad` (so ZeRO partitioning
and gradient zeroing cannot affect it): with lin = D h (down's output without its bias) and a = act(down(h)),
  sum_j D_ij dL/dD_ij = sum_tokens lin_i dL/dpre_i   and   sum_k U_ki dL/dU_ki = sum_tokens a_i dL/da_i,
so score_i = |T_pre_i| / d_in + |T_post_i| / d_out. (The spec notes that LoRA's single-T identity does not carry
over to a ReLU adapter; two sums, one per factor, do.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bottleneck import adapter_modules
from ..pruning.importance import ImportanceTracker, _Module
from ..runtime import Runtime


class BottleneckImportanceTracker(ImportanceTracker):
    def __init__(self, model: nn.Module, total_steps: int, runtime: Runtime):
        self.adapter = None
        self._setup(model, total_steps, runtime, [
            _Module(name, m, m.size, m.hidden, m.hidden) for name, m in adapter_modules(model)])
        for i, mod in enumerate(self.modules):
            self._handles.append(mod.layer.register_forward_hook(self._on_adapter(i)))
            self._handles.append(mod.layer.down.register_forward_hook(self._on_down(i)))
            self._handles.append(mod.layer.up.register_forward_hook(self._on_up(i)))

    @staticmethod
    def _taylor_shape(mod: _Module) -> tuple[int, ...]:
        return (2, mod.rank)  # row 0: T_pre (down's factor), row 1: T_post (up's factor)

    @staticmethod
    def _rank_score(mod: _Module, t: torch.Tensor) -> torch.Tensor:
        return t[0].abs() / mod.d_in + t[1].abs() / mod.d_out

    def _on_adapter(self, i: int):
        def hook(module, args, out):
            if self.recording:  # out is already scaled; args[0] is the projection's output
                base = args[0].detach().double().norm(dim=-1)
                self._add_ratio(i, out.detach().double().norm(dim=-1), base, out)
        return hook

    def _on_down(self, i: int):
        def hook(module, args, out):
            if self.recording and out.requires_grad:
                lin = out.detach() - module.bias.detach() if module.bias is not None else out.detach()
                self._grad_times(i, 0, out, lin)
        return hook

    def _on_up(self, i: int):
        def hook(module, args, out):
            if self.recording and args[0].requires_grad:
                self._grad_times(i, 1, args[0], args[0].detach())
        return hook

    def _grad_times(self, i: int, row: int, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """On backward, add sum_tokens value * dL/dtensor to row `row` of module i's Taylor sums."""

        def grad_hook(grad: torch.Tensor) -> None:
            self._taylor[i][row] += (value.double() * grad.double()).flatten(0, -2).sum(0)

        tensor.register_hook(grad_hook)
