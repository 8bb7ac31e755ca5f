"""A sharded random-weight LLaMA checkpoint of a chosen size, written without ever holding the model in memory.

Benchmarks of the streaming prune need checkpoints of several GB, which nobody wants to download or keep. Each shard
is written tensor by tensor with a minimal safetensors writer (header first, then each tensor's bytes as soon as it
is generated), so the generator holds one tensor at a time; the result is an ordinary HF folder (config.json,
model-0000k-of-0000n.safetensors, model.safetensors.index.json) that transformers and safetensors load.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class Shape:
    # 24 query heads in 8 KV groups: pruning 1/3 keeps 16 heads, which divides hidden_size (transformers 5 rejects a
    # stock LlamaConfig whose head count does not divide hidden_size, even with an explicit head_dim).
    hidden: int = 3072
    intermediate: int = 8192
    heads: int = 24
    kv_heads: int = 8
    layers: int = 9
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "num_hidden_layers": self.layers, "vocab_size": self.vocab,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "hidden_act": "silu", "rope_theta": 10000.0, "torch_dtype": "bfloat16", "dtype": "bfloat16"}

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order HF writes them: embeddings, then layer by layer, then norm and head."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]


def layers_for_size(target_bytes: int, base: Shape, dtype: torch.dtype = torch.bfloat16) -> Shape:
    """The same widths with enough layers that the checkpoint is at least `target_bytes`."""
    item = torch.tensor([], dtype=dtype).element_size()
    one = Shape(**{**base.__dict__, "layers": 1})
    per_layer = sum(math.prod(s) for n, s in one.tensors() if ".layers." in n) * item
    fixed = sum(math.prod(s) for n, s in one.tensors() if ".layers." not in n) * item
    return Shape(**{**base.__dict__, "layers": max(1, math.ceil((target_bytes - fixed) / per_layer))})


def write_streaming(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                    gen: torch.Generator) -> int:
    """One safetensors file whose tensors are generated and written one at a time; returns the data bytes."""
    item = torch.tensor([], dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = math.prod(shape) * item
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in entries:
            t = (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02)
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy())  # buffer protocol: no extra copy
            del t
        f.flush()
        os.fsync(f.fileno())
    return offset


def write_checkpoint(out: Path, shape: Shape, shard_bytes: int, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0) -> dict:
    """config.json, shards of about `shard_bytes` each (whole tensors), model.safetensors.index.json."""
    out.mkdir(parents=True, exist_ok=True)
    item = torch.tensor([], dtype=dtype).element_size()
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = math.prod(s) * item
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, s))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, entries in enumerate(tqdm(groups, desc="write shards", unit="shard")):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_streaming(out / fname, entries, dtype, gen)
        weight_map.update({name: fname for name, _ in entries})
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"shards": len(groups), "tensor_bytes": total,
            "disk_bytes": sum(p.stat().st_size for p in out.iterdir()), "layers": shape.layers}
