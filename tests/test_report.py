"""Report and figures on fake but self-consistent run directories (no model, no training: runs in seconds).

The fake run mirrors what the stages write: scores via save_scores, JSON records via write_json, and a plan whose
summary and hash come from the real planner's `summarize` and `plan_hash` (the report reads plans through
`read_plan`, which checks both), so the numbers the report shows can be checked exactly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from lightpeft_dist.reporting import plots
from lightpeft_dist.io_utils import write_json
from lightpeft_dist.pruning.plan import plan_hash, summarize
from lightpeft_dist.reporting.report import layer_rows, write_report
from lightpeft_dist.pruning.scores import Scores, save_scores

HEADS, KV, FFN, R, HIDDEN, HEAD_DIM = 6, 2, 16, 4, 48, 8
TYPES = ("q", "k", "v", "o", "gate", "up", "down")
ALL_PNGS = ("kept_structure.png", "mask_distribution.png", "module_importance.png", "kept_ranks.png",
            "loss_curves.png")
# Per layer (i % 3): kept query heads, kept KV groups, kept FFN width. GQA-valid: equal heads per kept group.
LAYER_PLANS = [([0, 1, 2, 3, 4, 5], [0, 1], 16), ([0, 1, 2], [0], 13), ([0, 1, 3, 4], [0, 1], 10)]


def module_name(layer: int, t: str) -> str:
    block = "self_attn" if t in ("q", "k", "v", "o") else "mlp"
    return f"model.layers.{layer}.{block}.{t}_proj"


def kept_ranks_of(layer: int, j: int) -> list[int] | None:
    """Every other module is dropped; kept ones keep 1..4 of their 4 ranks."""
    return list(range(1 + (layer + j) % R)) if (layer + j) % 2 == 0 else None


def make_run(root: Path, n_layers: int = 3, stages: tuple[str, ...] = ("estimate", "plan", "train", "eval"),
             accuracy: float = 0.8, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    layers = []
    for i in range(n_layers):
        q, kv, width = LAYER_PLANS[i % 3]
        layers.append({"q_heads": q, "kv_heads": kv, "ffn": list(range(width))})

    def masks(n: int, kept: list[int]) -> torch.Tensor:  # kept units score high, pruned ones low
        low = torch.rand(n, generator=g) * 0.3
        return torch.where(torch.isin(torch.arange(n), torch.tensor(kept)), 0.6 + low, low)

    peft, module, rank = {}, {}, {}
    for i in range(n_layers):
        for j, t in enumerate(TYPES):
            name, kr = module_name(i, t), kept_ranks_of(i, j)
            module[name] = (0.5 if kr else 0.0) + 0.4 * float(torch.rand(1, generator=g))
            rank[name] = torch.rand(R, generator=g)
            if kr:
                peft[name] = kr
    shapes = [{"num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": FFN}] * n_layers
    if "estimate" in stages:
        scores = Scores([masks(HEADS, lp["q_heads"]) for lp in layers], [masks(FFN, lp["ffn"]) for lp in layers],
                        module, rank)
        save_scores(root / "estimate" / "scores.safetensors", scores, metadata={"strategy": "lightpeft"})
        write_json(root / "estimate" / "estimate.json", {
            "layer_shapes": shapes, "hidden_size": HIDDEN, "head_dim": HEAD_DIM, "model_fingerprint": "fake",
            "steps": 40,
            "losses": [2.5 * 0.97 ** s + 0.05 * float(torch.rand(1, generator=g)) for s in range(40)],
            "train_seconds": 3.0})
    if "plan" in stages:
        plan = {"version": 1, "model_fingerprint": "fake", "prune": {}, "layers": layers, "peft_modules": peft}
        plan["summary"] = summarize(plan, shapes, HIDDEN, HEAD_DIM)
        plan["hash"] = plan_hash(plan)
        write_json(root / "plan.json", plan)
    if "train" in stages:
        write_json(root / "train" / "train.json", {"losses": [1.5 * 0.95 ** s for s in range(30)] + [float("nan")],
                                                   "tokens_per_s": 1234.0, "train_seconds": 10.0})
    if "eval" in stages:
        write_json(root / "eval.json", {
            "split": "test", "format": "classification",
            "base": {"accuracy": 0.55, "params": {"total": 1000}, "tokens_per_s": 900.0},
            "pruned": {"accuracy": accuracy, "params": {"total": 700, "adapter": 40}, "tokens_per_s": 1100.0}})
    return root


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5_000, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])
    assert 300 < width < 4000 and 200 < height < 3000, (path, width, height)
    assert matplotlib.image.imread(path).ndim == 3  # decodes fully


def test_full_report_writes_and_links_every_figure(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report(run)
    for name in ALL_PNGS:
        assert_png(out / name)
    md = (out / "summary.md").read_text()
    for name in ALL_PNGS:
        assert f"]({name})" in md, name
    assert "| 0 | 6 / 6 | 2 / 2 | 16 / 16 |" in md
    assert "| 1 | 3 / 6 | 1 / 2 | 13 / 16 |" in md
    assert "| 2 | 4 / 6 | 2 / 2 | 10 / 16 |" in md
    assert "55.00%" in md and "80.00%" in md  # the summary table is still there
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plots"] == list(ALL_PNGS)
    assert summary["layers"][1] == ["1", "3 / 6", "1 / 2", "13 / 16"]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # no temporaries left behind


def test_estimate_only_run(tmp_path):
    run = make_run(tmp_path / "run", stages=("estimate",))
    out = write_report(run)
    assert_png(out / "mask_distribution.png")
    assert_png(out / "module_importance.png")
    assert_png(out / "loss_curves.png")
    assert not (out / "kept_structure.png").exists() and not (out / "kept_ranks.png").exists()
    md = (out / "summary.md").read_text()
    assert "](mask_distribution.png)" in md and "kept_structure.png" not in md
    assert "Kept structure per layer" not in md


def test_empty_run_dir_writes_text_only(tmp_path):
    out = write_report(tmp_path)
    assert (out / "summary.md").is_file() and not list(out.glob("*.png"))
    for fn in plots.PLOTS.values():
        assert fn(tmp_path, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_plan_without_estimate_shows_kept_counts_only(tmp_path):
    run = make_run(tmp_path / "run", stages=("plan",))
    assert layer_rows(run)[2] == ("2", "4", "2", "10")
    out = write_report(run)
    assert_png(out / "kept_ranks.png")
    assert not (out / "kept_structure.png").exists()  # original shapes unknown without estimate.json


def test_stale_figures_are_removed(tmp_path):
    run = make_run(tmp_path / "run")
    out = write_report(run)
    (run / "plan.json").unlink()
    write_report(run)
    assert not (out / "kept_structure.png").exists() and not (out / "kept_ranks.png").exists()
    assert "kept_ranks.png" not in (out / "summary.md").read_text()


def test_failing_plot_does_not_break_the_report(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")

    def boom(*_):
        raise RuntimeError("broken figure")

    monkeypatch.setitem(plots.PLOTS, "kept_ranks.png", boom)
    out = write_report(run)
    assert not (out / "kept_ranks.png").exists() and (out / "kept_structure.png").is_file()


def test_thirty_layer_run(tmp_path):
    out = write_report(make_run(tmp_path / "big", n_layers=30))
    for name in ALL_PNGS:
        assert_png(out / name)
    assert "| 29 | 4 / 6 | 2 / 2 | 10 / 16 |" in (out / "summary.md").read_text()


def test_module_grid_layout():
    names = [module_name(1, "v"), module_name(0, "down"), "model.layers.0.mlp.fc1", "lm_head"]
    grid, types = plots.module_grid(names, 2, lambda n: float(len(n)))
    assert types == [*TYPES, "fc1"] and grid.shape == (8, 2)
    assert grid[2, 1] == len(module_name(1, "v")) and grid[6, 0] == len(module_name(0, "down"))
    assert np.isnan(grid[0]).all()


@pytest.mark.parametrize("name", ALL_PNGS)
def test_plot_functions_accept_loaded_data(tmp_path, name):
    data = plots.RunData.load(make_run(tmp_path / "run"))
    assert plots.PLOTS[name](data, tmp_path / "fig" / name) == tmp_path / "fig" / name


def test_the_title_names_the_run_s_strategy(tmp_path):
    """A report heads with the strategy of the run's saved recipe (an APT run is not called Light-PEFT), and with
    Light-PEFT for a run directory that holds no recipe."""
    import yaml

    from lightpeft_dist.reporting.report import report_title
    from conftest import tiny_recipe_dict

    run = tmp_path / "r1"
    run.mkdir()
    assert report_title(run) == "Light-PEFT run: r1"
    raw = tiny_recipe_dict(tmp_path)
    (run / "recipe.yaml").write_text(yaml.safe_dump({**raw, "strategy": "apt", "apt": {"target_density": 0.7}}))
    assert report_title(run) == "APT run: r1"
