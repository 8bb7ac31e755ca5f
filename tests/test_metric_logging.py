"""Metric logging (`logging.report_to`, training/reporters.py): TensorBoard event files under D/logs/<stage>/ hold the
logged scalars, read back with tensorboard's own EventAccumulator: training loss (equal to train.json's), LR (the
cosine schedule), grad norm, tokens/s, peak memory, eval metrics; the estimate's mask statistics; the plan's kept
counts. `report` draws its loss curve from them. `none` writes no logs, and a sink that is not installed is a
warning, never an error."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightpeft_dist.cli import main
from lightpeft_dist.reporting.plots import logged_losses
from test_schedules import cosine

STEPS, WARMUP = 8, 2


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    from conftest import tiny_recipe_dict

    d = tmp_path_factory.mktemp("logged")
    raw = tiny_recipe_dict(d)
    raw["train"].update(steps=STEPS, lr_scheduler="cosine", warmup_ratio=WARMUP / STEPS, eval_every=4)
    (d / "r.yaml").write_text(yaml.safe_dump(raw))
    run = d / "run"
    assert main(["run", "--config", str(d / "r.yaml"), "--run-dir", str(run)]) == 0
    return run


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_training_scalars_are_in_the_event_files(logged_run):
    assert list((logged_run / "logs" / "train").glob("events.out.tfevents.*"))
    logged = scalars(logged_run / "logs" / "train")
    record = json.loads((logged_run / "train" / "train.json").read_text())
    steps = list(range(1, STEPS + 1))
    assert [s for s, _ in logged["train/loss"]] == steps
    assert [v for _, v in logged["train/loss"]] == pytest.approx(record["losses"], rel=1e-6)  # float32 in events
    lr = 1e-2  # the tiny recipe's train.lr
    assert [v for _, v in logged["train/lr"]] == pytest.approx([lr * cosine(s - 1, STEPS, WARMUP) for s in steps],
                                                             rel=1e-6)
    for tag in ("train/grad_norm", "train/tokens_per_s", "train/peak_memory_bytes", "train/tokens"):
        assert [s for s, _ in logged[tag]] == steps and all(v > 0 and math.isfinite(v) for _, v in logged[tag]), tag
    assert sum(v for _, v in logged["train/tokens"]) == record["tokens"]
    assert [s for s, _ in logged["eval/accuracy"]] == [4, 8]
    assert [v for _, v in logged["eval/accuracy"]] == pytest.approx([e["accuracy"] for e in record["evals"]])


def test_estimate_mask_statistics_and_plan_counts_are_logged(logged_run):
    est = scalars(logged_run / "logs" / "estimate")
    assert [s for s, _ in est["estimate/loss"]] == list(range(1, 7))
    assert all(0.0 < v <= 1.5 for _, v in est["estimate/mask_mean"])  # masks start at 1 and move under L1
    assert est["estimate/mask_mean"][0][1] != est["estimate/mask_mean"][-1][1]
    assert all(0.0 <= v <= 1.0 for _, v in est["estimate/mask_at_floor_share"])
    plan = json.loads((logged_run / "plan.json").read_text())["summary"]
    kept = {tag: v for tag, [(_, v)] in scalars(logged_run / "logs" / "plan").items()}
    assert kept["plan/kept_num_attention_heads"] == plan["after"]["num_attention_heads"]
    assert kept["plan/kept_intermediate_size"] == plan["after"]["intermediate_size"]
    assert kept["plan/lora_ranks_kept"] == plan["lora_ranks_kept"]
    evaluate = scalars(logged_run / "logs" / "evaluate")
    assert evaluate["evaluate/accuracy"][0][1] == pytest.approx(
        json.loads((logged_run / "eval.json").read_text())["pruned"]["accuracy"])


def test_report_draws_the_loss_curve_from_the_event_files(logged_run):
    steps, losses = logged_losses(logged_run, "train", {"losses": [99.0] * 3})  # the record is not read
    assert list(steps) == list(range(1, STEPS + 1)) and 99.0 not in losses
    assert (logged_run / "report" / "loss_curves.png").is_file()


def test_report_to_none_writes_no_logs_and_missing_wandb_is_a_warning(tmp_path, tiny_recipe, caplog):
    tiny_recipe["logging"] = {"report_to": ["none"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run" / "logs").exists()
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed here; its missing-package path cannot be shown")
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--logging.report_to=[wandb]"]) == 0
    assert "wandb is not installed" in caplog.text
