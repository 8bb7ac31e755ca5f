"""APT (`strategy: apt`, lightpeft_dist/strategies/apt/): the block salience equals its autograd reference, the
outlier term is the kurtosis of each KV group's own block, the cost model counts the pruned model's parameters
exactly, the search keeps the largest salience-per-parameter prefix within the budget (so the density hits the
target within one block), a whole `lightpeft run` gives a valid plan and the shared artefacts, and bad input is one
`error:` line. (2-rank ZeRO-3 calibration against one process: test_apt_zero3.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model

from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig
from lightpeft_dist.models.loading import load_config, load_model
from lightpeft_dist.pruning.plan import read_plan
from lightpeft_dist.pruning.slicing import model_reference, prune_checkpoint
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.pruning.budget import CostModel, plan_for_budget
from lightpeft_dist.strategies.apt.kurtosis import excess_kurtosis
from lightpeft_dist.strategies.apt.plan import make_apt_plan
from lightpeft_dist.strategies.apt.salience import AptSalience
from tiny import randomize_lora, save_tiny, tiny_model

IDS = torch.tensor([[5, 9, 12, 7, 20, 4, 8, 11], [6, 3, 15, 9, 22, 2, 2, 2], [14, 4, 10, 18, 5, 7, 9, 2]])
MASK = (IDS != 2).long()
LABELS = IDS.masked_fill(MASK == 0, -100)
LAYOUTS = ["llama-mha", "mistral-gqa", "qwen2-bias", "qwen3-qknorm"]


def lora_model(layout: str, seed: int = 0):
    """LoRA with real B values on q, v and o_proj, so the o_proj kurtosis must use the merged weight."""
    model = get_peft_model(tiny_model(layout, seed=seed), lora_config(PeftConfig(r=2, alpha=4, dropout=0.0,
                                                                                 targets=["q_proj", "v_proj", "o_proj"])))
    randomize_lora(model)
    model.enable_input_require_grads()
    return model


def reference_kurtosis(x: torch.Tensor) -> float:
    """Excess kurtosis of all entries, written out: mean(((x - mean) / std_unbiased)^4) - 3."""
    x = x.double().flatten()
    m = x.sum() / x.numel()
    s = torch.sqrt(((x - m) ** 2).sum() / (x.numel() - 1))
    return float((((x - m) / s) ** 4).sum() / x.numel() - 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_salience_and_kurtosis_equal_their_direct_computation(layout):
    model = lora_model(layout)
    tracker = AptSalience(model, Runtime(), use_kurtosis=True)
    base = model.base_model.model.model
    captured: dict = {}
    for i, layer in enumerate(base.layers):
        for kind, proj in (("group", layer.self_attn.o_proj), ("ffn", layer.mlp.down_proj)):
            proj.register_forward_pre_hook(lambda mod, args, key=(kind, i): captured.setdefault(key, args[0]))
    tracker.recording, tracker.token_mask = True, MASK
    loss = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
    tracker.recording = False
    keys = list(captured)
    grads = dict(zip(keys, torch.autograd.grad(loss, [captured[k] for k in keys])))
    step = tracker.end_step()
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen3: explicit
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    w = MASK.double()[..., None]
    for i, layer in enumerate(base.layers):
        for kind, proj, width in (("group", layer.self_attn.o_proj, rep * hd), ("ffn", layer.mlp.down_proj, 1)):
            z, g = captured[kind, i].detach().double(), grads[kind, i].double()
            salience = ((z.abs() * w).sum((0, 1)) * (g.abs() * w).sum((0, 1))).reshape(-1, width).sum(-1)
            mean = (z * w).sum((0, 1)) / w.sum()
            weight = proj.base_layer.weight.double() if hasattr(proj, "base_layer") else proj.weight.double()
            if hasattr(proj, "lora_A"):  # o_proj carries LoRA: the effective weight is W + s * B A
                weight = weight + 2.0 * (proj.lora_B["default"].weight @ proj.lora_A["default"].weight).double()
            o = weight * mean[None, :]
            kurt = torch.tensor([max(reference_kurtosis(o[:, b * width:(b + 1) * width]), 0.0) ** 0.5
                                 for b in range(o.shape[1] // width)], dtype=torch.float64)
            assert float(kurt.max()) > 0 and float(salience.min()) > 0
            torch.testing.assert_close(tracker.parts[kind, "kurtosis"][i], kurt, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(tracker.parts[kind, "salience"][i], salience, rtol=1e-4, atol=1e-10)
            torch.testing.assert_close(step[kind][i], salience + kurt, rtol=1e-4, atol=1e-9)
    if rep * hd < cfg.hidden_size:  # the reference's reshape(-1, H) grouping gives other numbers than the blocks'
        o = base.layers[0].self_attn.o_proj.base_layer.weight.double()
        wrong = torch.stack([excess_kurtosis(col, 0) for col in o.reshape(-1, cfg.num_key_value_heads).T])
        right = torch.stack([excess_kurtosis(o[:, b * rep * hd:(b + 1) * rep * hd].flatten(), 0)
                             for b in range(cfg.num_key_value_heads)])
        assert not torch.allclose(wrong, right, atol=1e-3)


def test_calibration_sums_and_running_salience_is_an_ema():
    model = lora_model("mistral-gqa", seed=1)
    static = AptSalience(model, Runtime(), use_kurtosis=True)
    ema = AptSalience(model, Runtime(), use_kurtosis=True, beta=0.85)
    steps = []
    for ids in (IDS, IDS.flip(0)):
        mask = (ids != 2).long()
        for t in (static, ema):
            t.recording, t.token_mask = True, mask
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        for t in (static, ema):
            t.recording = False
        steps.append(static.end_step())
        ema.end_step()
    for kind in ("group", "ffn"):
        for i in range(2):
            s1, s2 = steps[0][kind][i], steps[1][kind][i]
            torch.testing.assert_close(static.scores()[kind][i], s1 + s2)
            torch.testing.assert_close(ema.scores()[kind][i], 0.85 * 0.15 * s1 + 0.15 * s2)


def greedy_reference(salience: dict, cost: CostModel, density: float) -> tuple[list[set], list[set]]:
    """The search written the slow way: keep each layer's best block, then walk the rest by salience per parameter
    and stop at the first block that would exceed the budget (the prefix rule)."""
    d = cost.hidden_size
    groups, ffn, items = [], [], []
    for kind, keep in (("group", groups), ("ffn", ffn)):
        for i, s in enumerate(salience[kind]):
            unit = d * cost.group_per_dim(i) + cost.group_fixed(i) if kind == "group" else \
                d * cost.neuron_per_dim() + cost.neuron_fixed()
            rho = [float(v) / unit for v in s]
            best = max(range(len(rho)), key=lambda j: (rho[j], -j))
            keep.append({best})
            items += [(-rho[j], kind, i, j) for j in range(len(rho)) if j != best]
    items.sort(key=lambda t: (t[0], ("group", "ffn").index(t[1]), t[2], t[3]))
    budget = int(density * cost.dense())
    for _, kind, i, j in items:
        trial = ([len(g) + (kind == "group" and k == i) for k, g in enumerate(groups)],
                 [len(f) + (kind == "ffn" and k == i) for k, f in enumerate(ffn)])
        if cost.count(*trial, d) > budget:
            break
        (groups if kind == "group" else ffn)[i].add(j)
    return groups, ffn


@pytest.mark.parametrize("layout,tied", [("llama-mha", False), ("mistral-gqa", False), ("qwen2-bias", False),
                                         ("llama-gqa", True)])
@pytest.mark.parametrize("density", [0.35, 0.7])
def test_budget_search_keeps_the_prefix_and_counts_the_pruned_models_parameters(layout, tied, density, tmp_path):
    model_dir = save_tiny(tmp_path / "model", layout, layers=3)
    config = load_config(str(model_dir))
    ref = model_reference(config)
    g = torch.Generator().manual_seed(7)
    scores = {"group": [torch.rand(s["num_key_value_heads"], generator=g).double() for s in ref["layer_shapes"]],
              "ffn": [torch.rand(s["intermediate_size"], generator=g).double() for s in ref["layer_shapes"]]}
    biases = ["qkv"] if layout == "qwen2-bias" else []
    record = {**ref, "biases": biases, "lora_modules": {"model.layers.0.self_attn.q_proj": 4}}
    cost = CostModel(tuple(ref["layer_shapes"]), ref["hidden_size"], ref["head_dim"], frozenset(biases))
    dense_model = load_model(str(model_dir))
    decoder = lambda m: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                            if "embed_tokens" not in n and "lm_head" not in n)
    assert cost.dense() == decoder(dense_model)
    kept = plan_for_budget(scores, cost, density)
    groups, ffn = greedy_reference(scores, cost, density)
    assert [set(k) for k in kept["group"]] == groups and [set(k) for k in kept["ffn"]] == ffn
    # within the budget, and the next block in the order would not fit: the density is the target within one block
    assert kept["kept_params"] <= kept["target_params"] < kept["kept_params"] + kept["next_block_params"]
    assert abs(kept["density"] - density) <= kept["next_block_params"] / cost.dense()
    plan = make_apt_plan(scores, record, density)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    read_plan(plan_path, ref)  # the shared format, hash and summary
    prune_checkpoint(str(model_dir), plan, tmp_path / "pruned")
    pruned = load_model(str(tmp_path / "pruned"))
    assert decoder(pruned) == kept["kept_params"]
    assert (pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()) == tied


def test_random_control_keeps_the_scored_counts_and_draws_other_units(tmp_path):
    """apt.random: per layer as many KV groups and FFN neurons as the scored plan, so the same parameter count, with
    the units drawn by the seed (the same seed, the same plan); the scored plan's hash is untouched."""
    model_dir = save_tiny(tmp_path / "model", "mistral-gqa", layers=3)
    ref = model_reference(load_config(str(model_dir)))
    g = torch.Generator().manual_seed(5)
    scores = {"group": [torch.rand(s["num_key_value_heads"], generator=g).double() for s in ref["layer_shapes"]],
              "ffn": [torch.rand(s["intermediate_size"], generator=g).double() for s in ref["layer_shapes"]]}
    record = {**ref, "biases": [], "lora_modules": {"model.layers.0.self_attn.q_proj": 4}}
    scored, rnd, again, other = (make_apt_plan(scores, record, 0.5, seed) for seed in (None, 1, 1, 2))
    counts = lambda p: [(len(lay["kv_heads"]), len(lay["ffn"])) for lay in p["layers"]]  # noqa: E731
    assert counts(rnd) == counts(scored) and rnd["summary"] == scored["summary"]
    assert rnd["apt"]["kept_params"] == scored["apt"]["kept_params"]
    assert [lay["ffn"] for lay in rnd["layers"]] != [lay["ffn"] for lay in scored["layers"]]
    assert rnd["layers"] == again["layers"] and rnd["layers"] != other["layers"]
    assert rnd["prune"]["random"] is True and "random" not in scored["prune"]
    for plan in (scored, rnd):
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        read_plan(path, ref)  # both are valid shared plans
    # a kept KV group keeps all its query heads in the random plan too
    rep = ref["layer_shapes"][0]["num_attention_heads"] // ref["layer_shapes"][0]["num_key_value_heads"]
    assert all(lay["q_heads"] == [k * rep + j for k in lay["kv_heads"] for j in range(rep)] for lay in rnd["layers"])


