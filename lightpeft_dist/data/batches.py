"""jsonl files -> causal-LM training batches.

All four formats (sft, classification, text, chat) become plain causal-LM examples so estimation, training and
evaluation share one loss. Loss masking (-100) is decided here, once, so metrics and training cannot disagree
about which tokens count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import datasets
import torch

from ..config import DataConfig
from .. import assets
from ..errors import LightPeftError

IGNORE_INDEX = -100
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "response"),
    "classification": ("text", "label"),
    "text": ("text",),
    "chat": ("messages",),  # rendered with the tokenizer's chat template (chat.py)
}
_SPLIT_KEY = {"train": "train_file", "eval": "eval_file", "test": "test_file"}


def _root_cause(exc: BaseException) -> str:
    """datasets wraps the useful pyarrow message ('JSON parse error ... in row 3') in a generic one; dig it out."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    text = str(seen).strip().splitlines()
    return text[0] if text else seen.__class__.__name__


def load_rows(cfg: DataConfig, split: Literal["train", "eval", "test"]) -> datasets.Dataset:
    """Load and validate one split, failing with a one-line fix instead of a deep stack trace mid-training."""
    key = _SPLIT_KEY[split]
    path = getattr(cfg, key)
    if path is None:
        raise LightPeftError(f"data.{key} is not set but the '{split}' split was requested; "
                             f"add data.{key} to the recipe")
    p = Path(assets.resolve(path))
    if not p.is_file():
        raise LightPeftError(f"data.{key} not found at {path}; fix the path in the recipe (relative paths are resolved "
                             "against the recipe's folder)")
    if p.stat().st_size == 0:
        raise LightPeftError(f"data.{key} at {path} is empty; it needs one JSON object per line")
    try:
        rows = datasets.load_dataset("json", data_files=str(p), split="train")
    except Exception as exc:  # datasets raises DatasetGenerationError, StopIteration, ArrowInvalid, ...
        raise LightPeftError(f"data.{key} at {path} is not valid jsonl ({_root_cause(exc)}); write one JSON object "
                             "per line") from None

    required = REQUIRED_COLUMNS[cfg.format]
    for col in required:
        if col not in rows.column_names:
            raise LightPeftError(f"data.{key} at {path} lacks column '{col}' required by data.format "
                                 f"'{cfg.format}'; every line needs keys {', '.join(required)}")
    limit = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    if limit is not None and limit < len(rows):
        rows = rows.select(range(max(limit, 0)))

    if cfg.format == "chat":
        from .chat import check_rows

        check_rows(rows["messages"], f"data.{key} at {path}")
    for col in required:
        if col in ("label", "messages"):
            continue
        for i, value in enumerate(rows[col]):
            if not isinstance(value, str):
                raise LightPeftError(f"data.{key} at {path}: column '{col}' on line {i + 1} is "
                                     f"{type(value).__name__}, not a string; fix that line")
    if cfg.format == "classification":
        assert cfg.labels is not None  # guaranteed by DataConfig
        unknown = sorted({str(v) for v in rows["label"]} - set(cfg.labels))
        if unknown:
            raise LightPeftError(f"data.{key} at {path} has label(s) {', '.join(repr(u) for u in unknown)} not in "
                                 f"data.labels ({', '.join(repr(k) for k in cfg.labels)}); add them to data.labels")
    return rows


def _fit(prompt: list[int], response: list[int], seq_len: int, bos_id: int | None) -> tuple[list[int], list[int]]:
    """Shorten to seq_len by cutting the prompt's oldest tokens, since the response is what carries the loss.

    A leading BOS survives the cut because LLaMA-family models degrade badly without it. At least one prompt token is
    kept (the response's first token needs something to be predicted from), so only a response longer than
    seq_len - 1 is itself cut, from the right.
    """
    if len(prompt) + len(response) <= seq_len:
        return prompt, response
    budget = seq_len - len(response)
    if budget < 1 and prompt:
        response, budget = response[: seq_len - 1], 1
    elif budget < 1:
        return [], response[:seq_len]
    head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
    body = prompt[len(head):]
    keep = max(budget - len(head), 0)
    prompt = head + body[len(body) - keep:] if keep else head
    return prompt, response


def classification_prompt(text: str, cfg: DataConfig) -> str:
    try:
        return cfg.template.format(text=text)
    except (KeyError, IndexError, ValueError) as exc:
        raise LightPeftError(f"data.template {cfg.template!r} cannot be filled ({exc!r}); use only {{text}} and write "
                             "literal braces as {{{{ and }}}}") from None


