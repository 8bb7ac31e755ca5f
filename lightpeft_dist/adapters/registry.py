"""Adapter kinds: everything the pipeline does with a kind of PEFT module, asked of one table (docs/adapters.md).

Why: estimation, slicing, training, evaluation and export used to branch on `peft.type`, and a model can now carry
several kinds at once (PrunePEFT's supernet: LoRA on some projections, bottleneck adapters after others). Each kind
is one module (lora.py, bottleneck.py) that builds an `AdapterKind` and registers it; the import line at the bottom
of this file is the only other place that names a kind.

Module keys: scores files and plans key PEFT modules by path. A bare path is a LoRA module (what runs have always
written, so LoRA artefacts stay byte-identical); every other kind's modules are qualified, `bottleneck:<path>`, so a
LoRA and a bottleneck adapter on the same o_proj never collide. Scores and plans written before kinds existed by a
`peft.type: adapter` run hold bare bottleneck paths; `upgrade_keys` qualifies them on read, and `bare_kind` tells
which kind a bare key means from the run's estimate record.

Save layout: an adapter directory (estimate/adapter, pruned_adapter, train/adapter) holds a single kind in its own
format at the top (a PEFT LoRA directory, or a bottleneck directory: the layout runs have always had), and several
kinds each in a subdirectory named after the kind (`adapter/lora/`, `adapter/bottleneck/`), so no tool that reads one
kind's format can mistake a mixed directory for a complete adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn

from ..errors import LightPeftError
from ..io_utils import atomic_dir
from ..pruning.module_keys import DEFAULT_KIND, SEP, by_kind, qualify, split_key, upgrade_keys  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..config import PeftConfig
    from ..pruning.importance import ImportanceTracker
    from ..runtime import Runtime

log = logging.getLogger(__name__)
CONFIG_FILE = "adapter_config.json"  # what marks a saved adapter directory, whatever its kind


@dataclass(frozen=True, eq=False)
class AdapterKind:
    """One kind of PEFT module. Paths in `slice`'s plan and in `tracker`'s results are bare module paths; the
    registry qualifies them."""

    name: str
    aliases: tuple[str, ...]
    order: int  # attach and load order: LoRA (0) wraps the model in a PeftModel, kinds after it sit on its projections
    attach: Callable[[nn.Module, "PeftConfig"], nn.Module]  # estimation: fresh modules from a recipe spec
    is_param: Callable[[str], bool]  # is this parameter name one of this kind's trainable parameters
    save: Callable[[nn.Module, Path, dict[str, torch.Tensor]], None]  # (model, out dir, this kind's full state)
    owns: Callable[[Path], bool]  # is this directory a saved adapter of this kind
    load: Callable[[nn.Module, Path, bool, bool], nn.Module]  # (model, dir, trainable, weights: False = fresh init)
    slice: Callable[[Path, dict, Any, Path, Path], dict]  # (estimation dir, plan, base config, pruned model, out dir)
    tracker: Callable[[nn.Module, int, "Runtime"], "ImportanceTracker"]  # (model, total steps, runtime)
    merge: Callable[[nn.Module, Path], nn.Module] | None = None  # into the weights; None: cannot be merged
    not_mergeable: str = ""  # why not, completing "a <name> adapter ..."
    defaults: Mapping[str, Any] = field(default_factory=dict)  # recipe values for the peft keys a spec leaves unset
    recipe_word: str | None = None  # what a single-form recipe stores for this kind (its keys hash it); None: name

    @property
    def mergeable(self) -> bool:
        return self.merge is not None


KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    taken = {w for k in KINDS.values() if k.name != kind.name for w in (k.name, *k.aliases)}
    if taken & {kind.name, *kind.aliases} or SEP in kind.name:
        raise LightPeftError(f"adapter kind {kind.name!r}: name or alias already taken, or contains {SEP!r}")
    KINDS[kind.name] = kind
    return kind


def resolve(word: str) -> AdapterKind:
    """The kind a recipe word names (its name or an alias)."""
    for kind in KINDS.values():
        if word == kind.name or word in kind.aliases:
            return kind
    known = ", ".join(k.name + (f" (alias {', '.join(k.aliases)})" if k.aliases else "") for k in ordered(KINDS))
    raise LightPeftError(f"unknown adapter kind {word!r}; choose from {known}")


def ordered(kinds) -> list[AdapterKind]:
    return sorted(kinds.values() if isinstance(kinds, dict) else kinds, key=lambda k: k.order)


def kinds_of(specs: "PeftConfig | list[PeftConfig]") -> list[AdapterKind]:
    """The kinds a recipe's peft section uses, in attach order."""
    return ordered([KINDS[s.type] for s in (specs if isinstance(specs, list) else [specs])])


