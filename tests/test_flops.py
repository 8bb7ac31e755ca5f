"""The FLOPs of the cost report (lightpeft_dist/reporting/flops.py) equal torch's own count of one training step.

torch.utils.flop_counter counts every matmul autograd runs (forward, input gradients, weight gradients), so a step
of a LoRA-wrapped model with a frozen base is the reference for 4 N + 6 T + 12 seq W per token. Eager attention makes
the attention products plain matmuls; `enable_input_require_grads` makes the first layer's input need a gradient,
the case where the formula is exact (docs/method.md, "Cost accounting").
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from lightpeft_dist.models.loading import model_structure
from lightpeft_dist.reporting.flops import (matmul_weights, query_width, run_costs, step_flops,
                                            tensor_numel)
from pruned_tiny import save_uneven
from tiny import save_tiny

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _step_count(model_dir, batch: int, seq: int) -> tuple[float, dict, int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return float(counter.get_total_flops()), json.loads((model_dir / "config.json").read_text()), adapters


@pytest.mark.parametrize("which", ["uniform", "uneven"])
def test_step_flops_equal_torchs_count_of_a_lora_step(tmp_path, which):
    model_dir = save_tiny(tmp_path / "m", "llama-gqa", layers=3) if which == "uniform" else save_uneven(tmp_path)
    measured, config, adapters = _step_count(model_dir, batch=2, seq=16)
    assert step_flops(2 * 16, 16, config, adapters) == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("which", ["uniform", "uneven"])
def test_counts_on_a_live_lora_model_equal_the_configs(tmp_path, which):
    """What a model that changes shape while it trains is counted by (strategies/apt/costs.py, per segment)."""
    model_dir = save_tiny(tmp_path / "m", "llama-gqa", layers=3) if which == "uniform" else save_uneven(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model_structure(model) == {"matmul_weights": matmul_weights(config), "adapter_weights": adapters,
                                      "query_width": query_width(config)}


def test_matmul_weights_and_query_width_follow_the_pruned_layers(tmp_path):
    model_dir = save_uneven(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert matmul_weights(config) == linear  # tied LM head counted once, as a matmul
    widths = sum(layer.self_attn.q_proj.out_features for layer in model.model.layers)
    assert query_width(config) == widths


def test_run_costs_reads_a_finished_run(tmp_path, tiny_recipe):
    import yaml

    from dist_checks import run_stages
    from lightpeft_dist.io_utils import read_json
    from lightpeft_dist.rundir import RunDir

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    run_stages(run, "estimate", config=tmp_path / "r.yaml")
    run_stages(run, "plan", "prune", "train")
    d = RunDir(run)
    costs = run_costs(run)
    est, train = read_json(d.estimate_record), read_json(d.train_record)
    base = json.loads((tmp_path / "model" / "config.json").read_text())
    pruned = json.loads((d.pruned_model / "config.json").read_text())
    assert costs["estimate_flops"] == step_flops(est["tokens"], 24, base, tensor_numel(d.estimate_adapter))
    assert costs["train_flops"] == step_flops(train["tokens"], 24, pruned, train["params"]["trainable"])
    assert costs["train_flops"] / train["tokens"] < costs["estimate_flops"] / est["tokens"]  # the pruned model is cheaper
    # records the caller already read (RunData.load) are used as given: one it dropped is not read again
    assert run_costs(run, est, train) == costs
    dropped = run_costs(run, est, None)
    assert dropped["train_flops"] is None and dropped["train_seconds"] is None
    assert dropped["estimate_flops"] == costs["estimate_flops"]
