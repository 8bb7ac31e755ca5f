"""Train-stage checkpoints: a training run SIGKILLed after a checkpoint resumes, on 1 process or 2 ZeRO-3 ranks and
across world sizes, to the adapter (last and best), loss curve and eval records of an uninterrupted run.

The kill is the loop's fault injection (LIGHTPEFT_FAULT_AFTER="RANK:STEP", a real SIGKILL), so each killed run is a
subprocess launched as a user would; the resumes are the CLI, in process or under torchrun. Dropout is 0 (the
shared multi-process recipe), so one process and N ranks take the same steps.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import BIN, REPO, ZERO3, launch, run_stages
from lightpeft_dist.cli import main
from lightpeft_dist.training.reporters import read_scalars

pytestmark = pytest.mark.timeout(1200)
STEPS, EVERY, KILL_AFTER = 6, 2, 4  # checkpoints after steps 2 and 4 (0-based 1, 3); killed after step 5 (0-based 4)
PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])


@pytest.fixture(scope="module")
def recipe(dist_recipe, tmp_path_factory) -> Path:
    raw = yaml.safe_load(dist_recipe.read_text())
    raw["train"].update(steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=2, eval_every=3, warmup_ratio=0.3,
                        lr_scheduler="cosine")
    path = tmp_path_factory.mktemp("resume") / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def pruned_copy(single: Path, dest: Path) -> Path:
    shutil.copytree(single, dest, ignore=shutil.ignore_patterns("train", "train.ckpt*", "eval.json", "export",
                                                                "report", "logs"))
    return dest


@pytest.fixture(scope="module")
def uninterrupted(recipe, dist_single, tmp_path_factory) -> Path:
    run = pruned_copy(dist_single, tmp_path_factory.mktemp("full") / "run")
    run_stages(run, "train", config=recipe)
    return run


def outputs(run: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    record = json.loads((run / "train" / "train.json").read_text())
    return (record, load_file(run / "train" / "adapter" / "adapter_model.safetensors"),
            load_file(run / "train" / "best_adapter" / "adapter_model.safetensors"))


def kill(run: Path, recipe: Path, ranks: int, rank: int = 0) -> None:
    """Train until LIGHTPEFT_FAULT_AFTER SIGKILLs `rank` after step KILL_AFTER; 2 ranks run ZeRO-3 under torchrun."""
    cli = ["-m", "lightpeft_dist", "train", "--config", str(recipe), "--run-dir", str(run)]
    cmd = [sys.executable, *cli] if ranks == 1 else \
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(ranks), *cli, "--deepspeed", ZERO3]
    killed = launch(cmd, env={"LIGHTPEFT_FAULT_AFTER": f"{rank}:{KILL_AFTER}", "PYTHONPATH": PYTHONPATH},
                    expect_ok=False)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert not (run / "train").exists(), "a killed run must leave no train output behind"
    state = json.loads((run / "train.ckpt" / "state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == ranks
    # keep_checkpoints: 2 keeps the one before the latest too
    assert [p.name for p in sorted(run.glob("train.ckpt.step-*"))] == ["train.ckpt.step-0000001"]


def assert_same_training(run: Path, reference: Path, exact: bool) -> None:
    (rec, last, best), (ref, ref_last, ref_best) = outputs(run), outputs(reference)
    worst = max(float((last[k] - ref_last[k]).abs().max()) for k in ref_last)
    print(f"resumed from step {rec['resumed_from_step']} on {rec['world_size']} rank(s): adapter max |diff| {worst:.2e}, "
          f"loss max rel diff {max(abs(a - b) / abs(b) for a, b in zip(rec['losses'], ref['losses'])):.2e}")
    assert rec["resumed_from_step"] == KILL_AFTER and ref["resumed_from_step"] == 0
    assert len(rec["losses"]) == STEPS and [e["step"] for e in rec["evals"]] == [3, 6]
    assert rec["best"]["step"] == ref["best"]["step"]
    assert rec["tokens"] == ref["tokens"]
    for got, want in ((last, ref_last), (best, ref_best)):
        assert got.keys() == want.keys() and got
        for k in want:
            if exact:
                assert torch.equal(got[k], want[k]), k
            else:
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)
    if exact:
        assert rec["losses"] == ref["losses"] and rec["evals"] == ref["evals"]
    else:
        assert rec["losses"] == pytest.approx(ref["losses"], rel=1e-5)
        assert [e["accuracy"] for e in rec["evals"]] == [e["accuracy"] for e in ref["evals"]]
    assert not list(run.glob("train.ckpt*")), "checkpoints are removed once the adapter is written"


def test_killed_training_resumes_to_the_uninterrupted_run(recipe, dist_single, uninterrupted, tmp_path):
    """1 process killed after step 5 (checkpoint after step 4) -> rerun: bit-identical adapter, best adapter,
    losses and eval records; the metric log's loss curve is the uninterrupted one too."""
    run = pruned_copy(dist_single, tmp_path / "run")
    kill(run, recipe, ranks=1)
    run_stages(run, "train", config=recipe)
    assert_same_training(run, uninterrupted, exact=True)
    logged = read_scalars(run / "logs" / "train")
    if logged:  # tensorboard installed (a dependency; tests/test_reporting.py requires it)
        assert [s for s, _ in logged["train/loss"]] == list(range(1, STEPS + 1))
        assert [v for _, v in logged["train/loss"]] == pytest.approx(outputs(uninterrupted)[0]["losses"], rel=1e-6)


