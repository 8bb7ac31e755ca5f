"""Scalar masks on attention heads and FFN neurons, applied by forward pre-hooks (no forked modelling code).

A head mask scales each head's slice of the attention output projection's input, which equals the reference's
scaling of the attention probabilities (section 7 of the spec) and works with eager, SDPA and flash attention alike.
An FFN mask scales the input of the down projection, i.e. act(gate(x)) * up(x). The hooks sit on whatever module
occupies the projection's slot when they are attached, so attach them *after* PEFT wrapping: the LoRA branch then sees
the masked input too, which is what makes "mask = 0" identical to "unit physically removed".

The mask parameters are registered on the attention / MLP module that owns the projection, so DeepSpeed ZeRO-3
gathers them with that module like any other parameter. For the same reason the L1 term is collected inside the hooks
(`L1Sink`): outside its module's forward a partitioned mask is an empty placeholder, and summing it there would
silently drop the penalty. The hooks use a copy of the gathered mask, so the term's backward never reads a parameter
that ZeRO-3 has already released.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.families import family_for, head_dim_of, layer_shapes, unwrap

HEAD_MASK = "lightpeft_head_mask"
FFN_MASK = "lightpeft_ffn_mask"
_HOOKS = "_lightpeft_mask_hooks"


class L1Sink:
    """Collects sum|m| of every mask used in a forward pass while `active` (off during recomputes and eval)."""

    def __init__(self) -> None:
        self.active = False
        self.terms: list[torch.Tensor] = []

    def add(self, mask: torch.Tensor) -> None:
        if self.active:
            self.terms.append(mask.float().abs().sum())

    def pop(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total


def _used_mask(owner: nn.Module, name: str, sink: L1Sink | None) -> torch.Tensor:
    mask = getattr(owner, name).clone()  # backward through clone needs no parameter data
    if sink is not None:
        sink.add(mask)
    return mask


def _head_hook(owner: nn.Module, head_dim: int, sink: L1Sink | None):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        mask = _used_mask(owner, HEAD_MASK, sink).to(x.dtype)
        scaled = (x.unflatten(-1, (-1, head_dim)) * mask[:, None]).flatten(-2)
        return (scaled, *args[1:])

    return hook


def _ffn_hook(owner: nn.Module, sink: L1Sink | None):
    def hook(module: nn.Module, args: tuple):
        x = args[0]
        return (x * _used_mask(owner, FFN_MASK, sink).to(x.dtype), *args[1:])

    return hook


def attach_masks(model: nn.Module, init: float = 1.0, sink: L1Sink | None = None) -> None:
    """Add fp32 head and FFN masks (trainable, value `init`) to every decoder layer of `model`."""
    base = unwrap(model)
    spec = family_for(base)
    hd = head_dim_of(base.config)
    handles = []
    device = next(base.parameters()).device
    for layer, shape in zip(spec.decoder_layers(base), layer_shapes(base)):
        attn, mlp = spec.attention(layer), spec.ffn(layer)
        attn.register_parameter(HEAD_MASK, nn.Parameter(
            torch.full((shape["num_attention_heads"],), init, dtype=torch.float32, device=device)))
        mlp.register_parameter(FFN_MASK, nn.Parameter(
            torch.full((shape["intermediate_size"],), init, dtype=torch.float32, device=device)))
        handles.append(getattr(attn, spec.head_out_proj).register_forward_pre_hook(_head_hook(attn, hd, sink)))
        handles.append(getattr(mlp, spec.ffn_out_proj).register_forward_pre_hook(_ffn_hook(mlp, sink)))
    setattr(base, _HOOKS, handles)


def mask_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head masks, FFN masks), one per layer, in layer order."""
    base = unwrap(model)
    spec = family_for(base)
    layers = spec.decoder_layers(base)
    return ([getattr(spec.attention(layer), HEAD_MASK) for layer in layers],
            [getattr(spec.ffn(layer), FFN_MASK) for layer in layers])


@torch.no_grad()
def set_masks_from_plan(model: nn.Module, plan: dict) -> None:
    """Masks = 1 on the units a plan keeps and 0 on the ones it prunes (the masked twin of the pruned model)."""
    heads, ffns = mask_parameters(model)
    for layer_plan, head_mask, ffn_mask in zip(plan["layers"], heads, ffns):
        head_mask.zero_()[torch.as_tensor(layer_plan["q_heads"], dtype=torch.long)] = 1.0
        ffn_mask.zero_()[torch.as_tensor(layer_plan["ffn"], dtype=torch.long)] = 1.0
