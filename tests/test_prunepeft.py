"""PrunePEFT (strategies/prunepeft): criteria == autograd, the mixing == a hand-worked example, the shared planner
keeps exactly the search's survivors, an end-to-end run whose LoRA part loads with plain PEFT in a fresh process,
and bad input as one `error:` line with nothing written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from tiny import randomize_lora, save_tiny

from lightpeft_dist.cli import main
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.models.families import config_layer_shapes, head_dim_of
from lightpeft_dist.models.loading import fingerprint, load_config
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.runtime import current
from lightpeft_dist.strategies.prunepeft.assignment import choice_counts, warmup_assignment
from lightpeft_dist.strategies.prunepeft.criteria import prunability, values
from lightpeft_dist.strategies.prunepeft.mixing import band_of, hybrid_scores, removal
from lightpeft_dist.strategies.prunepeft.search import outcome_scores, search_prune
from lightpeft_dist.strategies.prunepeft.stats import RoundStats
from lightpeft_dist.strategies.prunepeft.supernet import build_supernet, enumerate_groups, group_parameters

REPO = Path(__file__).resolve().parent.parent


def prunepeft_dict(d: Path, layers: int = 4, **section) -> dict:
    raw = tiny_recipe_dict(d)
    raw["model"]["path"] = str(save_tiny(d / f"model{layers}", "llama-gqa", layers=layers))
    for key in ("peft", "prune", "estimate"):
        del raw[key]
    raw["strategy"] = "prunepeft"
    raw["prunepeft"] = {"rounds": 2, "per_round": 3, "steps": 2, "batch_size": 4, "seq_len": 24,
                        "lr": {"lora": 1e-2, "bottleneck": 1e-2}, **section}
    return raw


def test_port_defaults_and_groups(tmp_path):
    recipe = recipe_from_dict(prunepeft_dict(tmp_path))
    assert [(s.type, s.r, s.alpha, s.targets) for s in recipe.adapters] == [
        ("lora", 8, 16.0, ["q_proj", "v_proj"]), ("bottleneck", 32, 1.0, ["o_proj", "down_proj"])]
    assert recipe.train.warm_start is False
    groups = enumerate_groups(recipe, load_config(recipe.model.path), 4)
    assert [g.name for g in groups][:2] == ["lora.0.q_proj+v_proj", "lora.1.q_proj+v_proj"]
    assert len(groups) == 8 and groups[4].keys == ["bottleneck:model.layers.0.self_attn.o_proj",
                                                   "bottleneck:model.layers.0.mlp.down_proj"]
    assert [band_of(i, 10) for i in (0, 1, 2, 4, 5, 7, 8, 9)] == ["0-20"] * 2 + ["20-50"] * 2 + ["50-80"] * 2 + \
        ["80-100"] * 2


def test_criteria_equal_autograd_and_hand_sums(tmp_path):
    """One step's statistics against p.grad and a hand recomputation of every group's output."""
    raw = prunepeft_dict(tmp_path, layers=2)
    raw["peft"] = [{"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "k_proj"]},
                   {"type": "bottleneck", "r": 6, "alpha": 1.0, "dropout": 0.0, "targets": ["o_proj", "down_proj"]}]
    recipe = recipe_from_dict(raw)
    groups = enumerate_groups(recipe, load_config(recipe.model.path), 2)
    assert [g.name for g in groups] == ["lora.0.q_proj+v_proj", "lora.0.k_proj", "lora.1.q_proj+v_proj",
                                        "lora.1.k_proj", "bottleneck.0.o_proj+down_proj", "bottleneck.1.o_proj+down_proj"]
    torch.manual_seed(0)
    model = build_supernet(recipe, groups)
    randomize_lora(model)
    params = group_parameters(model, groups)
    with torch.no_grad():  # exact zeros and values below the threshold for the counting criteria
        params[0][0][1].view(-1)[:5] = 0.0
        params[4][0][1].view(-1)[:3] = 1e-8
    inputs = {}
    hooks = [mod.register_forward_hook(lambda m, a, o, p=p: inputs.__setitem__(p, (a[0].detach(), o.detach())))
             for p, mod in model.base_model.model.named_modules() if p.endswith(("o_proj", "down_proj")) and
             not p.endswith("_adapter")]
    lora_in = {}
    hooks += [mod.lora_A["default"].register_forward_hook(lambda m, a, o, p=p: lora_in.__setitem__(p, a[0].detach()))
              for p, mod in model.base_model.model.named_modules() if hasattr(mod, "lora_A") and "default" in getattr(
                  mod, "lora_A", {})]
    stats = RoundStats(model, groups, current(), deepspeed=False)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 2]]), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                                      [1, 1, 1, 0]])}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    stats.before_forward(batch)
    model(**batch).loss.backward()
    stats.after_forward()
    stats.before_optimizer_step(0)
    got = values(stats.finish(1e-6))
    mask = batch["attention_mask"].double()
    base = model.base_model.model
    for g, (group, named) in enumerate(zip(groups, params)):
        ps = [p for _, p in named]
        n = sum(p.numel() for p in ps)
        assert got["weight"][g] == pytest.approx(sum(float((p.double() ** 2).sum()) for p in ps) / n)
        assert got["zeros"][g] == pytest.approx(sum(int((p == 0).sum()) for p in ps) / n)
        assert got["threshold"][g] == pytest.approx(sum(int((p.abs() < 1e-6).sum()) for p in ps) / n)
        assert got["gradient"][g] == pytest.approx(sum(float(p.grad.double().abs().sum()) for p in ps) / n)
        assert got["snip"][g] == pytest.approx(sum(float((p.grad.double() * p.double()).abs().sum()) for p in ps) / n)
        act, count = 0.0, 0.0
        for path in group.paths:
            mod = base.get_submodule(path)
            if group.kind == "lora":
                a, b = mod.lora_A["default"].weight.double(), mod.lora_B["default"].weight.double()
                delta = lora_in[path].double() @ a.T @ b.T * mod.scaling["default"]
            else:
                ad = base.get_submodule(path + "_adapter")
                x, _ = inputs[path]
                h = x.double() @ (mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight).double().T
                delta = (h @ ad.down.weight.double().T + ad.down.bias.double()) @ ad.up.weight.double().T + \
                    ad.up.bias.double()
            act += float((delta.abs().sum(-1) * mask).sum())
            count += float(mask.sum()) * delta.shape[-1]
        assert act > 0 and got["activation"][g] == pytest.approx(act / count, rel=1e-6)  # model in float32
    assert got["zeros"][0] > 0 and got["threshold"][4] > 0
    for h in hooks:
        h.remove()


def test_mixing_matches_a_hand_worked_example():
    """Partition A (groups 0-2) scored by weight and zeros, partition B (groups 3-4) by snip."""
    theta = {"weight": torch.tensor([0.5, 0.1, 0.3, 9.0, 9.0]), "zeros": torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]),
             "snip": torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0])}
    prunable = {"weight": -theta["weight"], "zeros": theta["zeros"], "snip": -theta["snip"]}
    got = hybrid_scores(prunable, ["A", "A", "A", "B", "B"], {"A": ["weight", "zeros"], "B": ["snip"]})

    def w(rank):
        return 5 / (1 + math.exp(rank - 3))

    def soft(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    # weight, prune smallest first: order 1 (0.1), 2 (0.3), 0 (0.5) -> ranks 2, 0, 1
    sw = soft([-0.5, -0.1, -0.3])
    # zeros, prune largest first: 1 and 2 tie at 0.5 (lower index first), then 0 -> ranks 2, 0, 1
    sz = soft([0.0, 0.5, 0.5])
    expect_a = [(w(2) * sw[0] + w(2) * sz[0]) / 2, (w(0) * sw[1] + w(0) * sz[1]) / 2,
                (w(1) * sw[2] + w(1) * sz[2]) / 2]
    # snip, prune smallest first: group 4 (1.0) rank 0, group 3 (2.0) rank 1
    ss = soft([-2.0, -1.0])
    expect_b = [w(1) * ss[0], w(0) * ss[1]]
    torch.testing.assert_close(got, torch.tensor(expect_a + expect_b, dtype=torch.float64))
    assert removal(got, 2) == sorted(range(5), key=lambda g: -(expect_a + expect_b)[g])[:2]


def test_warmup_assignment_rules():
    prunable = {m: torch.zeros(4, dtype=torch.float64) for m in ("weight", "zeros", "threshold", "activation",
                                                                "snip", "gradient")}
    prunable["snip"] = torch.tensor([0.0, 0.0, 5.0, 4.0], dtype=torch.float64)  # picks P's groups 2, 3
    prunable["gradient"] = torch.tensor([5.0, 0.0, 0.0, 4.0], dtype=torch.float64)  # picks 0 (P) and 3 (Q)
    counts = choice_counts(prunable, ["P", "P", "Q", "Q"], top=2)
    assert counts["snip"] == {"P": 0, "Q": 2} and counts["gradient"] == {"P": 1, "Q": 1}
    assigned = warmup_assignment(counts)
    # ties at 0-index groups: the other criteria pick groups 0, 1 (both P)
    assert assigned["Q"] == ["snip", "gradient"]  # horizontal: snip (2); vertical: gradient's best includes Q
    assert assigned["P"] == ["weight", "zeros", "threshold", "activation", "gradient"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_planner_keeps_exactly_the_search_survivors(tmp_path, seed):
    raw = prunepeft_dict(tmp_path, layers=3)
    raw["peft"] = [{"type": "lora", "r": 4, "targets": ["q_proj", "v_proj", "k_proj", "up_proj"]},
                   {"type": "bottleneck", "r": 5, "targets": ["o_proj", "down_proj"]}]
    recipe = recipe_from_dict(raw)
    config = load_config(recipe.model.path)
    shapes = config_layer_shapes(config)
    groups = enumerate_groups(recipe, config, 3)  # groups of 2 and of 1 module
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))[:7].tolist()
    from lightpeft_dist.strategies.prunepeft.search import module_ratio

    plan = make_plan(outcome_scores(recipe, groups, order, shapes), shapes,
                     search_prune(recipe, module_ratio(groups, order)), fingerprint(config), config.hidden_size,
                     head_dim_of(config))
    kept = [g for i, g in enumerate(groups) if i not in order]
    assert sorted(plan["peft_modules"]) == sorted(k for g in kept for k in g.keys)
    assert all(len(r) == (4 if ":" not in k else 5) for k, r in plan["peft_modules"].items())
    assert all(len(lp["q_heads"]) == 6 and len(lp["ffn"]) == 40 for lp in plan["layers"])


PLAIN_PEFT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(model, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits, sys.argv[3])
"""


