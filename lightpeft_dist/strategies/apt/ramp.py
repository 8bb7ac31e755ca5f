"""APT's mask ramp in gradual mode: the blocks a pruning checkpoint will remove fade out before it.

Why: the paper does not drop blocks at once; in a window before each pruning checkpoint the masks of the blocks
that will go decrease by `apt.mask_ramp_step` (0.01) per step, so the rest of the model adapts while they fade, and
the physical prune at the checkpoint removes blocks whose output is already (nearly) zero. docs/method.md, "APT",
says when the blocks are chosen and how this differs from the reference.

`RampMasks` scales, by one value r, the input of the output projection at the blocks it is given: the o_proj input
columns of a KV group's query heads and the down_proj input coordinate of an FFN neuron, as the reference's head and
intermediate masks do. The pre-hooks are prepended, so the salience hooks (pruning/taylor.py) and the LoRA branch of
a projection that carries LoRA both see the masked input. At r = 0 the masked model computes what the physically
pruned one does (a removed group's q/k/v rows only feed its own heads, a removed neuron's gate/up rows only its own
coordinate); at r = 1 the hooks multiply by exactly 1. Masks are plain fp32 tensors, never parameters: nothing
trains them and ZeRO-3 never partitions them. With `apt.prune_hidden` the hidden dimensions a checkpoint removes
ramp by the same value, through `pruning.hidden_mask.HiddenRamp` (the residual stream and the norms; at r = 0 the
pruned model's hidden width).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...models.families import family_for, head_dim_of, layer_shapes, unwrap
from ...pruning.hidden_mask import HiddenRamp


def ramp_windows(checkpoints: dict[int, int], ramp: int) -> dict[int, int]:
    """checkpoint step -> the step after which its blocks are chosen (the ramp's start).

    `ramp` steps before the checkpoint, but after the previous checkpoint (so that at least one step of salience on
    the pruned model is in) and not before step 0. A checkpoint whose start would not precede it gets none (its
    blocks are chosen at the checkpoint, as without a ramp)."""
    out, previous = {}, -1
    for step in sorted(checkpoints):
        start = max(step - ramp, previous + 1, 0)
        if start < step:
            out[step] = start
        previous = step
    return out


def ramp_value(step: int, start: int, rate: float) -> float:
    """The mask of the blocks being removed during optimizer step `step` (chosen after step `start`)."""
    return max(0.0, 1.0 - rate * (step - start))


class RampMasks:
    """Forward pre-hooks scaling the chosen KV groups and FFN neurons of `model` by `value` (module docstring).

    `groups[i]` / `neurons[i]`: indices, in layer i of the current model, of the KV groups / FFN neurons to scale;
    `hidden`: the current model's hidden dimensions to scale (None: the hidden width is not ramped)."""

    def __init__(self, model: nn.Module, groups: list[list[int]], neurons: list[list[int]],
                 hidden: list[int] | None = None):
        base = unwrap(model)
        spec = family_for(base)
        head_dim = head_dim_of(base.config)
        self._value = 1.0
        self.hidden = HiddenRamp(model, hidden) if hidden else None
        self._masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = []
        for i, (layer, shape) in enumerate(zip(spec.decoder_layers(base), layer_shapes(base), strict=True)):
            rep = shape["num_attention_heads"] // shape["num_key_value_heads"]
            heads = torch.zeros(shape["num_attention_heads"], dtype=torch.bool)
            for g in groups[i]:
                heads[g * rep:(g + 1) * rep] = True
            ffn = torch.zeros(shape["intermediate_size"], dtype=torch.bool)
            ffn[torch.as_tensor(neurons[i], dtype=torch.long)] = True
            self._masks.append((heads, ffn))
            attn_out = getattr(spec.attention(layer), spec.head_out_proj)
            ffn_out = getattr(spec.ffn(layer), spec.ffn_out_proj)
            self._handles.append(attn_out.register_forward_pre_hook(self._hook(heads, head_dim), prepend=True))
            self._handles.append(ffn_out.register_forward_pre_hook(self._hook(ffn, 1), prepend=True))

    @property
    def value(self) -> float:
        return self._value

    @value.setter
    def value(self, value: float) -> None:
        self._value = value
        if self.hidden is not None:
            self.hidden.value = value

    def _hook(self, chosen: torch.Tensor, width: int):
        def hook(module: nn.Module, args: tuple):
            if self.value == 1.0 or not bool(chosen.any()):
                return None  # exactly the unmasked forward
            x = args[0]
            mask = torch.ones(chosen.numel(), dtype=torch.float32)
            mask[chosen] = self.value
            mask = mask.to(device=x.device, dtype=x.dtype)
            scaled = (x.unflatten(-1, (-1, width)) * mask[:, None]).flatten(-2)
            return (scaled, *args[1:])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.hidden is not None:
            self.hidden.remove()
