"""Physically slice a base checkpoint and the estimation adapter to a plan.

The base checkpoint is read and written one tensor at a time (safetensors_stream), so memory holds one tensor,
not a shard or the model, whatever the shard size (benchmarks/bench_prune.py measures it; docs/benchmarks.md). The
estimation-stage LoRA weights are sliced the same way and warm-start training, as the reference does (docs/method.md):
rows of lora_B where the projection's outputs are pruned, columns of lora_A where its inputs are, then rank cuts
(rows of A, columns of B). The LoRA scale alpha / r_init is kept by setting alpha per module to alpha * r_kept / r_init.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import LightPeftError
from ..models.families import HEAD_NORMS, FamilySpec, config_layer_shapes, family_for, head_dim_of
from ..io_utils import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..models.loading import fingerprint, load_config, resolve_model_dir
from ..rundir import RunDir
from .plan import check_plan_structure, kept_hidden_size, kept_shapes, read_plan
from ..models.pruned_model import architecture_name, pruned_config
from .safetensors_stream import ShardReader, ShardWriter
from ..rundir import PRUNE_RECORD

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_PREFIX = "base_model.model."


def unit_index(plan_layer: dict, unit: str, head_dim: int) -> torch.Tensor:
    """Row/column indices of a projection kept by the plan, for a unit kind (heads expand to head_dim rows each)."""
    if unit == "ffn":
        return torch.as_tensor(plan_layer["ffn"], dtype=torch.long)
    heads = torch.as_tensor(plan_layer["q_heads" if unit == "q_heads" else "kv_heads"], dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def slicing_table(spec: FamilySpec, plan: dict, head_dim: int) -> dict[str, tuple[str, torch.Tensor]]:
    """Module path -> (side, kept indices) for every sliced projection."""
    table = {}
    for i, layer in enumerate(plan["layers"]):
        for proj, (side, unit) in spec.slicing.items():
            table[spec.proj_path(i, proj)] = (side, unit_index(layer, unit, head_dim))
    return table


# Weights outside the projections that carry the residual stream's width (hidden-dimension pruning slices them), by
# the last part of their module's name -> the dimension indexed by hidden dimensions; a module named `*norm` is an
# RMSNorm (input, post-attention, final; not Qwen3's per-head HEAD_NORMS). Llama, Mistral and Qwen name them alike.
HIDDEN_MODULES = {"embed_tokens": 1, "lm_head": 1}


def tensor_cuts(name: str, table: dict, hidden: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
    """(dimension, kept indices) for one checkpoint tensor. A projection is cut on its unit side by `table`; with
    kept `hidden` dimensions (APT's prune_hidden) also on its residual side: the input columns of q/k/v/gate/up, the
    output rows (and bias) of o/down; embeddings, the LM head and every RMSNorm are cut along the hidden width."""
    module, _, kind = name.rpartition(".")
    cuts: list[tuple[int, torch.Tensor]] = []
    if module in table:
        side, idx = table[module]
        if side == "out":
            cuts.append((0, idx))
            if hidden is not None and kind == "weight":  # an output-side bias has no hidden dimension
                cuts.append((1, hidden))
        else:
            if kind == "weight":  # an input-side bias is kept whole by the unit cut
                cuts.append((1, idx))
            if hidden is not None:
                cuts.append((0, hidden))
        return cuts
    if hidden is None:
        return cuts
    leaf = module.rpartition(".")[2]
    if leaf in HEAD_NORMS:  # within one head: neither the head nor the hidden cut reaches it
        return cuts
    dim = HIDDEN_MODULES.get(leaf, 0 if leaf.endswith("norm") else None) if kind == "weight" else None
    if dim is None:
        raise LightPeftError(f"checkpoint tensor {name} is neither a projection, an embedding, the LM head nor an "
                             "RMSNorm, so hidden-dimension pruning cannot slice it; set apt.prune_hidden: false for "
                             "this model")
    return [(dim, hidden)]


def slice_base_tensor(name: str, tensor: torch.Tensor, table: dict, hidden: torch.Tensor | None = None) -> torch.Tensor:
    for dim, idx in tensor_cuts(name, table, hidden):
        tensor = tensor.index_select(dim, idx)
    return tensor


def sliced_shape(name: str, shape: list[int], table: dict, hidden: torch.Tensor | None = None) -> list[int]:
    """The shape `slice_base_tensor` gives this tensor, known before reading it (shard headers come first)."""
    shape = list(shape)
    for dim, idx in tensor_cuts(name, table, hidden):
        shape[dim] = len(idx)
    return shape


def hidden_index(plan: dict) -> torch.Tensor | None:
    """The plan's kept hidden dimensions as an index (None: the plan keeps the hidden width)."""
    return torch.as_tensor(plan["hidden"], dtype=torch.long) if "hidden" in plan else None


def prune_shard(src: Path, dst: Path, table: dict, hidden: torch.Tensor | None = None) -> dict[str, tuple[int, int]]:
    """Slice one shard tensor by tensor; memory holds one tensor, never the shard. Returns name -> (numel, bytes).

    Untouched tensors (embeddings, norms) are copied through in chunks; see safetensors_stream for why neither
    safe_open (mapped pages stay resident) nor save_file (needs the whole shard) is used here.
    """
    with ShardReader(src) as reader:
        entries = [(n, reader.dtype(n), sliced_shape(n, reader.shape(n), table, hidden)) for n in reader.keys()]
        with ShardWriter(dst, entries, metadata={"format": "pt"}) as writer:
            for name in reader.keys():
                if tensor_cuts(name, table, hidden):
                    writer.write(name, slice_base_tensor(name, reader.get(name), table, hidden))
                else:
                    reader.copy_to(name, writer)
    return {n: (math.prod(shape), writer.sizes[n]) for n, _, shape in entries}


def _shards(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(read_json(index, "weight index")["weight_map"].values()))
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise LightPeftError(f"no safetensors weights in {model_dir}; convert the checkpoint to safetensors first")


def model_reference(config) -> dict:
    """What `plan.read_plan` checks a plan against, taken from the model that is about to be sliced."""
    return {"model_fingerprint": fingerprint(config), "layer_shapes": config_layer_shapes(config),
            "hidden_size": config.hidden_size, "head_dim": head_dim_of(config)}


def check_plan(plan: dict, config) -> None:
    """The plan is for this model and every index it keeps exists there and is GQA-valid: slicing trusts both."""
    if plan.get("model_fingerprint") != fingerprint(config):
        raise LightPeftError(f"plan.json was made for model {plan.get('model_fingerprint')} but model.path is "
                             f"{fingerprint(config)}; re-run estimate and plan for this model")
    if len(plan["layers"]) != config.num_hidden_layers:
        raise LightPeftError("plan.json layer count does not match the model; re-run plan")
    check_plan_structure(plan, model_reference(config))


def prune_checkpoint(model_path: str, plan: dict, out_dir: Path, record_extra: dict | None = None) -> dict:
    """Slice the model at `model_path` to `plan` into `out_dir` (atomically), with its prune record; `record_extra`
    adds fields to the record (the train stage notes the plan a run started from, docs/architecture.md)."""
    src = resolve_model_dir(model_path)
    config = load_config(model_path)
    check_plan(plan, config)
    spec, hd = family_for(config), head_dim_of(config)
    table = slicing_table(spec, plan, hd)
    hidden = hidden_index(plan)
    new_config = pruned_config(config, kept_shapes(plan), kept_hidden_size(plan, config.hidden_size))
    new_config.architectures = [architecture_name(new_config)]
    shards = _shards(src)
    weight_map, total_bytes, n_params = {}, 0, 0
    with atomic_dir(out_dir) as tmp:
        for shard in tqdm(shards, desc="prune shards", unit="shard"):
            for name, (numel, nbytes) in prune_shard(src / shard, tmp / shard, table, hidden).items():
                weight_map[name] = shard
                total_bytes += nbytes
                n_params += numel
        if shards != ["model.safetensors"]:  # an indexed source keeps its index, even with one shard
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
        new_config.save_pretrained(tmp)
        for extra in src.iterdir():
            if extra.is_file() and extra.name not in (*WEIGHT_FILES, "config.json") and extra.suffix != ".safetensors":
                shutil.copy2(extra, tmp / extra.name)
        record = {"plan_hash": plan["hash"], "source": str(src), "params": n_params,
                  "architecture": new_config.architectures[0], "fingerprint": fingerprint(new_config),
                  **(record_extra or {})}
        write_json(tmp / PRUNE_RECORD, record)
    log.info("pruned model -> %s (%s, %s params)", out_dir, record["architecture"], f"{n_params:,}")
    return record


def prune_adapter(adapter_dir: Path, plan: dict, config, model_dir: Path, out_dir: Path) -> dict:
    """Slice the estimation LoRA to the pruned shapes, keep the planned modules and ranks, save in PEFT format."""
    spec, hd = family_for(config), head_dim_of(config)
    table, hidden = slicing_table(spec, plan, hd), hidden_index(plan)
    peft_cfg = read_json(adapter_dir / "adapter_config.json", "estimation adapter config")
    weights = load_tensors(adapter_dir / "adapter_model.safetensors", "estimation adapter weights")
    r_init, alpha = int(peft_cfg["r"]), float(peft_cfg["lora_alpha"])
    # A grown adapter (adapters/lora_growth.py) has per-module ranks and alphas; an estimation adapter has none.
    ranks_of, alphas_of = peft_cfg.get("rank_pattern") or {}, peft_cfg.get("alpha_pattern") or {}
    kept_modules = plan["peft_modules"]
    out: dict[str, torch.Tensor] = {}
    for module, ranks in kept_modules.items():
        a_key, b_key = f"{ADAPTER_PREFIX}{module}.lora_A.weight", f"{ADAPTER_PREFIX}{module}.lora_B.weight"
        if a_key not in weights or b_key not in weights:
            raise LightPeftError(f"estimation adapter has no LoRA weights for {module}; re-run estimate")
        r_module = int(ranks_of.get(module, r_init))
        if module not in table or any(not 0 <= r < r_module for r in ranks):
            raise LightPeftError(f"the plan keeps ranks {ranks} of {module}, which the estimation adapter "
                                 f"(r={r_module}) "
                                 "does not have as a sliced projection; rerun `lightpeft plan`")
        ranks_t = torch.as_tensor(ranks, dtype=torch.long)
        a, b = weights[a_key].index_select(0, ranks_t), weights[b_key].index_select(1, ranks_t)
        side, idx = table[module]
        if side == "out":
            b = b.index_select(0, idx)
            if hidden is not None:  # the projection reads the residual stream: A's input columns
                a = a.index_select(1, hidden)
        else:
            a = a.index_select(1, idx)
            if hidden is not None:  # it writes the residual stream: B's output rows
                b = b.index_select(0, hidden)
        out[a_key], out[b_key] = a.contiguous(), b.contiguous()
    names = list(kept_modules)
    peft_cfg.update({
        "target_modules": names,
        "rank_pattern": {n: len(r) for n, r in kept_modules.items()},
        "alpha_pattern": {n: float(alphas_of.get(n, alpha)) * len(r) / int(ranks_of.get(n, r_init))
                          for n, r in kept_modules.items()},
        "base_model_name_or_path": str(model_dir.resolve()),
    })
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / "adapter_model.safetensors", out, metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", peft_cfg)
    n = sum(t.numel() for t in out.values())
    log.info("pruned adapter -> %s (%d modules, %d ranks, %s params)", out_dir, len(names),
             sum(len(r) for r in kept_modules.values()), f"{n:,}")
    return {"modules": len(names), "params": n}
