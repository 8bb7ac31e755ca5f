"""Hostile input (issue 16), class 4: trusted artefacts.

A plan or score file is checked on every read (indices, GQA, counts, hash; shapes and finite values), a stage
whose input changed under it says so, and the report takes its numbers from one plan only. The pipeline runs once
per module; each case copies the finished run directory, damages one artefact and runs one CLI command in a
subprocess, so the exit code and stderr are what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_recipe_dict
from hostile_helpers import RUN_LOCK, one_error, tree
from lightpeft_dist.cli import main
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pruning.plan import read_plan
from lightpeft_dist.reporting.report import write_report

C4_REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def c4_finished(tmp_path_factory) -> Path:
    """One finished run (estimate .. report) of the tiny recipe; cases work on copies of it."""
    root = tmp_path_factory.mktemp("c4")
    (root / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(root)))
    assert main(["run", "--config", str(root / "recipe.yaml"), "--run-dir", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture
def c4_run(c4_finished, tmp_path) -> Path:
    return Path(shutil.copytree(c4_finished, tmp_path / "run"))


def c4_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "lightpeft_dist", *args], cwd=C4_REPO, capture_output=True,
                          text=True, timeout=600, env={**env, "HF_HUB_OFFLINE": "1"})


def c4_fails(run: Path, *args: str) -> str:
    """Run one command that must refuse: exit 2, one `error:` line, no traceback, the run directory untouched
    (byte for byte, no new or temporary files or folders; only the run lock, which each command that opens the run
    rewrites with its own pid, is left out). Returns the error line."""
    before = tree(run, skip=RUN_LOCK)
    proc = c4_cli(*args, "--run-dir", str(run))
    line = one_error(proc.returncode, proc.stderr)
    assert tree(run, skip=RUN_LOCK) == before
    return line


def c4_edit_plan(run: Path, edit) -> dict:
    """Apply `edit(plan)` to plan.json, leaving its stored hash as it was."""
    plan = json.loads((run / "plan.json").read_text())
    edit(plan)
    (run / "plan.json").write_text(json.dumps(plan, indent=2))
    return plan


def c4_unkept(plan: dict, layer: int = 0) -> int:
    return next(i for i in range(10**6) if i not in plan["layers"][layer]["ffn"])


def _set(lp: dict, key: str, value) -> None:
    lp[key] = value


C4_BAD_PLANS = {
    # name: (edit, words of the error line)
    "index out of range": (lambda p: p["layers"][0]["ffn"].append(40), "layer 0 ffn has index 40, out of range"),
    "negative index": (lambda p: _set(p["layers"][1], "q_heads", [-1, *p["layers"][1]["q_heads"][1:]]),
                       "layer 1 q_heads has negative index -1"),
    "duplicated index": (lambda p: _set(p["layers"][0], "ffn", [p["layers"][0]["ffn"][0], *p["layers"][0]["ffn"][:-1]]),
                         "layer 0 ffn repeats index"),
    "unsorted": (lambda p: p["layers"][0]["ffn"].reverse(), "layer 0 ffn is not sorted"),
    "GQA-invalid": (lambda p: _set(p["layers"][0], "q_heads", [0, 1, 2, 3]),
                    "GQA needs the same number in each kept group"),
    "counts do not match the shapes": (lambda p: p["summary"]["after"].update(intermediate_size=3),
                                       "summary counts do not match"),
}


@pytest.mark.parametrize("case", list(C4_BAD_PLANS))
def test_c4_invalid_plan_is_refused_before_slicing(c4_run, case):
    edit, words = C4_BAD_PLANS[case]
    c4_edit_plan(c4_run, edit)
    line = c4_fails(c4_run, "prune")
    assert words in line and "plan.json" in line and "rerun `lightpeft plan`" in line, line


def test_c4_read_plan_checks_layer_count_and_leaves_a_good_plan_as_written(c4_run):
    """In-process (no CLI needed): the reference decides the layer count; an untouched plan reads back unchanged."""
    est = json.loads((c4_run / "estimate" / "estimate.json").read_text())
    assert read_plan(c4_run / "plan.json", est) == json.loads((c4_run / "plan.json").read_text())
    c4_edit_plan(c4_run, lambda p: p["layers"].pop())
    with pytest.raises(LightPeftError, match="it has 1 layers but the model has 2"):
        read_plan(c4_run / "plan.json", est)


def test_c4_hand_edited_plan_with_its_old_hash_stops_run(c4_run):
    """A valid-looking edit (another FFN neuron kept, same counts) under the old hash. `run` must not take prune
    for up to date: it stops with an error rather than re-planning, which would silently throw the edit away."""
    def swap(p: dict) -> None:
        p["layers"][0]["ffn"] = sorted([*p["layers"][0]["ffn"][1:], c4_unkept(p)])

    plan = c4_edit_plan(c4_run, swap)
    line = c4_fails(c4_run, "run")
    assert f"records hash {plan['hash']}" in line and "edited or corrupted" in line, line


def c4_rewrite_scores(path: Path, change) -> None:
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_c4_score_file_with_nan_is_refused(c4_run):
    c4_rewrite_scores(c4_run / "estimate" / "scores.safetensors", lambda t: t["ffn.1"].__setitem__(3, float("nan")))
    line = c4_fails(c4_run, "plan", "--ffn-ratio", "0.5")
    assert "ffn.1 holds non-finite values" in line and "(`lightpeft estimate`)" in line, line


def test_c4_score_file_with_wrong_shape_is_refused(c4_run):
    c4_rewrite_scores(c4_run / "estimate" / "scores.safetensors", lambda t: t.update({"ffn.0": t["ffn.0"][:-1]}))
    line = c4_fails(c4_run, "plan", "--ffn-ratio", "0.5")
    assert "layer 0 has 6 head and 39 FFN scores but the model has 6 heads and 40 FFN neurons" in line, line


def test_c4_adapter_of_an_earlier_plan_is_named_not_loaded(c4_run):
    """Re-plan and re-prune after training: evaluate and export say which plan the adapter was trained on."""
    trained = json.loads((c4_run / "train" / "train.json").read_text())["plan_hash"]
    assert main(["plan", "--run-dir", str(c4_run), "--ffn-ratio", "0.6"]) == 0
    assert main(["prune", "--run-dir", str(c4_run)]) == 0
    now = json.loads((c4_run / "pruned_model" / "lightpeft_prune.json").read_text())["plan_hash"]
    assert now != trained
    for stage in ("evaluate", "export"):
        line = c4_fails(c4_run, stage)
        assert f"trained on plan {trained}" in line and f"now plan {now}" in line, line
        assert "rerun `lightpeft train`" in line, line


def c4_report(run: Path) -> tuple[str, dict]:
    """`lightpeft report`: it succeeds and writes only under report/."""
    outside_report = lambda: {k: v for k, v in tree(run, skip=RUN_LOCK).items()  # noqa: E731
                              if k.split("/")[0] != "report"}
    before = outside_report()
    proc = c4_cli("report", "--run-dir", str(run))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr[-3000:]
    assert outside_report() == before
    return (run / "report" / "summary.md").read_text(), json.loads((run / "report" / "summary.json").read_text())


def test_c4_report_after_replanning_does_not_mix_plans(c4_run):
    old_plan = json.loads((c4_run / "plan.json").read_text())
    assert main(["plan", "--run-dir", str(c4_run), "--ffn-ratio", "0.6"]) == 0
    new_plan = json.loads((c4_run / "plan.json").read_text())
    assert new_plan["hash"] != old_plan["hash"]
    md, summary = c4_report(c4_run)
    rows = {r[0]: r[1:] for r in summary["rows"]}
    # the new plan's counts, and none of the old plan's measurements beside them
    assert rows["prunable parameters"][1] == f"{new_plan['summary']['prunable_params_after']:,}"
    assert all(v == ["-", "-"] for k, v in rows.items() if k != "prunable parameters"), rows
    assert "training tokens/s" not in rows and "estimation cost / training" not in rows
    assert [n for n in summary["notes"] if f"from plan {old_plan['hash']}" in n and "eval.json" in n]
    assert [n for n in summary["notes"] if f"from plan {old_plan['hash']}" in n and "train/train.json" in n]
    assert f"> note: eval.json is from plan {old_plan['hash']}" in md
    assert "loss_curves.png" in md  # the estimate's curve is still drawn; the old plan's training curve is not


def test_c4_report_with_an_invalid_plan_leaves_the_plan_out(c4_run):
    """The report tolerates a missing plan and does not trust an invalid one: one note, no plan rows or figures.
    (In-process: the report stage's own function; the CLI path is the re-plan case above.)"""
    c4_edit_plan(c4_run, lambda p: p["layers"][0]["ffn"].append(40))
    out = write_report(c4_run)
    md, summary = (out / "summary.md").read_text(), json.loads((out / "summary.json").read_text())
    assert len(summary["notes"]) == 1 and "ffn has index 40, out of range" in summary["notes"][0]
    assert summary["layers"] == [] and "Kept structure per layer" not in md
    assert {r[0]: r[1:] for r in summary["rows"]}["prunable parameters"] == ["-", "-"]
    assert "kept_structure.png" not in summary["plots"] and "kept_ranks.png" not in summary["plots"]
