"""`report.baseline_lora` (what `lightpeft demo` turns on): LoRA on the unpruned model, in the same run, beside the
pruned model in one three-column table.

One tiny run with the baseline on (module scope: a few seconds of training on 2 cores) answers every check: the
table's numbers are the records' numbers, its parameter counts are direct counts of the three final models, the
baseline's "pruned" model is the base model tensor for tensor, its LoRA started fresh, and a rerun skips every
finished stage, the baseline's own included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from lightpeft_dist.adapters.registry import count_parameters, load_adapters
from lightpeft_dist.cli import _baseline_overrides, _parser, main
from lightpeft_dist.config import apply_overrides
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import read_json, write_json
from lightpeft_dist.models.loading import load_model
from lightpeft_dist.ownership import open_run_dir
from lightpeft_dist.reporting.flops import step_flops, tensor_numel
from lightpeft_dist.reporting.report import COMPARISON_HEAD, summary_table
from lightpeft_dist.rundir import RunDir
from lightpeft_dist.runtime import CPU_STAGE_PEAK, peak_memory, reset_peak_memory

ROWS = ("accuracy (eval)", "parameters (total)", "trainable parameters", "training tokens/s", "inference tokens/s",
        "peak memory, training", "peak memory, estimate", "wall time (estimate + train)", "FLOPs (estimate + train)")


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """(run directory, recipe dict, stdout of the run) of one tiny run with --baseline-lora."""
    root = tmp_path_factory.mktemp("baseline")
    raw = tiny_recipe_dict(root)
    (root / "r.yaml").write_text(yaml.safe_dump(raw))
    run_dir = root / "run"
    out = root / "stdout.txt"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["run", "--config", str(root / "r.yaml"), "--run-dir", str(run_dir), "--baseline-lora",
                     "--estimate.steps=3", "--train.steps=3", "--report.speed_rounds=2",
                     "--logging.report_to=[none]"]) == 0
    return run_dir, raw, out.read_text()


def _table(text: str) -> dict[str, list[str]]:
    """The three-column table printed at the end, by row label."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| ") and "LoRA on the unpruned model" in line)
    end = next((i for i in range(head, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[head:end] if line.startswith("| ")]
    assert tuple(cells[0]) == COMPARISON_HEAD
    return {row[0]: row[1:] for row in cells[1:]}


def _config(model_dir: Path) -> dict:
    return read_json(Path(model_dir) / "config.json")


def _final(path: str, adapter: Path | None = None):
    model = load_model(path, "float32", "sdpa")
    return model if adapter is None else load_adapters(model, adapter)


def test_table_numbers_are_the_records_and_direct_counts(baseline_run):
    run_dir, raw, stdout = baseline_run
    d, lora = RunDir(run_dir), RunDir(RunDir(run_dir).baseline_lora)
    table = _table(stdout)
    assert set(ROWS) <= set(table)
    assert _table((d.report / "summary.md").read_text()) == table  # the same table in report/summary.md
    ev, lora_ev, record = read_json(d.eval_record), read_json(lora.eval_record), read_json(d.baseline_record)
    assert table["accuracy (eval)"] == [f"{ev['base']['accuracy']:.2%}", f"{lora_ev['pruned']['accuracy']:.2%}",
                                        f"{ev['pruned']['accuracy']:.2%}"]
    assert table["inference tokens/s"] == [f"{record['infer_tokens_per_s'][c]:,.0f}"
                                           for c in ("zero-shot", "lora", "pruned")]
    train, lora_train, est = read_json(d.train_record), read_json(lora.train_record), read_json(d.estimate_record)
    assert table["training tokens/s"] == ["-", f"{lora_train['tokens_per_s']:,.0f}", f"{train['tokens_per_s']:,.0f}"]
    assert table["peak memory, training"][1:] == [f"{r['peak_memory']['bytes'] / 2 ** 20:,.0f} MiB"
                                                  for r in (lora_train, train)]
    walls = (est["stage_seconds"], train["stage_seconds"])
    assert table["wall time (estimate + train)"][2].startswith(f"{sum(walls):,.0f} s")
    assert table["wall time (estimate + train)"][1] == f"{lora_train['stage_seconds']:,.0f} s (train)"
    # FLOPs: the analytic count of each record's tokens on its own model (tests/test_flops.py checks the formula)
    lora_f = step_flops(lora_train["tokens"], raw["train"]["seq_len"], _config(lora.pruned_model),
                        lora_train["params"]["trainable"])
    est_f = step_flops(est["tokens"], raw["estimate"]["seq_len"], _config(Path(raw["model"]["path"])),
                       tensor_numel(d.estimate_adapter))
    train_f = step_flops(train["tokens"], raw["train"]["seq_len"], _config(d.pruned_model),
                         train["params"]["trainable"])
    assert table["FLOPs (estimate + train)"][1] == f"{lora_f:.3g} (train)"
    assert table["FLOPs (estimate + train)"][2].startswith(f"{est_f + train_f:.3g} (estimate {est_f:.3g} + train "
                                                           f"{train_f:.3g}; {(est_f + train_f) / lora_f:.2f}x")
    # parameter counts: a direct count of each final model
    models = {"base": _final(raw["model"]["path"]),
              "lora": _final(str(lora.pruned_model), lora.train_adapter),
              "pruned": _final(str(d.pruned_model), d.train_adapter)}
    counts = {k: count_parameters(m) for k, m in models.items()}
    assert table["parameters (total)"] == [f"{counts[k]['total']:,}" for k in ("base", "lora", "pruned")]
    assert table["trainable parameters"] == ["-", f"{counts['lora']['adapter']:,}", f"{counts['pruned']['adapter']:,}"]
    assert counts["pruned"]["total"] < counts["lora"]["total"]  # the pruned model is smaller, the baseline is not
    if os.path.exists("/proc/self/clear_refs"):
        assert train["peak_memory"]["measure"] == CPU_STAGE_PEAK


def test_baseline_is_the_base_model_with_fresh_lora_and_the_same_training(baseline_run):
    run_dir, raw, _ = baseline_run
    lora = RunDir(RunDir(run_dir).baseline_lora)
    base = load_model(raw["model"]["path"], "float32", "sdpa").state_dict()
    kept = load_model(str(lora.pruned_model), "float32", "sdpa").state_dict()
    assert base.keys() == kept.keys()
    assert all(torch.equal(base[k], kept[k]) for k in base)
    saved = yaml.safe_load(lora.recipe.read_text())
    assert saved["train"]["warm_start"] is False and saved["report"]["baseline_lora"] is False
    assert all(saved["prune"][f"{k}_ratio"] == 0 for k in ("attn", "ffn", "module", "rank"))
    assert read_json(lora.train_record)["steps"] == read_json(RunDir(run_dir).train_record)["steps"] == 3
    assert saved["data"] == yaml.safe_load(RunDir(run_dir).recipe.read_text())["data"]
    # the estimate is the run's own, linked, not re-estimated
    assert (lora.estimate_record).samefile(RunDir(run_dir).estimate_record)
    assert lora.marker.is_file()


def test_rerun_skips_every_finished_stage(baseline_run, caplog):
    run_dir, _, _ = baseline_run
    d = RunDir(run_dir)
    records = [d.estimate_record, d.train_record, d.eval_record, d.baseline_record,
               RunDir(d.baseline_lora).train_record, RunDir(d.baseline_lora).eval_record]
    before = {p: p.stat().st_mtime_ns for p in records}
    with caplog.at_level(logging.INFO):
        assert main(["run", "--run-dir", str(run_dir)]) == 0  # the saved recipe keeps the baseline on
    skipped = {m.split(":")[0].removeprefix("stage ") for m in caplog.messages if m.endswith("up to date, skipped")}
    assert {"estimate", "plan", "prune", "train", "evaluate", "export", "baseline"} <= skipped
    assert {p: p.stat().st_mtime_ns for p in records} == before


def test_a_stale_baseline_record_is_left_out_of_the_report(baseline_run, tmp_path):
    """After the run's evaluation changes, the old LoRA column must not sit beside the new numbers."""
    run_dir, _, _ = baseline_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ev = read_json(RunDir(copy).eval_record)
    write_json(RunDir(copy).eval_record, {**ev, "key": "another"})
    table = summary_table(copy)
    assert "LoRA on the unpruned model" not in table and "after (pruned + LoRA)" in table


def test_baseline_folder_must_be_a_real_folder(tmp_path, tiny_recipe):
    run_dir = tmp_path / "run"
    with open_run_dir(run_dir, create=True):
        pass
    (run_dir / RunDir(run_dir).baseline_lora.name).write_text("not a run")
    with pytest.raises(LightPeftError, match="is a file where lightpeft writes a folder"):
        with open_run_dir(run_dir, create=True):
            pass
    (run_dir / "baseline_lora").unlink()
    (run_dir / "baseline_lora").symlink_to(tmp_path)
    with pytest.raises(LightPeftError, match="symbolic link"):
        with open_run_dir(run_dir, create=True):
            pass


def test_peak_memory_is_reset_per_stage():
    """What one stage allocated and freed does not count as the next stage's peak."""
    if not os.path.exists("/proc/self/clear_refs") or torch.cuda.is_available():
        pytest.skip("the per-stage reset is Linux's /proc/self/clear_refs (CPU)")
    reset_peak_memory()
    big = torch.ones(32 * 2 ** 20)  # 128 MiB, touched
    high = peak_memory()["bytes"]
    del big
    assert reset_peak_memory() == CPU_STAGE_PEAK
    assert peak_memory()["bytes"] < high - 64 * 2 ** 20


def test_demo_turns_the_baseline_on_and_an_override_can_turn_it_off():
    def baseline(argv: list[str]) -> bool:
        args, rest = _parser().parse_known_args(argv)
        raw = apply_overrides({"report": {}}, _baseline_overrides(args) + rest)
        return bool(raw["report"].get("baseline_lora"))

    assert baseline(["demo"]) and baseline(["run", "--run-dir", "D", "--baseline-lora"])
    assert not baseline(["run", "--run-dir", "D"])
    assert not baseline(["demo", "--report.baseline_lora=false"])


def test_an_apt_run_gets_its_lora_baseline_through_apts_own_plan(tmp_path):
    """APT prunes through its own section and plan stage: its baseline keeps every block (density 1) and trains a
    plain fresh LoRA (no rank growth) on the unpruned model, from the run's calibration, and the run's table has the
    three columns."""
    from test_apt import write_recipe

    recipe = write_recipe(tmp_path, {"target_density": 0.6, "calibration_samples": 8, "batch_size": 4, "seq_len": 24,
                                     "rank_growth": 2.0, "window": 6, "checkpoints": 2, "ramp": 1})
    run = tmp_path / "run"
    out = tmp_path / "stdout.txt"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        assert main(["run", "--config", str(recipe), "--run-dir", str(run), "--baseline-lora",
                     "--report.speed_rounds=1", "--logging.report_to=[none]"]) == 0
    d, lora = RunDir(run), RunDir(RunDir(run).baseline_lora)
    saved = yaml.safe_load(lora.recipe.read_text())
    assert saved["strategy"] == "apt" and saved["apt"]["target_density"] == 1.0 and saved["apt"]["rank_growth"] == 1.0
    assert saved["train"]["warm_start"] is False
    base = load_model(str(tmp_path / "model"), "float32", "sdpa").state_dict()
    kept = load_model(str(lora.pruned_model), "float32", "sdpa").state_dict()
    assert base.keys() == kept.keys() and all(torch.equal(base[k], kept[k]) for k in base)
    assert (lora.estimate_record).samefile(d.estimate_record)  # the run's calibration, linked
    # plain LoRA: every module at the recipe's rank, while the run's own adapter grew
    adapter = read_json(lora.train_adapter / "adapter_config.json")
    assert adapter["r"] == 4 and set(adapter.get("rank_pattern", {}).values()) <= {4}
    assert read_json(lora.train_record).get("structure") is None
    assert max(read_json(d.train_record)["structure"]["lora_ranks"].values()) > 4
    table = _table(out.read_text())
    assert table["accuracy (eval)"][1] == f"{read_json(lora.eval_record)['pruned']['accuracy']:.2%}"
    counts = [int(c.replace(",", "")) for c in table["parameters (total)"]]
    assert counts[2] < counts[0] < counts[1]  # pruned < base < base + LoRA
