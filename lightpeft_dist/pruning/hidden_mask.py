"""The masked twin of hidden-dimension pruning: one 0/1 mask m on the residual stream, applied without slicing.

Why: pruning a hidden dimension removes it from every sublayer at once, and RMSNorm then normalises over the kept
dimensions only. The masked model must compute exactly what the pruned one does, so here
- the embedding output and every o_proj / down_proj output (LoRA included: the hooks sit on the projection's slot,
  after PEFT wrapping) are multiplied by m, so the residual stream is zero on the pruned dimensions, and
- every RMSNorm (input, post-attention, final) becomes `MaskedRMSNorm`: x / sqrt(sum(x^2 m) / sum(m) + eps) * w * m,
  the RMS over the kept dimensions only.
q/k/v/gate/up and the LM head then read zeros on the pruned dimensions, which is what removing their columns does.
Used by the hidden-pruning equivalence test (masked == pruned); the one-shot pipeline prunes physically and needs no
masked model (docs/method.md, "APT").

`HiddenRamp` is the same mechanism with a soft mask for APT's gradual mask ramp: the dimensions a checkpoint will
remove get the mask value r (1 on the kept ones), and it is all hooks, no module is replaced, so a training engine
(ZeRO-3 included, whose parameter gathering is registered on the original modules) is untouched. The norms are
rescaled from their own input and output: with y = w * x / sqrt(mean(x^2) + eps) the stock output,
y * m * sqrt(mean(x^2) + eps) / sqrt(sum(x^2 m) / sum(m) + eps) is the masked norm above, without reading w. At
r = 0 this computes the pruned model (up to rounding), at r = 1 the hooks return nothing (exactly the unmasked
model), and in between it is a continuous interpolation of the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.families import HEAD_NORMS, family_for, unwrap


class MaskedRMSNorm(nn.Module):
    """A Llama-family RMSNorm whose mean square runs over the kept dimensions (mask 1) only."""

    def __init__(self, norm: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        m = self.mask.to(x.device)
        variance = (x.pow(2) * m).sum(-1, keepdim=True) / m.sum()
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype) * m.to(dtype)


def _mask_output(mask: torch.Tensor):
    def hook(module, args, out):
        return out * mask.to(device=out.device, dtype=out.dtype)
    return hook


def attach_hidden_mask(model: nn.Module, kept: list[int]) -> list:
    """Mask `model` (a Llama/Mistral/Qwen2 model, PEFT-wrapped or not) to the `kept` hidden dimensions, in place.
    Returns the hook handles."""
    base = unwrap(model)
    spec = family_for(base)
    mask = torch.zeros(base.config.hidden_size)
    mask[torch.as_tensor(kept, dtype=torch.long)] = 1.0
    handles = [base.get_input_embeddings().register_forward_hook(_mask_output(mask))]
    for layer in spec.decoder_layers(base):
        for proj in (spec.head_out_proj, spec.ffn_out_proj):
            handles.append(spec.proj(layer, proj).register_forward_hook(_mask_output(mask)))
    for name, module in _residual_norms(base):
        parent_name, _, leaf = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, leaf, MaskedRMSNorm(module, mask))
    return handles


def _residual_norms(base: nn.Module) -> list[tuple[str, nn.Module]]:
    """The RMSNorms on the residual stream (input, post-attention, final), not those within a head (HEAD_NORMS)."""
    return [(name, module) for name, module in base.named_modules()
            if type(module).__name__.endswith("RMSNorm") and name.rpartition(".")[2] not in HEAD_NORMS]


class HiddenRamp:
    """Hooks masking the hidden dimensions `removed` of `model` (PEFT-wrapped or not) by `value` (module docstring).

    The mask is a plain fp32 tensor rebuilt from `value` on each forward, never a parameter."""

    def __init__(self, model: nn.Module, removed: list[int]):
        base = unwrap(model)
        spec = family_for(base)
        self.value = 1.0
        self.removed = torch.zeros(base.config.hidden_size, dtype=torch.bool)
        self.removed[torch.as_tensor(removed, dtype=torch.long)] = True
        writers = [base.get_input_embeddings()] + [spec.proj(layer, proj) for layer in spec.decoder_layers(base)
                                                   for proj in (spec.head_out_proj, spec.ffn_out_proj)]
        self._handles = [m.register_forward_hook(self._scale) for m in writers]
        self._handles += [norm.register_forward_hook(self._norm(norm)) for _, norm in _residual_norms(base)]

    def active(self) -> bool:
        return self.value != 1.0 and bool(self.removed.any())

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        m = torch.ones(self.removed.numel(), dtype=torch.float32)
        m[self.removed] = self.value
        return m.to(like.device)

    def _scale(self, module: nn.Module, args: tuple, out: torch.Tensor):
        if not self.active():
            return None
        return out * self.mask(out).to(out.dtype)

    def _norm(self, norm: nn.Module):
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        def hook(module: nn.Module, args: tuple, out: torch.Tensor):
            if not self.active():
                return None
            x, m = args[0].float(), self.mask(out)
            full = x.pow(2).mean(-1, keepdim=True)
            kept = (x.pow(2) * m).sum(-1, keepdim=True) / m.sum()
            scale = torch.sqrt((full + eps) / (kept + eps))
            return (out.float() * scale * m).to(out.dtype)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
