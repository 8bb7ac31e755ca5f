"""Chat SFT (`data.format: chat`, data/chat.py): ids are the tokenizer's own chat-template rendering, the loss falls
exactly on the assistant turns, packing keeps per-conversation losses, the pipeline (estimate included) runs on chat
data, and malformed rows or a model without a chat template are one `error:` line naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from conftest import write_jsonl
from lightpeft_dist import assets
from lightpeft_dist.cli import main
from lightpeft_dist.config import DataConfig, TrainConfig
from lightpeft_dist.data.batches import IGNORE_INDEX, encode_split, load_rows
from lightpeft_dist.data.chat import encode_chat
from lightpeft_dist.data.packing import PackedCollator, pack_dataset, pop_token_count
from lightpeft_dist.models.fastpath import prepare_for_training
from lightpeft_dist.models.loading import load_model
from pruned_tiny import save_uneven
from test_packing import _example_loss
from tiny import tiny_tokenizer

# ChatML-like, in the tiny word-level vocabulary's words ("\n" is whitespace to it); roles are <unk> tokens.
TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} .\n{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "is the movie good"}, {"role": "assistant", "content": "the movie is good"}],
    [{"role": "system", "content": "answer"}, {"role": "user", "content": "the plot"},
     {"role": "assistant", "content": "boring"}, {"role": "user", "content": "and the acting"},
     {"role": "assistant", "content": "very fun and great"}],
    [{"role": "user", "content": "a film"}, {"role": "assistant", "content": "awful"}],
    [{"role": "user", "content": "review : great plot , good acting"}, {"role": "assistant", "content": "positive"}],
]


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    return tok


def supervised(example: dict) -> list[list[int]]:
    """The runs of label ids that are not ignored, in order."""
    runs, current = [], []
    for label in example["labels"]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_ids_are_the_chat_template_and_labels_are_the_assistant_turns():
    tok = chat_tokenizer()
    for messages in CONVERSATIONS:
        enc = encode_chat(messages, tok, seq_len=128)
        assert enc["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert supervised(enc) == [tok(f"{r} .", add_special_tokens=False)["input_ids"] for r in replies]


@pytest.mark.slow
def test_smollm2_chat_rows_mask_exactly_the_assistant_replies():
    """The real template (SmolLM2's ChatML with a default system prompt): each supervised run decodes to the reply
    and the end-of-turn tokens, and the header before it is `<|im_start|>assistant\\n`."""
    from lightpeft_dist.models.loading import load_tokenizer
    from lightpeft_dist.config import ModelConfig

    tok = load_tokenizer(ModelConfig(path="embedded:smollm2"))
    messages = [{"role": "user", "content": "Is this review positive? A fine film."},
                {"role": "assistant", "content": "positive"}, {"role": "user", "content": "And 'a dull plot'?"},
                {"role": "assistant", "content": "negative, sadly"}]
    enc = encode_chat(messages, tok, seq_len=512)
    assert enc["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert [tok.decode(r) for r in supervised(enc)] == ["positive<|im_end|>\n", "negative, sadly<|im_end|>\n"]
    first = enc["labels"].index(next(x for x in enc["labels"] if x != IGNORE_INDEX))
    assert tok.decode(enc["input_ids"][first - 4:first]) == "<|im_start|>assistant\n"
    short = encode_chat(messages, tok, seq_len=24)  # the last reply survives a cut, the oldest tokens go
    assert len(short["input_ids"]) == 24 and tok.decode(supervised(short)[-1]) == "negative, sadly<|im_end|>\n"


def test_packed_chat_batch_gives_the_unpacked_per_conversation_losses(tmp_path):
    model = prepare_for_training(load_model(str(save_uneven(tmp_path)), attn_implementation="sdpa"),
                                 TrainConfig()).train()
    rows = datasets.Dataset.from_dict({"messages": CONVERSATIONS})
    enc = encode_split(rows, DataConfig(format="chat", train_file="unused"), chat_tokenizer(), 64)
    packed = pack_dataset(enc, 40)
    assert len(packed) < len(enc)
    batch = PackedCollator(pad_token_id=2)(list(packed))
    pop_token_count(batch)
    with torch.no_grad():
        out = model(**batch)
        for r, row in enumerate(packed):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for s, e in zip(starts, starts[1:]):
                original = next(x for x in enc if x["input_ids"] == row["input_ids"][s:e])
                alone = model(input_ids=torch.tensor(original["input_ids"])[None],
                              labels=torch.tensor(original["labels"])[None])
                in_pack, n = _example_loss(out.logits[r, s:e], torch.tensor(original["labels"]))
                assert n > 0 and torch.allclose(in_pack / n, alone.loss, atol=1e-5), (r, s, e)


def chat_recipe(tmp_path: Path, tiny_recipe: dict, rows: list, template: bool = True) -> Path:
    """The tiny recipe on chat rows, its model's tokenizer given the tiny chat template (unless `template` is off)."""
    if template:
        chat_tokenizer().save_pretrained(Path(tiny_recipe["model"]["path"]))
    tiny_recipe["data"] = {"format": "chat", "train_file": write_jsonl(tmp_path / "chat.jsonl", rows),
                           "eval_file": write_jsonl(tmp_path / "chat_eval.jsonl", rows[:4])}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    return path


def test_chat_pipeline_runs_end_to_end_with_estimation_on_the_assistant_tokens(tmp_path, tiny_recipe):
    recipe = chat_recipe(tmp_path, tiny_recipe, [{"messages": m} for m in CONVERSATIONS] * 3)
    run = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--run-dir", str(run), "--train.packing=true"]) == 0
    est = json.loads((run / "estimate" / "estimate.json").read_text())
    assert est["tokens"] > 0 and all(torch.isfinite(torch.tensor(est["losses"])))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["format"] == "chat" and ev["pruned"]["perplexity"] > 1.0
    train = json.loads((run / "train" / "train.json").read_text())
    assert train["losses"][-1] < train["losses"][0]


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "user", "content": "good movie"}], "row 3 has no assistant turn"),
    ([{"role": "robot", "content": "good"}, {"role": "assistant", "content": "yes"}],
     "row 3 message 1 has unknown role 'robot'"),
    ([], "row 3 has no messages"),
], ids=["no-assistant", "unknown-role", "empty"])
def test_malformed_chat_row_is_one_error_line_naming_it(tmp_path, tiny_recipe, capsys, messages, problem):
    rows = [{"messages": m} for m in CONVERSATIONS[:2]] + [{"messages": messages}] + [{"messages": CONVERSATIONS[0]}]
    recipe = chat_recipe(tmp_path, tiny_recipe, rows)
    assert main(["run", "--config", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and problem in errors[0] and "chat.jsonl" in errors[0], err
    assert not (tmp_path / "run" / "estimate").exists()


def test_model_without_chat_template_is_one_error_line(tmp_path, tiny_recipe, capsys):
    recipe = chat_recipe(tmp_path, tiny_recipe, [{"messages": m} for m in CONVERSATIONS], template=False)
    assert main(["estimate", "--config", str(recipe), "--run-dir", str(tmp_path / "run")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no chat template" in errors[0]
    assert not (tmp_path / "run" / "estimate").exists()


@pytest.mark.slow
def test_embedded_chat_splits_are_the_movie_reviews_as_turns():
    rows = load_rows(DataConfig(format="chat", train_file="embedded:movie_reviews_chat/train"), "train")
    plain = load_rows(DataConfig(format="classification", train_file="embedded:movie_reviews/train",
                                 labels={"positive": "positive", "negative": "negative"}), "train")
    assert len(rows) == len(plain) > 8000
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"] == assets.CHAT_PROMPT.format(text=plain[0]["text"]) and \
        first[1]["content"] == plain[0]["label"]
