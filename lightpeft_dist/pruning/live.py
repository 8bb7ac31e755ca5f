"""Physical pruning during training: a `Restructure` transform that slices what the optimizer holds to a plan.

Why: APT's gradual recipe prunes at checkpoints inside training, so that later steps really run on the smaller model.
Masking alone would keep the full cost. A structural change of a partitioned (ZeRO-3) model goes through the loop's
checkpoint path (docs/hooks.md): the trainable state is gathered whole, this transform slices it, the caller's
`rebuild` builds the smaller model (`live_model_dir` writes it with the shared slicer, `slicing.prune_checkpoint`),
and the state is restored by name. The AdamW moments of LoRA tensors are sliced along the same indices as the
tensors, never reset, so every kept entry continues exactly where it was (docs/method.md, APT deviations).

Plans are the shared plan.json format and always index the *source* model (the one whose fingerprint they carry), so
successive prunes compose: the transform maps a new plan onto the current, already pruned coordinates, and
`meta["structure"]["plan"]` always holds the newest plan, from which a resume rebuilds the pruned shape. Kept rank
indices of `peft_modules` are in the current adapter's coordinates (ranks have no source coordinates once grown).
A plan with `hidden` (APT's prune_hidden) also cuts the residual stream: A's input columns of q/k/v/gate/up and B's
output rows of o/down (and their moments); the rebuild's slicer cuts the embedding, the norms and the LM head.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import LightPeftError
from ..models.families import family_for, head_dim_of
from ..rundir import PRUNE_RECORD
from ..runtime import Runtime
from ..io_utils import read_json
from ..training.hooks import Restructure, Transform
from .plan import plan_hash
from .slicing import check_plan, prune_checkpoint, slicing_table

log = logging.getLogger(__name__)
PLAN_KEY, LORA_KEY = "plan", "lora"  # what this kit keeps in meta["structure"] (docs/hooks.md)


def structure_and_layout(meta: dict[str, Any], lora: dict | None, what: str) -> tuple[dict, dict]:
    """A copy of the checkpoint's structure and of its LoRA layout (`lora` when none is recorded yet: the first
    restructure of a run), so growth and live pruning compose at one step in either order."""
    structure = dict(meta.get("structure") or {})
    layout = structure.get(LORA_KEY) or lora
    if layout is None:
        raise LightPeftError(f"{what} needs the LoRA layout (lora_layout(model)) to rebuild the model")
    return structure, {k: dict(v) if isinstance(v, dict) else v for k, v in layout.items()}
STATE_KINDS = ("param", "exp_avg", "exp_avg_sq")
UNIT_KEYS = ("q_heads", "kv_heads", "ffn")
_LORA_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight$")


def lora_parts(name: str) -> tuple[str, str, str] | None:
    """(module path relative to the causal LM, "A" or "B", adapter name) of a PEFT LoRA weight, else None."""
    m = _LORA_NAME.match(name)
    return (m["module"], m["part"], m["adapter"]) if m else None


def lora_tensor_names(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    """module -> {"A": parameter name, "B": parameter name} of the checkpoint-form tensors ("param/<name>")."""
    out: dict[str, dict[str, str]] = {}
    for key in tensors:
        kind, _, name = key.partition("/")
        parts = lora_parts(name) if kind == "param" else None
        if parts is not None:
            out.setdefault(parts[0], {})[parts[1]] = name
    return out


def check_live_plan(plan: dict, config) -> None:
    """The plan is for this source model, GQA-valid, and unedited (its hash is its contents')."""
    check_plan(plan, config)
    if plan.get("hash") != plan_hash(plan):
        raise LightPeftError(f"the live-pruning plan records hash {plan.get('hash')} but hashes to {plan_hash(plan)}; "
                             "build it with pruning.plan (summary and hash) instead of editing it")


def relative_layers(current: dict | None, new: dict) -> list[dict[str, list[int]]]:
    """The new plan's kept units as positions in the current (already pruned) model; identity for the first prune."""
    if current is None:
        return [{k: list(layer[k]) for k in UNIT_KEYS} for layer in new["layers"]]
    out = []
    for i, (cur, layer) in enumerate(zip(current["layers"], new["layers"], strict=True)):
        rel = {}
        for key in UNIT_KEYS:
            pos = {v: j for j, v in enumerate(cur[key])}
            gone = [v for v in layer[key] if v not in pos]
            if gone:
                raise LightPeftError(f"the live-pruning plan keeps layer {i} {key} {gone[:3]}, which an earlier "
                                     "prune removed; plans during training may only keep a subset of the last one")
            rel[key] = [pos[v] for v in layer[key]]
        out.append(rel)
    return out


def relative_hidden(current: dict | None, new: dict, hidden_size: int) -> torch.Tensor | None:
    """The new plan's kept hidden dimensions as positions in the current model's residual stream, or None when the
    width does not change (a plan without `hidden` keeps the source's full width)."""
    full = list(range(hidden_size))
    kept, now = new.get("hidden", full), (current or {}).get("hidden", full)
    pos = {v: j for j, v in enumerate(now)}
    gone = [v for v in kept if v not in pos]
    if gone:
        raise LightPeftError(f"the live-pruning plan keeps hidden dimensions {gone[:3]}, which an earlier prune "
                             "removed; plans during training may only keep a subset of the last one")
    rel = [pos[v] for v in kept]
    return None if rel == list(range(len(now))) else torch.as_tensor(rel, dtype=torch.long)


def _index(tensors: dict[str, torch.Tensor], name: str, dim: int, idx: torch.Tensor) -> None:
    for kind in STATE_KINDS:
        key = f"{kind}/{name}"
        tensors[key] = tensors[key].index_select(dim, idx).contiguous()


def _drop(tensors: dict[str, torch.Tensor], name: str) -> None:
    for kind in STATE_KINDS:
        tensors.pop(f"{kind}/{name}", None)


def live_prune_transform(plan: dict, config, lora: dict | None = None, drop_adapters: bool = False,
                         base_plan: dict | None = None) -> Transform:
    """A transform slicing LoRA tensors and their AdamW moments from the current structure to `plan`.

    `config` is the source model's config (the plan indexes it). `lora` is the current LoRA layout
    (`adapters.lora_structure.lora_layout`), used when `meta["structure"]` has none yet; the rebuild needs it.
    With `drop_adapters` the plan's `peft_modules` decide which LoRA modules and ranks stay (current rank indices,
    as the offline slicer reads them); by default every module and rank is kept (APT never drops adapters).
    Trainable tensors other than LoRA weights must not sit on a sliced projection: they are refused, not guessed at;
    when the plan cuts hidden dimensions every such tensor is refused (all of them carry the residual width).
    `base_plan` is the plan the model had before any live prune (the train stage starts from the prune stage's
    pruned model); the first live prune maps `plan` onto it instead of onto the unpruned source.
    """
    check_live_plan(plan, config)
    spec, head_dim = family_for(config), head_dim_of(config)

    def transform(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        structure, layout = structure_and_layout(meta, lora, "live pruning")
        current = structure.get(PLAN_KEY) or base_plan
        table = slicing_table(spec, {"layers": relative_layers(current, plan)}, head_dim)
        hidden = relative_hidden(current, plan, config.hidden_size)
        tensors = dict(tensors)
        names = lora_tensor_names(tensors)
        lora_params = {n for parts in names.values() for n in parts.values()}
        for key in tensors:
            kind, _, name = key.partition("/")
            bare = name.removeprefix("base_model.model.")
            if kind == "param" and name not in lora_params and (
                    hidden is not None or any(bare.startswith(m + ".") for m in table)):
                raise LightPeftError(f"live pruning slices LoRA only, but trainable {name} sits on a pruned "
                                     "projection (or on the residual stream, which the plan's hidden pruning cuts); "
                                     "train only LoRA weights there")
        if hidden is not None:
            outside = sorted(m for m in names if m not in table)
            if outside:
                raise LightPeftError(f"the plan cuts hidden dimensions, but LoRA on {outside[0]} is not on a decoder "
                                     "projection, so its residual-stream side cannot be sliced; drop it from "
                                     "peft.targets or set apt.prune_hidden: false")
        for module, parts in names.items():
            if drop_adapters and module not in plan["peft_modules"]:
                _drop(tensors, parts["A"]), _drop(tensors, parts["B"])
                layout["ranks"].pop(module, None), layout["alphas"].pop(module, None)
                continue
            if drop_adapters:
                r = int(tensors[f"param/{parts['A']}"].shape[0])
                kept = plan["peft_modules"][module]
                if kept[-1] >= r:
                    raise LightPeftError(f"the plan keeps rank {kept[-1]} of {module}, which has {r} ranks")
                ranks = torch.as_tensor(kept, dtype=torch.long)
                _index(tensors, parts["A"], 0, ranks)
                _index(tensors, parts["B"], 1, ranks)
                layout["alphas"][module] = layout["alphas"][module] * len(kept) / layout["ranks"][module]
                layout["ranks"][module] = len(kept)
            if module in table:
                side, idx = table[module]
                _index(tensors, parts["B"], 0, idx) if side == "out" else _index(tensors, parts["A"], 1, idx)
                if hidden is not None:  # the residual side: q/k/v/gate/up read it (A's columns), o/down write it
                    _index(tensors, parts["A"], 1, hidden) if side == "out" else _index(tensors, parts["B"], 0, hidden)
        structure.update({PLAN_KEY: plan, LORA_KEY: layout})
        return tensors, {**meta, "structure": structure}

    return transform


def live_prune(plan: dict, config, lora: dict | None = None, drop_adapters: bool = False,
               reason: str = "", base_plan: dict | None = None) -> Restructure:
    """What a step hook returns to prune physically after this step (see `live_prune_transform`)."""
    kept = plan["summary"]["after"]
    why = reason or (f"live prune to plan {plan['hash']} ({kept['num_attention_heads']} heads, "
                     f"{kept['intermediate_size']} FFN neurons"
                     + (f", hidden size {kept['hidden_size']})" if "hidden_size" in kept else ")"))
    return Restructure(live_prune_transform(plan, config, lora, drop_adapters, base_plan), why)


def live_model_dir(source: str, plan: dict | None, workdir: Path, runtime: Runtime) -> str:
    """Collective: the base model at the plan's shape, written once by rank 0 with the shared slicer.

    `workdir/live-<plan hash>` is reused when it is complete (a resume, or a rebuild on every rank); other live
    copies there are deleted once the new one exists (a resume from an older checkpoint writes its copy again, since
    the slicer is deterministic). Without a plan the source itself is the model. `workdir` must be visible to every
    rank (the run directory is).
    """
    if not plan:
        return source
    workdir = Path(workdir)
    out = workdir / f"live-{plan['hash']}"
    if runtime.is_main:
        record = out / PRUNE_RECORD
        if not (record.is_file() and read_json(record, "live prune record").get("plan_hash") == plan["hash"]):
            workdir.mkdir(parents=True, exist_ok=True)
            prune_checkpoint(source, plan, out)
        for old in workdir.glob("live-*"):
            if old != out and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    log.info("live-pruned model for plan %s at %s", plan["hash"], out)
    return str(out)
