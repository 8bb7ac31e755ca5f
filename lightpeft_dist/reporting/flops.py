"""Training FLOPs of a run's estimate and training, counted from its records and its model's config.

Why: wall time on a shared CPU says little about what a run costs on a cluster; FLOPs do not depend on the machine,
so "estimate + train against LoRA's training" can be compared across machines (issue 14, docs/method.md "Cost
accounting"). Counted analytically, per processed token, for a frozen base with trainable adapters:

- forward: 2 FLOPs per matmul weight (every linear layer of the decoder and the LM head; the input embedding is a
  lookup), 2 per adapter weight (LoRA A and B, bottleneck down and up), and 4 x seq x (query width) per layer for
  the attention products (scores and weighted values);
- backward: input gradients for all of that (2 x the forward), weight gradients only for the trainable adapter
  weights (2 per weight); the frozen base gets none.

Total per token: 4 N + 6 T + 12 seq W, with N the base's matmul weights, T the adapters' and W the summed query widths
(PaLM's 6 N + 12 L H Q T for full fine-tuning, less the base's weight gradients). It is exact for every matmul of a
step whose first layer's input needs a gradient (tests/test_flops.py against torch's FLOP counter); with a frozen
embedding autograd also skips the first layer's input projections' input gradients, so the count is an upper bound
by at most those. Elementwise work (norms, activations, masks, softmax) is not counted, as in MFU.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

from ..config import read_recipe_file, recipe_from_dict, recipe_to_dict
from ..errors import LightPeftError
from ..io_utils import read_json, read_json_if_present
from ..rundir import RunDir

log = logging.getLogger(__name__)

# which recipe section holds each strategy's estimate-stage sequence length
ESTIMATE_SECTION = {"lightpeft": "estimate", "apt": "apt", "prunepeft": "prunepeft"}


def layer_shapes(config: dict) -> list[dict]:
    """Per decoder layer: query heads, KV heads, FFN width (a pruned config's `layer_shapes`, else uniform)."""
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    uniform = {k: config.get(k) for k in keys}
    uniform["num_key_value_heads"] = uniform["num_key_value_heads"] or uniform["num_attention_heads"]
    shapes = config.get("layer_shapes") or [uniform] * config["num_hidden_layers"]
    return [{k: s.get(k, uniform[k]) for k in keys} for s in shapes]


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def matmul_weights(config: dict) -> int:
    """N: the weights of every decoder linear layer (q, k, v, o, gate, up, down) and of the LM head."""
    hidden, hd = config["hidden_size"], head_dim(config)
    total = config["vocab_size"] * hidden
    for s in layer_shapes(config):
        q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
        total += hidden * (2 * q + 2 * kv) + 3 * hidden * s["intermediate_size"]
    return total


def query_width(config: dict) -> int:
    """W: the query width (heads x head_dim) summed over the decoder layers."""
    return sum(s["num_attention_heads"] for s in layer_shapes(config)) * head_dim(config)


def structure_flops(tokens: int, seq_len: int, structure: dict) -> float:
    """FLOPs of training on `tokens` tokens (contexts of `seq_len`) of a model with `structure`'s counts
    (`matmul_weights` N, `adapter_weights` T, `query_width` W): tokens x (4 N + 6 T + 12 seq W)."""
    per_token = (4 * structure["matmul_weights"] + 6 * structure["adapter_weights"]
                 + 12 * seq_len * structure["query_width"])
    return float(tokens) * per_token


def step_flops(tokens: int, seq_len: int, config: dict, adapter_weights: int) -> float:
    """FLOPs of training on `tokens` tokens of the model `config` describes, with `adapter_weights` trainable."""
    return structure_flops(tokens, seq_len, {"matmul_weights": matmul_weights(config),
                                             "adapter_weights": adapter_weights, "query_width": query_width(config)})


def tensor_numel(folder: Path) -> int:
    """Elements of every tensor in the safetensors files of `folder` (headers only, nothing loaded)."""
    total = 0
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for dim in st.get_slice(name).get_shape():
                    n *= dim
                total += n
    return total


def _model_config(path: str | Path) -> dict | None:
    from .. import assets

    cfg = Path(assets.resolve(str(path))) / "config.json"
    return read_json(cfg, "model config") if cfg.is_file() else None


def _seq_len(recipe: dict | None, section: str) -> int | None:
    return ((recipe or {}).get(section) or {}).get("seq_len")


_READ = object()  # run_costs: the caller passed no record, read it from the run directory


def run_costs(run_dir: str | Path, estimate: dict | None | object = _READ, train: dict | None | object = _READ) -> dict:
    """FLOPs and wall seconds of a run's estimate (or calibration, or search) and training; None where a record,
    the model config or a sequence length is missing. `estimate` and `train` are the run's records where the caller
    has already read and checked them (RunData.load, which drops a record of another plan as None); if not passed,
    they are read here. Training is counted on the final model (pruned_model/), except for a run that changed shape
    while it trained (APT gradual): its record's per-segment counts (`hooks.apt_gradual_segments`) are summed."""
    d = RunDir(run_dir)
    est = read_json_if_present(d.estimate_record, "estimate record") if estimate is _READ else estimate
    train = read_json_if_present(d.train_record, "train record") if train is _READ else train
    out: dict = {"estimate_flops": None, "train_flops": None,
                 "estimate_seconds": None if not est else est.get("stage_seconds", est.get("wall_seconds")),
                 "train_seconds": None if not train else train.get("stage_seconds", train.get("wall_seconds"))}
    if est and est.get("tokens"):
        cfg = _model_config(est["model_path"]) if est.get("model_path") else None
        seq = _seq_len(est.get("recipe"), ESTIMATE_SECTION.get(est.get("strategy", "lightpeft"), "estimate"))
        if cfg and seq:
            # a records-only copy (benchmarks/quality/records.py) has the adapter's size in the record, no weights
            adapters = (int(est["adapter_params"]) if "adapter_params" in est else
                        tensor_numel(d.estimate_adapter) if d.estimate_adapter.exists() else 0)
            out["estimate_flops"] = step_flops(est["tokens"], seq, cfg, adapters)
    if train and train.get("tokens"):
        recipe = _saved_recipe(d)
        seq = _seq_len(recipe, "train")
        segments = (train.get("hooks") or {}).get("apt_gradual_segments")
        if segments and seq:  # counted on each segment's own model: no final model to read
            out["train_flops"] = sum(structure_flops(sg["tokens"], seq, sg) for sg in segments)
            return out
        cfg = (read_json(d.pruned_model / "config.json", "pruned model config")
               if (d.pruned_model / "config.json").is_file() else
               _model_config(recipe["model"]["path"]) if recipe else None)
        adapters = (train.get("params") or {}).get("trainable")
        if cfg and seq and adapters is not None:
            out["train_flops"] = step_flops(train["tokens"], seq, cfg, adapters)
    return out


def _saved_recipe(d: RunDir) -> dict | None:
    """The run's saved recipe, read and validated as `lightpeft` resumes it (pipeline/stages.py resolve_recipe,
    whose layer is above this one, so the two config calls are repeated here); None where there is none or it no
    longer validates (a run from an older schema: its cost is then unknown)."""
    if not d.recipe.is_file():
        return None
    try:
        raw = read_recipe_file(d.recipe, "saved recipe")
        return recipe_to_dict(recipe_from_dict(raw, source=str(d.recipe)))
    except LightPeftError as exc:
        log.warning("flops: %s: %s; its training FLOPs are left out", d.root, exc)
        return None
