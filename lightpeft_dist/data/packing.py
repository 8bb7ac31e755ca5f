"""Sequence packing: several SFT examples per row of `seq_len` tokens, with no attention across examples.

SFT examples are short and uneven, so padded batches spend much of their compute on pad tokens. Packing fills each
row with whole examples (best-fit decreasing, so rows are nearly full) and marks where each example starts by
restarting `position_ids` at 0. That is all transformers needs: with no 2-D attention mask, its SDPA and eager paths
turn restarting position ids into a block-diagonal causal mask, and FlashAttention-2 into variable-length
(cu_seqlens) attention, so every example sees only itself and gets its own positions, as if it were alone.
The label of each example's first token is set to -100: the causal-LM loss would otherwise train the previous
example's last token to predict it. The result is exact: per-example losses equal the unpacked ones
(tests/test_packing.py).

A packed row is one training "example" for `StepBatches`, so `train.batch_size` counts rows when packing is on and
the batch order stays a pure function of the step. Rows are right-padded to the batch's longest row; the padding is
its own block (labels -100) and the number of real tokens travels in `num_tokens`, which `pop_token_count` removes
before the batch reaches the model.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Sequence

import datasets
import torch

from .batches import IGNORE_INDEX, StepBatches
from ..errors import LightPeftError

log = logging.getLogger(__name__)
NUM_TOKENS = "num_tokens"
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int64")),
    "labels": datasets.List(datasets.Value("int64")),
    "position_ids": datasets.List(datasets.Value("int64")),
})


def assign_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: example indices per row, each row's total length <= capacity.

    Deterministic (ties keep the lower index first) and O(n log n): open rows are kept sorted by free space.
    """
    if capacity < 1:
        raise LightPeftError(f"packing capacity must be >= 1 token, got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise LightPeftError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packed row "
                             f"length {capacity}; encode with seq_len <= {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row id), sorted
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            space, row = free.pop(pos)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
    return rows


def pack_examples(examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Concatenate whole examples into one row: position ids restart per example, first labels ignored."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in examples:
        ids, lab = list(e["input_ids"]), list(e["labels"])
        if len(ids) != len(lab):
            raise ValueError(f"{len(lab)} labels for {len(ids)} input_ids")
        input_ids += ids
        labels += [IGNORE_INDEX] + lab[1:]
        positions += list(range(len(ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def pack_dataset(encoded: datasets.Dataset, capacity: int) -> datasets.Dataset:
    """Encoded examples (input_ids, labels) -> packed rows (input_ids, labels, position_ids)."""
    lengths = [len(ids) for ids in encoded["input_ids"]]
    rows = assign_rows(lengths, capacity)
    packed = [pack_examples([encoded[i] for i in row]) for row in rows]
    total = sum(lengths)
    log.info("packing: %d examples -> %d rows of <= %d tokens (%.1f%% filled, vs %.1f%% when padded per batch)",
             len(lengths), len(rows), capacity, 100 * total / max(1, len(rows) * capacity),
             100 * total / max(1, len(lengths) * max(lengths, default=1)))
    return datasets.Dataset.from_dict({k: [p[k] for p in packed] for k in _FEATURES}, features=_FEATURES)


class PackedCollator:
    """Right-pads packed rows to the batch's longest row; no attention_mask, so the position ids define the blocks."""

    def __init__(self, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise LightPeftError("the tokenizer has no pad token id; call data.ensure_pad_token(tokenizer) first")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        width = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        # Padding restarts at position 0: a block of its own that no real token attends to.
        position_ids = torch.arange(width).repeat(n, 1)
        num_tokens = torch.zeros(n, dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            input_ids[i, :k] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
            labels[i, :k] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
            position_ids[i, :k] = torch.as_tensor(list(r["position_ids"]), dtype=torch.long)
            position_ids[i, k:] = torch.arange(width - k)
            num_tokens[i] = k
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, NUM_TOKENS: num_tokens}


def pop_token_count(batch: dict[str, Any]) -> int:
    """Real (non-pad) tokens in a micro-batch; removes the packed collator's bookkeeping key from the batch."""
    if NUM_TOKENS in batch:
        return int(batch.pop(NUM_TOKENS).sum())
    return int(batch["attention_mask"].sum())


def packed_batches(batches: StepBatches, seq_len: int, pad_token_id: int | None) -> StepBatches:
    """The same step-indexed batching over packed rows of `seq_len` tokens (train.packing)."""
    return StepBatches(pack_dataset(batches.dataset, seq_len), batches.global_batch_size, batches.seed,
                       batches.rank, batches.world_size, collator=PackedCollator(pad_token_id))