def encode_example(row: dict[str, Any], cfg: DataConfig, tokenizer: Any, seq_len: int) -> dict[str, list[int]]:
    """One row -> {"input_ids", "labels"}; labels are -100 wherever the model should not be trained to predict."""
    if cfg.format == "chat":
        from .chat import encode_chat

        return encode_chat(row["messages"], tokenizer, seq_len)
    if cfg.format == "text":
        ids = list(tokenizer(row["text"])["input_ids"])[:seq_len]
        return {"input_ids": ids, "labels": list(ids)}
    if cfg.format == "sft":
        prompt_text, response_text = row["prompt"], row["response"]
        if tokenizer.eos_token_id is None:
            raise LightPeftError("the tokenizer has no eos token, which sft needs to end responses; use a tokenizer "
                                 "with eos_token set")
        eos = [tokenizer.eos_token_id]
    else:
        assert cfg.labels is not None
        prompt_text = classification_prompt(row["text"], cfg)
        response_text = " " + cfg.labels[str(row["label"])]
        eos = []
    prompt = list(tokenizer(prompt_text)["input_ids"])
    response = list(tokenizer(response_text, add_special_tokens=False)["input_ids"]) + eos
    prompt, response = _fit(prompt, response, seq_len, tokenizer.bos_token_id)
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


_ENCODED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int64")),
    "labels": datasets.List(datasets.Value("int64")),
})


def encode_split(rows: datasets.Dataset, cfg: DataConfig, tokenizer: Any, seq_len: int) -> datasets.Dataset:
    """Encode eagerly into memory: no `map` cache files, so concurrent ranks never race on (or reuse stale) caches."""
    if cfg.format == "chat":
        from .chat import require_template

        require_template(tokenizer)
    encoded = []
    for i, row in enumerate(rows):
        try:
            encoded.append(encode_example(row, cfg, tokenizer, seq_len))
        except LightPeftError as exc:  # chat: a template problem shows on a particular conversation
            if cfg.format != "chat":
                raise
            raise LightPeftError(f"row {i + 1}: {exc}") from None
    return datasets.Dataset.from_dict(
        {"input_ids": [e["input_ids"] for e in encoded], "labels": [e["labels"] for e in encoded]},
        features=_ENCODED_FEATURES,
    )


def ensure_pad_token(tokenizer: Any) -> None:
    """Reusing eos as pad is safe here because Collator builds attention masks from lengths, never from pad ids."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LightPeftError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token


class Collator:
    """Right-pads to the batch's longest example; the mask comes from lengths so pad == eos cannot hide real eos."""

    def __init__(self, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise LightPeftError("the tokenizer has no pad token id; call data.ensure_pad_token(tokenizer) first")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("Collator got an empty batch")
        width = max(len(e["input_ids"]) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            if len(e["labels"]) != k:
                raise ValueError(f"example {i}: {len(e['labels'])} labels for {k} input_ids")
            input_ids[i, :k] = torch.as_tensor(list(e["input_ids"]), dtype=torch.long)
            labels[i, :k] = torch.as_tensor(list(e["labels"]), dtype=torch.long)
            attention_mask[i, :k] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class StepBatches:
    """Deterministic, world-size-independent batch order for step-based training.

    Global batch `s` is the s-th block of `global_batch_size` indices in an endless stream of per-epoch permutations
    (epoch e seeded with seed + e). Because it is a pure function of `s`, a resumed run replays exactly the batches
    an uninterrupted one would, and N ranks together consume exactly the rows a single process would.
    """

    def __init__(self, dataset: Any, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None) -> None:
        if len(dataset) == 0:
            raise LightPeftError("the training split has no examples; check data.train_file and "
                                 "data.max_train_examples")
        if global_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise LightPeftError(f"invalid batching: global batch {global_batch_size}, rank {rank}, "
                                 f"world size {world_size}")
        if global_batch_size % world_size:
            raise LightPeftError(f"global batch size {global_batch_size} is not divisible by world size "
                                 f"{world_size}; change batch_size/grad_accum or the number of processes")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.collator = collator if collator is not None else Collator(pad_token_id=0)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # steps advance monotonically; only the current epochs are ever needed
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=gen)
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of global batch `step` (all ranks), in order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = len(self.dataset)
        pos, end = step * self.global_batch_size, (step + 1) * self.global_batch_size
        out: list[int] = []
        while pos < end:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, end - pos)
            out.extend(self._perm(epoch)[offset: offset + take].tolist())
            pos += take
        return out

    def indices_for_step(self, step: int) -> list[int]:
        """This rank's contiguous slice of the global batch."""
        lo = self.rank * self.per_rank
        return self.global_indices(step)[lo: lo + self.per_rank]

    def batch_for_step(self, step: int) -> dict[str, torch.Tensor]:
        return self.collator([self.dataset[i] for i in self.indices_for_step(step)])
