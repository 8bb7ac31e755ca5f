"""Loadable HF models whose layers have different head counts and FFN widths.

Global FFN ranking (the reference's default) gives every layer its own width, which stock Llama/Mistral/Qwen2 configs
cannot express. Rather than fork the modelling code, we register one config/model pair per family (model_type
`lightpeft_<family>`) whose config carries `layer_shapes`; the model builds the stock decoder layer class once per
layer from a per-layer copy of the config. Importing `lightpeft_dist` registers them with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(pruned_dir)` just works. Uniform plans need none of this: they are saved as the
stock config with new counts and load with plain transformers, unless the kept head count does not divide
hidden_size (the stock configs refuse that even with an explicit head_dim), in which case they use our class too.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from .families import FAMILIES, family_for

PREFIX = "lightpeft_"
_BASES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
PRUNED_CLASSES: dict[str, tuple[type, type]] = {}


def _layer_config(config: PretrainedConfig, shape: dict[str, int]) -> PretrainedConfig:
    cfg = copy.copy(config)
    for key, value in shape.items():
        setattr(cfg, key, value)
    return cfg


def check_head_groups(shapes: list[dict[str, Any]]) -> None:
    for idx, shape in enumerate(shapes):
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        if heads < 1 or kv < 1 or heads % kv:
            raise ValueError(f"layer {idx}: {heads} query heads cannot be grouped over {kv} KV heads")


def _make_pruned_classes(family: str) -> tuple[type, type]:
    base_cfg_cls, base_model_cls = _BASES[family]
    model_type = PREFIX + family

    def cfg_init(self, layer_shapes: list[dict[str, int]] | None = None, **kwargs: Any) -> None:
        # The stock __init__ runs the stock validators (hidden_size % heads) on its own class; give it one head
        # and set the real counts afterwards, then run our validation.
        heads = kwargs.pop("num_attention_heads", None)
        kv = kwargs.pop("num_key_value_heads", None)
        if heads is not None and kwargs.get("head_dim") is None:
            kwargs["head_dim"] = kwargs.get("hidden_size", 4096) // heads
        base_cfg_cls.__init__(self, num_attention_heads=1, num_key_value_heads=1, **kwargs)
        self.num_attention_heads = heads if heads is not None else base_cfg_cls().num_attention_heads
        self.num_key_value_heads = kv if kv is not None else self.num_attention_heads
        self.layer_shapes = layer_shapes or []
        self.validate()

    def validate(self) -> None:
        # The stock rule `hidden_size % num_attention_heads == 0` assumes head_dim is derived; after pruning it is
        # explicit and the head count is arbitrary, so check what the attention code really needs, per layer.
        for validator in base_cfg_cls.__class_validators__:
            if validator.__name__ != "validate_architecture":
                validator(self)
        check_head_groups(getattr(self, "layer_shapes", None) or [vars(self)])

    cfg_cls = type(f"Pruned{base_cfg_cls.__name__}", (base_cfg_cls,), {"model_type": model_type, "__init__": cfg_init,
                                                                         "validate": validate})

    def model_init(self, config: PretrainedConfig) -> None:
        base_model_cls.__init__(self, config)
        spec = FAMILIES[family]
        layers = spec.decoder_layers(self)
        for idx, shape in enumerate(config.layer_shapes):
            layer_cls = type(layers[idx])
            new = layer_cls(_layer_config(config, shape), idx)
            # Forward reads only `_attn_implementation` from the config; share the top-level one so
            # `set_attn_implementation` and `from_pretrained(attn_implementation=...)` reach every layer.
            spec.attention(new).config = config
            layers[idx] = new
        self.post_init()

    model_cls = type(f"Pruned{base_model_cls.__name__}", (base_model_cls,), {"config_class": cfg_cls,
                                                                              "__init__": model_init})
    return cfg_cls, model_cls


def register() -> None:
    for family in _BASES:
        if family in PRUNED_CLASSES:
            continue
        cfg_cls, model_cls = _make_pruned_classes(family)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        PRUNED_CLASSES[family] = (cfg_cls, model_cls)


def pruned_config(base_config: PretrainedConfig, shapes: list[dict[str, int]],
                  hidden_size: int | None = None) -> PretrainedConfig:
    """The config for a model with these per-layer shapes (and, when hidden dimensions were pruned, this hidden size):
    stock class when uniform and valid there, `lightpeft_<family>` otherwise. head_dim is always explicit, so a
    pruned hidden size leaves the q/k/v widths as they were."""
    register()
    check_head_groups(shapes)
    family = family_for(base_config).name
    raw = base_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "layer_shapes", "_name_or_path",
                "auto_map"):
        raw.pop(key, None)
    raw["head_dim"] = getattr(base_config, "head_dim", None) or base_config.hidden_size // base_config.num_attention_heads
    if hidden_size is not None:
        raw["hidden_size"] = hidden_size
    uniform = all(s == shapes[0] for s in shapes)
    # A stock config only loads if its head count divides hidden_size (transformers validates that even when
    # head_dim is explicit), so uniform plans that break the rule use the per-layer class too.
    stock_ok = uniform and raw["hidden_size"] % shapes[0]["num_attention_heads"] == 0
    # Top-level counts: the first layer's shape when uniform; the widest layer otherwise (so anything sized from
    # the top-level config, e.g. a KV cache preallocation, is large enough).
    top = shapes[0] if uniform else {k: max(s[k] for s in shapes) for k in shapes[0]}
    raw.update(top)
    if stock_ok:
        cfg_cls = _BASES[family][0]
        return cfg_cls(**raw)
    cfg_cls = PRUNED_CLASSES[family][0]
    return cfg_cls(layer_shapes=shapes, **raw)


def architecture_name(config: PretrainedConfig) -> str:
    register()
    family = family_for(config).name
    if getattr(config, "layer_shapes", None):
        return PRUNED_CLASSES[family][1].__name__
    return _BASES[family][1].__name__


register()  # idempotent; covers a first import of this module, whose transformers import could not (autoregister.py)
