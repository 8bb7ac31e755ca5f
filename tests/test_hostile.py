"""Hostile input (issue 16): bad files, bad settings, edited artefacts and diverged runs end in one `error:` line and
a non-zero exit, with the input files untouched and no stage output half-written. Each section is self-contained
(its own fixtures and helpers) and names the issue classes it covers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_recipe_dict
from fork_cli import run_cli, run_python_m
from lightpeft_dist.cli import main
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pruning.plan import read_plan
from lightpeft_dist.reporting.report import write_report
from lightpeft_dist.rundir import RunDir


# --- classes 2, 3, 5, 8: pickles, non-finite values, tracebacks, late checks ---

Mutation = Callable[[Path, dict], list[str]]  # (tmp_path, recipe dict) -> extra CLI arguments


RUN_METADATA = (RunDir(".").marker.name, RunDir(".").lock.name)  # a run directory's own bookkeeping


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (folders map to None, files to their bytes), less the run directories' marker and
    lock: a stage that started writes them along with its recipe.yaml (the lock holds the holder's pid)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")
            if p.name not in RUN_METADATA}


def _refused(tmp_path: Path, argv: list[str], expect: list[str], new_ok: set[str] = frozenset(),
             env: dict[str, str] | None = None) -> str:
    """Run the CLI as its own process; check exit 2, one `error:` line holding every `expect` word, no traceback,
    every file that was there byte-identical, and nothing new but `new_ok` (paths relative to tmp_path)."""
    before = _tree(tmp_path)
    proc = run_cli(argv, tmp_path, env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert all(word in errors[0] for word in expect), errors[0]
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs byte-identical, none removed
    new = set(after) - set(before)  # no (half-)written output; an entry "D/" in new_ok allows D and all under it
    folders = [ok.rstrip("/") for ok in new_ok if ok.endswith("/")]
    assert all(p in new_ok or any(p == f or p.startswith(f + "/") for f in folders) for p in new), sorted(new)
    return errors[0]


def _write_recipe(tmp_path: Path, raw: dict) -> str:
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "recipe.yaml")


def _model_file(tmp_path: Path) -> Path:
    return tmp_path / "model" / "model.safetensors"


def _pickle_only(tmp_path: Path, raw: dict) -> list[str]:
    weights = _model_file(tmp_path)
    torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
    weights.unlink()
    return []


def _truncated(tmp_path: Path, raw: dict) -> list[str]:
    data = _model_file(tmp_path).read_bytes()
    _model_file(tmp_path).write_bytes(data[: len(data) // 2])
    return []


def _garbage_weights(tmp_path: Path, raw: dict) -> list[str]:
    _model_file(tmp_path).write_bytes(b"\x17garbage, not a safetensors header" * 40)
    return []


def _garbage_config(tmp_path: Path, raw: dict) -> list[str]:
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return []


def _ds_config(content: bytes) -> Mutation:
    def mutate(tmp_path: Path, raw: dict) -> list[str]:
        (tmp_path / "ds.json").write_bytes(content)
        return ["--deepspeed", str(tmp_path / "ds.json")]

    return mutate


def _set(section: str, key: str, value) -> Mutation:
    def mutate(tmp_path: Path, raw: dict) -> list[str]:
        raw[section][key] = value
        return []

    return mutate


def _run_dir_is_file(tmp_path: Path, raw: dict) -> list[str]:
    (tmp_path / "run").write_text("a file where the run directory should be\n")
    return []


def _run_dir_under_file(tmp_path: Path, raw: dict) -> list[str]:
    (tmp_path / "blocker").write_text("a file\n")
    return ["--run-dir", str(tmp_path / "blocker" / "run")]  # argparse keeps the last --run-dir


def _eval_rows(rows: str) -> Mutation:
    def mutate(tmp_path: Path, raw: dict) -> list[str]:
        Path(raw["data"]["eval_file"]).write_text(rows)
        return []

    return mutate


def _train_rows(rows: str) -> Mutation:
    def mutate(tmp_path: Path, raw: dict) -> list[str]:
        Path(raw["data"]["train_file"]).write_text(rows)
        return []

    return mutate


# (stage, mutation, words the error line must hold): each is refused before the first stage starts
REFUSED_AT_VALIDATION: dict[str, tuple[str, Mutation, list[str]]] = {
    "pickle-only model": ("run", _pickle_only, ["pickle", "pytorch_model.bin", "save_pretrained"]),
    "truncated safetensors": ("run", _truncated, ["model.safetensors", "truncated"]),
    "garbage safetensors": ("run", _garbage_weights, ["model.safetensors", "not a readable safetensors"]),
    "garbage config.json": ("run", _garbage_config, ["config.json", "transformers cannot read"]),
    "non-UTF-8 DeepSpeed config": ("estimate", _ds_config(b'{"zero_optimization": {"stage": 3}, "n": "\xe9"}'),
                                   ["DeepSpeed config", "UTF-8"]),
    "DeepSpeed stage 7": ("estimate", _ds_config(b'{"zero_optimization": {"stage": 7}}'),
                          ["zero_optimization.stage is 7"]),
    "peft.targets []": ("run", _set("peft", "targets", []), ["peft.targets"]),
    "empty label word": ("run", _set("data", "labels", {"positive": "positive", "negative": " "}),
                         ["data.labels", "'negative'", "empty verbalizer word"]),
    "identical label words": ("run", _set("data", "labels", {"positive": "good", "negative": "good"}),
                              ["data.labels", "share the verbalizer word 'good'"]),
    "inf learning rate": ("run", _set("estimate", "lr", math.inf), ["estimate.lr", "finite"]),
    "run dir is a file": ("run", _run_dir_is_file, ["is a file"]),
    "run dir cannot be created": ("run", _run_dir_under_file, ["cannot be created", "blocker"]),
    "missing eval_file": ("run", _set("data", "eval_file", "no_such_eval.jsonl"), ["data.eval_file not found"]),
    "no eval split": ("run", _set("data", "eval_file", None), ["evaluate stage needs data.eval_file"]),
    "max_eval_examples 0": ("run", _set("data", "max_eval_examples", 0), ["data.max_eval_examples"]),
    "eval file lacks a column": ("run", _eval_rows('{"sentence": "good movie", "label": "positive"}\n'),
                                 ["data.eval_file", "lacks column 'text'"]),
    "train file is not jsonl": ("estimate", _train_rows("text,label\ngood movie,positive\n"),
                                ["data.train_file", "line 1 is not JSON"]),
}


@pytest.mark.parametrize("case", list(REFUSED_AT_VALIDATION))
def test_refused_before_the_first_stage(case, tmp_path, tiny_recipe):
    stage, mutate, expect = REFUSED_AT_VALIDATION[case]
    extra = mutate(tmp_path, tiny_recipe)
    _refused(tmp_path, [stage, "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir",
                        str(tmp_path / "run"), *extra], expect)


def test_non_utf8_recipe_and_unparsable_saved_recipe(tmp_path, tiny_recipe):
    tiny_recipe["data"]["template"] = "critique : {text} sentiment :"
    (tmp_path / "latin1.yaml").write_bytes(yaml.safe_dump(tiny_recipe, allow_unicode=True).replace(
        "critique", "critiqu\u00e9").encode("latin-1"))
    _refused(tmp_path, ["run", "--config", str(tmp_path / "latin1.yaml"), "--run-dir", str(tmp_path / "run")],
             ["latin1.yaml", "not UTF-8", "0xe9"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("model: {path: [unclosed\n")
    _refused(tmp_path, ["plan", "--run-dir", str(tmp_path / "run")], ["saved recipe", "not valid YAML", "--config"])


def test_pickle_case_is_the_same_as_a_plain_python_m_process(tmp_path, tiny_recipe):
    """The forked runner against a plain `python -m lightpeft_dist` process, on the pickle case."""
    _pickle_only(tmp_path, tiny_recipe)
    argv = ["run", "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "run")]
    plain = run_python_m(argv, tmp_path)
    line = _refused(tmp_path, argv, ["pickle"])
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr[-4000:]
    assert [e for e in plain.stderr.splitlines() if e.startswith("error:")] == [line]
    assert not (tmp_path / "run").exists()


def test_no_module_unpickles():
    """torch.load (weights-only or not) appears nowhere in the package; models and adapters load as safetensors."""
    package = Path(__file__).resolve().parent.parent / "lightpeft_dist"
    sources = {p: p.read_text() for p in package.rglob("*.py")}
    assert not [p for p, text in sources.items() if re.search(r"torch\.load\b|pickle\.load|weights_only", text)]
    loading = sources[package / "models" / "loading.py"]
    assert "use_safetensors=True" in loading and "output_loading_info=True" in loading


def _drop_tensor(path: Path, prefix: str) -> str:
    tensors = load_file(path)
    name = sorted(k for k in tensors if k.startswith(prefix))[0]
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_model_with_a_missing_or_extra_tensor_is_refused(change, tmp_path, tiny_recipe):
    if change == "missing":
        name = _drop_tensor(_model_file(tmp_path), "model.layers.1.mlp")
    else:
        name = "model.layers.0.extra.weight"
        tensors = load_file(_model_file(tmp_path))
        save_file({**tensors, name: torch.zeros(3)}, _model_file(tmp_path), metadata={"format": "pt"})
    argv = ["run", "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "run")]
    _refused(tmp_path, argv, [f"1 {change} ({name})", "do not match its config.json"], {"run", "run/recipe.yaml"})


def test_diverging_estimate_stops_at_the_step_and_writes_nothing(tmp_path, tiny_recipe):
    argv = ["run", "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "run"),
            "--estimate.lr=1e15"]
    line = _refused(tmp_path, argv, ["estimate: the loss is nan at step 2", "lower estimate.lr"],
                    {"run", "run/recipe.yaml", "run/logs/"})  # metric logs of the stopped run are kept, for the user
    assert "output was not written" in line and not (tmp_path / "run" / "estimate").exists()


def test_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_recipe):
    tiny_recipe["estimate"]["checkpoint_every"] = 2
    argv = ["estimate", "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "run")]
    killed = run_cli(argv, tmp_path, {"LIGHTPEFT_FAULT_AFTER": "0:3"})  # SIGKILL after step 3 (checkpointed)
    assert killed.returncode == -9, killed.stderr[-4000:]
    state = tmp_path / "run" / "estimate.ckpt" / "state.safetensors"
    name = _drop_tensor(state, "param/")
    _refused(tmp_path, argv, ["estimate.ckpt", "is incomplete", name, "delete it"])


def test_non_finite_scores_are_refused_by_plan(tmp_path, tiny_recipe):
    argv = ["estimate", "--config", _write_recipe(tmp_path, tiny_recipe), "--run-dir", str(tmp_path / "run")]
    assert run_cli(argv, tmp_path).returncode == 0
    scores = tmp_path / "run" / "estimate" / "scores.safetensors"
    with safe_open(str(scores), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(scores)
    tensors["ffn.1"][3] = float("nan")
    save_file(tensors, scores, metadata=metadata)
    _refused(tmp_path, ["plan", "--run-dir", str(tmp_path / "run")], ["non-finite", "ffn.1", "rerun estimate"])


def test_non_finite_values_are_refused_in_process(tmp_path):
    """The checks behind the CLI cases: scores before writing, the loss of a step, evaluation metrics."""
    from lightpeft_dist.config import DataConfig
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.pipeline.metrics import classification_accuracy
    from lightpeft_dist.pruning.scores import Scores, save_scores
    from lightpeft_dist.training.finite import check_loss, check_metrics
    from tiny import tiny_model, tiny_tokenizer

    with pytest.raises(LightPeftError, match="non-finite values .*head.0"):
        save_scores(tmp_path / "s.safetensors", Scores(head=[torch.tensor([1.0, math.inf])], ffn=[torch.ones(2)]))
    assert not list(tmp_path.iterdir())
    with pytest.raises(LightPeftError, match=r"train: the loss is inf at step 5; .*train\.lr"):
        check_loss("train", 4, math.inf)
    with pytest.raises(LightPeftError, match="first step .*non-finite weights"):
        check_loss("estimate", 0, math.nan)
    check_loss("train", 3, 2.5)
    check_metrics("evaluation", {"loss": 30.0, "perplexity": math.inf})
    with pytest.raises(LightPeftError, match="accuracy is nan"):
        check_metrics("evaluation", {"accuracy": math.nan})
    tok, model = tiny_tokenizer(), tiny_model(vocab=len(tiny_tokenizer()))
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    cfg = DataConfig(format="classification", train_file="unused", labels={"positive": "good", "negative": "bad"},
                     template="review : {text} sentiment :")
    with pytest.raises(LightPeftError, match="label log-probabilities hold non-finite values"):
        classification_accuracy(model, tok, [{"text": "good movie", "label": "positive"}], cfg, 24, 4)


def test_adapter_is_read_as_complete_safetensors_only(tmp_path):
    """PEFT would unpickle adapter_model.bin and keep a missing LoRA tensor at its fresh value; load_adapter refuses."""
    from lightpeft_dist.config import PeftConfig
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.adapters.lora import load_adapter
    from lightpeft_dist.adapters.registry import attach_adapters
    from tiny import tiny_model

    attach_adapters(tiny_model(), PeftConfig(r=2, targets=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert load_adapter(tiny_model(), tmp_path / "adapter") is not None
    name = _drop_tensor(weights, "base_model.model.model.layers.1")
    with pytest.raises(LightPeftError, match=f"adapter at .* is incomplete .*{re.escape(name[:40])}"):
        load_adapter(tiny_model(), tmp_path / "adapter")
    torch.save(load_file(weights), weights.with_name("adapter_model.bin"))
    weights.unlink()
    with pytest.raises(LightPeftError, match=r"only pickle weights \(adapter_model.bin\)"):
        load_adapter(tiny_model(), tmp_path / "adapter")


# --- class 4: trusted artefacts ---
# A plan or score file is checked on every read (indices, GQA, counts, hash; shapes and finite values), a stage
# whose input changed under it says so, and the report takes its numbers from one plan only. The pipeline runs once
# per module; each case copies the finished run directory, damages one artefact and runs one CLI command in a
# subprocess, so the exit code and stderr are what a user sees.

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


def c4_snapshot(run: Path) -> dict[str, str]:
    """Every file's hash, except the run lock, which each command that opens the run rewrites with its own pid."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != RunDir(run).lock.name}


