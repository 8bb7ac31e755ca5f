"""Loading base/pruned models and tokenizers, counting parameters and matmul structure, and fingerprinting a
model's shape.

The fingerprint ties every artefact in a run directory to the exact architecture it was computed for, so a plan
made for one model can never be applied to another.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .. import assets
from . import quant
from .attention import choose_attention
from ..config import ModelConfig
from ..errors import LightPeftError
from .families import family_for, head_dim_of
from ..io_utils import sha256_json
from .weights import check_adapter, check_model_weights

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(path: str) -> Path:
    real = Path(assets.resolve(path))
    if not (real / "config.json").is_file():
        raise LightPeftError(f"no HF model at {path} (config.json missing); set model.path to a local model folder")
    return real


def load_config(path: str):
    real = resolve_model_dir(path)
    try:  # transformers wraps bad JSON in OSError; its strict config dataclasses raise their own type
        config = AutoConfig.from_pretrained(real)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as exc:
        raise LightPeftError(f"transformers cannot read the model config at {real}/config.json "
                             f"({first_line(exc)}); fix or replace config.json") from None
    family_for(config)  # unsupported architectures fail here, before any weights are read
    return config


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else exc.__class__.__name__


def load_model(path: str, dtype: str = "float32", attn_implementation: str | None = None,
               load_in_4bit: bool = False) -> PreTrainedModel:
    """Safetensors only (models/weights.py), and a checkpoint that lacks or adds a tensor is an error: transformers
    would fill a missing tensor with random values and only log it."""
    real = resolve_model_dir(path)
    load_config(path)
    check_model_weights(real)
    kwargs = {"dtype": DTYPES[dtype]}
    kwargs["attn_implementation"] = choose_attention(attn_implementation, DTYPES[dtype])
    if load_in_4bit:
        kwargs.update(quant.load_kwargs(DTYPES[dtype]))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(real, use_safetensors=True, output_loading_info=True,
                                                           **kwargs)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise LightPeftError(f"cannot load model weights from {real} ({first_line(exc)})") from None
    problems = [(kind, sorted(map(str, info.get(f"{kind}_keys") or ()))) for kind in ("missing", "unexpected",
                                                                                      "mismatched")]
    problems.append(("load errors", [str(m) for m in info.get("error_msgs") or ()]))
    found = "; ".join(f"{len(names)} {kind} ({names[0]}{', ...' if len(names) > 1 else ''})"
                      for kind, names in problems if names)
    if found:
        raise LightPeftError(f"the weights in {real} do not match its config.json: {found}; the checkpoint is "
                             "incomplete or for another model, so re-download or re-save it")
    if load_in_4bit:
        quant.keep_generic_cpu_path(model)  # pruned widths crash bitsandbytes' packed CPU kernel (quant.py)
    log.info("loaded %s from %s (%s params, attention=%s)", type(model).__name__, real,
             f"{count_parameters(model)['total']:,}", model.config._attn_implementation)
    return model


def load_tokenizer(cfg: ModelConfig):
    real = assets.resolve(cfg.tokenizer or cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(real)
    except Exception as exc:  # noqa: BLE001 - `tokenizers` raises a bare Exception for a garbage tokenizer.json
        raise LightPeftError(f"cannot load a tokenizer from {real} ({first_line(exc)}); "
                             "set model.tokenizer to a folder with tokenizer files") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def fingerprint(config) -> str:
    """Hash of everything that decides tensor shapes and names (not weights: those are checked by the loader)."""
    spec = family_for(config)
    fields = {k: getattr(config, k, None) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias")}
    fields["head_dim"] = head_dim_of(config)
    fields["family"] = spec.name
    fields["layer_shapes"] = getattr(config, "layer_shapes", None) or None
    return sha256_json(fields)[:16]


def count_parameters(model: torch.nn.Module, is_adapter: Callable[[str], bool] = lambda name: False) -> dict[str, int]:
    """Total, trainable and adapter parameter counts (`is_adapter(name)`: adapters/registry.py counts every kind);
    ZeRO-3 partitioned parameters count in full."""
    seen, counts = set(), {"total": 0, "trainable": 0, "adapter": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        counts["total"] += n
        counts["trainable"] += n if p.requires_grad else 0
        counts["adapter"] += n if is_adapter(name) else 0
    return counts


def model_structure(model: torch.nn.Module) -> dict[str, int]:
    """N, T and W counted on a live model, as the training loop runs it (a model that changes shape while it trains
    gets one count per segment: strategies/apt/costs.py): N the frozen weights of every linear layer (the LM head
    included, the embedding lookup not), T the trainable parameters, W the rows of every q_proj; ZeRO-3 partitioned
    parameters count in full. Equals reporting/flops.py matmul_weights / query_width of the model's config
    (tests/test_flops.py)."""
    n = w = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            weight = module.weight
            n += weight.ds_numel if hasattr(weight, "ds_numel") else weight.numel()
            if name.endswith(("q_proj", "q_proj.base_layer")):
                w += (weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape)[0]
    return {"matmul_weights": n, "adapter_weights": count_parameters(model)["trainable"], "query_width": w}