def test_killed_zero3_training_resumes_on_one_process(recipe, dist_single, uninterrupted, tmp_path):
    """2 ZeRO-3 ranks, rank 1 killed -> resumed by 1 plain process from the gathered checkpoint."""
    run = pruned_copy(dist_single, tmp_path / "run")
    kill(run, recipe, ranks=2, rank=1)
    run_stages(run, "train", config=recipe)
    assert_same_training(run, uninterrupted, exact=False)
    assert json.loads((run / "train" / "train.json").read_text())["world_size"] == 1


def test_killed_single_process_training_resumes_on_two_zero3_ranks(recipe, dist_single, uninterrupted, tmp_path):
    run = pruned_copy(dist_single, tmp_path / "run")
    kill(run, recipe, ranks=1)
    launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "lightpeft_dist", "train",
            "--config", str(recipe), "--run-dir", str(run), "--deepspeed", ZERO3], env={"PYTHONPATH": PYTHONPATH})
    assert_same_training(run, uninterrupted, exact=False)
    assert json.loads((run / "train" / "train.json").read_text())["world_size"] == 2


def test_every_train_checkpoint_reaches_the_listeners(recipe, dist_single, tmp_path):
    """What the Ray launcher relies on: each train checkpoint is handed to checkpoint.LISTENERS (Ray's
    ray.train.report copies it), named so that `_restore_from_ray` puts it back as D/train.ckpt."""
    from lightpeft_dist.config import load_recipe
    from lightpeft_dist.pipeline.train import run_train
    from lightpeft_dist.runtime import Runtime
    from lightpeft_dist.training import checkpoint

    run = pruned_copy(dist_single, tmp_path / "run")
    heard: list[tuple[str, int, int]] = []

    def listener(path: Path, step: int) -> None:
        heard.append((path.name, step, json.loads((path / "state.json").read_text())["step"]))

    checkpoint.LISTENERS.append(listener)
    try:
        run_train(load_recipe(recipe), run, Runtime())
    finally:
        checkpoint.LISTENERS.remove(listener)
    assert heard == [("train.ckpt", 1, 1), ("train.ckpt", 3, 3)]


def test_checkpoint_of_another_train_key_is_ignored_with_a_warning(recipe, dist_single, uninterrupted, tmp_path,
                                                                    caplog):
    run = pruned_copy(dist_single, tmp_path / "run")
    kill(run, recipe, ranks=1)
    assert main(["train", "--config", str(recipe), "--run-dir", str(run), "--train.lr=0.02"]) == 0
    assert "ignoring checkpoint" in caplog.text and "another train key" in caplog.text
    record = json.loads((run / "train" / "train.json").read_text())
    assert record["resumed_from_step"] == 0 and len(record["losses"]) == STEPS
    assert record["losses"][0] == outputs(uninterrupted)[0]["losses"][0]  # same first step, another LR after it


def test_unreadable_checkpoint_is_one_error_line_and_writes_nothing(recipe, dist_single, tmp_path, capsys):
    run = pruned_copy(dist_single, tmp_path / "run")
    kill(run, recipe, ranks=1)
    (run / "train.ckpt" / "state.safetensors").write_bytes(b"not a safetensors file")
    assert main(["train", "--config", str(recipe), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint state") and "train.ckpt" in errors[0], err
    assert "Traceback" not in err
    assert not (run / "train").exists()
