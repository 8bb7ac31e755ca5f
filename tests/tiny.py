"""Tiny random models and a word-level tokenizer built in code, so tests need no hub and run in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

WORDS = ("review sentiment positive negative good bad great awful movie film plot acting fun boring the a is was "
         "and very not really question answer text story").split()

LAYOUTS = {
    # name: (config class, model class, heads, kv heads, extra)
    "llama-mha": (LlamaConfig, LlamaForCausalLM, 4, 4, {}),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, 6, 2, {"tie_word_embeddings": True}),
    "mistral-gqa": (MistralConfig, MistralForCausalLM, 4, 2, {}),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, 4, 2, {}),
    # per-head q/k norms, an explicit head_dim that is not hidden / heads, untied
    "qwen3-qknorm": (Qwen3Config, Qwen3ForCausalLM, 4, 2, {"head_dim": 8, "tie_word_embeddings": False}),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", *WORDS, ":", "\n", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def tiny_model(layout: str = "llama-gqa", seed: int = 0, layers: int = 2, hidden: int = 48, ffn: int = 40,
               vocab: int = 64):
    cfg_cls, model_cls, heads, kv, extra = LAYOUTS[layout]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                  pad_token_id=2, eos_token_id=1, bos_token_id=None, **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02): widen it so pruning visibly changes the logits
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(-0.3, 0.3)
    model.tie_weights()
    return model


def save_tiny(path: Path, layout: str = "llama-gqa", **kwargs) -> Path:
    model = tiny_model(layout, vocab=len(tiny_tokenizer()), **kwargs)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def randomize_lora(model, std: float = 0.3, seed: int = 3) -> None:
    """LoRA B starts at zero, which would make every adapter check vacuous; give all LoRA weights real values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