def test_run_end_to_end_and_lora_part_loads_with_plain_peft(tmp_path):
    raw = prunepeft_dict(tmp_path, rounds=1, per_round=2, assignment="warmup", warmup_examples=8, warmup_steps=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    record = json.loads((run / "estimate" / "estimate.json").read_text())["prunepeft"]
    assert len(record["removal_order"]) == 2 and len(record["kept"]) == 6 and "warmup" in record
    plan = json.loads((run / "plan.json").read_text())
    assert len(record["groups"]) == 8
    kept_lora = [g for g in record["kept"] if g.startswith("lora.")]
    assert kept_lora and len(plan["peft_modules"]) == 2 * len(record["kept"])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["pruned"]["accuracy"] is not None and ev["pruned"]["params"]["adapter"] > 0
    lora_dir = run / "train" / "adapter" / "lora"
    cfg = json.loads((lora_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(k for k in plan["peft_modules"] if ":" not in k)
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(run / "pruned_model"), str(lora_dir), str(out)],
                   check=True, cwd=REPO)
    from lightpeft_dist.adapters.lora import load_adapter
    from lightpeft_dist.models.loading import load_model

    ours = load_adapter(load_model(str(run / "pruned_model")), lora_dir).eval()
    with torch.no_grad():
        expect = ours(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits
        base = load_model(str(run / "pruned_model"))(input_ids=torch.tensor([[3, 4, 5, 6, 7]])).logits
    got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-4  # the trained LoRA changes the logits


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["prunepeft"].update(rounds=3, per_round=3), "would remove 9 of the supernet's 8 module groups"),
    (lambda r: r["prunepeft"].update(table={k: {b: ["snipp"] for b in ("0-20", "20-50", "50-80", "80-100")}
                                            for k in ("lora", "bottleneck")}), "unknown criterion 'snipp'"),
    (lambda r: r["prunepeft"].update(table={k: {b: [] for b in ("0-20", "20-50", "50-80", "80-100")}
                                            for k in ("lora", "bottleneck")}), "empty partition"),
    (lambda r: r.update(strategy="lightpeft"), "belongs to strategy prunepeft"),
    (lambda r: r.update(prune={"module_ratio": 0.5}), "prune.module_ratio is decided by the PrunePEFT search"),
    (lambda r: r.update(prune={"attn_ratio": 0.3}), "prunes the base model, which needs unit scores"),
    (lambda r: r["prunepeft"].update(base_scores="missing_scores.safetensors"), "no scores file at"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, change, message):
    raw = prunepeft_dict(tmp_path)
    change(raw)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) != 0
    assert message in one_error_line(capsys)
    assert not (run / "estimate").exists() and not (run / "plan.json").exists()


