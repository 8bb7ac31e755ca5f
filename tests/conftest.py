import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402

POS = ["good movie", "great film", "the acting was fun", "really great plot", "a good story", "very fun film"]
NEG = ["bad movie", "awful film", "the acting was boring", "really bad plot", "a boring story", "very awful film"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_recipe_dict(d: Path) -> dict:
    """A complete classification recipe over a tiny random GQA model and a tiny sentiment set, written under `d`."""
    model_dir = save_tiny(d / "model", "llama-gqa")
    rows = [{"text": t, "label": "positive"} for t in POS] + [{"text": t, "label": "negative"} for t in NEG]
    train = write_jsonl(d / "train.jsonl", rows * 3)
    evals = write_jsonl(d / "eval.jsonl", rows)
    return {
        "model": {"path": str(model_dir)},
        "data": {"format": "classification", "train_file": train, "eval_file": evals,
                 "labels": {"positive": "positive", "negative": "negative"},
                 "template": "review : {text} sentiment :"},
        "peft": {"r": 4, "alpha": 8},
        "estimate": {"steps": 6, "batch_size": 4, "seq_len": 24, "lr": 1e-2},
        "prune": {"attn_ratio": 0.34, "ffn_ratio": 0.3, "module_ratio": 0.5, "rank_ratio": 0.5},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 24, "lr": 1e-2},
        "eval": {"batch_size": 8, "speed_batches": 1},
    }


@pytest.fixture
def tiny_recipe(tmp_path):
    return tiny_recipe_dict(tmp_path)


@pytest.fixture(scope="session")
def dist_recipe(tmp_path_factory) -> Path:
    """The recipe the multi-process tests share; dropout 0 because N ranks reproduce one process's dropout masks
    only without dropout. Checkpoints every 2 steps so kill-and-resume has something to resume from."""
    import yaml

    d = tmp_path_factory.mktemp("dist")
    raw = tiny_recipe_dict(d)
    raw["peft"]["dropout"] = 0.0
    raw["estimate"]["checkpoint_every"] = 2
    (d / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return d / "recipe.yaml"


@pytest.fixture(scope="session")
def dist_single(dist_recipe, tmp_path_factory) -> Path:
    """The reference the multi-process runs must reproduce: one process, no DeepSpeed, estimate -> plan -> prune."""
    from dist_checks import run_stages

    run = tmp_path_factory.mktemp("single") / "run"
    run_stages(run, "estimate", config=dist_recipe)
    run_stages(run, "plan", "prune")
    return run


def prune_and_reload(base_dir: Path, plan: dict, peft_config, adapter_dir: Path, out: Path):
    """Slice the base checkpoint and its adapter by `plan` into `out/pruned` and `out/pruned_adapter`; the pruned
    model reloaded through transformers (eval mode) and the pruned adapter's folder."""
    from transformers import AutoModelForCausalLM

    from lightpeft_dist.pruning.slicing import prune_adapter, prune_checkpoint

    prune_checkpoint(str(base_dir), plan, out / "pruned")
    prune_adapter(adapter_dir, plan, peft_config, out / "pruned", out / "pruned_adapter")
    return AutoModelForCausalLM.from_pretrained(out / "pruned").eval(), out / "pruned_adapter"
