"""The bottleneck adapter kind (`peft.type: bottleneck`, formerly `adapter`): the reference's `output_adapter`,
attached without PEFT (registered in registry.py; docs/adapters.md).

PEFT has no bottleneck-adapter type, so this module owns the adapter, its attachment and its file format. Each
adapted projection (by default o_proj and down_proj: both output the hidden size) gets a child `BottleneckAdapter`
registered on the projection's parent module (`<proj>_adapter`, e.g. `model.layers.0.self_attn.o_proj_adapter`) and a
forward hook on the projection that returns `base(x) + s * up(act(down(dropout(base(x)))))` (docs/method.md). On a
projection that also carries LoRA the hook sits on the LoRA wrapper, so the adapter sees base plus LoRA output (LoRA
attaches first, registry.py). Because the adapter is a registered submodule called through its own `__call__`,
DeepSpeed ZeRO-3 partitions its parameters and gathers them for its forward like any other module's. The adapter
works in the hidden dimension, so head and FFN pruning never slice it; only whole adapters (modules) and bottleneck
units are pruned.

On disk: `adapter_model.safetensors` (parameter names relative to the causal-LM model, also under a PEFT wrapper) and
`adapter_config.json` with `{"peft_type": "lightpeft_bottleneck", "targets": {module: size}, "activation", "scaling",
"dropout"}`. No pickles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import LightPeftError
from ..models.families import RESIDUAL_ADAPTER_SUFFIX, family_for, unwrap
from ..io_utils import atomic_dir, load_tensors, read_json, save_tensors, write_json
from .registry import AdapterKind, is_adapter_param as _any_kind_param, register

if TYPE_CHECKING:
    from ..pruning.importance import ImportanceTracker
    from ..runtime import Runtime

log = logging.getLogger(__name__)
PEFT_TYPE = "lightpeft_bottleneck"
SUFFIX = RESIDUAL_ADAPTER_SUFFIX
DEFAULT_TARGETS = ["o_proj", "down_proj"]
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "none": nn.Identity}  # none: PrunePEFT's port
_HOOKS = "_lightpeft_adapter_hooks"


class BottleneckAdapter(nn.Module):
    """delta(h) = scaling * up(act(down(dropout(h)))); weights N(0, 0.02), biases 0 (the reference's "bert" init)."""

    def __init__(self, hidden: int, size: int, activation: str = "relu", dropout: float = 0.0, scaling: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise LightPeftError(f"unknown adapter activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.hidden, self.size, self.activation, self.scaling = hidden, size, activation, float(scaling)
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(hidden, size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden, dtype=dtype, device=device)
        with torch.no_grad():
            for lin in (self.down, self.up):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.down.weight.dtype)
        return (self.up(self.act(self.down(self.dropout(x)))) * self.scaling).to(h.dtype)


def _residual_hook(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + adapter(out)
    return hook


def is_adapter_param(name: str) -> bool:
    return f"{SUFFIX}." in name


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Module paths of the adapted projections; every target must be a projection that outputs the hidden size."""
    base = unwrap(model)
    spec = family_for(base)
    unknown = [t for t in targets if t not in spec.slicing]
    if unknown:
        raise LightPeftError(f"peft.targets {unknown} are not projections of the {spec.name} family; "
                             f"for a bottleneck adapter use {DEFAULT_TARGETS}")
    pruned_out = [t for t in targets if spec.slicing[t][0] == "out"]
    if pruned_out:
        raise LightPeftError(f"peft.targets {pruned_out}: their outputs are pruned (heads / FFN neurons), but a "
                             f"bottleneck adapter needs projections that output the hidden size, e.g. "
                             f"{DEFAULT_TARGETS}")
    hidden = base.config.hidden_size
    paths = []
    for i, layer in enumerate(spec.decoder_layers(base)):
        for t in targets:
            out = getattr(spec.proj(layer, t), "out_features", None)
            if out != hidden:
                raise LightPeftError(f"peft.targets: {t} outputs {out} features, not the hidden size {hidden}; a "
                                     f"bottleneck adapter needs projections that output the hidden size, e.g. "
                                     f"{DEFAULT_TARGETS}")
            paths.append(spec.proj_path(i, t))
    return paths


def attach(model: nn.Module, sizes: dict[str, int], activation: str = "relu", dropout: float = 0.0,
           scaling: float = 1.0) -> dict[str, BottleneckAdapter]:
    """Freeze the model (but not another kind's adapters: LoRA may be attached already) and add trainable adapters
    of the given sizes on the projections at the given paths."""
    base = unwrap(model)
    for name, p in base.named_parameters():
        if not _any_kind_param(name):
            p.requires_grad_(False)
    handles, added = getattr(base, _HOOKS, []), {}
    for path, size in sizes.items():
        parent_path, _, proj_name = path.rpartition(".")
        try:
            parent = base.get_submodule(parent_path)
            proj = getattr(parent, proj_name)
        except AttributeError:
            raise LightPeftError(f"the model has no module {path} to attach an adapter to; re-run estimate") from None
        if hasattr(parent, proj_name + SUFFIX):
            raise LightPeftError(f"{path} already has a bottleneck adapter")
        ref = next(p for p in proj.parameters())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        adapter = BottleneckAdapter(proj.out_features, int(size), activation, dropout, scaling, dtype, ref.device)
        parent.add_module(proj_name + SUFFIX, adapter)
        handles.append(proj.register_forward_hook(_residual_hook(adapter)))
        added[path] = adapter
    setattr(base, _HOOKS, handles)
    log.info("bottleneck adapters on %d projections (%s units, %s params)", len(added),
             sum(a.size for a in added.values()), f"{sum(p.numel() for a in added.values() for p in a.parameters()):,}")
    return added


def attach_from_config(model: nn.Module, cfg) -> nn.Module:
    """Estimation: one adapter of size `peft.r` on every target of every layer; scaling = peft.alpha."""
    attach(model, {p: cfg.r for p in target_paths(model, list(cfg.targets))}, "relu", cfg.dropout, cfg.alpha)
    return model


def adapter_modules(model: nn.Module) -> list[tuple[str, BottleneckAdapter]]:
    """(adapted projection's path, adapter) pairs, e.g. ("model.layers.0.self_attn.o_proj", ...)."""
    return [(name.removesuffix(SUFFIX), m) for name, m in unwrap(model).named_modules()
            if isinstance(m, BottleneckAdapter)]


def adapter_config(model: nn.Module) -> dict:
    mods = adapter_modules(model)
    if not mods:
        raise LightPeftError("the model has no bottleneck adapters to save")
    first = mods[0][1]
    return {"peft_type": PEFT_TYPE, "targets": {n: m.size for n, m in mods}, "activation": first.activation,
            "scaling": first.scaling, "dropout": first.dropout.p}


def save_bottleneck(out_dir: Path, state: dict[str, torch.Tensor], config: dict) -> None:
    """Write an adapter directory atomically (state: full tensors named like the model's parameters)."""
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / WEIGHTS_FILE, {k: v.detach().contiguous() for k, v in state.items()},
                     metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)


def is_bottleneck_dir(path: Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    return cfg.is_file() and read_json(cfg, "adapter config").get("peft_type") == PEFT_TYPE


def read_config(path: Path) -> dict:
    cfg = read_json(Path(path) / CONFIG_FILE, "bottleneck adapter config")
    if cfg.get("peft_type") != PEFT_TYPE or not isinstance(cfg.get("targets"), dict):
        raise LightPeftError(f"{path} is not a lightpeft bottleneck adapter (peft_type {cfg.get('peft_type')!r})")
    return cfg


def load_bottleneck(model: nn.Module, path: Path, trainable: bool = False, weights: bool = True) -> nn.Module:
    """Attach the adapters described in `path` and load their weights (`weights=False`: fresh init, same sizes)."""
    cfg = read_config(path)
    added = attach(model, cfg["targets"], cfg["activation"], cfg["dropout"], cfg["scaling"])
    if weights:
        state = load_tensors(Path(path) / WEIGHTS_FILE, "bottleneck adapter weights")
        used = set()
        for mod_path, adapter in added.items():
            prefix = f"{mod_path}{SUFFIX}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            used.update(prefix + k for k in own)
            try:
                adapter.load_state_dict(own, strict=True)
            except RuntimeError as exc:
                raise LightPeftError(f"adapter weights in {path} do not fit {mod_path} "
                                     f"({str(exc).splitlines()[0]}); re-run the stage that wrote them") from None
        if set(state) - used:
            raise LightPeftError(f"{path} holds weights for modules not in its config "
                                 f"({sorted(set(state) - used)[0]}, ...); re-run the stage that wrote it")
    for adapter in added.values():
        adapter.requires_grad_(trainable)
    return model


def prune_bottleneck(adapter_dir: Path, plan: dict, out_dir: Path) -> dict:
    """Keep the planned adapters and bottleneck units: rows of down (weight, bias), columns of up.weight."""
    cfg = read_config(adapter_dir)
    weights = load_tensors(Path(adapter_dir) / WEIGHTS_FILE, "estimation adapter weights")
    out: dict[str, torch.Tensor] = {}
    for module, units in plan["peft_modules"].items():
        p = f"{module}{SUFFIX}."
        keys = [p + k for k in ("down.weight", "down.bias", "up.weight", "up.bias")]
        if any(k not in weights for k in keys) or module not in cfg["targets"]:
            raise LightPeftError(f"estimation adapter has no bottleneck weights for {module}; re-run estimate")
        idx = torch.as_tensor(units, dtype=torch.long)
        if idx.numel() and int(idx.max()) >= int(cfg["targets"][module]):
            raise LightPeftError(f"plan keeps unit {int(idx.max())} of {module}, which has {cfg['targets'][module]}")
        dw, db, uw, ub = (weights[k] for k in keys)
        out.update({keys[0]: dw.index_select(0, idx), keys[1]: db.index_select(0, idx),
                    keys[2]: uw.index_select(1, idx), keys[3]: ub})
    new_cfg = {**cfg, "targets": {m: len(u) for m, u in plan["peft_modules"].items()}}
    save_bottleneck(out_dir, out, new_cfg)
    n = sum(t.numel() for t in out.values())
    log.info("pruned bottleneck adapter -> %s (%d modules, %d units, %s params)", out_dir, len(new_cfg["targets"]),
             sum(new_cfg["targets"].values()), f"{n:,}")
    return {"modules": len(new_cfg["targets"]), "params": n}


PEFT_PREFIX = "base_model.model."  # parameter names under a PeftModel (LoRA attached too)


def save(model: nn.Module, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    save_bottleneck(out_dir, {n.removeprefix(PEFT_PREFIX): v for n, v in state.items()}, adapter_config(model))


def slice_to_plan(adapter_dir: Path, plan: dict, config, model_dir: Path, out_dir: Path) -> dict:
    return prune_bottleneck(adapter_dir, plan, out_dir)  # hidden-size adapters: head and FFN pruning never cut them


def tracker(model: nn.Module, total_steps: int, runtime: Runtime) -> ImportanceTracker:
    from .bottleneck_importance import BottleneckImportanceTracker

    return BottleneckImportanceTracker(model, total_steps, runtime)


KIND = register(AdapterKind(
    name="bottleneck", aliases=("adapter",), order=1, attach=attach_from_config, is_param=is_adapter_param,
    save=save, owns=is_bottleneck_dir, load=load_bottleneck, slice=slice_to_plan, tracker=tracker,
    not_mergeable="is a nonlinear module and cannot be merged into the weights",
    defaults={"targets": DEFAULT_TARGETS, "dropout": 0.1, "alpha": 1.0},  # the reference's adapter values
    recipe_word="adapter"))  # single-form recipes keep the word their estimate keys hash (docs/adapters.md)
