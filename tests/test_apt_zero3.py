"""APT calibration on 2 ZeRO-3 ranks (DeepSpeed on CPU, gloo) gives one process's block scores and plan: the sums are
added across ranks before the product and the kurtosis, and the kurtosis reads the gathered o_proj / down_proj
weights. One launch, so the test costs one 2-process start."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import BIN, ZERO3, launch, run_stages

pytestmark = pytest.mark.timeout(1200)


def test_two_rank_zero3_calibration_equals_one_process(tmp_path):
    from conftest import tiny_recipe_dict

    raw = tiny_recipe_dict(tmp_path)
    raw.pop("estimate"), raw.pop("prune")
    raw["peft"]["dropout"] = 0.0  # N ranks reproduce one process's dropout masks only without dropout
    raw["peft"]["targets"] = ["q_proj", "v_proj", "o_proj"]  # LoRA on o_proj: its kurtosis gathers LoRA weights too
    raw.update({"strategy": "apt", "apt": {"target_density": 0.6, "calibration_samples": 8, "batch_size": 4,
                                           "seq_len": 24}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    run_stages(single, "calibrate", config=recipe)
    run_stages(single, "plan")
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000 + 7),
            "--module", "lightpeft_dist", "calibrate", "--config", str(recipe), "--run-dir", str(zero3),
            "--deepspeed", ZERO3])
    run_stages(zero3, "plan")
    record = json.loads((zero3 / "estimate" / "estimate.json").read_text())
    assert record["world_size"] == 2 and record["deepspeed"]["zero_optimization"]["stage"] == 3
    a, b = (load_file(str(d / "estimate" / "apt_scores.safetensors")) for d in (single, zero3))
    assert a.keys() == b.keys()
    for name in a:
        if not name.startswith("salience.") and not name.startswith("kurtosis."):
            assert float(a[name].max()) > 0, name
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6 * max(1.0, float(a[name].abs().max())))
    plans = [json.loads((d / "plan.json").read_text()) for d in (single, zero3)]
    assert plans[0]["layers"] == plans[1]["layers"] and plans[0]["hash"] == plans[1]["hash"]
