"""PrunePEFT's final training at a learning rate per adapter kind (`prunepeft.train_lr`, pipeline/train_optimizer.py):
one AdamW step moves every parameter by the hand-computed AdamW update at its own kind's LR, the train stage builds
one group per kind that the schedule scales alike, the default keeps one group (trained weights bit-identical to
per-kind LRs that all equal train.lr), and the keys: train_lr never changes the search key, and unset it leaves the
train key as it was. The train record's search cost report (estimate_budget) agrees with the search record."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import run_stages
from test_prunepeft import prunepeft_dict

from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.io_utils import read_json, sha256_json
from lightpeft_dist.keys import keyed_section
from lightpeft_dist.models.loading import load_config
from lightpeft_dist.pipeline import train as train_stage
from lightpeft_dist.pipeline.train_optimizer import kind_of, make_optimizer
from lightpeft_dist.rundir import RunDir
from lightpeft_dist.strategies.prunepeft.search import search_key
from lightpeft_dist.strategies.prunepeft.section import kind_lrs
from lightpeft_dist.strategies.prunepeft.supernet import build_supernet, enumerate_groups


def test_one_step_is_adamw_at_each_kinds_lr(tmp_path):
    recipe = recipe_from_dict(prunepeft_dict(tmp_path, layers=2))
    groups = enumerate_groups(recipe, load_config(recipe.model.path), 2)
    torch.manual_seed(0)
    model = build_supernet(recipe, groups)
    for n, p in model.named_parameters():  # LoRA B starts at zero: make every gradient non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lrs, wd = {"lora": 3e-2, "bottleneck": 5e-3}, 0.1
    opt = make_optimizer(named, 1e-4, wd, lrs)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("lora", 3e-2), ("bottleneck", 5e-3)]
    for g in opt.param_groups:  # membership: exactly the kind's parameters, none left out
        assert {id(p) for p in g["params"]} == {id(p) for n, p in named if kind_of(n) == g["name"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    model.train(False)
    loss = model(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]]), labels=torch.tensor([[3, 4, 5, 6, 7, 8]])).loss
    loss.backward()
    before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in named}
    opt.step()
    eps = opt.param_groups[0]["eps"]
    for n, p in named:
        w, g = before[n]
        lr = lrs[kind_of(n)]
        # AdamW's first step: bias-corrected m = g, v = g^2; decoupled decay w * (1 - lr * wd)
        expect = w * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)
    single = make_optimizer(named, 1e-4, wd)  # the default: today's one group, same order
    assert len(single.param_groups) == 1 and single.param_groups[0]["lr"] == 1e-4
    assert [id(p) for p in single.param_groups[0]["params"]] == [id(p) for _, p in named]


def test_train_stage_groups_schedule_and_default_bit_identical(tmp_path, monkeypatch):
    raw = prunepeft_dict(tmp_path, rounds=1, per_round=2)
    # no clipping: the clip norm sums the gradients group by group, so with clipping two groups differ from one in
    # the last bit of the norm; without it the per-kind optimizer at equal LRs must be today's, bit for bit
    raw["train"].update(steps=2, lr=1e-2, lr_scheduler="linear", max_grad_norm=0.0)
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(raw))
    base_run = tmp_path / "run"
    run_stages(base_run, "search", "plan", "prune", config=config)
    made: list[torch.optim.Optimizer] = []

    def capture(*args, **kwargs):
        made.append(make_optimizer(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(train_stage, "make_optimizer", capture)
    out = {}
    for name, train_lr in [("default", None), ("equal", {"lora": 1e-2, "bottleneck": 1e-2}),
                           ("kinds", {"lora": 2e-2, "bottleneck": 1e-3})]:
        variant = copy.deepcopy(raw)
        variant["prunepeft"]["train_lr"] = train_lr
        recipe = recipe_from_dict(variant)
        run = tmp_path / name
        shutil.copytree(base_run, run)
        record = train_stage.run_train(recipe, run)
        opt = made[-1]
        out[name] = ({k: load_file(run / "train" / "adapter" / k / "adapter_model.safetensors")
                      for k in ("lora", "bottleneck")}, opt, record, recipe)
    # the default: one group at train.lr, the train key as before train_lr existed
    _, opt, record, recipe = out["default"]
    assert len(opt.param_groups) == 1 and record["kind_lrs"] is None
    d = RunDir(tmp_path / "default")
    prune_record = read_json(d.prune_record)
    old = sha256_json({"plan": train_stage.started_plan_hash(prune_record), "train": keyed_section(recipe, "train"),
                       "data": keyed_section(recipe, "data")})[:16]
    assert record["key"] == old
    # the search cost report: the search's steps, tokens and wall time as shares of this training's
    search = read_json(d.estimate_record)
    budget = record["estimate_budget"]
    assert search["steps"] == 1 * 2 == budget["steps"] and budget["tokens"] == search["tokens"] > 0
    assert budget["steps_fraction"] == pytest.approx(search["steps"] / record["steps"])
    assert budget["tokens_fraction"] == pytest.approx(search["tokens"] / record["tokens"])
    assert budget["seconds"] == search["wall_seconds"] > 0 and budget["train_seconds"] == record["wall_seconds"]
    assert budget["seconds_fraction"] == pytest.approx(search["wall_seconds"] / record["wall_seconds"])
    # per-kind LRs that all equal train.lr: the same training, bit for bit, but its own key
    for kind in ("lora", "bottleneck"):
        a, b = out["default"][0][kind], out["equal"][0][kind]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out["equal"][2]["key"] != record["key"]
    # per-kind LRs: a group per kind at its LR, both scaled by the same linear schedule after 2 of 2 steps
    _, opt, rec, recipe = out["kinds"]
    assert [(g["name"], g["initial_lr"]) for g in opt.param_groups] == [("lora", 2e-2), ("bottleneck", 1e-3)]
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in opt.param_groups)  # linear decay ends at 0
    assert rec["kind_lrs"] == {"lora": 2e-2, "bottleneck": 1e-3}
    assert any(not torch.equal(out["kinds"][0]["lora"][k], out["default"][0]["lora"][k])
               for k in out["default"][0]["lora"])
    searched = copy.deepcopy(raw)
    searched["prunepeft"].update(train_lr="search", lr={"lora": 3e-3, "bottleneck": 4e-4})
    assert kind_lrs(recipe_from_dict(searched)) == {"lora": 3e-3, "bottleneck": 4e-4}  # the rounds' prunepeft.lr
    keys = {name: search_key(v[3]) for name, v in out.items()}
    assert len(set(keys.values())) == 1  # the search never reads train_lr
