"""Specification of the command line: the pipeline resumes stage by stage, re-planning reuses the estimate, and
bad input fails with one `error:` line, a non-zero exit and nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from lightpeft_dist.cli import main
from tiny import save_tiny


def write_recipe(tmp_path: Path, raw: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def finished_run(tmp_path, tiny_recipe):
    cfg = write_recipe(tmp_path, tiny_recipe)
    run = tmp_path / "run"
    assert main(["run", "--config", cfg, "--run-dir", str(run)]) == 0
    return cfg, run


def mtimes(run: Path) -> dict[str, float]:
    files = ["estimate/estimate.json", "plan.json", "pruned_model/config.json", "train/train.json", "eval.json",
             "export/lightpeft_export.json"]
    return {f: (run / f).stat().st_mtime_ns for f in files}


def test_run_writes_every_artefact_and_resumes_stage_by_stage(finished_run, capsys):
    cfg, run = finished_run
    for rel in ("recipe.yaml", "estimate/scores.safetensors", "estimate/adapter/adapter_model.safetensors",
                "plan.json", "pruned_model/model.safetensors", "pruned_adapter/adapter_config.json",
                "train/adapter/adapter_model.safetensors", "eval.json", "report/summary.md"):
        assert (run / rel).is_file(), rel
    ev = json.loads((run / "eval.json").read_text())
    assert ev["pruned"]["params"]["total"] < ev["base"]["params"]["total"]
    before = mtimes(run)
    assert main(["run", "--config", cfg, "--run-dir", str(run)]) == 0
    assert mtimes(run) == before  # nothing redone
    # a train-only change redoes train, evaluate and export, nothing upstream
    assert main(["run", "--config", cfg, "--run-dir", str(run), "--train.steps=3"]) == 0
    after = mtimes(run)
    assert [f for f in before if before[f] != after[f]] == ["train/train.json", "eval.json",
                                                            "export/lightpeft_export.json"]
    assert json.loads((run / "train" / "train.json").read_text())["steps"] == 3


def test_replanning_at_new_ratios_reuses_the_estimate(finished_run):
    _, run = finished_run
    est = (run / "estimate" / "estimate.json").stat().st_mtime_ns
    old = json.loads((run / "plan.json").read_text())
    assert main(["plan", "--run-dir", str(run), "--ffn-ratio", "0.6", "--uniform"]) == 0
    new = json.loads((run / "plan.json").read_text())
    assert (run / "estimate" / "estimate.json").stat().st_mtime_ns == est
    assert new["summary"]["after"]["intermediate_size"] < old["summary"]["after"]["intermediate_size"]
    assert new["summary"]["uniform"]
    assert main(["prune", "--run-dir", str(run)]) == 0
    cfg = json.loads((run / "pruned_model" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "layer_shapes" not in cfg  # uniform -> stock config


def test_unknown_architecture_is_one_line_error_and_writes_nothing(tmp_path, tiny_recipe, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    tiny_recipe["model"]["path"] = str(tmp_path / "gpt2")
    cfg = write_recipe(tmp_path, tiny_recipe)
    assert main(["estimate", "--config", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "unsupported architecture 'GPT2LMHeadModel'" in line and "llama" in line
    assert not (tmp_path / "run" / "estimate").exists()


def test_bad_ratio_and_bad_override_are_rejected(finished_run, capsys):
    cfg, run = finished_run
    plan_before = (run / "plan.json").read_bytes()
    assert main(["plan", "--run-dir", str(run), "--attn-ratio", "1.2"]) == 2
    assert "prune.attn_ratio" in one_error_line(capsys)
    assert main(["run", "--config", cfg, "--run-dir", str(run), "--prune.atn_ratio=0.2"]) == 2
    assert "prune.atn_ratio: unknown key" in one_error_line(capsys)
    assert (run / "plan.json").read_bytes() == plan_before


def test_plan_for_another_model_is_refused(finished_run, tmp_path, capsys):
    _, run = finished_run
    other = save_tiny(tmp_path / "other", "llama-gqa", layers=3)
    assert main(["prune", "--run-dir", str(run), f"--model.path={other}"]) == 2
    assert "plan.json was made for model" in one_error_line(capsys)


def test_missing_and_corrupt_files(tmp_path, finished_run, capsys):
    _, run = finished_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    assert main(["prune", "--run-dir", str(empty)]) == 2
    assert "plan not found" in one_error_line(capsys)
    scores = run / "estimate" / "scores.safetensors"
    scores.write_bytes(scores.read_bytes()[:100])
    assert main(["plan", "--run-dir", str(run), "--attn-ratio", "0.5"]) == 2
    assert "corrupt" in one_error_line(capsys)
    (run / "plan.json").write_text("{not json")
    assert main(["prune", "--run-dir", str(run)]) == 2
    line = one_error_line(capsys)
    assert "plan at" in line and "corrupt" in line
    assert main(["plan", "--run-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_crash_mid_prune_leaves_no_partial_output(finished_run, monkeypatch):
    _, run = finished_run
    import shutil

    shutil.rmtree(run / "pruned_model")
    calls = {"n": 0}

    def flaky(*_args):  # the base model's shards are written first (src, dst, table, hidden)
        calls["n"] += 1
        raise OSError("disk full")

    monkeypatch.setattr("lightpeft_dist.pruning.slicing.prune_shard", flaky)
    with pytest.raises(OSError):
        main(["prune", "--run-dir", str(run)])
    assert calls["n"] == 1 and not (run / "pruned_model").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # temp dirs cleaned up


def test_console_script_exit_code_and_stderr(tmp_path):
    exe = Path(sys.executable).parent / "lightpeft"
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout, wherever the editable install points
    proc = subprocess.run([str(exe), "plan", "--run-dir", str(tmp_path / "none")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: run directory {tmp_path / 'none'} does not exist")


HEAVY_AT_START = r"""
import contextlib, io, sys
import lightpeft_dist.cli as cli
heavy = lambda: sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "deepspeed", "peft"})
codes, out = [], io.StringIO()
for argv in (["--help"], ["run", "--help"], ["plan", "--help"], [], ["calibrate"], ["nosuchstage"],
             ["plan", "--run-dir", "r", "--ffn-ratio", "half"], ["plan", "--run-dir", "r", "stray"]):
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            codes.append(cli.main(argv))
        except SystemExit as exc:
            codes.append(exc.code)