def test_combined_with_base_pruning_from_unit_scores(tmp_path):
    """Heads and FFN neurons planned from a unit-scores file, the PEFT modules searched on the pruned base; the shared
    planner reproduces both, and the estimation LoRA (full shapes) slices back to the rounds' trained weights."""
    from lightpeft_dist.pruning.scores import Scores, save_scores

    raw = prunepeft_dict(tmp_path, rounds=1, per_round=2)
    config = load_config(raw["model"]["path"])
    shapes = config_layer_shapes(config)
    g = torch.Generator().manual_seed(5)
    base = Scores(head=[torch.rand(s["num_attention_heads"], generator=g) for s in shapes],
                  ffn=[torch.rand(s["intermediate_size"], generator=g) for s in shapes])
    save_scores(tmp_path / "unit_scores.safetensors", base)
    raw["prunepeft"]["base_scores"] = str(tmp_path / "unit_scores.safetensors")
    raw["prune"] = {"attn_ratio": 0.34, "ffn_ratio": 0.3}
    raw["train"]["warm_start"] = True  # start from the search's last round: the slicing round trip is used
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    plan = json.loads((run / "plan.json").read_text())
    recipe = recipe_from_dict(raw)
    alone = make_plan(base, shapes, search_prune(recipe, 0.0), fingerprint(config), config.hidden_size,
                      head_dim_of(config))
    assert plan["layers"] == alone["layers"] and plan["summary"]["prunable_fraction_pruned"] > 0.2
    record = json.loads((run / "estimate" / "estimate.json").read_text())["prunepeft"]
    assert sorted(plan["peft_modules"]) == sorted(k for name in record["kept"] for k in
                                                  next(gr.keys for gr in enumerate_groups(recipe, config, 4)
                                                       if gr.name == name))
    assert not (run / "search.ckpt").exists()
    from safetensors.torch import load_file

    full = load_file(run / "estimate" / "adapter" / "lora" / "adapter_model.safetensors")
    sliced = load_file(run / "pruned_adapter" / "lora" / "adapter_model.safetensors")
    checked = 0
    for name, b in sliced.items():
        if ".lora_B." in name and ".q_proj." in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            rows = torch.tensor([h * 8 + i for h in plan["layers"][layer]["q_heads"] for i in range(8)])
            torch.testing.assert_close(full[name][rows], b, rtol=0, atol=0)
            others = torch.ones(full[name].shape[0], dtype=torch.bool)
            others[rows] = False
            assert float(full[name][others].abs().sum()) == 0 and float(b.abs().sum()) > 0
            checked += 1
    assert checked >= 2
    ev = json.loads((run / "eval.json").read_text())
    assert ev["pruned"]["params"]["total"] - ev["pruned"]["params"]["adapter"] < ev["base"]["params"]["total"]
