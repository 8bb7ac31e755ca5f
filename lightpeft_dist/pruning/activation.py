"""Activation unit scores, collected during the estimation run at no extra forward cost (`prune.unit_scores`).

Why: on a short estimate the learned masks rank FFN neurons barely better than random (docs/results.md, the damage
table), because a mask moves by its summed, signed gradient and 40 steps of that is mostly noise. How much a unit
actually writes into the residual stream is measured by every forward pass: an FFN neuron j scores
mean_tokens |a_j| * ||W_down[:, j]||_2 and a head h scores mean_tokens ||x_h||_2 * ||W_o[:, h-slice]||_F, where a is
the down projection's input and x_h the head's slice of the output projection's input. This is a deviation from the
Light-PEFT reference (docs/method.md): the reference ranks by mask value only, which stays the default.

The statistics are read before the mask hooks scale the input (hooks prepended), only while `recording` is set (so a
gradient-checkpointing recompute is not counted twice) and over non-pad tokens. Like the PEFT importance trackers,
per-step sums are added across ranks at the end of every optimizer step, so every rank holds the global totals and a
checkpoint written by N ranks resumes on M. The weight norms come from probing each output projection's base layer
with unit vectors, which reads LoRA-wrapped, 4-bit (bitsandbytes) and ZeRO-3-partitioned weights alike.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.families import RESIDUAL_ADAPTER_SUFFIX, family_for, head_dim_of, layer_shapes, unwrap
from ..runtime import Runtime

PROBE_ROWS = 1024  # unit vectors per probe forward: bounds the probe's activation memory


def token_weights(token_mask: torch.Tensor | None, like: torch.Tensor,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """1 for a real token and 0 for padding, shaped like `like` without its feature dimension (all ones when the
    batch's attention mask does not match, e.g. for a probe)."""
    if token_mask is not None and token_mask.shape == like.shape[:-1]:
        return token_mask.to(like.device, dtype)
    return torch.ones(like.shape[:-1], dtype=dtype, device=like.device)


def base_layer(module: nn.Module) -> nn.Module:
    """The frozen projection under a PEFT wrapper (the module itself when it is not wrapped)."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else getattr(module, "base_layer", module)


@torch.no_grad()
def input_column_norms(linear: nn.Module, in_features: int, head_dim: int = 1) -> torch.Tensor:
    """||W[:, group]||_F for each group of `head_dim` input columns, by probing the layer with unit vectors.

    linear(e_j) - linear(0) is column j of the weight whatever the layer stores (dense, packed 4-bit, partitioned)."""
    param = next(linear.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    device = param.device
    zero = linear(torch.zeros(1, in_features, dtype=dtype, device=device)).float()
    squares = []
    for start in range(0, in_features, PROBE_ROWS):
        rows = torch.arange(start, min(start + PROBE_ROWS, in_features), device=device)
        probe = torch.zeros(len(rows), in_features, dtype=dtype, device=device)
        probe[torch.arange(len(rows), device=device), rows] = 1.0
        squares.append((linear(probe).float() - zero).pow(2).sum(-1))
    return torch.cat(squares).reshape(-1, head_dim).sum(-1).sqrt().cpu()


@torch.no_grad()
def output_weight_norms(owner: nn.Module, proj_name: str, in_features: int, head_dim: int = 1) -> torch.Tensor:
    """Column-group norms of the frozen weight in `owner.<proj_name>`: under a LoRA wrapper the base layer is probed;
    a bottleneck adapter (a residual forward hook on the projection) is silenced for the probe, because it is
    nonlinear and would otherwise leak into the columns."""
    adapter = getattr(owner, proj_name + RESIDUAL_ADAPTER_SUFFIX, None)
    saved = getattr(adapter, "scaling", None)
    if adapter is not None:
        adapter.scaling = 0.0
    try:
        return input_column_norms(base_layer(getattr(owner, proj_name)), in_features, head_dim)
    finally:
        if adapter is not None:
            adapter.scaling = saved


class ActivationTracker:
    """Sums |a_j| per FFN neuron and ||x_h|| per head over the estimation run's tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, runtime: Runtime):
        base = unwrap(model)
        self.spec = family_for(base)
        self.head_dim = head_dim_of(base.config)
        self.runtime = runtime
        self.layers = self.spec.decoder_layers(base)
        shapes = layer_shapes(base)
        device = next(base.parameters()).device
        self.recording = False
        self.token_mask: torch.Tensor | None = None
        self._step_head = [torch.zeros(s["num_attention_heads"], dtype=torch.float64, device=device) for s in shapes]
        self._step_ffn = [torch.zeros(s["intermediate_size"], dtype=torch.float64, device=device) for s in shapes]
        self._step_tokens = torch.zeros(1, dtype=torch.float64, device=device)
        self.head_sum = [torch.zeros_like(t, device="cpu") for t in self._step_head]
        self.ffn_sum = [torch.zeros_like(t, device="cpu") for t in self._step_ffn]
        self.tokens = torch.zeros(1, dtype=torch.float64)
        self._handles = []
        for i, layer in enumerate(self.layers):
            attn_out = getattr(self.spec.attention(layer), self.spec.head_out_proj)
            ffn_out = getattr(self.spec.ffn(layer), self.spec.ffn_out_proj)
            self._handles.append(attn_out.register_forward_pre_hook(self._on_head_input(i), prepend=True))
            self._handles.append(ffn_out.register_forward_pre_hook(self._on_ffn_input(i), prepend=True))

    # The hooks run on every estimation forward: per-token work stays in fp32 (a float64 copy of a [batch, seq,
    # intermediate] activation would be the largest tensor of the step); only the per-unit sums are float64.
    def _on_head_input(self, i: int):
        def hook(module, args):
            if self.recording:
                x = args[0].detach()
                norms = x.unflatten(-1, (-1, self.head_dim)).float().norm(dim=-1)  # [..., heads]
                w = token_weights(self.token_mask, x, torch.float32)
                self._step_head[i] += w.reshape(-1) @ norms.reshape(-1, norms.shape[-1])
                if i == 0:
                    self._step_tokens += w.sum()
        return hook

    def _on_ffn_input(self, i: int):
        def hook(module, args):
            if self.recording:
                x = args[0].detach()
                w = token_weights(self.token_mask, x, torch.float32)
                self._step_ffn[i] += w.reshape(-1) @ x.abs().reshape(-1, x.shape[-1]).float()
        return hook

    def end_step(self) -> None:
        """Add this optimizer step's sums, across ranks (one collective for all layers), to the run totals."""
        step = [*self._step_head, *self._step_ffn, self._step_tokens]
        reduced = self.runtime.all_reduce_sum(torch.cat(step)).cpu()
        for total, part in zip([*self.head_sum, *self.ffn_sum, self.tokens],
                               reduced.split([t.numel() for t in step]), strict=True):
            total += part
        for t in step:
            t.zero_()

    @torch.no_grad()
    def results(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head scores, FFN scores) per layer. Collective under ZeRO-3 (the probes gather each projection)."""
        n = float(self.tokens.clamp_min(1))
        heads, ffns = [], []
        for i, layer in enumerate(self.layers):
            w_heads = output_weight_norms(self.spec.attention(layer), self.spec.head_out_proj,
                                          self.head_sum[i].numel() * self.head_dim, self.head_dim)
            w_ffn = output_weight_norms(self.spec.ffn(layer), self.spec.ffn_out_proj, self.ffn_sum[i].numel())
            heads.append((self.head_sum[i] / n * w_heads.double()).float())
            ffns.append((self.ffn_sum[i] / n * w_ffn.double()).float())
        return heads, ffns

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"tokens": self.tokens}
        state.update({f"head.{i}": t for i, t in enumerate(self.head_sum)})
        state.update({f"ffn.{i}": t for i, t in enumerate(self.ffn_sum)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tokens = state["tokens"].clone().double()
        self.head_sum = [state[f"head.{i}"].clone().double() for i in range(len(self.head_sum))]
        self.ffn_sum = [state[f"ffn.{i}"].clone().double() for i in range(len(self.ffn_sum))]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
