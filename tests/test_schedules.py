"""Training length and LR schedules: `train.epochs` runs exactly that many passes over the train split, the cosine
and constant schedules follow their formulas (with warm-up) at sampled steps, and contradictory or unknown settings
are one `error:` line before anything is written."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import yaml

from lightpeft_dist.cli import main
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.data.batches import StepBatches
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.training.schedules import lr_factor, make_schedule, steps_for


def cosine(step: int, steps: int, warmup: int) -> float:
    """The textbook formula, written independently of schedules.py."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


@pytest.mark.parametrize("steps, warmup", [(100, 10), (37, 0), (8, 3)])
def test_cosine_schedule_matches_the_formula_at_sampled_steps(steps, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_schedule(opt, "cosine", steps, warmup)
    seen = []
    for _ in range(steps):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    for s in sorted({0, warmup, (warmup + steps) // 2, steps - 1, *range(0, steps, max(1, steps // 7))}):
        assert seen[s] == pytest.approx(2.0 * cosine(s, steps, warmup), abs=1e-12), s
    assert seen[warmup] == pytest.approx(2.0) and seen[-1] < seen[steps // 2] < seen[warmup]  # decays


def test_constant_and_linear_schedules():
    assert [lr_factor("constant", s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 10, 0) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    with pytest.raises(LightPeftError, match="unknown LR schedule 'step'"):
        lr_factor("step", 0, 10)


def test_epochs_become_steps_that_make_exactly_that_many_passes():
    n, batch = 12, 4
    steps = steps_for(None, 2, n, batch)
    assert steps == 6 and steps_for(50, None, n, batch) == 50
    batches = StepBatches(list(range(n)), batch, seed=3)
    seen = [i for s in range(steps) for i in batches.global_indices(s)]
    assert Counter(seen) == {i: 2 for i in range(n)}  # every row exactly twice
    assert sorted(seen[:n]) == list(range(n)) and seen[:n] != seen[n:]  # pass 1 is a permutation, pass 2 another
    assert steps_for(None, 1, 10, 4) == 3  # 10 rows: the third step takes 2 rows of the next pass (logged)


def test_train_stage_runs_the_epochs(tmp_path, tiny_recipe):
    import json

    tiny_recipe["train"] = {**{k: v for k, v in tiny_recipe["train"].items() if k != "steps"}, "epochs": 2,
                            "lr_scheduler": "cosine", "warmup_ratio": 0.25}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    record = json.loads((run / "train" / "train.json").read_text())
    rows = 36  # conftest: 12 sentences x 3
    assert record["epochs"] == 2 and record["steps"] == 2 * rows // 4 == len(record["losses"])
    budget = record["estimate_budget"]
    assert budget["steps"] == 6 and budget["steps_fraction"] == pytest.approx(6 / 18)
    assert 0 < budget["tokens_fraction"] < 1
    # the recipe saved in the run directory reloads (steps: null, epochs: 2)
    assert main(["train", "--run-dir", str(run)]) == 0


@pytest.mark.parametrize("train, message", [
    ({"steps": 10, "epochs": 2}, "train: set train.steps (10) or train.epochs (2), not both"),
    ({"lr_scheduler": "step"}, "train.lr_scheduler: Input should be 'linear', 'cosine' or 'constant'"),
], ids=["steps-and-epochs", "unknown-scheduler"])
def test_bad_schedule_settings_are_one_error_line(tmp_path, tiny_recipe, capsys, train, message):
    tiny_recipe["train"].update(train)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(LightPeftError):
        recipe_from_dict(tiny_recipe)
