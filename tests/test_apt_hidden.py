"""APT hidden-dimension pruning (`apt.prune_hidden`): the masked model (residual mask, RMSNorm over the kept
dimensions) computes the pruned model's logits, with and without the sliced LoRA; the pruned model has the cost
model's parameter count and reloads in a fresh process to the same logits; a one-shot run prunes hidden dimensions
end to end and its adapter reloads with plain PEFT; a bad hidden index is one `error:` line; gradual mode
accepts it (test_apt_gradual_hidden.py runs it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import lightpeft_dist  # noqa: F401  (registers the pruned model types)
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig, load_recipe
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.models.loading import load_config
from lightpeft_dist.pruning.hidden_mask import attach_hidden_mask
from lightpeft_dist.pruning.importance import lora_modules
from lightpeft_dist.pruning.masks import attach_masks, set_masks_from_plan
from lightpeft_dist.pruning.plan import plan_hash, read_plan
from conftest import prune_and_reload
from lightpeft_dist.pruning.slicing import model_reference
from lightpeft_dist.strategies.apt.plan import cost_model, make_apt_plan
from test_apt import FRESH_EVAL, write_recipe
from tiny import randomize_lora, save_tiny

INPUT = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])
RELOAD = """
import sys, torch, lightpeft_dist
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    save_file({"logits": m(torch.tensor(%s)).logits}, sys.argv[2])
""" % INPUT.tolist()


def hidden_plan(model, base_dir, density: float, seed: int = 5) -> tuple[dict, dict]:
    """An APT plan over random scores that prunes hidden dimensions, and the record it was made from."""
    config = load_config(str(base_dir))
    ref = model_reference(config)
    g = torch.Generator().manual_seed(seed)
    scores = {"group": [torch.rand(s["num_key_value_heads"], generator=g).double() for s in ref["layer_shapes"]],
              "ffn": [torch.rand(s["intermediate_size"], generator=g).double() for s in ref["layer_shapes"]],
              "hidden": torch.rand(ref["hidden_size"], generator=g).double() * 4}
    record = {**ref, "biases": ["qkv"] if config.model_type == "qwen2" else [], "vocab_size": config.vocab_size,
              "head_norms": config.model_type == "qwen3",
              "tie_word_embeddings": config.tie_word_embeddings,
              "lora_modules": {name: int(m.r["default"]) for name, m in lora_modules(model)}}
    return make_apt_plan(scores, record, density), record


# tied GQA; untied GQA with q/k/v biases; untied with per-head q/k norms and an explicit head_dim
@pytest.mark.parametrize("layout", ["llama-gqa", "qwen2-bias", "qwen3-qknorm"])
def test_masked_hidden_model_equals_the_pruned_one_and_the_cost_model_counts_it(tmp_path, layout):
    base_dir = save_tiny(tmp_path / "base", layout)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(),
                                lora_config(PeftConfig(r=4, alpha=8, dropout=0.0)))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    plan, record = hidden_plan(peft_model, base_dir, 0.6)
    d = record["hidden_size"]
    assert 1 < len(plan["hidden"]) < d and plan["hidden"] != list(range(len(plan["hidden"])))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    read_plan(tmp_path / "plan.json", model_reference(load_config(str(base_dir))))
    with torch.no_grad(), peft_model.disable_adapter():
        full = peft_model(INPUT).logits
    attach_masks(peft_model)
    set_masks_from_plan(peft_model, plan)
    attach_hidden_mask(peft_model, plan["hidden"])
    with torch.no_grad():
        masked_adapted = peft_model(INPUT).logits
        with peft_model.disable_adapter():
            masked = peft_model(INPUT).logits

    pruned, pruned_adapter = prune_and_reload(base_dir, plan, peft_model.config, tmp_path / "adapter", tmp_path)
    assert pruned.config.hidden_size == len(plan["hidden"]) and pruned.config.head_dim == record["head_dim"]
    assert pruned.model.embed_tokens.weight.shape == (record["vocab_size"], len(plan["hidden"]))
    with torch.no_grad():
        pruned_logits = pruned(INPUT).logits
    assert torch.allclose(pruned_logits, masked, atol=1e-4), (pruned_logits - masked).abs().max()
    assert not torch.allclose(pruned_logits, full, atol=1e-2)  # pruning changed the model
    # the cost model (embeddings and the untied LM head included) predicts the pruned model's parameter count
    kept = plan["apt"]["kept_params"]
    assert sum(p.numel() for p in pruned.parameters()) == kept == cost_model(record, hidden=True).count(
        [len(lp["kv_heads"]) for lp in plan["layers"]], [len(lp["ffn"]) for lp in plan["layers"]], len(plan["hidden"]))
    assert (pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()) == (layout == "llama-gqa")
    with_adapter = PeftModel.from_pretrained(pruned, pruned_adapter).eval()
    with torch.no_grad():
        adapted = with_adapter(INPUT).logits
    assert torch.allclose(adapted, masked_adapted, atol=1e-4), (adapted - masked_adapted).abs().max()
    assert not torch.allclose(adapted, pruned_logits, atol=1e-3)  # the sliced adapter matters
    # a fresh process loads the pruned model with plain transformers to the same logits
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "pruned"), str(tmp_path / "logits.safetensors")],
                   check=True)
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], pruned_logits)


def test_plans_without_hidden_dimensions_keep_their_hash(tmp_path):
    """prune_hidden off: no `hidden` field, the decoder-only count, and the very plan (hash) the code before hidden
    pruning made for these inputs (e2e7c0b3e092c536, computed with that code), so old run directories stay valid."""
    base_dir = save_tiny(tmp_path / "base", "qwen2-bias")
    ref = model_reference(load_config(str(base_dir)))
    g = torch.Generator().manual_seed(11)
    scores = {"group": [torch.rand(s["num_key_value_heads"], generator=g).double() for s in ref["layer_shapes"]],
              "ffn": [torch.rand(s["intermediate_size"], generator=g).double() for s in ref["layer_shapes"]]}
    record = {**ref, "biases": ["qkv"], "lora_modules": {"model.layers.0.self_attn.q_proj": 4}}
    off = make_apt_plan(scores, record, 0.6)
    assert "hidden" not in off and "hidden_size" not in off["summary"]["after"]
    assert off["hash"] == "e2e7c0b3e092c536"
    assert off["apt"]["dense_params"] == cost_model(record).dense()
    # with hidden scores, the count covers the embeddings and the untied LM head too
    on = make_apt_plan({**scores, "hidden": torch.rand(ref["hidden_size"], generator=g).double()},
                       {**record, "vocab_size": 33, "tie_word_embeddings": False}, 0.6)
    assert on["apt"]["dense_params"] == cost_model(record).dense() + 2 * 33 * ref["hidden_size"]
    kept = on["hidden"]
    assert 1 < len(kept) < ref["hidden_size"]
    for bad, message in ((kept[:1] + kept, "repeats index"), (kept[::-1], "is not sorted"), ([], "keeps nothing"),
                         ([-1] + kept, "has negative index")):
        edited = {**on, "hidden": bad}
        edited["hash"] = plan_hash(edited)  # a consistent hash: the structure check must catch it
        (tmp_path / "plan.json").write_text(json.dumps(edited))
        with pytest.raises(LightPeftError, match=f"hidden {message}"):
            read_plan(tmp_path / "plan.json", ref)


def test_one_shot_run_with_hidden_pruning_end_to_end(tmp_path, capsys):
    # the tiny model's hidden dimensions score high per parameter (their kurtosis term sums over every o/down row), so
    # a low density is needed before any is pruned: 0.2 keeps 29 of 48 (and the floor of one group and neuron)
    recipe = write_recipe(tmp_path, {"target_density": 0.2, "calibration_samples": 8, "batch_size": 4, "seq_len": 24,
                                     "rank_growth": 2.0, "window": 6, "checkpoints": 2, "ramp": 1,
                                     "prune_hidden": True})
    run = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--run-dir", str(run)]) == 0
    base = load_config(str(tmp_path / "model"))
    plan = read_plan(run / "plan.json", model_reference(base))
    assert 1 < len(plan["hidden"]) < base.hidden_size
    assert plan["summary"]["after"]["hidden_size"] == len(plan["hidden"])
    a = plan["apt"]
    assert a["kept_params"] <= a["target_params"] < a["kept_params"] + a["next_block_params"]
    pruned = json.loads((run / "pruned_model" / "config.json").read_text())
    assert pruned["hidden_size"] == len(plan["hidden"]) and pruned["head_dim"] == base.head_dim
    # the trained adapter (grown ranks) loads with plain PEFT on the pruned model and evaluates to eval.json
    fresh = subprocess.run([sys.executable, "-c", FRESH_EVAL, str(run), str(recipe)], capture_output=True, text=True,
                           check=True)
    direct = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert direct["accuracy"] == json.loads((run / "eval.json").read_text())["pruned"]["accuracy"]
    # an edited plan whose hidden index is out of range: one error line, the pruned model is not replaced
    before = (run / "pruned_model" / "model.safetensors").stat().st_mtime_ns
    plan["hidden"][-1] = base.hidden_size
    plan["hash"] = plan_hash(plan)
    (run / "plan.json").write_text(json.dumps(plan))
    capsys.readouterr()
    assert main(["prune", "--config", str(recipe), "--run-dir", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"hidden has index {base.hidden_size}, out of range" in err[0], err
    assert (run / "pruned_model" / "model.safetensors").stat().st_mtime_ns == before


def test_hidden_pruning_in_gradual_mode_is_accepted_with_the_mask_ramp(tmp_path):
    """Gradual mode used to refuse prune_hidden ("one_shot only"); the recipe now loads, with the mask ramp on
    (the hidden dimensions ramp with the blocks). test_apt_gradual_hidden.py runs it end to end."""
    recipe = load_recipe(write_recipe(tmp_path, {"mode": "gradual", "prune_hidden": True, "window": 8,
                                                 "checkpoints": 2, "ramp": 1}))
    apt = recipe.section("apt")
    assert apt.mode == "gradual" and apt.prune_hidden and apt.mask_ramp
