"""Language-model loss and perplexity of a model on encoded examples, below the pipeline so reports can use it.

`lm_loss` is what `evaluate` reports for sft and text data; `perplexity` scores held-out text (data/heldout.py) the
same way. Both are token-weighted over label tokens, computed in float32 from the positions that carry a label.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import datasets
import torch
import torch.nn.functional as F

from ..data.batches import IGNORE_INDEX, Collator
from ..errors import LightPeftError
from .finite import check_metrics


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


def perplexity(model: Any, tokenizer: Any, examples: Sequence[dict[str, Any]], batch_size: int = 4) -> dict[str, Any]:
    """Perplexity (and mean loss, tokens scored) of `model` on encoded examples whose labels mark the scored tokens."""
    out = lm_loss(model, examples, Collator(tokenizer.pad_token_id), batch_size)
    return {"perplexity": out["perplexity"], "loss": out["loss"], "tokens": out["tokens"]}
