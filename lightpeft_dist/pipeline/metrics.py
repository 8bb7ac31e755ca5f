"""Evaluation: verbalizer accuracy for classification, token-level loss/perplexity for sft and text.

Candidates are encoded with `data.encode_example`, so evaluation scores exactly the tokens training put loss on
(same template, same leading space, same left truncation).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..data.batches import IGNORE_INDEX, Collator, encode_example
from ..errors import LightPeftError
from ..training.finite import NON_FINITE_OUTPUTS, check_metrics, check_tensors


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Evaluation is called mid-training; leaving dropout off afterwards would silently change the run."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _label_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of log p(label token), number of label tokens), using HF's one-position shift.

    Only the positions that carry a label go through log_softmax (in float32), which keeps memory at
    O(label tokens x vocab) instead of O(batch x length x vocab) and avoids bf16 rounding in the scores.
    """
    device = _device(model)
    input_ids = batch["input_ids"].to(device)
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"].to(logits.device)[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1][mask].float()
    logp = F.log_softmax(picked, dim=-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    rows = mask.nonzero()[:, 0]
    n = input_ids.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add_(0, rows, logp)
    counts = mask.sum(dim=1)
    return sums.cpu(), counts.cpu()


def _chunks(items: Any, size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def classification_scores(model: Any, tokenizer: Any, rows: datasets.Dataset | Sequence[dict[str, Any]],
                          cfg: DataConfig, seq_len: int, batch_size: int) -> torch.Tensor:
    """[n_rows, n_labels] summed log-probs of each label's verbalizer after the row's prompt (labels in cfg order).

    `batch_size` counts sequences per forward: each forward holds batch_size // n_labels rows (at least one) with all
    their label candidates, so memory matches a training batch of the same size whatever the number of labels.
    """
    if cfg.format != "classification" or not cfg.labels:
        raise LightPeftError("classification accuracy needs data.format 'classification' with data.labels")
    names = list(cfg.labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = Collator(pad_token_id=pad)
    per_forward = max(1, batch_size // len(names))
    out: list[torch.Tensor] = []
    with _eval_mode(model):
        for chunk in _chunks(rows, per_forward):
            candidates = [encode_example({"text": row["text"], "label": name}, cfg, tokenizer, seq_len)
                          for row in chunk for name in names]
            sums, _ = _label_logprobs(model, collator(candidates))
            out.append(sums.view(len(chunk), len(names)))
    if not out:
        return torch.zeros((0, len(names)))
    return torch.cat(out)


@torch.no_grad()
def classification_accuracy(model: Any, tokenizer: Any, rows: datasets.Dataset | Sequence[dict[str, Any]],
                            cfg: DataConfig, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Rank-the-verbalizers accuracy; ties go to the label listed first in data.labels.

    per_label_accuracy only has the gold labels that occur in `rows` (an absent label has no accuracy, and a null
    would break averaging downstream).
    """
    if cfg.format != "classification" or not cfg.labels:
        raise LightPeftError("classification accuracy needs data.format 'classification' with data.labels")
    gold = [str(row["label"]) for row in rows]
    if not gold:
        raise LightPeftError("no rows to evaluate; check data.eval_file/test_file and data.max_eval_examples")
    names = list(cfg.labels)
    unknown = sorted(set(gold) - set(names))
    if unknown:
        raise LightPeftError(f"label(s) {', '.join(map(repr, unknown))} are not in data.labels; add them there")
    scores = classification_scores(model, tokenizer, rows, cfg, seq_len, batch_size)
    check_tensors("the label log-probabilities", {"classification scores": scores}, NON_FINITE_OUTPUTS)
    pred = [names[i] for i in scores.argmax(dim=1).tolist()]
    hits = [p == g for p, g in zip(pred, gold)]
    per_label: dict[str, float] = {}
    for name in names:
        mine = [h for h, g in zip(hits, gold) if g == name]
        if mine:
            per_label[name] = sum(mine) / len(mine)
    return {"accuracy": sum(hits) / len(hits), "n": len(hits), "per_label_accuracy": per_label}


@torch.no_grad()
def lm_loss(model: Any, dataset_encoded: datasets.Dataset | Sequence[dict[str, Any]],
            collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]], batch_size: int) -> dict[str, Any]:
    """Token-weighted mean cross-entropy over label tokens, so a batch of short examples does not count as much as
    a batch of long ones (the mean of batch means would depend on how examples happen to be grouped)."""
    total, tokens = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(dataset_encoded), batch_size):
            stop = min(start + batch_size, len(dataset_encoded))
            sums, counts = _label_logprobs(model, collator([dataset_encoded[i] for i in range(start, stop)]))
            total -= float(sums.double().sum())
            tokens += int(counts.sum())
    if tokens == 0:
        raise LightPeftError("the evaluation split has no tokens to score (empty split, or every example shorter "
                             "than two tokens); check the eval data and seq_len")
    loss = total / tokens
    check_metrics("evaluation", {"loss": loss})
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = float("inf")
    return {"loss": loss, "perplexity": ppl, "tokens": tokens}