print(codes, heavy())
from transformers import AutoConfig  # the pruned model types still register, once transformers is imported
print(type(AutoConfig.for_model("lightpeft_llama")).__name__, "calibrate" in out.getvalue())
"""


@pytest.mark.parametrize("first", ["lightpeft_dist.models.pruned_model", "lightpeft_dist.pruning.slicing"])
def test_any_module_imported_first_still_registers_the_pruned_types(first):
    """Whichever of our modules a script imports first, transformers' Auto classes know the pruned model types
    afterwards (the module that imports transformers may be pruned_model itself, models/autoregister.py)."""
    code = (f"import {first}\nfrom transformers import AutoConfig\n"
            "print(*(type(AutoConfig.for_model(f'lightpeft_{f}')).__name__ for f in ('llama', 'qwen3')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["PrunedLlamaConfig", "PrunedQwen3Config"]


def test_help_and_usage_errors_import_no_torch():
    """`lightpeft --help`, a subcommand's help and usage errors answer without importing torch, transformers,
    DeepSpeed or peft (their import is most of a command's start-up; docs/benchmarks.md, "CLI start"); importing
    transformers later still registers the pruned model types (models/autoregister.py)."""
    repo = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", HEAVY_AT_START], capture_output=True, text=True, cwd=repo,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo})
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes, registered = proc.stdout.strip().splitlines()
    assert codes == "[0, 0, 0, 2, 2, 2, 2, 2] []", proc.stdout
    assert registered == "PrunedLlamaConfig True", proc.stdout
