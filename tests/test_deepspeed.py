"""DeepSpeed on CPU (gloo, 2 ranks): ZeRO-3 estimation and training agree with the single-process pipeline.

Launch costs dominate (each multi-rank run starts 2 Python processes), so the runs are fixtures shared by the
assertions that read them (the one-process reference, `dist_single`, lives in conftest and is shared with
test_multinode.py). The first DeepSpeed run on a machine JIT-builds a small op (a minute or two).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_checks import BIN, REPO, ZERO3, assert_same_scores, launch, run_stages

from lightpeft_dist.cli import main
from lightpeft_dist.config import PruneConfig
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.scores import load_scores
from lightpeft_dist.training.zero import fill_ds_config

pytestmark = pytest.mark.timeout(1200)


def _torchrun(*args: str, env: dict | None = None, expect_ok: bool = True):
    return launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args], env, expect_ok)


@pytest.fixture(scope="module")
def recipe(dist_recipe) -> Path:
    return dist_recipe


@pytest.fixture(scope="module")
def single(dist_single) -> Path:
    return dist_single


@pytest.fixture(scope="module")
def zero3_two_ranks(recipe, tmp_path_factory) -> Path:
    """ZeRO-3 estimation on 2 ranks through the `deepspeed` launcher, as a user runs it."""
    run = tmp_path_factory.mktemp("z3") / "run"
    launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000),
             "--module", "lightpeft_dist", "estimate", "--config", str(recipe), "--run-dir", str(run),
             "--deepspeed", ZERO3])
    run_stages(run, "plan")
    return run


def activation_plan(run: Path) -> dict:
    record = json.loads((run / "estimate" / "estimate.json").read_text())
    cfg = PruneConfig(**{**record["recipe"]["prune"], "unit_scores": "activation"})
    return make_plan(load_scores(run / "estimate" / "activation_scores.safetensors"), record["layer_shapes"], cfg,
                     record["model_fingerprint"], record["hidden_size"], record["head_dim"])


def test_two_rank_zero3_estimate_gives_the_single_process_plan(single, zero3_two_ranks):
    assert_same_scores(single, zero3_two_ranks)
    p1, p2 = (json.loads((r / "plan.json").read_text()) for r in (single, zero3_two_ranks))
    assert p1["hash"] == p2["hash"]
    assert p1["layers"] == p2["layers"] and p1["peft_modules"] == p2["peft_modules"]
    # the activation unit scores (weight norms probed through ZeRO-3's partitioned projections) plan the same too
    a1, a2 = (activation_plan(r) for r in (single, zero3_two_ranks))
    assert a1["hash"] == a2["hash"] and a1["layers"] != p1["layers"]


def test_two_ranks_without_deepspeed_average_gradients_like_one_process(recipe, single, tmp_path):
    run = tmp_path / "run"
    _torchrun("-m", "lightpeft_dist", "estimate", "--config", str(recipe), "--run-dir", str(run))
    assert json.loads((run / "estimate" / "estimate.json").read_text())["world_size"] == 2
    assert_same_scores(single, run)


def test_masks_are_partitioned_during_zero3_estimation(zero3_two_ranks):
    record = json.loads((zero3_two_ranks / "estimate" / "estimate.json").read_text())
    part = record["mask_partitioning"]
    assert record["world_size"] == 2 and record["deepspeed"]["zero_optimization"]["stage"] == 3
    assert all(0 < n < part["total_elements"] for n in part["elements_per_rank"])  # each rank holds a shard only
    assert sum(part["elements_per_rank"]) >= part["total_elements"]
    assert part["persistent_masks_per_rank"] == [0, 0]


def test_zero3_estimation_adapter_is_complete(single, zero3_two_ranks):
    a = load_file(single / "estimate" / "adapter" / "adapter_model.safetensors")
    b = load_file(zero3_two_ranks / "estimate" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(b[k].numel() > 0 and b[k].shape == a[k].shape for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_killed_estimation_resumes_to_the_uninterrupted_scores(recipe, single, tmp_path):
    run = tmp_path / "run"
    common = ["-m", "lightpeft_dist", "estimate", "--config", str(recipe), "--run-dir", str(run),
              "--deepspeed", ZERO3]
    killed = _torchrun(*common, env={"LIGHTPEFT_FAULT_AFTER": "1:4"}, expect_ok=False)
    assert killed.returncode != 0
    assert not (run / "estimate").exists(), "a killed run must leave no estimate behind"
    assert json.loads((run / "estimate.ckpt" / "state.json").read_text())["step"] == 3
    # Resume on a different world size (1 rank): the checkpoint holds whole tensors, not ZeRO shards.
    launch([sys.executable, *common])
    record = json.loads((run / "estimate" / "estimate.json").read_text())
    assert record["resumed_from_step"] == 4 and record["world_size"] == 1
    assert not (run / "estimate.ckpt").exists()
    assert_same_scores(single, run)


def test_zero3_training_on_two_ranks_matches_one_process_and_reloads(recipe, single, tmp_path):
    live_logits = tmp_path / "live_logits.safetensors"
    _torchrun(str(REPO / "tests" / "zero3_train_worker.py"), str(recipe), str(single), ZERO3, str(live_logits))
    record = json.loads((single / "train" / "train.json").read_text())
    assert record["world_size"] == 2 and record["losses"][-1] < record["losses"][0]
    ds_adapter = load_file(single / "train" / "adapter" / "adapter_model.safetensors")
    assert ds_adapter and all(t.numel() > 0 for t in ds_adapter.values())
    reloaded = launch([sys.executable, "-c", RELOAD_LOGITS, str(single), str(tmp_path / "reloaded.safetensors")])
    assert reloaded.returncode == 0
    torch.testing.assert_close(load_file(tmp_path / "reloaded.safetensors")["logits"],
                               load_file(live_logits)["logits"], atol=1e-5, rtol=0)
    run_stages(single, "train")  # the same training in one process, no DeepSpeed
    plain = load_file(single / "train" / "adapter" / "adapter_model.safetensors")
    for k in plain:
        torch.testing.assert_close(plain[k], ds_adapter[k], atol=1e-5, rtol=0)


RELOAD_LOGITS = """
import sys, torch
import lightpeft_dist
from peft import PeftModel
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
from zero3_train_worker import FIXED_INPUTS
run, out = sys.argv[1:3]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run + "/pruned_model"), run + "/train/adapter")
with torch.no_grad():
    save_file({"logits": model.eval()(input_ids=FIXED_INPUTS).logits.float()}, out)