def is_adapter_param(name: str) -> bool:
    """A parameter of any adapter kind (what estimation trains besides the masks, and what is saved)."""
    return any(kind.is_param(name) for kind in KINDS.values())


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, trainable and adapter (every kind) parameter counts; ZeRO-3 partitioned parameters count in full."""
    from ..models.loading import count_parameters as count  # on use: loading imports the schema, which reads KINDS

    return count(model, is_adapter_param)


# --- module keys: pruning/module_keys.py; which kind a run's bare keys mean ------------------------------------

def bare_kind(estimate_record: dict | None) -> str:
    """The kind a bare key means in a run's scores and plan, from its estimate record: LoRA, except for runs whose
    single-form recipe named another kind (`peft.type: adapter`), whose files may predate qualified keys."""
    peft = ((estimate_record or {}).get("recipe") or {}).get("peft")
    return resolve(peft.get("type", DEFAULT_KIND)).name if isinstance(peft, dict) else DEFAULT_KIND


# --- operations on a model's set of adapters -------------------------------------------------------------------------

def attach_adapters(model: nn.Module, specs: "PeftConfig | list[PeftConfig]") -> nn.Module:
    """Fresh, trainable adapters of every spec on a frozen model (estimation); returns the (maybe wrapped) model."""
    for spec in sorted(specs if isinstance(specs, list) else [specs], key=lambda s: KINDS[s.type].order):
        model = KINDS[spec.type].attach(model, spec)
    return model


def save_adapters(out_dir: Path, model: nn.Module, state: dict[str, torch.Tensor], kinds: list[AdapterKind]) -> None:
    """Each kind's part of `state` (full tensors named like the model's parameters) in its own format."""
    if len(kinds) == 1:
        kinds[0].save(model, out_dir, {n: v for n, v in state.items() if kinds[0].is_param(n)})
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in ordered(kinds):
        kind.save(model, out_dir / kind.name, {n: v for n, v in state.items() if kind.is_param(n)})


def saved_kinds(adapter_dir: Path) -> list[tuple[AdapterKind, Path]]:
    """(kind, directory) of each adapter saved in `adapter_dir`, in load order; [] when nothing is saved there."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / CONFIG_FILE).is_file():
        for kind in ordered(KINDS):
            if kind.owns(adapter_dir):
                return [(kind, adapter_dir)]
        raise LightPeftError(f"the adapter at {adapter_dir} is of no known kind ({', '.join(KINDS)}); "
                             "re-run the stage that wrote it")
    return [(kind, adapter_dir / kind.name) for kind in ordered(KINDS) if kind.owns(adapter_dir / kind.name)]


def load_adapters(model: nn.Module, adapter_dir: Path, trainable: bool = False, weights: bool = True) -> nn.Module:
    """Attach every adapter saved in `adapter_dir` (weights=False: same shapes, fresh init); returns the model."""
    found = saved_kinds(adapter_dir)
    if not found:
        raise LightPeftError(f"no adapter at {adapter_dir}; run the stage that writes it first")
    for kind, path in found:
        model = kind.load(model, path, trainable, weights)
    return model


def slice_adapters(adapter_dir: Path, plan: dict, bare: str, config, model_dir: Path, out_dir: Path) -> dict:
    """Slice the estimation adapters to the plan's kept modules and units (`bare`: see `bare_kind`)."""
    found = saved_kinds(adapter_dir)
    planned = by_kind(upgrade_keys(plan["peft_modules"], bare))
    missing = sorted(set(planned) - {kind.name for kind, _ in found})
    if missing:
        raise LightPeftError(f"the plan keeps {missing[0]} modules but the estimation adapter at {adapter_dir} has "
                             "none; re-run estimate")
    if len(found) == 1:
        kind, src = found[0]
        return kind.slice(src, {**plan, "peft_modules": planned.get(kind.name, {})}, config, model_dir, out_dir)
    records = {}
    with atomic_dir(out_dir) as tmp:
        for kind, src in found:
            if not planned.get(kind.name):
                log.info("the plan keeps no %s module: the pruned adapter has none", kind.name)
                continue
            sub = {**plan, "peft_modules": planned[kind.name]}
            records[kind.name] = kind.slice(src, sub, config, model_dir, tmp / kind.name)
    return {"modules": sum(r["modules"] for r in records.values()),
            "params": sum(r["params"] for r in records.values()), "kinds": records}


# One line per kind: importing its module registers it.
from . import bottleneck, lora  # noqa: E402,F401
