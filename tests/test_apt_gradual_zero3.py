"""APT's gradual mode on 2 ZeRO-3 ranks (DeepSpeed on CPU, gloo) equals one process: the running salience is summed
across ranks every step, so every pruning checkpoint keeps the same blocks (same plan history and final plan hash),
and the physically pruned, re-partitioned training with the sliced AdamW moments and the grown LoRA ranks ends with
the same adapter weights (dropout 0) and the same parameter counts around each checkpoint in the cost record. One
2-rank launch of the train stage, from one process's calibrate / plan / prune (the plan stage's full-density plan
is world-size independent). Also with `apt.prune_hidden`: the hidden salience is summed across ranks too, so both
checkpoints cut the same hidden dimensions, and the hidden ramp's hooks and the residual-side slicing of the
partitioned LoRA and its moments end where one process does."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import BIN, ZERO3, launch, run_stages
from test_apt import write_recipe

pytestmark = pytest.mark.timeout(1200)
# checkpoints (pruning + growth) after 0-based steps 2 and 5, each chosen 2 steps before (mask ramp 0.5, 0); 7 steps
APT = {"mode": "gradual", "target_density": 0.6, "calibration_samples": 4, "batch_size": 4, "seq_len": 24,
       "window": 6, "checkpoints": 2, "ramp": 2, "mask_ramp_step": 0.5, "rank_growth": 2.0}
# first-order salience only, so that hidden dimensions go at this density (test_apt_gradual_hidden.py says why)
HIDDEN = {**APT, "prune_hidden": True, "use_kurtosis": False}


@pytest.mark.parametrize("apt", [APT, HIDDEN], ids=["blocks", "hidden"])
def test_two_rank_zero3_gradual_equals_one_process(tmp_path, apt):
    recipe = write_recipe(tmp_path, apt)
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["steps"] = 7
    raw["peft"]["dropout"] = 0.0  # N ranks reproduce one process's dropout masks only without dropout
    recipe.write_text(yaml.safe_dump(raw))
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    run_stages(single, "calibrate", "plan", "prune", config=recipe)
    shutil.copytree(single, zero3)
    run_stages(single, "train", config=recipe)
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000 + 13),
            "--module", "lightpeft_dist", "train", "--config", str(recipe), "--run-dir", str(zero3),
            "--deepspeed", ZERO3])

    records = [json.loads((d / "train" / "train.json").read_text()) for d in (single, zero3)]
    assert records[1]["world_size"] == 2 and records[1]["deepspeed"]["zero_optimization"]["stage"] == 3
    plans = [json.loads((d / "plan.json").read_text()) for d in (single, zero3)]
    history = [p["apt"]["history"] for p in plans]
    assert [h["step"] for h in history[0]] == [2, 5]  # both checkpoints pruned, the second further
    assert history[0][0]["kept_params"] > history[0][1]["kept_params"]
    if apt.get("prune_hidden"):  # both checkpoints cut hidden dimensions, the same ones on both runs (plans equal)
        assert 48 > history[0][0]["hidden_size"] > history[0][1]["hidden_size"] == len(plans[1]["hidden"])
        assert plans[0]["hidden"] == plans[1]["hidden"]
    assert plans[0]["layers"] == plans[1]["layers"] and plans[0]["hash"] == plans[1]["hash"]
    for a, b in zip(*history, strict=True):  # the same search result at every checkpoint (densities exact)
        assert a == b
    assert records[0]["plan_hash"] == records[1]["plan_hash"] == plans[0]["hash"] != records[0]["start_plan_hash"]
    assert records[0]["structure"] == records[1]["structure"]  # the same grown ranks
    assert max(records[0]["structure"]["lora_ranks"].values()) > 4
    costs = [r["hooks"]["apt_gradual_costs"] for r in records]  # ZeRO-3 partitions count in full
    assert [(c["params_before"], c["params_after"]) for c in costs[1]] == \
        [(c["params_before"], c["params_after"]) for c in costs[0]]
    torch.testing.assert_close(torch.tensor(records[1]["losses"]), torch.tensor(records[0]["losses"]),
                               rtol=1e-4, atol=1e-6)
    a, b = (load_file(d / "train" / "adapter" / "adapter_model.safetensors") for d in (single, zero3))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"gradual 2-rank ZeRO-3 vs 1 process: adapter max |diff| {worst:.2e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