def write_recipe(tmp_path: Path, apt: dict, **top) -> Path:
    from conftest import tiny_recipe_dict

    raw = tiny_recipe_dict(tmp_path)
    raw.pop("estimate"), raw.pop("prune")
    raw.update({"strategy": "apt", "apt": apt, **top})
    raw["train"]["warm_start"] = False
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


FRESH_EVAL = """
import json, sys
from pathlib import Path
import lightpeft_dist
from peft import PeftModel
from lightpeft_dist.config import load_recipe
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pipeline.evaluate import task_metrics
run, recipe = Path(sys.argv[1]), load_recipe(sys.argv[2])
model = PeftModel.from_pretrained(load_model(str(run / "pruned_model")), str(run / "train" / "adapter"))
print(json.dumps(task_metrics(model.eval(), load_tokenizer(recipe.model), recipe, "eval")))
"""


def test_apt_run_end_to_end_gives_a_valid_plan_at_the_target_density(tmp_path):
    recipe = write_recipe(tmp_path, {"target_density": 0.6, "calibration_samples": 8, "batch_size": 4, "seq_len": 24,
                                     "rank_growth": 2.0, "window": 6, "checkpoints": 2, "ramp": 1})
    run = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--run-dir", str(run)]) == 0
    # rank growth (2 events after steps 1 and 3, budget x1.5 then x2 of 4 per module): a standard PEFT adapter whose
    # rank_pattern shows it, which a fresh process loads with plain PEFT and evaluates to eval.json's numbers
    config = json.loads((run / "train" / "adapter" / "adapter_config.json").read_text())
    ranks = config["rank_pattern"]
    n = len(ranks)
    assert sum(ranks.values()) == pytest.approx(2 * 4 * n, abs=n) and max(ranks.values()) > 4 and min(ranks.values()) == 4
    assert all(config["alpha_pattern"][m] == 2 * r for m, r in ranks.items())  # alpha / r stays 8 / 4
    train = json.loads((run / "train" / "train.json").read_text())
    assert train["structure"]["lora_ranks"] == ranks and train["plan_hash"] == train["start_plan_hash"]
    fresh = subprocess.run([sys.executable, "-c", FRESH_EVAL, str(run), str(recipe)], capture_output=True, text=True,
                           check=True)
    direct = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert direct["accuracy"] == json.loads((run / "eval.json").read_text())["pruned"]["accuracy"]
    ref = model_reference(load_config(str(tmp_path / "model")))
    plan = read_plan(run / "plan.json", ref)
    a = plan["apt"]
    assert a["kept_params"] <= a["target_params"] < a["kept_params"] + a["next_block_params"]
    record = json.loads((run / "estimate" / "estimate.json").read_text())
    assert record["strategy"] == "apt" and record["steps"] == 2
    assert plan["peft_modules"] == {k: list(range(4)) for k in record["lora_modules"]} and plan["peft_modules"]
    assert (run / "pruned_model" / "config.json").is_file() and (run / "train" / "adapter").is_dir()
    ev = json.loads((run / "eval.json").read_text())
    pruned = json.loads((run / "pruned_model" / "lightpeft_prune.json").read_text())["params"]
    assert pruned < sum(p.numel() for p in load_model(str(tmp_path / "model")).parameters())
    # re-planning at another density reuses the calibration
    before = (run / "estimate" / "apt_scores.safetensors").stat().st_mtime_ns
    assert main(["run", "--config", str(recipe), "--run-dir", str(run), "--apt.target_density=0.8"]) == 0
    assert (run / "estimate" / "apt_scores.safetensors").stat().st_mtime_ns == before
    assert read_plan(run / "plan.json", ref)["apt"]["density"] > a["density"]


