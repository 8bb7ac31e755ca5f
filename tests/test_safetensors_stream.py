"""The tensor-at-a-time safetensors reader/writer behind the streaming prune: files it writes load with the
safetensors library bit for bit, it reads what the library writes, and misuse fails with a clear error instead of a
silently corrupt shard."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pruning.slicing import prune_shard, slice_base_tensor, sliced_shape
from lightpeft_dist.pruning.safetensors_stream import ShardReader, ShardWriter


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(7, generator=g),
            "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
            "d.flag": torch.tensor([True, False, True]),
            "e.empty": torch.zeros(0, 4, dtype=torch.float16)}


def test_written_file_loads_with_safetensors(tmp_path):
    tensors = sample()
    entries = [(k, {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL",
                    torch.float16: "F16"}[v.dtype], list(v.shape)) for k, v in tensors.items()]
    with ShardWriter(tmp_path / "s.safetensors", entries, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_reader_reads_library_files_and_copies_through(tmp_path):
    tensors = sample()
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    with ShardReader(tmp_path / "lib.safetensors") as r:
        assert r.metadata == {"k": "v"} and set(r.keys()) == set(tensors)
        assert all(torch.equal(r.get(k), v) for k, v in tensors.items())
        entries = [(k, r.dtype(k), r.shape(k)) for k in r.keys()]
        with ShardWriter(tmp_path / "copy.safetensors", entries, {}) as w:
            for k in r.keys():
                r.copy_to(k, w)
    back = load_file(str(tmp_path / "copy.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_writer_rejects_wrong_order_shape_and_missing_tensors(tmp_path):
    entries = [("x", "F32", [2, 2]), ("y", "F32", [3])]
    with pytest.raises(LightPeftError, match="out of the declared order"):
        with ShardWriter(tmp_path / "o.safetensors", entries, {}) as w:
            w.write("y", torch.zeros(3))
    with pytest.raises(LightPeftError, match=r"shape \[4\], \[2, 2\] declared"):
        with ShardWriter(tmp_path / "s.safetensors", entries, {}) as w:
            w.write("x", torch.zeros(4))
    with pytest.raises(LightPeftError, match="1 declared tensors were never written"):
        with ShardWriter(tmp_path / "m.safetensors", entries, {}) as w:
            w.write("x", torch.zeros(2, 2))


def test_truncated_file_is_a_clear_error(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with ShardReader(tmp_path / "t.safetensors") as r, pytest.raises(LightPeftError, match="truncated"):
        r.get("w")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(LightPeftError, match="not a valid safetensors file"):
        ShardReader(tmp_path / "bad.safetensors")


def test_prune_shard_matches_in_memory_slicing(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"model.embed_tokens.weight": torch.randn(11, 8, generator=g),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
               "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g),
               "model.layers.0.self_attn.o_proj.weight": torch.randn(8, 8, generator=g),
               "model.layers.0.self_attn.o_proj.bias": torch.randn(8, generator=g)}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    idx = torch.tensor([0, 1, 4, 5])
    table = {"model.layers.0.self_attn.q_proj": ("out", idx), "model.layers.0.self_attn.o_proj": ("in", idx)}
    sizes = prune_shard(tmp_path / "in.safetensors", tmp_path / "out.safetensors", table)
    back = load_file(str(tmp_path / "out.safetensors"))
    for name, t in tensors.items():
        want = slice_base_tensor(name, t, table)
        assert torch.equal(back[name], want)
        assert list(want.shape) == sliced_shape(name, list(t.shape), table)
        assert sizes[name] == (want.numel(), want.numel() * 4)
    assert back["model.layers.0.self_attn.o_proj.bias"].shape == (8,)  # an input-side bias is kept whole


def test_single_indexed_shard_keeps_its_index_and_loads(tmp_path):
    """A checkpoint saved as one indexed shard (model-00001-of-00001 + index) must stay loadable after pruning."""
    import json

    from tiny import save_tiny
    from transformers import AutoModelForCausalLM

    import lightpeft_dist  # noqa: F401 - registers the pruned model types
    from lightpeft_dist.config import PruneConfig
    from lightpeft_dist.models.families import head_dim_of
    from lightpeft_dist.models.loading import fingerprint, load_config
    from lightpeft_dist.pruning.plan import make_plan
    from lightpeft_dist.pruning.slicing import prune_checkpoint
    from lightpeft_dist.pruning.scores import Scores

    src = save_tiny(tmp_path / "src", "llama-gqa")
    shard = "model-00001-of-00001.safetensors"
    (src / "model.safetensors").rename(src / shard)
    names = list(load_file(str(src / shard)))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        n: shard for n in names}}))
    cfg = load_config(str(src))
    n = cfg.num_hidden_layers
    shapes = [{"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
               "intermediate_size": cfg.intermediate_size}] * n
    scores = Scores([torch.zeros(cfg.num_attention_heads)] * n, [torch.zeros(cfg.intermediate_size)] * n)
    plan = make_plan(scores.randomized(0), shapes, PruneConfig(attn_ratio=0.34, ffn_ratio=0.3), fingerprint(cfg),
                     cfg.hidden_size, head_dim_of(cfg))
    record = prune_checkpoint(str(src), plan, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(names) and set(index["weight_map"].values()) == {shard}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(p.numel() for p in model.parameters()) == record["params"]  # tied head is stored once
