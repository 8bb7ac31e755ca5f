"""Probe: does compensating pruned units' mean input as an output bias (FLAP-style) undo a plan's damage?

Usage: `python -m benchmarks.quality.bias_compensation_probe RUN_DIR`, where RUN_DIR is a finished study row
(recipe.yaml, plan.json, pruned_model/). It measures the mean input of every o_proj and down_proj of the unpruned
model on 128 training examples, adds W[:, pruned] @ mean[pruned] to the pruned model's outputs through forward hooks,
and prints the pruned base's zero-shot test accuracy and Brown perplexity without and with it. The result is in
docs/results.md. It was negative, so this stayed a probe rather than a slicer feature.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from lightpeft_dist.config import Recipe, load_recipe
from lightpeft_dist.data.batches import encode_example, load_rows
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pipeline.evaluate import task_metrics
from lightpeft_dist.pruning.plan import read_plan

from .perplexity import load_windows, perplexity

CALIBRATION_EXAMPLES = 128


@torch.no_grad()
def mean_inputs(model: nn.Module, examples: list[dict]) -> dict[tuple[str, int], torch.Tensor]:
    """Mean over every token of the examples of each layer's o_proj ("o") and down_proj ("d") input."""
    sums: dict[tuple[str, int], torch.Tensor] = {}
    tokens = 0

    def hook(key: tuple[str, int]):
        def add(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double().sum(0)
            sums[key] = sums.get(key, 0) + x
        return add

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(("o", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(("d", i))))
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        tokens += ids.numel()
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {k: (v / tokens).float() for k, v in sums.items()}


def compensation(model: nn.Module, plan: dict, means: dict[tuple[str, int], torch.Tensor]) -> dict:
    """Per layer, the output bias that replaces the pruned heads' and neurons' mean contribution."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    out = {}
    for i, (layer, kept) in enumerate(zip(model.model.layers, plan["layers"])):
        o_keep = torch.zeros(layer.self_attn.o_proj.in_features, dtype=torch.bool)
        for h in kept["q_heads"]:
            o_keep[h * head_dim:(h + 1) * head_dim] = True
        d_keep = torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.bool)
        d_keep[kept["ffn"]] = True
        out[("o", i)] = layer.self_attn.o_proj.weight[:, ~o_keep] @ means[("o", i)][~o_keep]
        out[("d", i)] = layer.mlp.down_proj.weight[:, ~d_keep] @ means[("d", i)][~d_keep]
    return out


def measure(model: nn.Module, tok, recipe: Recipe, windows: list[dict]) -> dict:
    return {"accuracy": task_metrics(model, tok, recipe, "test")["accuracy"],
            "perplexity": perplexity(model, tok, windows, 4)["perplexity"]}


def main(row: Path) -> dict:
    recipe = load_recipe(row / "recipe.yaml", [])
    plan = read_plan(row / "plan.json")
    tok = load_tokenizer(recipe.model)
    base = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
    rows = load_rows(recipe.data, "train").select(range(CALIBRATION_EXAMPLES))
    examples = [encode_example(r, recipe.data, tok, recipe.train.seq_len) for r in rows]
    bias = compensation(base, plan, mean_inputs(base, examples))
    del base
    pruned = load_model(str(row / "pruned_model"), recipe.model.dtype, recipe.model.attn_implementation)
    windows = load_windows(tok, "brown", 256, 16)[0]
    result = {"plain": measure(pruned, tok, recipe, windows)}
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out, b=bias[("o", i)]: out + b)
        layer.mlp.down_proj.register_forward_hook(lambda _m, _a, out, b=bias[("d", i)]: out + b)
    result["compensated"] = measure(pruned, tok, recipe, windows)
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