def c4_fails(run: Path, *args: str) -> str:
    """Run one command that must refuse: exit 2, one `error:` line, no traceback, the run directory untouched
    (byte for byte, no new or temporary files). Returns the error line."""
    before = c4_snapshot(run)
    proc = c4_cli(*args, "--run-dir", str(run))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert c4_snapshot(run) == before
    return errors[0]


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
    before = {k: v for k, v in c4_snapshot(run).items() if not k.startswith("report/")}
    proc = c4_cli("report", "--run-dir", str(run))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr[-3000:]
    assert {k: v for k, v in c4_snapshot(run).items() if not k.startswith("report/")} == before
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


# --- classes 1, 6, 7: run directory ownership, missing run dirs, concurrency ---
# Every CLI case runs as its own process (real stderr, real exit code). Importing the CLI costs ~10 s of CPU, so the
# processes are forked from one server that imported it once; a fork is a fresh process all the same.

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from conftest import tiny_recipe_dict  # noqa: E402
from lightpeft_dist.errors import LightPeftError  # noqa: E402
from lightpeft_dist.io_utils import atomic_dir  # noqa: E402
from lightpeft_dist.ownership import open_run_dir  # noqa: E402
from lightpeft_dist.rundir import MANIFEST, RunDir  # noqa: E402
from lightpeft_dist.runtime import Runtime  # noqa: E402

