"""Data pipeline and metrics on a word-level tokenizer and a tiny random LLaMA built in code (no hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightpeft_dist.config import DataConfig
from lightpeft_dist.data.batches import (Collator, StepBatches, encode_example, encode_split, ensure_pad_token, load_rows)
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pipeline.metrics import classification_accuracy, classification_scores, lm_loss

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "Review", ":", "Sentiment", "great", "movie", "bad", "film", "plot",
         "the", "was", "positive", "not", "good", "Q", "A", "why", "because"]
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = {"pos": "positive", "neg": "not good"}  # "not good" is two tokens: scores must sum over both


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **extra)


TOK = make_tokenizer()
ID = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cls_cfg(train: str, **kw) -> DataConfig:
    return DataConfig(format="classification", train_file=train, labels=LABELS, template=TEMPLATE, **kw)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      initializer_range=0.5)  # large init so label scores are far from ties
    return LlamaForCausalLM(cfg).float()


# ---------------------------------------------------------------- encoding

def test_sft_loss_only_on_response_and_eos() -> None:
    cfg = DataConfig(format="sft", train_file="unused")
    ex = encode_example({"prompt": "Q why", "response": "because good"}, cfg, TOK, seq_len=64)
    assert ex["input_ids"] == [ID["<s>"], ID["Q"], ID["why"], ID["because"], ID["good"], ID["</s>"]]
    assert ex["labels"] == [-100, -100, -100, ID["because"], ID["good"], ID["</s>"]]


def test_classification_verbalizer_and_left_truncation_keeps_label_and_bos() -> None:
    cfg = cls_cfg("unused")
    full = encode_example({"text": "the movie was bad", "label": "neg"}, cfg, TOK, seq_len=64)
    prompt = [ID[w] for w in ["<s>", "Review", ":", "the", "movie", "was", "bad", "Sentiment", ":"]]
    assert full["input_ids"] == prompt + [ID["not"], ID["good"]]  # no eos for classification
    assert full["labels"] == [-100] * len(prompt) + [ID["not"], ID["good"]]

    cut = encode_example({"text": "the movie was bad " * 5, "label": "neg"}, cfg, TOK, seq_len=8)
    assert len(cut["input_ids"]) == 8
    assert cut["input_ids"][0] == ID["<s>"]  # BOS survives the left cut
    assert cut["input_ids"][1:] == [ID[w] for w in ["movie", "was", "bad", "Sentiment", ":", "not", "good"]]
    assert cut["labels"] == [-100] * 6 + [ID["not"], ID["good"]]


def test_overlong_response_is_cut_from_the_right_keeping_one_prompt_token() -> None:
    cfg = DataConfig(format="sft", train_file="unused")
    ex = encode_example({"prompt": "Q why", "response": "because " * 20}, cfg, TOK, seq_len=8)
    assert ex["input_ids"] == [ID["<s>"]] + [ID["because"]] * 7
    assert ex["labels"] == [-100] + [ID["because"]] * 7


def test_text_labels_equal_ids_and_truncate_right() -> None:
    cfg = DataConfig(format="text", train_file="unused")
    ex = encode_example({"text": "the plot was good the film was bad"}, cfg, TOK, seq_len=4)
    assert ex["input_ids"] == [ID["<s>"], ID["the"], ID["plot"], ID["was"]]
    assert ex["labels"] == ex["input_ids"]


def test_encode_split_drops_raw_columns() -> None:
    rows = datasets.Dataset.from_list([{"text": "great film", "label": "pos"}, {"text": "bad", "label": "neg"}])
    enc = encode_split(rows, cls_cfg("unused"), TOK, 32)
    assert enc.column_names == ["input_ids", "labels"] and len(enc) == 2
    assert enc[1]["labels"][-2:] == [ID["not"], ID["good"]]


def test_collator_pads_right_with_masks() -> None:
    batch = Collator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                      {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_ensure_pad_token_falls_back_to_eos() -> None:
    tok = make_tokenizer(pad=False)
    assert tok.pad_token is None
    ensure_pad_token(tok)
    assert tok.pad_token == "</s>" and tok.pad_token_id == ID["</s>"]


# ---------------------------------------------------------------- step batches

def id_dataset(n: int) -> list[dict]:
    return [{"input_ids": [i], "labels": [i]} for i in range(n)]


def test_two_ranks_together_equal_one_rank_and_are_repeatable() -> None:
    ds = id_dataset(10)
    one = StepBatches(ds, global_batch_size=4, seed=3)
    ranks = [StepBatches(ds, global_batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in [0, 1, 2, 7, 5]:  # out of order on purpose: a resume jumps straight to a step
        both = torch.cat([r.batch_for_step(step)["input_ids"] for r in ranks])
        assert torch.equal(both, one.batch_for_step(step)["input_ids"])
    fresh = StepBatches(ds, global_batch_size=4, seed=3)
    assert torch.equal(fresh.batch_for_step(5)["input_ids"], one.batch_for_step(5)["input_ids"])
    assert one.global_indices(0) != StepBatches(ds, 4, seed=4).global_indices(0)


def test_epoch_boundary_reshuffles_deterministically() -> None:
    sb = StepBatches(id_dataset(10), global_batch_size=4, seed=7)
    p0 = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    p1 = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert p0 != p1
    assert sb.global_indices(0) == p0[:4] and sb.global_indices(1) == p0[4:8]
    assert sb.global_indices(2) == p0[8:] + p1[:2]  # step 2 straddles epochs 0 and 1
    assert sb.batch_for_step(2)["input_ids"].flatten().tolist() == p0[8:] + p1[:2]
    tiny = StepBatches(id_dataset(3), global_batch_size=4, seed=0)  # batch larger than the dataset
    assert sorted(tiny.global_indices(0)[:3]) == [0, 1, 2]


@pytest.mark.parametrize("kwargs, needle", [
    ({"dataset": [], "global_batch_size": 4}, "no examples"),
    ({"dataset": id_dataset(4), "global_batch_size": 3, "world_size": 2}, "not divisible by world size 2"),
])
def test_step_batches_rejects_bad_setup(kwargs: dict, needle: str) -> None:
    with pytest.raises(LightPeftError, match=needle):
        StepBatches(seed=0, **kwargs)


# ---------------------------------------------------------------- metrics

CLS_ROWS = [{"text": "great movie", "label": "pos"}, {"text": "the plot was bad", "label": "neg"},
            {"text": "good film the plot was great", "label": "pos"}, {"text": "bad", "label": "neg"},
            {"text": "the film was not good", "label": "neg"}]


def reference_scores(model: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
    """One unpadded sequence at a time, built straight from the tokenizer (independent of encode_example)."""
    out = []
    for row in rows:
        prompt = TOK(TEMPLATE.format(text=row["text"]))["input_ids"]
        scores = []
        for word in LABELS.values():
            verb = TOK(" " + word, add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(model(torch.tensor([prompt + verb])).logits[0].float(), dim=-1)
            scores.append(sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(verb)))
        out.append(scores)
    return torch.tensor(out)


def test_classification_matches_slow_reference_and_restores_mode() -> None:
    model = tiny_llama().train()
    cfg = cls_cfg("unused")
    rows = datasets.Dataset.from_list(CLS_ROWS)
    got = classification_scores(model, TOK, rows, cfg, seq_len=64, batch_size=4)  # 2 rows x 2 labels per forward
    with torch.no_grad():
        ref = reference_scores(model.eval(), CLS_ROWS)
    model.train()
    assert torch.allclose(got, ref, atol=1e-4), (got, ref)
    res = classification_accuracy(model, TOK, rows, cfg, seq_len=64, batch_size=3)
    assert model.training
    names = list(LABELS)
    hits = [names[i] == r["label"] for i, r in zip(ref.argmax(1).tolist(), CLS_ROWS)]
    assert res["n"] == 5 and res["accuracy"] == pytest.approx(sum(hits) / 5)


class RiggedLM(torch.nn.Module):
    """'bad' anywhere to the left makes 'not' and 'good' likely; 'great' makes 'positive' likely."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        self.modes.append(self.training)
        seen_bad = (input_ids == ID["bad"]).cumsum(1) > 0
        seen_great = (input_ids == ID["great"]).cumsum(1) > 0
        logits = torch.zeros(*input_ids.shape, len(TOK))
        logits[..., ID["not"]] = 8.0 * seen_bad
        logits[..., ID["good"]] = 8.0 * seen_bad
        logits[..., ID["positive"]] = 8.0 * seen_great
        return SimpleNamespace(logits=logits)


