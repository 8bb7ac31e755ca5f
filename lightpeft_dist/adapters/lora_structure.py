"""A LoRA layout (per-module ranks and alphas) as JSON, and the model a restructured run is rebuilt into.

Why: rank growth and live pruning change the shapes of what trains. The loop carries the new shape through
`meta["structure"]` (docs/hooks.md): the base model's plan under "plan" (pruning/live.py) and the LoRA layout under
"lora" (this module). `structured_model` turns that JSON back into a model, on any world size, which is what both a
restructure and a resume from a checkpoint written after one need. The layout maps to a standard PEFT config with
`rank_pattern` / `alpha_pattern`, so a grown adapter saves and reloads with plain PEFT (docs/adapters.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..errors import LightPeftError
from ..pruning.importance import lora_modules
from ..pruning.live import LORA_KEY, PLAN_KEY, live_model_dir
from ..runtime import Runtime

Layout = dict[str, Any]  # {"ranks": {module: r}, "alphas": {module: alpha}, "dropout": p}


def lora_layout(model: nn.Module, adapter: str = "default") -> Layout:
    """The live model's LoRA layout (module paths relative to the causal LM, as plans and rank_pattern key them)."""
    found = lora_modules(model, adapter)
    if not found:
        raise LightPeftError("the model has no LoRA modules; rank growth and live pruning need LoRA (peft.type lora)")
    dropouts = {float(getattr(m.lora_dropout[adapter], "p", 0.0)) for _, m in found}
    return {"ranks": {n: int(m.r[adapter]) for n, m in found},
            "alphas": {n: float(m.lora_alpha[adapter]) for n, m in found},
            "dropout": max(dropouts)}


def layout_scale(layout: Layout, module: str) -> float:
    """alpha / r of one module: what growth and rank slicing keep constant."""
    return layout["alphas"][module] / layout["ranks"][module]


def lora_config_for(layout: Layout, **extra):
    """A PEFT LoraConfig that builds exactly this layout: every module named, its rank and alpha in the patterns."""
    from peft import LoraConfig

    modules = list(layout["ranks"])
    if not modules:
        raise LightPeftError("the LoRA layout has no modules left; keep at least one adapter")
    first = modules[0]
    return LoraConfig(r=int(layout["ranks"][first]), lora_alpha=float(layout["alphas"][first]),
                      lora_dropout=float(layout.get("dropout", 0.0)), target_modules=modules, bias="none",
                      task_type="CAUSAL_LM", rank_pattern={m: int(r) for m, r in layout["ranks"].items()},
                      alpha_pattern={m: float(a) for m, a in layout["alphas"].items()}, **extra)


def attach_layout(model: nn.Module, layout: Layout) -> nn.Module:
    """Fresh LoRA of this layout on a frozen base (values come from the restored state)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config_for(layout))
    got = lora_layout(peft_model)
    if got["ranks"] != {m: int(r) for m, r in layout["ranks"].items()}:
        raise LightPeftError(f"PEFT built LoRA ranks {got['ranks']} for the layout {layout['ranks']}")
    return peft_model


def structured_model(structure: dict, source: str, workdir: Path, runtime: Runtime,
                     load: Callable[[str], nn.Module]) -> nn.Module:
    """Collective: the model of a restructured run: `load(model_dir)` of the base at `structure["plan"]`'s shape
    (the source itself without a plan; pruning/live.py writes the pruned copy under `workdir`), with LoRA of
    `structure["lora"]` attached. `load` is the caller's loader (dtype, ZeRO-3 `zero.Init`, gradient checkpointing).
    """
    if not structure.get(LORA_KEY):
        raise LightPeftError(f"the structure to rebuild has no LoRA layout (keys {sorted(structure)}); it was not "
                             "written by rank growth or live pruning")
    base = load(live_model_dir(source, structure.get(PLAN_KEY), workdir, runtime))
    return attach_layout(base, structure[LORA_KEY])
