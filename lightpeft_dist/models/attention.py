"""Which attention kernel a stage runs with, chosen once and logged.

Training speed depends on the attention kernel more than on anything else we control: FlashAttention-2 when the
`flash_attn` package is usable (CUDA, half precision), otherwise PyTorch's SDPA, which itself dispatches to its flash
or memory-efficient kernel on GPU. Both read head counts from the attention modules, not from the config, so pruned
models whose layers have different numbers of query and KV heads work with either (tests/test_attention.py checks
SDPA against eager on such a model). `auto` (the recipe default) picks the fastest that will run here; an explicit
choice is honoured or refused with a one-line reason, never silently swapped.
"""

from __future__ import annotations

import logging

import torch
from transformers.utils import is_flash_attn_2_available

from ..errors import LightPeftError

log = logging.getLogger(__name__)
CHOICES = ("auto", "eager", "sdpa", "flash_attention_2")
HALF = (torch.bfloat16, torch.float16)


def flash_attn_usable(dtype: torch.dtype) -> bool:
    """FlashAttention-2 runs only on CUDA, in bf16/fp16, with `flash_attn` installed."""
    return torch.cuda.is_available() and dtype in HALF and is_flash_attn_2_available()


def choose_attention(requested: str | None, dtype: torch.dtype) -> str:
    """The HF `attn_implementation` to load a model with; None means `auto`."""
    requested = requested or "auto"
    if requested not in CHOICES:
        raise LightPeftError(f"model.attn_implementation {requested!r} is not one of {', '.join(CHOICES)}")
    if requested == "flash_attention_2" and not flash_attn_usable(dtype):
        why = ("no CUDA device" if not torch.cuda.is_available() else
               f"model.dtype is {str(dtype).removeprefix('torch.')}, flash-attn needs bfloat16 or float16"
               if dtype not in HALF else "the flash_attn package (>= 2.3.3) is not installed")
        raise LightPeftError(f"model.attn_implementation flash_attention_2 cannot run here ({why}); "
                             "use 'auto' or 'sdpa'")
    if requested != "auto":
        chosen, reason = requested, "as the recipe asks"
    elif flash_attn_usable(dtype):
        chosen, reason = "flash_attention_2", "flash_attn is installed and the model runs in half precision on CUDA"
    else:
        chosen = "sdpa"
        reason = ("flash_attn is not usable here; SDPA dispatches to its own flash kernel on GPU"
                  if torch.cuda.is_available() else "CPU: SDPA's fused kernel")
    log.info("attention backend: %s (%s)", chosen, reason)
    return chosen