def test_rigged_model_gets_everything_right() -> None:
    rows = [r for r in CLS_ROWS if ("bad" in r["text"]) != ("great" in r["text"])]
    model = RiggedLM()
    res = classification_accuracy(model, TOK, rows, cls_cfg("unused"), seq_len=64, batch_size=2)
    assert res == {"accuracy": 1.0, "n": len(rows), "per_label_accuracy": {"pos": 1.0, "neg": 1.0}}
    assert model.modes and not any(model.modes) and model.training
    flipped = [{**r, "label": "neg" if r["label"] == "pos" else "pos"} for r in rows]
    assert classification_accuracy(model, TOK, flipped, cls_cfg("unused"), 64, 8)["accuracy"] == 0.0


def test_lm_loss_is_token_weighted_across_unequal_batches() -> None:
    model = tiny_llama()
    cfg = DataConfig(format="sft", train_file="unused")
    rows = [{"prompt": "Q why", "response": "because the plot was good"}, {"prompt": "Q", "response": "bad"},
            {"prompt": "Q why the film", "response": "because"}]
    enc = encode_split(datasets.Dataset.from_list(rows), cfg, TOK, 64)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in enc:
            logp = F.log_softmax(model(torch.tensor([ex["input_ids"]])).logits[0], dim=-1)
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != -100:
                    total -= logp[t - 1, ex["labels"][t]].item()
                    count += 1
    res = lm_loss(model, enc, Collator(TOK.pad_token_id), batch_size=2)  # batches of 2 and 1 examples
    assert res["tokens"] == count == 5 + 1 + 1 + 3
    assert res["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


# ---------------------------------------------------------------- load_rows

def test_load_rows_reads_caps_and_accepts_int_labels(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": f"movie {i}", "label": i % 2} for i in range(6)])
    cfg = DataConfig(format="classification", train_file=train, eval_file=train, labels={"0": "bad", "1": "good"},
                     max_train_examples=4, max_eval_examples=2)
    assert load_rows(cfg, "train")["text"] == [f"movie {i}" for i in range(4)]
    assert len(load_rows(cfg, "eval")) == 2
    assert encode_example(load_rows(cfg, "eval")[1], cfg, TOK, 16)["labels"][-1] == ID["good"]


def _bad_input(tmp_path: Path, case: str) -> tuple[DataConfig, str, list[str]]:
    good = write_jsonl(tmp_path / "ok.jsonl", [{"text": "great", "label": "pos"}])
    if case == "missing_eval_file":
        missing = str(tmp_path / "nope.jsonl")
        return cls_cfg(good, eval_file=missing), "eval", ["data.eval_file", missing]
    if case == "no_eval_key":
        return cls_cfg(good), "eval", ["data.eval_file", "not set"]
    if case == "missing_column":
        f = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Q"}])
        return DataConfig(format="sft", train_file=f), "train", ["'response'", f]
    if case == "unknown_label":
        f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
        return cls_cfg(f), "train", ["'meh'", "data.labels"]
    if case == "corrupt_json":
        f = tmp_path / "bad.jsonl"
        f.write_text('{"text": "a", "label": "pos"}\n{"text": oops\n')
        return cls_cfg(str(f)), "train", ["data.train_file", "not valid jsonl"]
    if case == "non_string_text":
        f = write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}, {"text": None}])
        return DataConfig(format="text", train_file=f, test_file=f), "test", ["'text'", "line 2"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_eval_file", "no_eval_key", "missing_column", "unknown_label",
                                  "corrupt_json", "non_string_text"])
def test_load_rows_rejects_bad_input(tmp_path: Path, case: str) -> None:
    cfg, split, needles = _bad_input(tmp_path, case)
    with pytest.raises(LightPeftError) as info:
        load_rows(cfg, split)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