@pytest.mark.parametrize("apt,top,message", [
    ({"target_density": 0.0}, {}, "apt.target_density: target_density 0.0 is outside (0, 1]"),
    ({"target_density": 1.5}, {}, "outside (0, 1]"),
    ({"window": 50, "ramp": 100}, {}, "window 50 is shorter than the ramp"),
    ({"max_rank": 2}, {}, "apt.max_rank 2 is below peft.r 4"),
    ({"mode": "gradual", "window": 300, "checkpoints": 4}, {}, "window 300 over 4 checkpoints leaves 75 steps"),
    ({"target_density": 0.5}, {"strategy": "lightpeft"}, "section 'apt:' belongs to strategy apt"),
    ({"mode": "gradual", "random": True, "window": 8, "checkpoints": 2, "ramp": 2}, {},
     "apt.random (the random control at the scored plan's counts) is for mode one_shot"),
])
def test_bad_apt_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, apt, top, message):
    recipe = write_recipe(tmp_path, apt, **top)
    run = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--run-dir", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not run.exists()


def test_budget_search_with_hidden_dimensions_counts_the_multiplicative_cost():
    """Hidden dimensions (apt.prune_hidden; test_apt_hidden.py slices them) compete in the same sorted list; the count
    of a prefix is d' x A + B, so the kept count is the cost model's count of the kept shapes, within one block of
    the budget."""
    shapes = tuple({"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 12} for _ in range(3))
    cost = CostModel(shapes, 16, 4, frozenset({"qkv"}))
    g = torch.Generator().manual_seed(3)
    scores = {"group": [torch.rand(2, generator=g) for _ in shapes], "ffn": [torch.rand(12, generator=g) for _ in shapes],
              "hidden": torch.rand(16, generator=g) * 50}
    for density in (0.3, 0.6, 0.9):
        kept = plan_for_budget(scores, cost, density)
        assert 1 <= len(kept["hidden"]) <= 16 and (density > 0.5 or len(kept["hidden"]) < 16)
        assert cost.count([len(x) for x in kept["group"]], [len(x) for x in kept["ffn"]], len(kept["hidden"])) == \
            kept["kept_params"] <= kept["target_params"] < kept["kept_params"] + kept["next_block_params"]


@pytest.mark.parametrize("layout", ["llama-mha", "qwen2-bias"])
def test_hidden_salience_equals_its_direct_computation(layout):
    model = lora_model(layout, seed=2)
    tracker = AptSalience(model, Runtime(), use_kurtosis=True, hidden=True)
    base = model.base_model.model.model
    inputs, outputs = {}, {}
    for i, layer in enumerate(base.layers):
        for name, proj in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            proj.register_forward_hook(lambda mod, args, out, key=(name, i): (inputs.setdefault(key, args[0]),
                                                                               outputs.setdefault(key, out),
                                                                               out.retain_grad()) and None)
    tracker.recording, tracker.token_mask = True, MASK
    loss = model(input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
    tracker.recording = False
    loss.backward()  # a full backward: the block inputs' gradients (kurtosis means) are recorded too
    keys = list(outputs)
    grads = {k: outputs[k].grad for k in keys}
    step = tracker.end_step()
    w = MASK.double()[..., None]
    expect = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    expect_kurt = torch.zeros_like(expect)
    for name, i in keys:
        y, g, x = outputs[name, i].detach().double(), grads[name, i].double(), inputs[name, i].detach().double()
        expect += (y.abs() * w).sum((0, 1)) * (g.abs() * w).sum((0, 1))
        layer = base.layers[i]
        proj = layer.self_attn.o_proj if name == "o" else layer.mlp.down_proj
        weight = proj.base_layer.weight.double() if hasattr(proj, "base_layer") else proj.weight.double()
        if hasattr(proj, "lora_A"):
            weight = weight + 2.0 * (proj.lora_B["default"].weight @ proj.lora_A["default"].weight).double()
        o = weight * ((x * w).sum((0, 1)) / w.sum())[None, :]
        kurt = torch.tensor([max(reference_kurtosis(row), 0.0) ** 0.5 for row in o], dtype=torch.float64)
        expect, expect_kurt = expect + kurt, expect_kurt + kurt
    torch.testing.assert_close(tracker.parts["hidden", "kurtosis"][0], expect_kurt, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(tracker.parts["hidden", "salience"][0], expect - expect_kurt, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(step["hidden"][0], expect, rtol=1e-4, atol=1e-9)
    assert float(tracker.parts["hidden", "salience"][0].min()) > 0
