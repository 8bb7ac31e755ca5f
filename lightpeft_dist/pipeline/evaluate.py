"""Stage 5: task quality, size and speed of the pruned + fine-tuned model, next to the unpruned base.

The base row is the zero-shot starting point (no adapter), so one eval.json answers "what did pruning and
fine-tuning buy, at what size". Speed is forward tokens/s over the same eval batches for both models.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..adapters.registry import count_parameters, load_adapters
from ..config import Recipe, recipe_to_dict
from ..keys import keyed_section
from ..errors import LightPeftError
from ..data.batches import Collator, encode_split, load_rows
from ..errors import LightPeftError
from ..io_utils import read_json, read_json_if_present, sha256_json, write_json
from ..training.reporters import log_once
from .metrics import classification_accuracy, lm_loss
from ..rundir import RunDir
from ..models.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)


def eval_split(recipe: Recipe) -> str:
    return "test" if recipe.data.test_file else "eval"


def task_metrics(model, tokenizer, recipe: Recipe, split: str) -> dict:
    rows = load_rows(recipe.data, split)
    seq_len, bs = recipe.train.seq_len, recipe.eval.batch_size
    if recipe.data.format == "classification":
        out = classification_accuracy(model, tokenizer, rows, recipe.data, seq_len, bs)
        return {"accuracy": out["accuracy"], "n": out["n"]}
    encoded = encode_split(rows, recipe.data, tokenizer, seq_len)
    out = lm_loss(model, encoded, Collator(tokenizer.pad_token_id), bs)
    return {"loss": out["loss"], "perplexity": out["perplexity"], "n": len(rows)}


@torch.no_grad()
def forward_tokens_per_s(model, tokenizer, recipe: Recipe, split: str) -> float:
    encoded = encode_split(load_rows(recipe.data, split), recipe.data, tokenizer, recipe.train.seq_len)
    collate, bs = Collator(tokenizer.pad_token_id), recipe.eval.batch_size
    batches = [collate([encoded[j] for j in range(i, min(i + bs, len(encoded)))])
               for i in range(0, min(len(encoded), bs * recipe.eval.speed_batches), bs)]
    model.eval()
    model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def evaluate_model(model, tokenizer, recipe: Recipe, split: str) -> dict:
    return {**task_metrics(model, tokenizer, recipe, split), "params": count_parameters(model),
            "tokens_per_s": forward_tokens_per_s(model, tokenizer, recipe, split)}


def eval_key(recipe: Recipe, run_dir: Path) -> str:
    train = read_json(RunDir(run_dir).train_record, "train record")
    return sha256_json({"train": train["key"], "eval": keyed_section(recipe, "eval")})[:16]


def chosen_adapter(recipe: Recipe, run_dir: Path) -> tuple[Path, dict]:
    """The trained adapter `eval.adapter` names, and what to record about it (which one, from which step).

    `best` needs the best adapter that training keeps with `train.eval_every`; without it the choice would silently
    fall back to the last one, so it is an error instead.
    """
    d, which = RunDir(run_dir), recipe.eval.adapter
    train = read_json_if_present(d.train_record, "train record") or {}  # no training: the caller says so
    path = d.adapter(which)
    if which == "best" and not path.is_dir():
        raise LightPeftError(f"eval.adapter is best but {path} does not exist: training keeps a best adapter only "
                             "with train.eval_every > 0 and data.eval_file; set them and rerun train, or use "
                             "eval.adapter: last")
    step = (train.get("best") or {}).get("step") if which == "best" else train.get("steps")
    return path, {"which": which, "path": str(path.relative_to(d.root)), "step": step,
                  **({"metric": train["best"]["metric"], "value": train["best"]["value"]} if which == "best" else {})}


def trained_plan(run_dir: Path) -> str | None:
    """The plan the trained adapter was made for, which must still be the pruned model's: after a re-prune the
    adapter no longer fits, and loading it would fail with a size mismatch deep inside PEFT. None for a train
    record older than this check (it did not record its plan)."""
    d = RunDir(run_dir)
    trained = read_json(d.train_record, "train record").get("plan_hash")
    pruned = read_json(d.prune_record, "prune record").get("plan_hash")
    if trained is not None and trained != pruned:
        raise LightPeftError(f"the adapter in {d.train} was trained on plan {trained} but {d.pruned_model} is now "
                             f"plan {pruned}; rerun `lightpeft train`")
    return trained


def run_evaluate(recipe: Recipe, run_dir: Path, baseline: bool = True) -> dict:
    plan_hash = trained_plan(run_dir)
    tokenizer = load_tokenizer(recipe.model)
    split = eval_split(recipe)
    result: dict = {"key": eval_key(recipe, run_dir), "split": split, "format": recipe.data.format,
                    "plan_hash": plan_hash}
    if baseline:
        base = load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation)
        result["base"] = evaluate_model(base, tokenizer, recipe, split)
        log.info("base (zero-shot, unpruned): %s", result["base"])
        del base
    adapter, result["adapter"] = chosen_adapter(recipe, run_dir)
    log.info("evaluating the %s adapter (%s, step %s)", result["adapter"]["which"], adapter, result["adapter"]["step"])
    pruned = load_model(str(RunDir(run_dir).pruned_model), recipe.model.dtype, recipe.model.attn_implementation)
    model = load_adapters(pruned, adapter)
    result["pruned"] = evaluate_model(model, tokenizer, recipe, split)
    log.info("pruned + fine-tuned: %s", result["pruned"])
    write_json(RunDir(run_dir).eval_record, result)
    metrics = {f"evaluate/{k}": float(v) for k, v in result["pruned"].items() if isinstance(v, (int, float))}
    log_once(recipe.logging.report_to, RunDir(run_dir).stage_logs("evaluate"), metrics, result["adapter"]["step"] or 0)
    return result
