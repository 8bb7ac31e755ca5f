"""Specification of `peft.type: adapter` (the bottleneck adapter): its unit score equals the reference's weight x
grad form, zeroing exactly the planned units equals pruning them, the saved adapter reloads bit-identically, the
whole pipeline runs with it, and bad targets fail with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lightpeft_dist  # noqa: F401  (registers pruned model types)
from lightpeft_dist.adapters.bottleneck import (adapter_config, adapter_modules, attach_from_config, load_bottleneck,
                                       prune_bottleneck, save_bottleneck)
from lightpeft_dist.adapters.bottleneck_importance import BottleneckImportanceTracker
from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig, PruneConfig
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.models.families import head_dim_of, layer_shapes
from lightpeft_dist.pruning.masks import attach_masks, set_masks_from_plan
from lightpeft_dist.adapters.registry import attach_adapters
from lightpeft_dist.models.loading import fingerprint
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.slicing import prune_checkpoint
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.rundir import MANIFEST
from lightpeft_dist.pruning.scores import Scores
from tiny import save_tiny, tiny_model

INPUT = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])
CFG = PeftConfig(type="adapter", r=4, dropout=0.0)


def randomize_adapters(model, seed: int = 3) -> None:
    """Init gives zero biases and tiny weights; real values (biases of both signs) make ReLU cut some units."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            for p in m.parameters():
                p.normal_(0, 0.3)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "_adapter." in n}


