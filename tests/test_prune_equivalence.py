"""Specification: a masked model with zeroed masks on exactly the plan's pruned units computes the same logits as
the physically pruned model, with and without the sliced LoRA adapter, and the saved artefacts reload."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import lightpeft_dist  # noqa: F401  (registers pruned model types)
from lightpeft_dist.config import PeftConfig, PruneConfig
from lightpeft_dist.models.families import head_dim_of, layer_shapes
from lightpeft_dist.pruning.importance import lora_modules
from lightpeft_dist.pruning.masks import attach_masks, set_masks_from_plan
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.models.loading import fingerprint
from lightpeft_dist.pruning.plan import make_plan
from conftest import prune_and_reload
from lightpeft_dist.pruning.slicing import prune_checkpoint
from lightpeft_dist.pruning.scores import Scores
from tiny import LAYOUTS, randomize_lora, save_tiny

INPUT = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])


def random_scores(model, seed: int = 1) -> Scores:
    g = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(model)
    mods = lora_modules(model)
    return Scores(head=[torch.rand(s["num_attention_heads"], generator=g) for s in shapes],
                  ffn=[torch.rand(s["intermediate_size"], generator=g) for s in shapes],
                  module={n: float(torch.rand(1, generator=g)) for n, _ in mods},
                  rank={n: torch.rand(m.r["default"], generator=g) for n, m in mods})


def build(tmp_path, layout, prune_cfg, **model_kwargs):
    base_dir = save_tiny(tmp_path / "base", layout, **model_kwargs)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft_model = get_peft_model(base, lora_config(PeftConfig(r=4, alpha=8, dropout=0.0)))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = base.config
    plan = make_plan(random_scores(peft_model), layer_shapes(base), prune_cfg, fingerprint(cfg),
                     cfg.hidden_size, head_dim_of(cfg))
    return base_dir, peft_model, plan


@torch.no_grad()
def masked_twin(peft_model, plan: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the masked twin of `plan` (with and without the adapter): the plan's pruned units masked to 0 and
    the adapter ranks it drops zeroed, i.e. what the sliced pair must reproduce."""
    attach_masks(peft_model)
    set_masks_from_plan(peft_model, plan)
    for name, module in lora_modules(peft_model):
        keep = torch.zeros(module.r["default"], dtype=torch.bool)
        keep[plan["peft_modules"].get(name, [])] = True
        module.lora_A["default"].weight[~keep] = 0.0
    with_adapter = peft_model(INPUT).logits
    with peft_model.disable_adapter():
        return with_adapter, peft_model(INPUT).logits


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("uniform", [False, True])
def test_masked_equals_pruned(tmp_path, layout, uniform):
    prune_cfg = PruneConfig(attn_ratio=0.5, ffn_ratio=0.4, module_ratio=0.3, rank_ratio=0.5, uniform=uniform)
    base_dir, peft_model, plan = build(tmp_path, layout, prune_cfg)
    with torch.no_grad(), peft_model.disable_adapter():
        full_logits = peft_model(INPUT).logits
    masked_logits, masked_base_logits = masked_twin(peft_model, plan)

    pruned, pruned_adapter = prune_and_reload(base_dir, plan, peft_model.config, tmp_path / "adapter", tmp_path)
    assert (type(pruned).__name__.startswith("Pruned")) != uniform or plan["summary"]["uniform"]
    with torch.no_grad():
        pruned_logits = pruned(INPUT).logits
    assert torch.allclose(pruned_logits, masked_base_logits, atol=1e-4), (pruned_logits - masked_base_logits).abs().max()
    with_adapter = PeftModel.from_pretrained(pruned, pruned_adapter).eval()
    with torch.no_grad():
        adapted = with_adapter(INPUT).logits
    assert torch.allclose(adapted, masked_logits, atol=1e-4), (adapted - masked_logits).abs().max()
    # pruning really happened and the adapter really matters
    assert plan["summary"]["prunable_fraction_pruned"] > 0.2
    assert not torch.allclose(pruned_logits, full_logits, atol=1e-2)
    assert not torch.allclose(adapted, pruned_logits, atol=1e-3)
    kept_ranks = sum(m.r["default"] for _, m in lora_modules(with_adapter))
    assert kept_ranks == plan["summary"]["lora_ranks_kept"]


def test_uniform_plan_whose_head_count_does_not_divide_hidden_still_loads(tmp_path):
    """hidden 40 with 4 heads of 10; keeping 3 heads everywhere is uniform but 40 % 3 != 0, which the stock config
    refuses, so the pruned checkpoint must carry its own config class and still match the masked model."""
    prune_cfg = PruneConfig(attn_ratio=0.25, ffn_ratio=0.25, module_ratio=0.0, rank_ratio=0.0, uniform=True)
    base_dir, peft_model, plan = build(tmp_path, "llama-mha", prune_cfg, hidden=40)
    assert plan["summary"]["uniform"] and {len(layer["q_heads"]) for layer in plan["layers"]} == {3}
    with torch.no_grad():
        attach_masks(peft_model)
        set_masks_from_plan(peft_model, plan)
        with peft_model.disable_adapter():
            masked = peft_model(INPUT).logits
    prune_checkpoint(str(base_dir), plan, tmp_path / "pruned")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert pruned.config.head_dim == 10 and pruned.config.num_attention_heads == 3
    with torch.no_grad():
        assert torch.allclose(pruned(INPUT).logits, masked, atol=1e-4)


def test_pruned_config_rejects_heads_that_do_not_group(tmp_path):
    from lightpeft_dist.models.pruned_model import pruned_config
    base = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "base", "llama-gqa")).config
    with pytest.raises(ValueError, match="cannot be grouped"):
        pruned_config(base, [{"num_attention_heads": 3, "num_key_value_heads": 2, "intermediate_size": 8}] * 2)


def test_pruned_artefacts_reload_in_fresh_process(tmp_path):
    prune_cfg = PruneConfig(attn_ratio=0.34, ffn_ratio=0.5, module_ratio=0.5, rank_ratio=0.5)
    base_dir, peft_model, plan = build(tmp_path, "qwen2-bias", prune_cfg)
    pruned, pruned_adapter = prune_and_reload(base_dir, plan, peft_model.config, tmp_path / "adapter", tmp_path)
    model = PeftModel.from_pretrained(pruned, pruned_adapter).eval()
    with torch.no_grad():
        here = model(INPUT).logits
    torch.save(INPUT, tmp_path / "input.pt")
    script = f"""
import torch, lightpeft_dist
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import save_file
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'pruned')!r}).eval()
m = PeftModel.from_pretrained(m, {str(tmp_path / 'pruned_adapter')!r}).eval()
x = torch.tensor({INPUT.tolist()})
with torch.no_grad():
    save_file({{"logits": m(x).logits}}, {str(tmp_path / 'logits.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    from safetensors.torch import load_file
    there = load_file(tmp_path / "logits.safetensors")["logits"]
    assert torch.equal(here, there)
