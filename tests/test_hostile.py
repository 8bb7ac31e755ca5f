"""Hostile input (issue 16), classes 2, 3, 5 and 8: pickles, non-finite values, tracebacks and late checks end in
one `error:` line and exit 2, with the input files untouched and no stage output half-written. Class 4 (trusted
artefacts) is in test_hostile_plans.py, classes 1, 6 and 7 (the run directory) in test_hostile_rundir.py; the
three share tests/hostile_helpers.py."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fork_cli import run_cli, run_python_m
from hostile_helpers import RUN_METADATA, one_error, tree


# --- classes 2, 3, 5, 8: pickles, non-finite values, tracebacks, late checks ---

Mutation = Callable[[Path, dict], list[str]]  # (tmp_path, recipe dict) -> extra CLI arguments


def _refused(tmp_path: Path, argv: list[str], expect: list[str], new_ok: set[str] = frozenset(),
             env: dict[str, str] | None = None) -> str:
    """Run the CLI as its own process; check exit 2, one `error:` line holding every `expect` word, no traceback,
    every file that was there byte-identical, and nothing new but `new_ok` (paths relative to tmp_path). The run
    directories' marker and lock are left out: a stage that started writes them along with its recipe.yaml."""
    before = tree(tmp_path, skip=RUN_METADATA)
    proc = run_cli(argv, tmp_path, env)
    line = one_error(proc.returncode, proc.stderr, *expect)
    after = tree(tmp_path, skip=RUN_METADATA)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs byte-identical, none removed
    new = set(after) - set(before)  # no (half-)written output; an entry "D/" in new_ok allows D and all under it
    folders = [ok.rstrip("/") for ok in new_ok if ok.endswith("/")]
    assert all(p in new_ok or any(p == f or p.startswith(f + "/") for f in folders) for p in new), sorted(new)
    return line


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
