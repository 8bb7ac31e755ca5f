"""Evaluation: verbalizer accuracy for classification, token-level loss/perplexity for sft and text.

Candidates are encoded with `data.encode_example`, so evaluation scores exactly the tokens training put loss on
(same template, same leading space, same left truncation). The LM loss itself lives in training/lm_eval.py, where
reports can reach it too.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import datasets
import torch

from ..config import DataConfig
from ..data.batches import Collator, encode_example
from ..errors import LightPeftError
from ..training.finite import NON_FINITE_OUTPUTS, check_tensors
from ..training.lm_eval import _eval_mode, _label_logprobs, lm_loss  # noqa: F401 (lm_loss: evaluate's import)


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
