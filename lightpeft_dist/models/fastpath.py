"""The training stage's memory/speed switches, applied to the loaded (pruned) base before LoRA is attached.

One function so that `train` and the benchmarks (benchmarks/bench_train.py) prepare a model identically: a 4-bit
base goes through the QLoRA preparation (quant.py), and gradient checkpointing trades recompute for activation
memory. Checkpointing is non-reentrant, which needs no `requires_grad` on the inputs and works with a frozen base.
The KV cache is switched off for every training model (see `prepare_for_training`).
"""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

from ..config import TrainConfig
from .quant import is_4bit, prepare_4bit

log = logging.getLogger(__name__)


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    log.info("gradient checkpointing on (non-reentrant)")


def prepare_for_training(model: PreTrainedModel, cfg: TrainConfig) -> PreTrainedModel:
    # No KV cache in training: it is useless there, and with one transformers ignores the position-id blocks of
    # packed rows (packing.py), so examples would attend across each other.
    model.config.use_cache = False
    if is_4bit(model):
        model = prepare_4bit(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
