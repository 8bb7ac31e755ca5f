"""Model-family adapters: the only place that knows where q/k/v/o and gate/up/down live.

Llama, Mistral, Qwen2 and Qwen3 share one decoder layout; they differ in biases (Qwen2 has q/k/v biases), per-head
norms (Qwen3's q_norm / k_norm) and in config details, which the slicing code handles generically (a bias is sliced
when present). A new family with the same layout needs only a new `FamilySpec` entry; one with another layout needs
a spec with other names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from ..errors import LightPeftError

# A residual adapter on a projection hangs next to it as `<projection>_adapter` (adapters/bottleneck.py); the pruning
# kit looks it up by this name to silence it while probing the projection's own weights.
RESIDUAL_ADAPTER_SUFFIX = "_adapter"

# RMSNorms that act within one attention head (Qwen3's q_norm / k_norm, weight of size head_dim): pruning heads or
# hidden dimensions leaves them whole, unlike the norms on the residual stream.
HEAD_NORMS = ("q_norm", "k_norm")

# What a linear's input ("in") or output ("out") features are indexed by.
Unit = Literal["q_heads", "kv_heads", "ffn"]


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    # projection name -> (which side is sliced, by which unit)
    slicing: dict[str, tuple[Literal["in", "out"], Unit]] = field(
        default_factory=lambda: {
            "q_proj": ("out", "q_heads"),
            "k_proj": ("out", "kv_heads"),
            "v_proj": ("out", "kv_heads"),
            "o_proj": ("in", "q_heads"),
            "gate_proj": ("out", "ffn"),
            "up_proj": ("out", "ffn"),
            "down_proj": ("in", "ffn"),
        }
    )
    head_out_proj: str = "o_proj"  # its input carries the per-head attention outputs (head mask goes here)
    ffn_out_proj: str = "down_proj"  # its input carries the FFN neurons (FFN mask goes here)

    def projection_parent(self, proj: str) -> str:
        unit = self.slicing[proj][1]
        return self.mlp if unit == "ffn" else self.attn

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        root = unwrap(model)
        obj = root
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def ffn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def proj(self, layer: nn.Module, name: str) -> nn.Module:
        return getattr(getattr(layer, self.projection_parent(name)), name)

    def proj_path(self, layer_idx: int, name: str) -> str:
        """Module path of a projection relative to the causal-LM model (what PEFT and state dicts use)."""
        return f"{self.layers_path}.{layer_idx}.{self.projection_parent(name)}.{name}"


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("llama", ("llama", "lightpeft_llama")),
    "mistral": FamilySpec("mistral", ("mistral", "lightpeft_mistral")),
    "qwen2": FamilySpec("qwen2", ("qwen2", "lightpeft_qwen2")),
    # Qwen3: the same layout; its q_norm / k_norm act within one head (head_dim), so pruning heads leaves them whole
    "qwen3": FamilySpec("qwen3", ("qwen3", "lightpeft_qwen3")),
}


def family_for(config_or_model) -> FamilySpec:
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec
    archs = getattr(config, "architectures", None) or [model_type]
    raise LightPeftError(
        f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); supported families: "
        f"{', '.join(FAMILIES)}; add a FamilySpec in lightpeft_dist/models/families.py"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The causal-LM model under PEFT / DeepSpeed wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeed / DDP engine
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        else:
            return model


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per-layer head and FFN counts read from the modules themselves (so pruned, uneven models work too)."""
    spec = family_for(unwrap(model))
    hd = head_dim_of(unwrap(model).config)
    shapes = []
    for layer in spec.decoder_layers(model):
        q = _base_linear(spec.proj(layer, "q_proj"))
        k = _base_linear(spec.proj(layer, "k_proj"))
        g = _base_linear(spec.proj(layer, "gate_proj"))
        shapes.append(
            {"num_attention_heads": q.out_features // hd, "num_key_value_heads": k.out_features // hd,
             "intermediate_size": g.out_features}
        )
    return shapes


def _base_linear(module: nn.Module) -> nn.Linear:
    return getattr(module, "base_layer", module)


def config_layer_shapes(config) -> list[dict[str, int]]:
    """Per-layer shapes from a config alone (before any weights exist, e.g. to size a DeepSpeed config)."""
    shapes = getattr(config, "layer_shapes", None)
    if shapes:
        return [dict(s) for s in shapes]
    return [{"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
             "intermediate_size": config.intermediate_size} for _ in range(config.num_hidden_layers)]