"""


def test_estimate_on_two_ranks_then_train_on_one(zero3_two_ranks):
    run_stages(zero3_two_ranks, "prune", "train")
    record = json.loads((zero3_two_ranks / "train" / "train.json").read_text())
    assert record["world_size"] == 1 and record["losses"][-1] < record["losses"][0]


@pytest.mark.parametrize("config", ["zero2.json", "zero3_offload.json"])
def test_other_shipped_ds_configs_give_the_same_plan(config, recipe, single, tmp_path):
    run = tmp_path / "run"
    launch([sys.executable, "-m", "lightpeft_dist", "estimate", "--config", str(recipe), "--run-dir", str(run),
             "--deepspeed", str(REPO / "ds_configs" / config)])
    run_stages(run, "plan")
    assert json.loads((run / "plan.json").read_text())["hash"] == json.loads((single / "plan.json").read_text())["hash"]


def test_ds_config_auto_fields_come_from_the_recipe():
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    out = fill_ds_config(cfg, batch_size=32, grad_accum=2, max_grad_norm=1.0, dtype="bfloat16", hidden_size=64,
                         min_mask_numel=4, world_size=4)
    assert (out["train_batch_size"], out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == \
        (32, 4, 2)
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert out["zero_optimization"]["stage3_param_persistence_threshold"] == 0  # masks get partitioned


def test_ds_config_that_would_replicate_masks_or_contradict_the_recipe_is_refused():
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 100_000
    with pytest.raises(LightPeftError, match="replicated instead of partitioned"):
        fill_ds_config(cfg, batch_size=8, grad_accum=1, max_grad_norm=1.0, dtype="float32", hidden_size=64,
                       min_mask_numel=6, world_size=2)
    cfg = {"train_batch_size": 16, "zero_optimization": {"stage": 2}}
    with pytest.raises(LightPeftError, match="train_batch_size=16 but the recipe implies 8"):
        fill_ds_config(cfg, batch_size=8, grad_accum=1, max_grad_norm=1.0, dtype="float32", hidden_size=64,
                       min_mask_numel=6, world_size=2)


def test_missing_or_broken_ds_config_is_one_line_error(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["estimate", "--config", str(recipe), "--run-dir", str(run), "--deepspeed", "nope.json"]) == 2
    assert "DeepSpeed config not found at nope.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["estimate", "--config", str(recipe), "--run-dir", str(run), "--deepspeed", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not valid JSON" in err[0]
    assert not (run / "estimate").exists()


def test_qlora_under_zero3_shards_the_4bit_base_and_matches_one_process(recipe, single, tmp_path, monkeypatch):
    """Sharded QLoRA: the NF4-packed base (stored in the model dtype, `bnb_4bit_quant_storage`) is partitioned by
    ZeRO-3 like any weight, and 2-rank training gives the 1-process QLoRA adapter. Both runs force bitsandbytes'
    AVX512-BF16 CPU repack on (bnb_cpu.py; the worker does it for itself)."""
    pytest.importorskip("bitsandbytes")
    from bnb_cpu import force_cpu_repack

    force_cpu_repack(monkeypatch.setattr)
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(single, run, ignore=shutil.ignore_patterns("train", "eval.json", "export", "report"))
    raw = yaml.safe_load(recipe.read_text())
    raw["train"]["load_in_4bit"] = True
    recipe4 = tmp_path / "recipe4.yaml"
    recipe4.write_text(yaml.safe_dump(raw))
    logits = tmp_path / "logits.safetensors"
    _torchrun(str(REPO / "tests" / "zero3_train_worker.py"), str(recipe4), str(run), ZERO3, str(logits))
    layout = json.loads(Path(str(logits) + ".json").read_text())
    assert layout["linear4bit"] == 2 * 7 and layout["quant_type"] == ["nf4"]  # 2 layers x 7 projections
    assert all(0 < local < full for local, full in zip(layout["local_numel"], layout["full_numel"]))
    z3 = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    z3_losses = json.loads((run / "train" / "train.json").read_text())["losses"]
    assert z3_losses[-1] < z3_losses[0]
    run_stages(run, "train", config=recipe4)  # one process, same QLoRA recipe
    one = load_file(run / "train" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == z3.keys()
    for k in one:
        torch.testing.assert_close(one[k], z3[k], atol=1e-6, rtol=0)


def test_a_stale_op_build_lock_is_an_error_not_a_silent_hang(tmp_path, monkeypatch):
    """DeepSpeed builds its CPU shared-memory op at init behind a plain lock file; a build killed midway leaves it
    and every later run waits forever. A lock older than a build can take is refused, naming the file; a fresh one
    (a build in progress) and none at all are not."""
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.training.zero import STALE_BUILD_LOCK_S, check_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_build_locks()  # no lock
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.touch()
    built_at = lock.stat().st_mtime
    check_build_locks(now=built_at + 60)  # a build in progress
    with pytest.raises(LightPeftError, match="deepspeed_shm_comm/lock"):
        check_build_locks(now=built_at + STALE_BUILD_LOCK_S + 1)