def test_unit_score_activation_form_equals_weight_times_grad():
    model = attach_from_config(tiny_model("qwen2-bias"), CFG)
    randomize_adapters(model)
    tracker = BottleneckImportanceTracker(model, total_steps=1, runtime=Runtime())
    ids = torch.randint(3, 60, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    pre = {}
    for name, m in adapter_modules(model):
        m.down.register_forward_hook(lambda mod, a, out, name=name: pre.update({name: out.detach()}))
    tracker.recording, tracker.token_mask = True, mask
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    tracker.recording = False
    tracker.end_step(0)
    modules, units = tracker.results()
    assert sorted(modules) == sorted(f"model.layers.{i}.{p}" for i in range(2)
                                     for p in ("self_attn.o_proj", "mlp.down_proj"))
    for name, m in adapter_modules(model):
        assert 0 < float((pre[name] > 0).float().mean()) < 1, "ReLU must cut some units for the check to bite"
        d, u = m.down.weight, m.up.weight
        reference = (d * d.grad).mean(dim=1).abs() + (u * u.grad).mean(dim=0).abs()  # the reference's formula, weights only (docs/method.md)
        assert reference.abs().max() > 0
        assert torch.allclose(units[name], reference.float(), rtol=1e-4, atol=1e-10), name
        assert modules[name] > 0


def _plan(model, prune_cfg: PruneConfig, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes, cfg = layer_shapes(model), model.config
    mods = adapter_modules(model)
    scores = Scores(head=[torch.rand(s["num_attention_heads"], generator=g) for s in shapes],
                    ffn=[torch.rand(s["intermediate_size"], generator=g) for s in shapes],
                    module={n: float(torch.rand(1, generator=g)) for n, _ in mods},
                    rank={n: torch.rand(m.size, generator=g) for n, m in mods})
    return make_plan(scores, shapes, prune_cfg, fingerprint(cfg), cfg.hidden_size, head_dim_of(cfg))


@torch.no_grad()
def _zero_pruned(model, plan: dict) -> None:
    """The masked twin of adapter pruning: a dropped module outputs 0; a dropped unit has pre = 0, so ReLU(0) = 0."""
    for name, m in adapter_modules(model):
        if name not in plan["peft_modules"]:
            m.up.weight.zero_()
            m.up.bias.zero_()
            continue
        keep = torch.zeros(m.size, dtype=torch.bool)
        keep[plan["peft_modules"][name]] = True
        m.down.weight[~keep] = 0.0
        m.down.bias[~keep] = 0.0


@pytest.mark.parametrize("layout, attn, ffn", [("llama-gqa", 0.0, 0.0), ("qwen2-bias", 0.5, 0.4)])
def test_masked_twin_equals_pruned_adapter(tmp_path, layout, attn, ffn):
    base_dir = save_tiny(tmp_path / "base", layout, layers=3)
    model = attach_from_config(AutoModelForCausalLM.from_pretrained(base_dir).eval(), CFG)
    randomize_adapters(model)
    save_bottleneck(tmp_path / "adapter", adapter_state(model), adapter_config(model))
    plan = _plan(model, PruneConfig(attn_ratio=attn, ffn_ratio=ffn, module_ratio=0.34, rank_ratio=0.5))
    assert 0 < len(plan["peft_modules"]) < 6 and plan["summary"]["lora_ranks_kept"] < 4 * len(plan["peft_modules"])
    with torch.no_grad():
        full = model(INPUT).logits
    attach_masks(model)
    set_masks_from_plan(model, plan)
    _zero_pruned(model, plan)
    with torch.no_grad():
        twin = model(INPUT).logits

    prune_checkpoint(str(base_dir), plan, tmp_path / "pruned")
    prune_bottleneck(tmp_path / "adapter", plan, tmp_path / "pruned_adapter")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        pruned_base = pruned(INPUT).logits
    load_bottleneck(pruned, tmp_path / "pruned_adapter")
    sizes = {n: m.size for n, m in adapter_modules(pruned)}
    assert sizes == {n: len(u) for n, u in plan["peft_modules"].items()}
    with torch.no_grad():
        adapted = pruned(INPUT).logits
    tol = 1e-5 if attn == ffn == 0 else 1e-4  # a pruned base sums in another order than its masked twin
    assert (adapted - twin).abs().max() < tol, (adapted - twin).abs().max()
    # the pruned adapter matters, and pruning it changed something
    assert (adapted - pruned_base).abs().max() > 1e-3
    assert (twin - full).abs().max() > 1e-3


def test_save_reload_in_fresh_process_is_identical(tmp_path):
    base_dir = save_tiny(tmp_path / "base", "llama-mha")
    model = attach_from_config(AutoModelForCausalLM.from_pretrained(base_dir).eval(), CFG)
    randomize_adapters(model)
    save_bottleneck(tmp_path / "adapter", adapter_state(model), adapter_config(model))
    with torch.no_grad():
        here = model(INPUT).logits
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "lightpeft_bottleneck" and set(cfg["targets"].values()) == {4}
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                                  MANIFEST}
    script = f"""
import torch
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
from lightpeft_dist.adapters.bottleneck import load_bottleneck
m = load_bottleneck(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(tmp_path / 'adapter')!r}).eval()
with torch.no_grad():
    save_file({{"logits": m(torch.tensor({INPUT.tolist()})).logits}}, {str(tmp_path / 'logits.safetensors')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    there = load_file(tmp_path / "logits.safetensors")["logits"]
    assert torch.equal(here, there)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert (fresh(INPUT).logits - here).abs().max() > 1e-3  # the adapter is really in the reloaded logits


def test_pipeline_runs_with_adapter(tmp_path, tiny_recipe, capsys):
    raw = {**tiny_recipe, "peft": {"type": "adapter", "r": 4},
           "train": {**tiny_recipe["train"], "steps": 12}}
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--run-dir", str(run)]) == 0
    plan = json.loads((run / "plan.json").read_text())
    # 2 layers x (o_proj, down_proj) = 4 modules of 4 units; module_ratio 0.5 keeps 2 (8 units), rank_ratio 0.5 of
    # those keeps 4 (global; a module left with none would be dropped too).
    assert plan["summary"]["lora_ranks_kept"] == 4
    assert 1 <= plan["summary"]["peft_modules_kept"] <= 2
    assert all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in plan["peft_modules"])
    pruned_cfg = json.loads((run / "pruned_adapter" / "adapter_config.json").read_text())
    # plan keys of a kind other than LoRA are qualified by it; the adapter's own config holds model paths
    assert all(n.startswith("bottleneck:") for n in plan["peft_modules"])
    assert pruned_cfg["targets"] == {n.removeprefix("bottleneck:"): len(u) for n, u in plan["peft_modules"].items()}
    assert pruned_cfg["scaling"] == 1.0 and pruned_cfg["dropout"] == 0.1
    train = json.loads((run / "train" / "train.json").read_text())
    losses = train["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    n_adapter = 4 * 48 * 2 + 4 + 48 * len(plan["peft_modules"])  # down/up weights, down biases, up biases
    assert train["params"]["trainable"] == train["params"]["adapter"] == n_adapter
    trained = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    pruned_w = load_file(run / "pruned_adapter" / "adapter_model.safetensors")
    assert trained.keys() == pruned_w.keys()
    assert any(not torch.equal(trained[k], pruned_w[k]) for k in trained)  # training moved the warm start
    result = json.loads((run / "eval.json").read_text())
    assert result["pruned"]["params"]["adapter"] == n_adapter and 0 <= result["pruned"]["accuracy"] <= 1
    # a bottleneck adapter is nonlinear: `run` skips the export, and asking for it is a one-line error
    assert not (run / "export").exists()
    capsys.readouterr()
    assert main(["export", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a bottleneck adapter") and "cannot be merged" in err[-1]
    assert not (run / "export").exists()


@pytest.mark.parametrize("targets, words", [(["q_proj"], "outputs are pruned"), (["wq"], "not projections")])
def test_bad_targets_are_one_line_errors(tmp_path, tiny_recipe, capsys, targets, words):
    with pytest.raises(LightPeftError, match=words):
        attach_adapters(tiny_model("llama-gqa"), PeftConfig(type="adapter", targets=targets))
    raw = {**tiny_recipe, "peft": {"type": "adapter", "targets": targets}}
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["estimate", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run" / "estimate").exists()
