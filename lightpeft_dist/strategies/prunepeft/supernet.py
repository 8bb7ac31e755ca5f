"""The PrunePEFT supernet: candidate module groups and a model carrying the surviving ones.

A group is every module of one kind on one layer that is pruned together (the port's `lora_l` = LoRA on q and v of
layer l; `adapter_l` = the bottleneck adapters after attention and MLP of layer l). Groups are built from the
recipe's `peft` list (one spec per kind: sizes, targets) and `prunepeft.groups`; a LoRA and a bottleneck group on
the same layer are independent candidates. Modules use the adapter-kind registry's kinds and module keys
(adapters/registry.py, pruning/module_keys.py), so the shared planner, slicer and train stage handle the survivors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...adapters import bottleneck
from ...config import PeftConfig, Recipe
from ...models.families import family_for, unwrap
from ...models.loading import load_model
from ...pruning.module_keys import qualify
from .section import PrunePeftConfig


@dataclass(frozen=True)
class Group:
    kind: str
    layer: int
    targets: tuple[str, ...]
    paths: tuple[str, ...]  # module paths of the targets on this layer

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.layer}.{'+'.join(self.targets)}"

    @property
    def keys(self) -> list[str]:
        """Module keys as scores and plans write them (kind-qualified, LoRA bare)."""
        return [qualify(self.kind, p) for p in self.paths]


def target_groups(spec: PeftConfig, cfg: PrunePeftConfig) -> list[tuple[str, ...]]:
    """The kind's per-layer target groups: the configured ones, then every other target on its own."""
    listed = [tuple(g) for g in cfg.groups.get(spec.type, []) if g]
    grouped = {t for g in listed for t in g}
    return listed + [(t,) for t in spec.targets if t not in grouped]


def enumerate_groups(recipe: Recipe, config, n_layers: int) -> list[Group]:
    """All candidate groups, kind by kind (attach order), layer by layer: the fixed order ties break on."""
    fam = family_for(config)
    cfg: PrunePeftConfig = recipe.section("prunepeft")
    out = []
    for spec in recipe.adapters:
        for layer in range(n_layers):
            for targets in target_groups(spec, cfg):
                out.append(Group(spec.type, layer, targets, tuple(fam.proj_path(layer, t) for t in targets)))
    return out


def attach_groups(model: nn.Module, recipe: Recipe, alive: list[Group]) -> nn.Module:
    """Fresh, trainable adapters for the alive groups only (LoRA through PEFT first, then bottleneck adapters)."""
    cfg: PrunePeftConfig = recipe.section("prunepeft")
    specs = {s.type: s for s in recipe.adapters}
    lora_paths = [p for g in alive if g.kind == "lora" for p in g.paths]
    if lora_paths:
        from peft import LoraConfig, get_peft_model

        s = specs["lora"]
        model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                                 target_modules=lora_paths, bias="none", task_type="CAUSAL_LM"))
    bn_paths = [p for g in alive if g.kind == "bottleneck" for p in g.paths]
    if bn_paths:
        s = specs["bottleneck"]
        bottleneck.attach(model, {p: s.r for p in bn_paths}, cfg.bottleneck_activation, s.dropout, s.alpha)
    return model


def build_supernet(recipe: Recipe, alive: list[Group], model_path: str | None = None) -> nn.Module:
    """The base (`model_path`: a pruned base; default the recipe's model) with the alive groups' adapters."""
    model = load_model(model_path or recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
    return attach_groups(model, recipe, alive)


def group_parameters(model: nn.Module, groups: list[Group]) -> list[list[tuple[str, torch.Tensor]]]:
    """Each group's trainable parameters (names relative to the causal-LM model), in a fixed order."""
    named = list(unwrap(model).named_parameters())
    out = []
    for g in groups:
        if g.kind == "lora":
            marks = tuple(f"{p}.lora_" for p in g.paths)
        else:
            marks = tuple(f"{p}{bottleneck.SUFFIX}." for p in g.paths)
        out.append([(n, p) for n, p in named if n.startswith(marks)])
    return out


def output_modules(model: nn.Module, group: Group) -> list[tuple[nn.Module, float]]:
    """(module whose output is the group's added signal, the factor that output is scaled by) per target."""
    base = unwrap(model)
    out = []
    for path in group.paths:
        if group.kind == "lora":
            layer = base.get_submodule(path)
            out.append((layer.lora_B["default"], float(layer.scaling["default"])))
        else:
            out.append((base.get_submodule(path + bottleneck.SUFFIX), 1.0))
    return out
