"""APT's gradual mode through `lightpeft train` (strategies/apt/gradual.py, pipeline/train_structure.py): at every
pruning checkpoint the kept parameter count is the cubic schedule's budget within one block, the final density hits
the target, the run directory ends with the final plan and its physically pruned model (which evaluate loads with
the grown adapter), and a training SIGKILLed between two pruning checkpoints, inside the second one's mask ramp and
with the ramped distillation on, resumes to the uninterrupted result. The train record's cost entries (one per
checkpoint) name the parameter counts of the model actually trained before and after each checkpoint, and
tokens/s on both sides (positive, never asserted against a time)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from dist_checks import launch, run_stages
from lightpeft_dist.models.loading import load_config, load_model
from lightpeft_dist.pruning.plan import read_plan
from lightpeft_dist.pruning.slicing import model_reference
from lightpeft_dist.reporting.flops import matmul_weights, query_width, run_costs, structure_flops
from lightpeft_dist.strategies.apt.gradual import GradualPrune, cubic_density
from test_apt import write_recipe

pytestmark = pytest.mark.timeout(1200)
TARGET = 0.6
# checkpoints (pruning + growth) after 0-based steps 2 and 5, their blocks chosen after steps 0 and 3 (masks 0.5 then
# 0 in the two steps up to each); train checkpoints after steps 1, 3, 5; killed after 4, inside the second ramp
APT = {"mode": "gradual", "target_density": TARGET, "calibration_samples": 4, "batch_size": 4, "seq_len": 24,
       "window": 6, "checkpoints": 2, "ramp": 2, "mask_ramp_step": 0.5, "rank_growth": 2.0, "distill_weight": 0.5}
BEFORE_TRAIN = ("calibrate", "plan", "prune")


def decoder_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_at_checkpoints(monkeypatch) -> dict[str, list[int]]:
    """The parameter counts of the model the loop trains right before each pruning checkpoint and right after each
    rebuild (the prune and the rank growth of a checkpoint are one restructure)."""
    seen: dict[str, list[int]] = {"before": [], "after": []}
    step_fn, rebuild_fn = GradualPrune.after_optimizer_step, GradualPrune.after_rebuild

    def after_optimizer_step(self, step, loss):
        if step in self.checkpoints:
            seen["before"].append(n_params(self.ctx.trainee.model))
        return step_fn(self, step, loss)

    def after_rebuild(self, trainee):
        seen["after"].append(n_params(trainee.model))
        return rebuild_fn(self, trainee)

    monkeypatch.setattr(GradualPrune, "after_optimizer_step", after_optimizer_step)
    monkeypatch.setattr(GradualPrune, "after_rebuild", after_rebuild)
    return seen


def assert_costs(costs: list[dict], seen: dict[str, list[int]]) -> None:
    assert [c["checkpoint"] for c in costs] == [1, 2] and [c["step"] for c in costs] == [2, 5]
    assert [c["params_before"] for c in costs] == seen["before"]
    assert [c["params_after"] for c in costs] == seen["after"]
    assert costs[0]["params_after"] == costs[1]["params_before"]  # nothing restructures in between
    for c in costs:
        assert c["params_after"] < c["params_before"]  # the prune removes more than the growth adds
        for key in ("tokens_per_s_before", "tokens_per_s_after", "speedup"):
            assert c[key] > 0 and math.isfinite(c[key]), (key, c)


def test_gradual_prunes_on_schedule_and_resumes_mid_pruning(tmp_path, monkeypatch, caplog):
    recipe = write_recipe(tmp_path, APT)
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(checkpoint_every=2, keep_checkpoints=1, steps=7)
    raw["peft"]["dropout"] = 0.0
    recipe.write_text(yaml.safe_dump(raw))
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stages(full, *BEFORE_TRAIN, config=recipe)
    shutil.copytree(full, killed)
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="lightpeft_dist.strategies.apt.costs"):
        seen = count_at_checkpoints(patch)
        run_stages(full, "train", config=recipe)
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["APT pruning checkpoint 1 after step 2",
                                                      "APT pruning checkpoint 2 after step 5"], lines
    run_stages(full, "evaluate", config=recipe)

    ref = model_reference(load_config(str(tmp_path / "model")))
    plan = read_plan(full / "plan.json", ref)
    history = plan["apt"]["history"]
    assert [h["checkpoint"] for h in history] == [1, 2] and [h["step"] for h in history] == [2, 5]
    assert [h["chosen_after_step"] for h in history] == [0, 3]
    for h in history:  # the budget search's count is the schedule's budget within one block
        assert h["scheduled_density"] == pytest.approx(cubic_density(TARGET, h["checkpoint"], 2))
        assert h["target_params"] == int(h["scheduled_density"] * h["dense_params"])
        assert h["kept_params"] <= h["target_params"] < h["kept_params"] + h["next_block_params"]
    assert history[0]["kept_params"] > history[1]["kept_params"]
    dense = decoder_params(load_model(str(tmp_path / "model")))
    assert history[-1]["dense_params"] == dense
    pruned = load_model(str(full / "pruned_model"))  # the final physically pruned model, counted
    assert decoder_params(pruned) == history[-1]["kept_params"]
    assert abs(decoder_params(pruned) / dense - TARGET) <= history[-1]["next_block_params"] / dense
    train = json.loads((full / "train" / "train.json").read_text())
    prune_record = json.loads((full / "pruned_model" / "lightpeft_prune.json").read_text())
    assert train["plan_hash"] == plan["hash"] == prune_record["plan_hash"] != train["start_plan_hash"]
    assert prune_record["trained_from"] == train["start_plan_hash"]
    ranks = json.loads((full / "train" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert max(ranks.values()) > 4  # grown at the same checkpoints
    assert json.loads((full / "eval.json").read_text())["plan_hash"] == plan["hash"]
    assert not (full / "live_models").exists() and not list(full.glob("train.ckpt*"))
    costs = train["hooks"]["apt_gradual_costs"]
    assert_costs(costs, seen)
    assert costs[0]["params_before"] == train["params"]["total"]  # the dense start
    final = PeftModel.from_pretrained(pruned, str(full / "train" / "adapter"))  # the saved end, reloaded
    assert n_params(final) == costs[-1]["params_after"]
    # FLOPs segment by segment: every token in one segment, each counted on the model that trained on it
    segments = train["hooks"]["apt_gradual_segments"]
    assert len(segments) == 3 and sum(sg["tokens"] for sg in segments) == train["tokens"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    dense, end = segments[0], segments[-1]
    assert dense["matmul_weights"] == matmul_weights(config) and dense["query_width"] == query_width(config)
    assert dense["adapter_weights"] == train["params"]["trainable"]
    pruned_config = json.loads((full / "pruned_model" / "config.json").read_text())
    assert end["matmul_weights"] == matmul_weights(pruned_config)
    assert end["adapter_weights"] == sum(p.numel() for n, p in final.named_parameters() if "lora_" in n)
    assert segments[0]["matmul_weights"] > segments[1]["matmul_weights"] > segments[2]["matmul_weights"]
    assert run_costs(full)["train_flops"] == sum(structure_flops(sg["tokens"], 24, sg) for sg in segments)

    # killed after step 4 (one pruning checkpoint done, the second ramp running), resumed from the checkpoint after 3
    cmd = [sys.executable, "-m", "lightpeft_dist", "train", "--config", str(recipe), "--run-dir", str(killed)]
    proc = launch(cmd, env={"LIGHTPEFT_FAULT_AFTER": "0:4"}, expect_ok=False)
    assert proc.returncode != 0 and not (killed / "train").exists(), proc.stderr[-3000:]
    state = json.loads((killed / "train.ckpt" / "state.json").read_text())
    assert state["step"] == 3 and state["structure"]["plan"]["apt"]["checkpoint"] == 1
    saved = load_file(killed / "train.ckpt" / "state.safetensors")  # the ramp's choice and the distillation step
    assert "extra/apt.ramp" in saved and int(saved["extra/apt_distill.step"]) == 3
    run_stages(killed, "train", config=recipe)
    resumed = json.loads((killed / "train" / "train.json").read_text())
    assert resumed["resumed_from_step"] == 4
    # the cost record survives the kill: the first checkpoint's entry came back with the checkpoint
    assert [{k: c[k] for k in ("checkpoint", "step", "params_before", "params_after")}
            for c in resumed["hooks"]["apt_gradual_costs"]] == \
        [{k: c[k] for k in ("checkpoint", "step", "params_before", "params_after")} for c in costs]
    assert resumed["hooks"]["apt_gradual_segments"] == segments  # and so do the segments' tokens and counts
    assert read_plan(killed / "plan.json", ref)["hash"] == plan["hash"]
    assert_resumed_like_uninterrupted(full, killed, resumed, train, "gradual")


def assert_resumed_like_uninterrupted(full, killed, resumed: dict, train: dict, what: str) -> None:
    """The killed-and-resumed run's adapter and losses equal the uninterrupted run's (its train.json: `train`)."""
    a, b = (load_file(d / "train" / "adapter" / "adapter_model.safetensors") for d in (full, killed))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{what} kill-and-resume: adapter max |diff| {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(train["losses"]), rtol=1e-5, atol=0)
