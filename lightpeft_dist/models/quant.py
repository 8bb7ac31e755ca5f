"""QLoRA: the pruned base held in 4-bit NF4 (bitsandbytes) with LoRA trained on top.

Pruning and quantization compound: the pruned base is smaller, and 4-bit storage quarters what is left. The
quantized weights are stored in `bnb_4bit_quant_storage` = the model's dtype, so every parameter of the model has one
dtype and DeepSpeed ZeRO-3 can partition the packed 4-bit tensors like any other (the sharded-QLoRA recipe). Compute
runs in bf16 on a bf16-capable GPU and in fp32 elsewhere (bitsandbytes 0.50 also runs 4-bit layers on CPU, which is
what CI tests). Under ZeRO-3 no `device_map` is passed (DeepSpeed places the shards) and PEFT's
`prepare_model_for_kbit_training` is skipped, because its fp32 up-cast of the non-quantized weights would break the
one-dtype rule that sharding needs.

On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit layer's weight for a fused CPU kernel on its first
inference forward (eval mode, no grad). That repack asserts out_features % 32 == 0 ("N must be divisible by block_n")
and reshapes the scales as in_features // blocksize, so it crashes on the odd widths pruning leaves. Each layer
decides through its own `support_avx512bf16_for_cpu` flag; `keep_generic_cpu_path` clears it on the layers that do
not fit, which keep bitsandbytes' generic dequantize-and-matmul path, while layers that fit keep the fast kernel.
`prune.multiple_of: 64` (plan.py) plans widths that fit, when the hidden size is a multiple of 64.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

from ..errors import LightPeftError

log = logging.getLogger(__name__)


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LightPeftError("train.load_in_4bit needs bitsandbytes; install it with "
                             "pip install 'lightpeft-dist[qlora]' (or set train.load_in_4bit: false)")


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU has it (the QLoRA recipe), fp32 on CPU and older GPUs."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(storage_dtype: torch.dtype) -> BitsAndBytesConfig:
    """NF4 with double quantization; packed weights stored in the model's dtype so ZeRO-3 can shard them."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(), bnb_4bit_quant_storage=storage_dtype)


def load_kwargs(storage_dtype: torch.dtype) -> dict[str, Any]:
    """Extra `from_pretrained` arguments that load a model in 4-bit on this process's device."""
    require_bitsandbytes()
    kwargs: dict[str, Any] = {"quantization_config": quantization_config(storage_dtype)}
    if torch.cuda.is_available() and not is_deepspeed_zero3_enabled():
        from ..runtime import current

        kwargs["device_map"] = {"": current().device}  # quantize straight onto the GPU, never via host copies
    log.info("loading the base in 4-bit NF4 (compute %s, storage %s%s)", str(compute_dtype()).removeprefix("torch."),
             str(storage_dtype).removeprefix("torch."), ", ZeRO-3 sharded" if is_deepspeed_zero3_enabled() else "")
    return kwargs


def is_4bit(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


# bitsandbytes' `_convert_weight_packed_for_cpu`: output rows in blocks of 32, whole scale blocks along the input.
PACKED_CPU_BLOCK_N = 32


def _blocksize(layer: torch.nn.Module) -> int:
    for state in (getattr(layer.weight, "quant_state", None), getattr(layer, "quant_state", None)):
        if state is not None:
            return int(state.blocksize)
    return int(getattr(layer.weight, "blocksize", 64))


def fits_packed_cpu_kernel(layer: torch.nn.Module) -> bool:
    """Whether bitsandbytes' CPU repack can take this Linear4bit's shape."""
    return layer.out_features % PACKED_CPU_BLOCK_N == 0 and layer.in_features % _blocksize(layer) == 0


def keep_generic_cpu_path(model: torch.nn.Module) -> int:
    """Turn the AVX512-BF16 CPU repack off on every 4-bit layer whose shape it cannot take (see above); returns how
    many. A per-layer switch, so layers that fit keep the fast kernel; the flag matters only for inputs on such a CPU."""
    import bitsandbytes as bnb

    odd = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)
           and getattr(m, "support_avx512bf16_for_cpu", False) and not fits_packed_cpu_kernel(m)]
    for layer in odd:
        layer.support_avx512bf16_for_cpu = False
    if odd:
        log.info("%d 4-bit layers have widths the packed CPU kernel cannot take; they use the generic path", len(odd))
    return len(odd)


def prepare_4bit(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze the 4-bit base and make it trainable through LoRA (PEFT's recipe, except under ZeRO-3; see above)."""
    if is_deepspeed_zero3_enabled():
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    from peft import prepare_model_for_kbit_training

    # Checkpointing is switched on by fastpath for every base alike (non-reentrant: no input-grad hooks needed).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
