"""LoRA, the default adapter kind, through HF PEFT: attach, save, load, slice, track and merge (registry.py).

Why a module of its own: every LoRA-specific step of the pipeline is here, so the stages ask the registry instead of
branching on `peft.type`. LoRA is saved as a standard PEFT adapter directory; the slicing itself lives with the
base-model slicing it mirrors (pruning/slicing.py `prune_adapter`). PEFT costs ~0.15 GB of RSS at import and prune
never needs it, so it is imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import LightPeftError
from ..io_utils import read_json
from ..models.families import family_for
from ..models.weights import check_adapter
from .registry import CONFIG_FILE, AdapterKind, register

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from ..config import PeftConfig
    from ..pruning.importance import ImportanceTracker
    from ..runtime import Runtime

PEFT_TYPE = "LORA"  # adapter_config.json's peft_type for a PEFT LoRA directory


def lora_config(cfg: PeftConfig, target_modules: list[str] | None = None, **extra) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=target_modules or list(cfg.targets), bias="none", task_type="CAUSAL_LM", **extra)


def attach(model: nn.Module, cfg: PeftConfig) -> PeftModel:
    spec = family_for(model)
    unknown = [t for t in cfg.targets if t not in spec.slicing]
    if unknown:
        raise LightPeftError(f"peft.targets {unknown} are not projections of the {spec.name} family; "
                             f"choose from {sorted(spec.slicing)}")
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg))


def is_param(name: str) -> bool:
    return "lora_" in name


def save(model: nn.Module, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)


def owns(path: Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    return cfg.is_file() and read_json(cfg, "adapter config").get("peft_type") == PEFT_TYPE


def load_adapter(model: nn.Module, adapter_dir: Path, is_trainable: bool = False) -> PeftModel:
    """A saved LoRA adapter on `model`: safetensors only, and a missing adapter tensor is an error (PEFT would keep
    its fresh initialisation and only warn)."""
    import warnings

    from peft import PeftModel

    from ..models.loading import first_line  # on use: loading imports the schema, which reads the kinds registered here

    check_adapter(Path(adapter_dir))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Found missing adapter keys")
        try:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
        except UserWarning as exc:
            raise LightPeftError(f"the adapter at {adapter_dir} is incomplete ({first_line(exc)[:200]}); rerun "
                                 "the stage that writes it") from None


def load(model: nn.Module, path: Path, trainable: bool = False, weights: bool = True) -> PeftModel:
    """The saved LoRA (weights=False: fresh LoRA with the same per-module ranks, e.g. `train.warm_start: false`)."""
    from peft import LoraConfig, get_peft_model

    if weights:
        return load_adapter(model, path, is_trainable=trainable)
    cfg = read_json(Path(path) / CONFIG_FILE, "pruned adapter config")
    fields = {k: cfg[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern")}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **fields))


def slice_to_plan(adapter_dir: Path, plan: dict, config, model_dir: Path, out_dir: Path) -> dict:
    from ..pruning.slicing import prune_adapter

    return prune_adapter(adapter_dir, plan, config, model_dir, out_dir)


def tracker(model: nn.Module, total_steps: int, runtime: Runtime) -> ImportanceTracker:
    from ..pruning.importance import LoraImportanceTracker

    return LoraImportanceTracker(model, total_steps, runtime)


def merge(model: nn.Module, path: Path) -> nn.Module:
    return load_adapter(model, path).merge_and_unload()


KIND = register(AdapterKind(name="lora", aliases=(), order=0, attach=attach, is_param=is_param, save=save, owns=owns,
                            load=load, slice=slice_to_plan, tracker=tracker, merge=merge))