OWN_REPO = Path(__file__).resolve().parent.parent
OWN_FEW = ["--estimate.steps=2", "--train.steps=2"]
OWN_SERVER = r"""
import json, os, sys, time, traceback
from pathlib import Path
from lightpeft_dist.cli import _parser, main
from lightpeft_dist.ownership import run_lock
_parser()  # imports every stage module once, before any fork
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if "reap" in job:
        _, status = os.waitpid(job["reap"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            if job["argv"][0] == "hold-lock":  # a stand-in for a long run: holds the lock through the API
                with run_lock(Path(job["argv"][1]), "lightpeft run"):
                    print("locked", flush=True)
                    time.sleep(120)
            code = main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    if job["wait"]:
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
    else:
        print(json.dumps({"pid": pid}), flush=True)
"""


class OwnCli:
    """Runs `lightpeft ...` in a process forked from the server; returns (exit code, stdout, stderr)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen([sys.executable, "-c", OWN_SERVER], cwd=OWN_REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "ready" in self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the CLI server died"
        return json.loads(line)

    def _send(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, *argv: str, cwd: Path | None = None, wait: bool = True) -> tuple[dict, Path, Path]:
        self.n += 1
        out, err = self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"
        reply = self._send({"argv": [str(a) for a in argv], "cwd": str(cwd or self.logs), "out": str(out),
                            "err": str(err), "wait": wait})
        return reply, out, err

    def __call__(self, *argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
        reply, out, err = self.start(*argv, cwd=cwd)
        return reply["rc"], out.read_text(), err.read_text()

    def hold_lock(self, run_dir: Path) -> int:
        reply, out, _ = self.start("hold-lock", run_dir, wait=False)
        deadline = time.monotonic() + 60
        while not (out.is_file() and "locked" in out.read_text()):
            assert time.monotonic() < deadline, "the lock holder never took the lock"
            time.sleep(0.05)
        return reply["pid"]

    def reap(self, pid: int) -> int:
        return self._send({"reap": pid})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def own_cli(tmp_path_factory):
    cli = OwnCli(tmp_path_factory.mktemp("own_logs"))
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def own_finished(own_cli, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, finished run directory): the tiny recipe (conftest.tiny_recipe_dict) run end to end, 2 steps."""
    d = tmp_path_factory.mktemp("own_run")
    (d / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(d)))
    rc, _, err = own_cli("run", "--config", d / "recipe.yaml", "--run-dir", d / "run", *OWN_FEW)
    assert rc == 0, err[-3000:]
    return d / "recipe.yaml", d / "run"


