"""Specification: QLoRA on a pruned model. The pruned base loads in 4-bit NF4 (bitsandbytes, which runs on CPU), LoRA
on top of it trains (the loss goes down), and the saved adapter reloads onto a fresh 4-bit base with the same
outputs. Every test here runs with bitsandbytes' AVX512-BF16 CPU repack forced on (bnb_cpu.py), whatever the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not os.environ.get("CI"):  # CI installs bitsandbytes (Makefile) and must run these; elsewhere it is optional
    pytest.importorskip("bitsandbytes")

import bitsandbytes as bnb  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from lightpeft_dist.config import PeftConfig, TrainConfig  # noqa: E402
from lightpeft_dist.errors import LightPeftError  # noqa: E402
from lightpeft_dist.models.fastpath import prepare_for_training  # noqa: E402
from lightpeft_dist.adapters.lora import lora_config  # noqa: E402
from lightpeft_dist.models.loading import load_model  # noqa: E402
from lightpeft_dist.models.quant import fits_packed_cpu_kernel, keep_generic_cpu_path, quantization_config  # noqa: E402
from bnb_cpu import force_cpu_repack, quantized_linear  # noqa: E402
from pruned_tiny import save_uneven  # noqa: E402

IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6, 8, 10, 12, 14], [8, 10, 12, 14, 16, 18, 20, 22, 3, 5, 7, 9]])


def load_4bit(path) -> torch.nn.Module:
    return load_model(str(path), "float32", "sdpa", load_in_4bit=True)


@pytest.fixture(autouse=True)
def cpu_repack(monkeypatch):
    force_cpu_repack(monkeypatch.setattr)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    return save_uneven(tmp_path_factory.mktemp("qlora"))


def test_pruned_base_loads_in_4bit(pruned_dir):
    full = load_model(str(pruned_dir), "float32", "sdpa")
    model = load_4bit(pruned_dir)
    projections = [m for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert projections and all(isinstance(m, bnb.nn.Linear4bit) for m in projections)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # head and embeddings stay in full precision
    q = model.model.layers[1].self_attn.q_proj.weight
    assert q.quant_state.quant_type == "nf4" and q.quant_state.shape == torch.Size([2 * 8, 48])  # pruned shape
    assert model.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    with torch.no_grad():  # quantized, but still the same function up to NF4 error
        a, b = model(IDS).logits, full(IDS).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_odd_width_pruned_layers_evaluate_under_the_forced_cpu_repack(pruned_dir, monkeypatch):
    """The repack asserts out_features % 32 == 0 and whole scale blocks along in_features; pruned widths are
    neither, so those layers keep the generic path and give exactly the outputs they give without the repack."""
    forced = load_4bit(pruned_dir)
    gate = forced.model.layers[1].mlp.gate_proj  # 14 of 40 neurons kept
    assert gate.out_features == 14 and not fits_packed_cpu_kernel(gate) and not gate.support_avx512bf16_for_cpu
    x = torch.randn(3, 5, gate.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, logits = gate(x), forced(IDS).logits
    assert not getattr(gate.weight.quant_state, "packing_format_for_cpu", False)
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    plain = load_4bit(pruned_dir)
    with torch.no_grad():
        b, plain_logits = plain.model.layers[1].mlp.gate_proj(x), plain(IDS).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(logits, plain_logits)


def test_layers_that_fit_keep_the_packed_cpu_kernel():
    fit, odd, generic = quantized_linear(128, 64), quantized_linear(128, 40), quantized_linear(128, 64)
    assert keep_generic_cpu_path(torch.nn.ModuleList([fit, odd])) == 1
    assert fit.support_avx512bf16_for_cpu and not odd.support_avx512bf16_for_cpu
    generic.support_avx512bf16_for_cpu = False
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed, expected = fit(x), generic(x)
    assert fit.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(packed, expected, atol=3e-2, rtol=2e-2)  # the packed kernel computes in bf16


def test_a_plan_with_multiple_of_64_fits_the_packed_cpu_kernel_everywhere(tmp_path):
    from lightpeft_dist.config import PruneConfig
    from lightpeft_dist.pruning.slicing import prune_checkpoint
    from pruned_tiny import plan_for
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", "llama-mha", hidden=64, ffn=160)
    plan = plan_for(base, PruneConfig(attn_ratio=0.25, ffn_ratio=0.3, multiple_of=64))
    assert [len(layer["ffn"]) for layer in plan["layers"]] == [128, 128]  # 112 kept, rounded
    prune_checkpoint(str(base), plan, tmp_path / "pruned")
    model = load_4bit(tmp_path / "pruned")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(fits_packed_cpu_kernel(m) and m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)


def test_activation_probe_reads_4bit_weights_as_their_dequantized_columns(pruned_dir):
    from lightpeft_dist.pruning.activation import input_column_norms

    layer = load_4bit(pruned_dir).model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(input_column_norms(layer, dense.shape[1]), dense.norm(dim=0), rtol=1e-3, atol=1e-4)


def test_quantization_config_is_zero3_shardable():
    cfg = quantization_config(torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert cfg.bnb_4bit_quant_storage == torch.bfloat16  # same dtype as the rest of the model: DeepSpeed can shard it
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert cfg.bnb_4bit_compute_dtype == expected


def test_qlora_trains_and_the_adapter_reloads(pruned_dir, tmp_path):
    torch.manual_seed(0)
    base = prepare_for_training(load_4bit(pruned_dir), TrainConfig(load_in_4bit=True))
    model = get_peft_model(base, lora_config(PeftConfig(r=4, alpha=8, dropout=0.0)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0] and losses == sorted(losses, reverse=True), losses
    model.eval()
    with torch.no_grad():
        trained = model(IDS).logits
        with model.disable_adapter():
            plain = model(IDS).logits
    assert not torch.allclose(trained, plain, atol=1e-2)  # the adapter is what learned
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(load_4bit(pruned_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(IDS).logits
    assert torch.allclose(again, trained, atol=1e-4), (again - trained).abs().max()


def test_missing_bitsandbytes_is_a_one_line_error(pruned_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(LightPeftError, match="needs bitsandbytes"):
        load_4bit(pruned_dir)


def test_train_stage_runs_qlora_from_the_recipe(tmp_path, tiny_recipe, caplog):
    """`train.load_in_4bit` reaches the train stage: it trains on a 4-bit base and saves an adapter that loads."""
    import json
    import logging
    import math

    import yaml

    from lightpeft_dist.cli import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run, cfg = tmp_path / "run", str(tmp_path / "r.yaml")
    few = ["--estimate.steps=2", "--train.steps=3", "--train.load_in_4bit=true", "--train.gradient_checkpointing=true"]
    with caplog.at_level(logging.INFO, logger="lightpeft_dist.models.quant"):
        for stage in ("estimate", "plan", "prune", "train"):
            assert main([stage, "--config", cfg, "--run-dir", str(run), *few]) == 0
    assert "4-bit NF4" in caplog.text
    train = json.loads((run / "train" / "train.json").read_text())
    assert len(train["losses"]) == 3 and all(math.isfinite(x) for x in train["losses"])
    full = load_model(str(run / "pruned_model"))
    assert train["params"]["total"] < 0.7 * sum(p.numel() for p in full.parameters())  # packed 4-bit storage
    model = PeftModel.from_pretrained(load_4bit(run / "pruned_model"), run / "train" / "adapter")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
