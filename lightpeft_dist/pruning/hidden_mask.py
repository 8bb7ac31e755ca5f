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
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.families import family_for, unwrap


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
    norms = [(name, module) for name, module in base.named_modules() if type(module).__name__.endswith("RMSNorm")]
    for name, module in norms:
        parent_name, _, leaf = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, leaf, MaskedRMSNorm(module, mask))
    return handles