@pytest.fixture
def own_run(own_finished, tmp_path) -> Path:
    """A private copy of the finished run (links kept as links)."""
    shutil.copytree(own_finished[1], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def own_tree(root: Path) -> dict[str, object]:
    """Everything under `root`, links not followed: path -> bytes, 'dir' or ('link', target)."""
    out: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def own_one_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one `error:` line (holding every needle), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def own_no_half_written(run: Path) -> None:
    """No temporary sibling is left, and every stage folder that exists holds its record (it was published whole)."""
    assert not [p for p in run.rglob("*.tmp")], sorted(run.rglob("*.tmp"))
    for folder, record in RunDir(run).replaced_folders().items():
        assert not (run / folder).exists() or (run / folder / record).is_file(), folder


def test_user_files_in_the_run_dir_or_a_stage_folder_are_never_touched(own_cli, own_finished, own_run, tmp_path):
    recipe, _ = own_finished
    mine = tmp_path / "mine"  # the user's own folder, given as --run-dir by mistake
    (mine / "train").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "train" / "data.jsonl").write_text('{"text": "mine"}\n')
    before = own_tree(mine)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", mine, *OWN_FEW)
    own_one_error(rc, err, str(mine), "notes.txt", "not a run directory")
    assert own_tree(mine) == before  # nothing written, not even a marker or a lock

    (mine / "notes.txt").unlink()  # only a folder named like a stage's: still not one that we wrote
    before = own_tree(mine)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", mine, *OWN_FEW)
    own_one_error(rc, err, str(mine / "train"), "not written by lightpeft")
    assert own_tree(mine) == before

    (own_run / "train" / "notes.txt").write_text("my notes on this run")  # inside a stage folder we wrote
    before = own_tree(own_run)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
    own_one_error(rc, err, str(own_run / "train" / "notes.txt"), "not written by lightpeft")
    assert own_tree(own_run) == before  # refused before any stage ran: train/ was not replaced
    own_no_half_written(own_run)


