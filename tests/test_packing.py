"""Specification: packing puts whole examples into rows of at most seq_len tokens, and a packed batch trains exactly
like the unpacked examples: each example's loss from the packed forward equals its loss alone, and the batch loss is
the token-weighted mean of them, with eager attention and with SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightpeft_dist.config import DataConfig, TrainConfig
from lightpeft_dist.data.batches import IGNORE_INDEX, Collator, StepBatches, encode_split
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.models.fastpath import prepare_for_training
from lightpeft_dist.models.loading import load_model
from lightpeft_dist.data.packing import (NUM_TOKENS, PackedCollator, assign_rows, pack_dataset, packed_batches,
                                    pop_token_count)
from pruned_tiny import save_uneven
from tiny import tiny_tokenizer

PAIRS = [("question : good movie", "answer positive"), ("question : the plot was really boring and bad", "answer"),
         ("text", "the acting was very fun and the story was great ."), ("a", "b"),
         ("question : awful film", "answer negative , very bad"), ("story", "not fun"),
         ("review : great plot , good acting", "sentiment positive")]


def encoded(seq_len: int = 16):
    import datasets

    rows = datasets.Dataset.from_dict({"prompt": [p for p, _ in PAIRS], "response": [r for _, r in PAIRS]})
    return encode_split(rows, DataConfig(format="sft", train_file="unused"), tiny_tokenizer(), seq_len)


def test_rows_hold_whole_examples_within_capacity():
    lengths = [7, 3, 9, 1, 4, 4, 8, 2, 5]
    rows = assign_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every example exactly once
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5 == -(-sum(lengths) // 10)  # 43 tokens: best fit needs only the minimum 5 rows
    assert assign_rows(lengths, 10) == rows  # deterministic
    with pytest.raises(LightPeftError, match="more than the packed row length"):
        assign_rows([3, 12], 10)


def test_packed_rows_restart_positions_and_ignore_first_labels():
    enc = encoded()
    packed = pack_dataset(enc, 16)
    assert len(packed) < len(enc)
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in enc["input_ids"])
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(row["input_ids"]) <= 16 and starts[0] == 0
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
        pos = row["position_ids"]
        assert all(pos[i] == pos[i - 1] + 1 for i in range(1, len(pos)) if i not in starts)


def test_collator_pads_as_own_block_and_counts_real_tokens():
    packed = pack_dataset(encoded(), 16)
    batch = PackedCollator(pad_token_id=2)([packed[0], packed[len(packed) - 1]])
    assert "attention_mask" not in batch  # position ids alone define the blocks
    real = len(packed[0]["input_ids"]) + len(packed[len(packed) - 1]["input_ids"])
    assert pop_token_count(batch) == real and NUM_TOKENS not in batch
    k = len(packed[len(packed) - 1]["input_ids"])
    if k < batch["input_ids"].shape[1]:
        assert batch["position_ids"][1, k] == 0 and (batch["labels"][1, k:] == IGNORE_INDEX).all()
    assert pop_token_count(Collator(2)([packed[0]])) == len(packed[0]["input_ids"])


def test_packed_step_batches_cover_the_rows():
    enc = encoded()
    plain = StepBatches(enc, 2, seed=3, collator=Collator(2))
    packed = packed_batches(plain, 16, pad_token_id=2)
    assert len(packed.dataset) == len(pack_dataset(enc, 16))
    seen = [i for s in range(len(packed.dataset) // 2) for i in packed.global_indices(s)]
    assert len(set(seen)) == len(seen)
    assert set(packed.batch_for_step(0)) == {"input_ids", "labels", "position_ids", NUM_TOKENS}


def _example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token CE of one example (HF's shift) and its number of scored tokens."""
    target = labels[1:]
    keep = target != IGNORE_INDEX
    return F.cross_entropy(logits[:-1][keep], target[keep], reduction="sum"), int(keep.sum())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_batch_gives_the_unpacked_per_example_losses(tmp_path, impl):
    model = prepare_for_training(load_model(str(save_uneven(tmp_path)), attn_implementation=impl),
                                 TrainConfig()).train()  # train mode, as in the loop; the model has no dropout
    enc = encoded()
    packed = pack_dataset(enc, 16)
    assert any(len(set(r["position_ids"])) < len(r["position_ids"]) for r in packed)  # rows really hold several
    batch = PackedCollator(pad_token_id=2)(list(packed))
    n_real = pop_token_count(batch)
    assert n_real < batch["input_ids"].numel()  # some padding, which must not matter
    with torch.no_grad():
        out = model(**batch)
        total, count = torch.zeros(()), 0
        for r, row in enumerate(packed):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for s, e in zip(starts, starts[1:]):
                ids = torch.tensor(row["input_ids"][s:e])
                original = next(x for x in enc if x["input_ids"] == ids.tolist())
                alone = model(input_ids=ids[None], labels=torch.tensor(original["labels"])[None])
                in_pack, n = _example_loss(out.logits[r, s:e], torch.tensor(original["labels"]))
                if n:
                    assert torch.allclose(in_pack / n, alone.loss, atol=1e-5), (r, s, e)
                total, count = total + in_pack, count + n
    assert count > 0 and torch.allclose(out.loss, total / count, atol=1e-5)


def test_train_stage_packs_rows_from_the_recipe(tmp_path, tiny_recipe):
    """`train.packing` (with gradient checkpointing) reaches the train stage: each step holds whole packed rows, so it
    trains on many more real tokens than padded examples would, and the counted tokens are real ones only."""
    import json

    import yaml

    from conftest import write_jsonl
    from lightpeft_dist.cli import main

    rows = [{"prompt": p, "response": r} for p, r in PAIRS] * 4
    tiny_recipe["data"] = {"format": "sft", "train_file": write_jsonl(tmp_path / "sft.jsonl", rows),
                           "eval_file": write_jsonl(tmp_path / "sft_eval.jsonl", rows[:4])}
    tiny_recipe["train"].update({"steps": 3, "seq_len": 32, "batch_size": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    plain = json.loads((run / "train" / "train.json").read_text())
    assert main(["train", "--run-dir", str(run), "--config", str(tmp_path / "r.yaml"), "--train.packing=true",
                 "--train.gradient_checkpointing=true"]) == 0
    packed = json.loads((run / "train" / "train.json").read_text())
    assert packed["key"] != plain["key"]
    assert all(torch.isfinite(torch.tensor(packed["losses"])))
    assert packed["tokens"] <= 3 * 2 * 32  # real tokens only: never more than the rows hold
    assert packed["tokens"] > 2 * plain["tokens"]  # rows of ~32 tokens vs single examples of ~8
