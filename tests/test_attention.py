"""Specification: the attention backend is chosen as documented and logged, and a pruned model whose layers have
different query/KV head counts gives the same logits with eager attention and with SDPA (and FlashAttention-2 on a
GPU with flash_attn), for padded batches and for packed rows."""

from __future__ import annotations

import logging

import pytest
import torch

from lightpeft_dist.models.attention import choose_attention, flash_attn_usable
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.models.families import FAMILIES, layer_shapes
from lightpeft_dist.models.loading import load_model
from pruned_tiny import save_pruned, save_uneven

IDS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6, 8, 10], [8, 10, 12, 14, 16, 18, 20, 22, 2, 2]])
MASK = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])
PACKED_POS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])


def _count_sdpa_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **inputs).logits


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attn")
    return {"uneven": save_uneven(tmp), "qwen2-bias": save_pruned(tmp, "qwen2-bias")}


@pytest.mark.parametrize("which", ["uneven", "qwen2-bias"])
@pytest.mark.parametrize("inputs", ["padded", "packed"])
def test_sdpa_matches_eager_on_pruned_model(pruned_dirs, which, inputs, monkeypatch):
    # Packed rows need use_cache=False: with a KV cache transformers does not derive blocks from position ids.
    kwargs = {"attention_mask": MASK} if inputs == "padded" else {"position_ids": PACKED_POS, "use_cache": False}
    eager = load_model(str(pruned_dirs[which]), attn_implementation="eager").eval()
    sdpa = load_model(str(pruned_dirs[which]), attn_implementation="sdpa").eval()
    shapes = layer_shapes(sdpa)
    if which == "uneven":  # the case that matters: per-layer head and KV-group counts differ
        assert len({(s["num_attention_heads"], s["num_key_value_heads"]) for s in shapes}) == 3
    for model, impl in ((eager, "eager"), (sdpa, "sdpa")):
        attn = [FAMILIES["llama" if which == "uneven" else "qwen2"].attention(layer)
                for layer in model.model.layers]
        assert all(a.config._attn_implementation == impl for a in attn)
    calls = _count_sdpa_calls(monkeypatch)
    ref = _logits(eager, **kwargs)
    assert calls[0] == 0  # eager really is eager
    got = _logits(sdpa, **kwargs)
    assert calls[0] == len(shapes)  # ... and SDPA ran once per layer
    real = MASK.bool() if inputs == "padded" else torch.ones_like(MASK, dtype=torch.bool)
    assert torch.allclose(got[real], ref[real], atol=1e-5, rtol=1e-4), (got[real] - ref[real]).abs().max()
    assert ref[real].std() > 0.1  # logits are not trivially equal


def test_packed_rows_do_not_attend_across_examples(pruned_dirs):
    """Changing the first example of a packed row leaves the second example's logits unchanged (both kernels)."""
    for impl in ("eager", "sdpa"):
        model = load_model(str(pruned_dirs["uneven"]), attn_implementation=impl).eval()
        pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
        a, b = IDS[:1].clone(), IDS[:1].clone()
        b[0, :4] = torch.tensor([20, 21, 22, 23])
        with torch.no_grad():
            la = model(input_ids=a, position_ids=pos, use_cache=False).logits
            lb = model(input_ids=b, position_ids=pos, use_cache=False).logits
        assert not torch.allclose(la[0, :4], lb[0, :4], atol=1e-3)
        assert torch.allclose(la[0, 4:], lb[0, 4:], atol=1e-5), impl


@pytest.mark.skipif(not flash_attn_usable(torch.bfloat16), reason="needs CUDA and the flash_attn package")
def test_flash_attention_2_matches_sdpa_on_pruned_model(pruned_dirs):
    dev = torch.device("cuda")
    out = {}
    for impl in ("sdpa", "flash_attention_2"):
        model = load_model(str(pruned_dirs["uneven"]), "bfloat16", impl).to(dev).eval()
        with torch.no_grad():
            out[impl] = model(input_ids=IDS.to(dev), position_ids=PACKED_POS.to(dev), use_cache=False).logits.float()
    assert torch.allclose(out["flash_attention_2"], out["sdpa"], atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_auto_is_sdpa_on_cpu_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="lightpeft_dist.models.attention"):
        assert choose_attention("auto", torch.float32) == "sdpa"
        assert choose_attention(None, torch.bfloat16) == "sdpa"
    assert "attention backend: sdpa" in caplog.text


def test_explicit_choices_are_honoured_or_refused():
    assert choose_attention("eager", torch.float32) == "eager"
    assert choose_attention("sdpa", torch.bfloat16) == "sdpa"
    if not flash_attn_usable(torch.float32):
        with pytest.raises(LightPeftError, match="flash_attention_2 cannot run here"):
            choose_attention("flash_attention_2", torch.float32)
    with pytest.raises(LightPeftError, match="not one of"):
        choose_attention("flash", torch.float32)


def test_recipe_default_is_auto_and_typos_fail(tiny_recipe):
    assert recipe_from_dict(tiny_recipe).model.attn_implementation == "auto"
    tiny_recipe["model"]["attn_implementation"] = "flash2"
    with pytest.raises(LightPeftError, match="model.attn_implementation"):
        recipe_from_dict(tiny_recipe)