def test_a_foreign_file_that_appears_during_a_stage_stops_the_swap(tmp_path):
    out = tmp_path / "train"
    with atomic_dir(out) as tmp:
        (tmp / "train.json").write_text("{}")
    with pytest.raises(LightPeftError, match="notes.txt was not written by lightpeft"):
        with atomic_dir(out) as tmp:
            (tmp / "train.json").write_text('{"new": 1}')
            (out / "notes.txt").write_text("added while the stage ran")
    assert (out / "notes.txt").read_text() == "added while the stage ran" and (out / "train.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temporaries left behind


@pytest.mark.parametrize("stage", ["run", "plan", "report"])
def test_empty_run_dir_is_refused(own_cli, own_finished, tmp_path, stage):
    (tmp_path / "notes.txt").write_text("the current directory is the user's")
    before = own_tree(tmp_path)
    config = ["--config", own_finished[0]] if stage == "run" else []
    rc, _, err = own_cli(stage, *config, "--run-dir", "", cwd=tmp_path)
    own_one_error(rc, err, "--run-dir is empty")
    assert own_tree(tmp_path) == before


def test_a_symlinked_stage_folder_or_run_dir_is_refused(own_cli, own_finished, own_run, tmp_path):
    recipe, _ = own_finished
    elsewhere = tmp_path / "elsewhere"  # the link's target: not ours, whatever it holds
    shutil.move(own_run / "train", elsewhere)
    (elsewhere / "notes.txt").write_text("mine")
    (own_run / "train").symlink_to(elsewhere, target_is_directory=True)
    before, target = own_tree(own_run), own_tree(elsewhere)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
    own_one_error(rc, err, str(own_run / "train"), "symbolic link")
    assert own_tree(own_run) == before and own_tree(elsewhere) == target
    own_no_half_written(own_run)

    link = tmp_path / "linked-run"  # a run directory that is a link leads to the user's folder
    link.symlink_to(elsewhere, target_is_directory=True)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", link, *OWN_FEW)
    own_one_error(rc, err, "not a run directory")
    assert own_tree(elsewhere) == target


@pytest.mark.parametrize("stage", ["report", "plan", "prune"])
def test_a_stage_on_a_missing_run_dir_is_an_error_and_creates_nothing(own_cli, tmp_path, stage):
    rc, out, err = own_cli(stage, "--run-dir", tmp_path / "typo" / "run")
    own_one_error(rc, err, str(tmp_path / "typo" / "run"), "does not exist")
    assert list(tmp_path.iterdir()) == [] and "|" not in out  # no folder, no empty table

    (tmp_path / "empty").mkdir()  # an existing empty folder holds no run either
    rc, _, err = own_cli(stage, "--run-dir", tmp_path / "empty")
    own_one_error(rc, err, "holds no run yet")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_second_run_is_refused_naming_the_holder(own_cli, own_finished, own_run):
    recipe, _ = own_finished
    holder = own_cli.hold_lock(own_run)
    try:
        before = own_tree(own_run)
        rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
        own_one_error(rc, err, f"in use by pid {holder} ", "lightpeft run")
        assert own_tree(own_run) == before  # not one stage redone or started
    finally:
        os.kill(holder, signal.SIGTERM)
        own_cli.reap(holder)


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(own_cli, own_run):
    holder = own_cli.hold_lock(own_run)
    os.kill(holder, signal.SIGKILL)
    assert own_cli.reap(holder) == -signal.SIGKILL
    assert json.loads(RunDir(own_run).lock.read_text())["pid"] == holder  # the dead holder's note is still there
    rc, _, err = own_cli("plan", "--run-dir", own_run)
    assert rc == 0, err[-3000:]
    assert json.loads(RunDir(own_run).lock.read_text())["pid"] != holder


def test_other_ranks_take_no_lock_and_share_rank_0s_verdict(own_cli, own_run, monkeypatch):
    """Under DeepSpeed, torchrun or Slurm only rank 0 checks and locks; every rank raises rank 0's error."""
    holder = own_cli.hold_lock(own_run)
    try:
        rank1 = Runtime(rank=1, world_size=2)
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: [None, obj])
        with open_run_dir(own_run, create=False, runtime=rank1):  # rank 1 of a job whose rank 0 holds the lock
            pass
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: ["rank 0 was refused", obj])
        with pytest.raises(LightPeftError, match="rank 0 was refused"):
            with open_run_dir(own_run, create=False, runtime=rank1):
                pass
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: [obj, None])
        with pytest.raises(LightPeftError, match=f"in use by pid {holder} "):
            with open_run_dir(own_run, create=False, runtime=Runtime(rank=0, world_size=2)):
                pass
    finally:
        os.kill(holder, signal.SIGTERM)
        own_cli.reap(holder)


def test_a_run_dir_from_before_markers_is_adopted_and_resumes(own_cli, own_finished, own_run):
    recipe, _ = own_finished
    d = RunDir(own_run)
    d.marker.unlink()
    d.lock.unlink()
    for manifest in own_run.rglob(MANIFEST):
        manifest.unlink()
    (own_run / "train" / "notes.txt").write_text("an old train/ folder cannot prove what is ours")
    old_train = own_tree(own_run / "train")
    record = d.estimate_record.stat().st_mtime_ns
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, *OWN_FEW)
    assert rc == 0, err[-3000:]
    assert "stage train: up to date, skipped" in err and d.estimate_record.stat().st_mtime_ns == record
    assert json.loads(d.marker.read_text())["adopted"] is True

    rc, _, err = own_cli("train", "--run-dir", own_run, "--train.steps=3")
    assert rc == 0, err[-3000:]
    assert json.loads(d.train_record.read_text())["steps"] == 3 and (d.train / MANIFEST).is_file()
    kept = [p for p in own_run.iterdir() if p.name.startswith("train.kept-")]
    assert len(kept) == 1 and own_tree(kept[0]) == old_train  # moved aside whole, not deleted
    own_no_half_written(own_run)
