"""PrunePEFT's search on 2 ZeRO-3 ranks (DeepSpeed on CPU, gloo) removes exactly what one process removes.

Dropout 0 (the port's 0.1 would draw different masks on a split batch). Every criterion is a sum that the ranks
reduce (activations) or read whole from rank-identical gathered values (weights, averaged gradients), so the removal
order and its hash must match, and the criterion values must agree to float tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_checks import BIN, ZERO3, launch, run_stages
from test_prunepeft import prunepeft_dict

pytestmark = pytest.mark.timeout(1200)


def test_two_rank_zero3_search_equals_one_process(tmp_path):
    raw = prunepeft_dict(tmp_path, rounds=2, per_round=2, between_rounds="warm_start")
    raw["peft"] = [{"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
                   {"type": "bottleneck", "r": 8, "dropout": 0.0, "targets": ["o_proj", "down_proj"]}]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    single, double = tmp_path / "single", tmp_path / "z3"
    run_stages(single, "search", config=recipe)
    launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "lightpeft_dist", "search",
            "--config", str(recipe), "--run-dir", str(double), "--deepspeed", ZERO3])
    a, b = (json.loads((d / "estimate" / "estimate.json").read_text()) for d in (single, double))
    assert b["world_size"] == 2 and b["deepspeed"]["zero_optimization"]["stage"] == 3
    assert a["prunepeft"]["removal_order"] == b["prunepeft"]["removal_order"]
    assert a["prunepeft"]["order_hash"] == b["prunepeft"]["order_hash"]
    for ra, rb in zip(a["prunepeft"]["rounds"], b["prunepeft"]["rounds"], strict=True):
        for m, va in ra["values"].items():
            assert max(va) > 0 or m in ("zeros", "threshold")
            assert va == pytest.approx(rb["values"][m], rel=1e-4, abs=1e-9), m
    run_stages(double, "plan")
    run_stages(single, "plan")
    pa, pb = (json.loads((d / "plan.json").read_text()) for d in (single, double))
    assert pa["hash"] == pb["hash"]
