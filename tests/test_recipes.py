"""Every shipped recipe parses, and runs the whole pipeline for a few steps on the real embedded assets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightpeft_dist.assets import EMBEDDED_NAMES
from lightpeft_dist.cli import main
from lightpeft_dist.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "lightpeft_dist" / "recipes").glob("*.yaml"))
# train.epochs=null: a recipe that trains for epochs runs two steps here instead (steps and epochs exclude each other)
FEW_STEPS = ["--estimate.steps=2", "--estimate.batch_size=2", "--estimate.seq_len=32", "--train.epochs=null",
             "--train.steps=2",
             "--train.batch_size=2", "--train.seq_len=32", "--data.max_train_examples=8",
             "--data.max_eval_examples=4", "--eval.batch_size=4", "--eval.speed_batches=1"]

APT_FEW_STEPS = ["--apt.calibration_samples=4", "--apt.batch_size=2", "--apt.seq_len=32"]
APT_GRADUAL_FEW_STEPS = ["--apt.window=2", "--apt.checkpoints=2", "--apt.ramp=1"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe):
    r = load_recipe(recipe)
    # embedded names are resolved only when a stage reads them, so a misspelt one would pass parsing
    named = [r.model.path, r.data.train_file, r.data.eval_file, r.data.test_file]
    assert all(p in EMBEDDED_NAMES for p in named if p and p.startswith("embedded:")), named


def test_both_real_tasks_have_a_recipe():
    data = {load_recipe(r).data.train_file for r in RECIPES}
    assert {"embedded:movie_reviews/train", "embedded:nyt_editorials/train"} <= data


def test_top_level_recipes_is_the_shipped_folder():
    """One copy: the checkout's recipes/ (what the README's commands use) is the package data the wheel ships."""
    assert RECIPES and (REPO / "recipes").is_symlink()
    assert (REPO / "recipes").resolve() == (REPO / "lightpeft_dist" / "recipes").resolve()


# a PrunePEFT recipe's search: one round of one step (warm-up too), still removing its groups
FEW_SEARCH_STEPS = ["--prunepeft.steps=1", "--prunepeft.batch_size=2", "--prunepeft.seq_len=32",
                    "--prunepeft.warmup_steps=1", "--prunepeft.warmup_examples=8", "--prunepeft.rounds=1"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_runs_a_few_steps_on_real_assets(recipe, tmp_path):
    run = tmp_path / "run"
    loaded = load_recipe(recipe)
    few = FEW_STEPS + (APT_FEW_STEPS if loaded.strategy == "apt" else []) + \
        (FEW_SEARCH_STEPS if loaded.strategy == "prunepeft" else [])
    if loaded.strategy == "apt" and loaded.section("apt").mode == "gradual":  # prune at both of the two steps
        few += APT_GRADUAL_FEW_STEPS
    assert main(["run", "--config", str(recipe), "--run-dir", str(run), *few]) == 0
    ev = json.loads((run / "eval.json").read_text())
    plan = json.loads((run / "plan.json").read_text())
    if loaded.strategy == "prunepeft":
        record = json.loads((run / "estimate" / "estimate.json").read_text())["prunepeft"]
        removed = loaded.section("prunepeft").per_round
        assert len(record["kept"]) == len(record["groups"]) - removed
        assert plan["summary"]["peft_modules_kept"] == 2 * len(record["kept"])  # two projections per group
        if loaded.section("prunepeft").base_scores == "none":
            assert plan["summary"]["prunable_fraction_pruned"] == 0
            return
    assert ev["pruned"]["params"]["total"] < ev["base"]["params"]["total"]
    assert plan["summary"]["prunable_fraction_pruned"] > 0.1
    assert (run / "report" / "kept_structure.png").is_file()


def test_sft_format_runs_end_to_end(tmp_path, tiny_recipe):
    import yaml

    rows = [{"prompt": "question : is the movie good", "response": "answer : the movie is good"},
            {"prompt": "question : is the plot fun", "response": "answer : the plot is not fun"}] * 4
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_recipe["data"] = {"format": "sft", "train_file": str(tmp_path / "sft.jsonl"),
                           "eval_file": str(tmp_path / "sft.jsonl")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["pruned"]["perplexity"] > 1.0 and ev["base"]["perplexity"] > 1.0
    train = json.loads((tmp_path / "run" / "train" / "train.json").read_text())
    assert train["losses"][-1] < train["losses"][0]  # lr 1e-2 on 8 repeated rows: it must learn something
