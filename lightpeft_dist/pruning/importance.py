"""PEFT module ("p2") and LoRA rank ("first-order") importance, tracked with hooks during estimation.

`ImportanceTracker` holds what every adapter kind shares (per-step sums, the second-half average, the cross-rank
reduction, checkpoint state); `LoraImportanceTracker` measures LoRA, bottleneck_importance.py the bottleneck adapter,
and `TrackerSet` drives one tracker per kind of a model as one (docs/adapters.md).

Module score: per token, ||delta(x)|| / ||base(x)|| over the hidden dimension, averaged over non-pad tokens of an
optimizer step, then over the second half of the steps (docs/method.md).

Rank score: the reference's |mean_j(A_ij dL/dA_ij)| + |mean_k(B_ki dL/dB_ki)|, computed in its equivalent
activation form |T_i| * (1/d_in + 1/d_out) with T_i = sum_tokens h_i * dL/dh_i and h = A(dropout(x)) (docs/method.md).
The activation form never reads `param.grad`, so it is unaffected by gradient partitioning (ZeRO) or by the optimizer
zeroing gradients; gradient accumulation sums T over micro-batches, which is the full-batch value.

Per-step statistics are summed across ranks before they are used (the reference used rank 0's alone, a bug we do not copy: docs/method.md), and
hooks record only while `recording` is set, so a gradient-checkpointing recompute never counts twice (docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer

from .activation import token_weights
from .module_keys import qualify
from ..models.families import unwrap
from ..runtime import Runtime


@dataclass
class _Module:
    name: str
    layer: nn.Module
    rank: int
    d_in: int
    d_out: int


def lora_modules(model: nn.Module, adapter: str = "default") -> list[tuple[str, LoraLayer]]:
    """LoRA-wrapped projections with names relative to the causal-LM model (e.g. model.layers.0.self_attn.q_proj)."""
    base = unwrap(model)
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


class ImportanceTracker:
    """The bookkeeping every kind shares. A kind subclasses it: its `__init__` calls `_setup` with its modules and
    adds hooks that feed `_add_ratio` (module score) and `self._taylor` (unit sums), and it says how the Taylor sums
    are shaped and turned into unit scores (`_taylor_shape`, `_rank_score`)."""

    def _setup(self, model: nn.Module, total_steps: int, runtime: Runtime, modules: list[_Module]) -> None:
        self.runtime = runtime
        self.first_recorded_step = total_steps // 2
        self.modules = modules
        self.recording = False
        self.token_mask: torch.Tensor | None = None
        n, device = len(self.modules), self._device(model)
        # Within the current optimizer step.
        self._ratio_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._ratio_tokens = torch.zeros(n, dtype=torch.float64, device=device)
        self._taylor = [torch.zeros(self._taylor_shape(m), dtype=torch.float64, device=device) for m in self.modules]
        self._base_norm: dict[int, torch.Tensor] = {}
        # Over the recorded (second-half) steps.
        self.module_sum = torch.zeros(n, dtype=torch.float64)
        self.rank_sum = [torch.zeros(m.rank, dtype=torch.float64) for m in self.modules]
        self.recorded_steps = 0
        self._handles = []

    @staticmethod
    def _taylor_shape(mod: _Module) -> tuple[int, ...]:
        raise NotImplementedError

    @staticmethod
    def _rank_score(mod: _Module, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _add_ratio(self, i: int, delta_norm: torch.Tensor, base_norm: torch.Tensor, like: torch.Tensor) -> None:
        ratio = torch.where(base_norm > 0, delta_norm / base_norm, torch.zeros_like(delta_norm))
        tokens = self._tokens(like)
        self._ratio_sum[i] += (ratio * tokens).sum()
        self._ratio_tokens[i] += tokens.sum()

    @staticmethod
    def _device(model: nn.Module) -> torch.device:
        return next(model.parameters()).device

    def _tokens(self, like: torch.Tensor) -> torch.Tensor:
        return token_weights(self.token_mask, like)

    def end_step(self, step: int) -> None:
        """Close optimizer step `step` (0-based): reduce across ranks and fold into the second-half averages."""
        rt = self.runtime
        ratio_sum = rt.all_reduce_sum(self._ratio_sum.clone())
        ratio_tokens = rt.all_reduce_sum(self._ratio_tokens.clone())
        taylor = [rt.all_reduce_sum(t.clone()) / rt.world_size for t in self._taylor]
        if step >= self.first_recorded_step:
            p2 = torch.nan_to_num(ratio_sum / ratio_tokens.clamp_min(1), nan=0.0, posinf=0.0, neginf=0.0)
            self.module_sum += p2.cpu()
            for mod, acc, t in zip(self.modules, self.rank_sum, taylor):
                score = self._rank_score(mod, t)
                acc += torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0).cpu()
            self.recorded_steps += 1
        self._ratio_sum.zero_()
        self._ratio_tokens.zero_()
        for t in self._taylor:
            t.zero_()
        self._base_norm.clear()

    def results(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        n = max(self.recorded_steps, 1)
        module_scores = {m.name: float(s / n) for m, s in zip(self.modules, self.module_sum)}
        rank_scores = {m.name: (r / n).float() for m, r in zip(self.modules, self.rank_sum)}
        return module_scores, rank_scores

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"module_sum": self.module_sum, "recorded_steps": torch.tensor(self.recorded_steps)}
        state.update({f"rank_sum.{m.name}": r for m, r in zip(self.modules, self.rank_sum)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module_sum = state["module_sum"].clone()
        self.recorded_steps = int(state["recorded_steps"])
        self.rank_sum = [state[f"rank_sum.{m.name}"].clone() for m in self.modules]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class LoraImportanceTracker(ImportanceTracker):
    """LoRA's module and rank scores, from hooks on each LoRA layer's base layer and A and B factors."""

    def __init__(self, model: nn.Module, total_steps: int, runtime: Runtime, adapter: str = "default"):
        self.adapter = adapter
        self._setup(model, total_steps, runtime, [
            _Module(name, m, m.r[adapter], m.in_features, m.out_features) for name, m in lora_modules(model, adapter)
        ])
        for i, mod in enumerate(self.modules):
            self._handles.append(mod.layer.base_layer.register_forward_hook(self._on_base(i)))
            self._handles.append(mod.layer.lora_A[adapter].register_forward_hook(self._on_lora_a(i)))
            self._handles.append(mod.layer.lora_B[adapter].register_forward_hook(self._on_lora_b(i)))

    @staticmethod
    def _taylor_shape(mod: _Module) -> tuple[int, ...]:
        return (mod.rank,)  # LoRA: one T_i serves both factors (docs/method.md)

    @staticmethod
    def _rank_score(mod: _Module, t: torch.Tensor) -> torch.Tensor:
        return t.abs() * (1.0 / mod.d_in + 1.0 / mod.d_out)

    def _on_base(self, i: int):
        def hook(module, args, out):
            if self.recording:
                self._base_norm[i] = out.detach().double().norm(dim=-1)
        return hook

    def _on_lora_b(self, i: int):
        def hook(module, args, out):
            if not self.recording or i not in self._base_norm:
                return
            mod = self.modules[i]
            delta = out.detach().double().norm(dim=-1) * float(mod.layer.scaling[self.adapter])
            self._add_ratio(i, delta, self._base_norm.pop(i), out)
        return hook

    def _on_lora_a(self, i: int):
        def hook(module, args, out):
            if not self.recording or not out.requires_grad:
                return
            h = out.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                self._taylor[i] += (h.double() * grad.double()).flatten(0, -2).sum(0)

            out.register_hook(grad_hook)
        return hook


class TrackerSet:
    """One tracker per adapter kind of a model, driven as one; result keys are qualified by kind (registry.py).

    Checkpoint state of a single tracker keeps its own names, as before kinds existed, so an interrupted estimate
    resumes; with several, each tracker's names are prefixed with its kind."""

    def __init__(self, trackers: dict[str, ImportanceTracker]):
        self.trackers = trackers

    @property
    def modules(self) -> list[_Module]:
        return [m for t in self.trackers.values() for m in t.modules]

    @property
    def recording(self) -> bool:
        return any(t.recording for t in self.trackers.values())

    @recording.setter
    def recording(self, value: bool) -> None:
        for t in self.trackers.values():
            t.recording = value

    @property
    def token_mask(self) -> torch.Tensor | None:
        return next(iter(self.trackers.values())).token_mask

    @token_mask.setter
    def token_mask(self, value: torch.Tensor | None) -> None:
        for t in self.trackers.values():
            t.token_mask = value

    def end_step(self, step: int) -> None:
        for t in self.trackers.values():
            t.end_step(step)

    def results(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        module_scores: dict[str, float] = {}
        rank_scores: dict[str, torch.Tensor] = {}
        for kind, t in self.trackers.items():
            modules, ranks = t.results()
            module_scores.update({qualify(kind, n): v for n, v in modules.items()})
            rank_scores.update({qualify(kind, n): v for n, v in ranks.items()})
        return module_scores, rank_scores

    def _prefix(self, kind: str) -> str:
        return "" if len(self.trackers) == 1 else f"{kind}:"

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self._prefix(kind) + k: v for kind, t in self.trackers.items() for k, v in t.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for kind, t in self.trackers.items():
            p = self._prefix(kind)
            t.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})

    def remove(self) -> None:
        for t in self.trackers.values():
            t.remove()
