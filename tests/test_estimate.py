"""Specification of estimation: the rank score equals the reference's weight x grad form, and units made irrelevant
by construction end up ranked lowest (and are the ones a plan prunes)."""

from __future__ import annotations

import json

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lightpeft_dist.config import PeftConfig, PruneConfig, recipe_from_dict
from lightpeft_dist.strategies.lightpeft import run_estimate
from lightpeft_dist.models.families import head_dim_of
from lightpeft_dist.pruning.importance import LoraImportanceTracker, lora_modules
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.pruning.scores import load_scores
from tiny import randomize_lora, save_tiny, tiny_model


def test_rank_score_equals_reference_weight_times_grad_form():
    model = get_peft_model(tiny_model("qwen2-bias"), lora_config(PeftConfig(r=4, alpha=8, dropout=0.0)))
    randomize_lora(model)
    tracker = LoraImportanceTracker(model, total_steps=1, runtime=Runtime())
    ids = torch.randint(3, 60, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    tracker.recording, tracker.token_mask = True, mask
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    tracker.recording = False
    tracker.end_step(0)
    _, ranks = tracker.results()
    for name, m in lora_modules(model):
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        reference = (a * a.grad).mean(dim=1).abs() + (b * b.grad).mean(dim=0).abs()  # the reference's formula, verbatim (docs/method.md)
        assert torch.allclose(ranks[name], reference.float(), rtol=1e-4, atol=1e-9), name


def test_module_score_is_delta_over_base_norm_on_real_tokens():
    model = get_peft_model(tiny_model("llama-mha"), lora_config(PeftConfig(r=2, alpha=4, dropout=0.0,
                                                                             targets=["v_proj"])))
    randomize_lora(model)
    tracker = LoraImportanceTracker(model, total_steps=1, runtime=Runtime())
    ids = torch.randint(3, 60, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    captured = {}
    name, layer = lora_modules(model)[0]
    layer.register_forward_hook(lambda mod, args, out: captured.setdefault("x", args[0].detach()))
    tracker.recording, tracker.token_mask = True, mask
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    tracker.end_step(0)
    x = captured["x"]
    base = layer.base_layer(x)
    delta = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    ratio = delta.norm(dim=-1) / base.norm(dim=-1)
    expected = float(((ratio * mask).sum() / mask.sum()).detach())
    assert abs(tracker.results()[0][name] - expected) < 1e-6


def _irrelevant_model(path):
    """3 layers, 4 heads: head 0 of layers 0 and 2 and all of layer 1's attention output are dead, and FFN
    neurons 0-7 of every layer feed nothing."""
    save_tiny(path, "llama-mha", layers=3, ffn=40)
    model = AutoModelForCausalLM.from_pretrained(path)
    hd = head_dim_of(model.config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            o = layer.self_attn.o_proj.weight
            if i == 1:
                o.zero_()
            else:
                o[:, :hd] = 0
            layer.mlp.down_proj.weight[:, :8] = 0
    model.save_pretrained(path)
    return path


def test_estimation_ranks_irrelevant_units_lowest(tmp_path, tiny_recipe):
    _irrelevant_model(tmp_path / "model")
    texts = [{"text": "the movie was good and the plot was fun"}, {"text": "a bad film , really boring story"},
             {"text": "very great acting , not awful"}, {"text": "the story is a question and the answer"}]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts * 4))
    raw = {**tiny_recipe, "data": {"format": "text", "train_file": str(tmp_path / "text.jsonl")},
           "peft": {"r": 4, "alpha": 8, "targets": ["q_proj", "k_proj", "v_proj"]},
           "estimate": {"steps": 20, "batch_size": 4, "seq_len": 16, "lr": 1e-2, "l1": 1e-3}}
    recipe = recipe_from_dict(raw)
    record = run_estimate(recipe, tmp_path / "run")
    scores = load_scores(tmp_path / "run" / "estimate" / "scores.safetensors")
    for i in (0, 2):
        assert int(scores.head[i].argmin()) == 0, scores.head[i]
        assert scores.head[i][0] < scores.head[i][1:].min()
    # Dead neurons get only the constant L1 push, i.e. Adam's maximal decrease. A neuron the task actively wants
    # smaller (consistently harmful) can sink about as fast, so "lowest" means: inside the bottom 30% (12 of 40; by
    # chance all 8 would land there with probability < 1e-4), and a plan at that ratio removes every dead neuron.
    for ffn in scores.ffn:
        assert int((ffn < ffn[:8].min()).sum()) <= 4, ffn
    dead = {f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")}
    lowest = sorted(scores.module, key=scores.module.get)[:3]
    assert set(lowest) == dead
    assert all(float(scores.rank[n].abs().max()) == 0.0 for n in dead)
    plan = make_plan(scores, record["layer_shapes"], PruneConfig(attn_ratio=0.25, ffn_ratio=0.3, module_ratio=1 / 3,
                                                                 ffn_scope="layerwise"),
                     record["model_fingerprint"], record["hidden_size"], record["head_dim"])
    assert all(0 not in lay["q_heads"] for i, lay in enumerate(plan["layers"]) if i != 1)
    assert all(set(lay["ffn"]).isdisjoint(range(8)) for lay in plan["layers"])
    assert dead.isdisjoint(plan["peft_modules"])
    # The activation unit scores of the same run see dead units exactly: nothing flows through a zero column.
    act = load_scores(tmp_path / "run" / "estimate" / "activation_scores.safetensors")
    assert act.module == scores.module and all(torch.equal(act.rank[n], scores.rank[n]) for n in scores.rank)
    assert float(act.head[1].abs().max()) == 0.0
    for i in (0, 2):
        assert float(act.head[i][0]) == 0.0 and float(act.head[i][1:].min()) > 0
    for ffn in act.ffn:
        assert float(ffn[:8].abs().max()) == 0.0 and float(ffn[8:].min()) > 0
    act_plan = make_plan(act, record["layer_shapes"], PruneConfig(attn_ratio=0.25, ffn_ratio=0.2, module_ratio=0,
                                                                  ffn_scope="layerwise", unit_scores="activation"),
                         record["model_fingerprint"], record["hidden_size"], record["head_dim"])
    assert all(sorted(lay["ffn"]) == list(range(8, 40)) for lay in act_plan["layers"])  # exactly the dead ones go
    assert all(0 not in lay["q_heads"] for i, lay in enumerate(act_plan["layers"]) if i != 1)
    # So do the Taylor scores: no gradient reaches a unit that writes through a zero column.
    taylor = load_scores(tmp_path / "run" / "estimate" / "taylor_scores.safetensors")
    assert taylor.module == scores.module
    assert float(taylor.head[1].abs().max()) == 0.0
    for i in (0, 2):
        assert float(taylor.head[i][0]) == 0.0 and float(taylor.head[i][1:].min()) > 0
    for ffn in taylor.ffn:
        assert float(ffn[:8].abs().max()) == 0.0 and float(ffn[8:].min()) > 0
    # the estimation adapter is a standard PEFT adapter for the base model
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "estimate" / "adapter")
    assert len(lora_modules(loaded)) == 9
