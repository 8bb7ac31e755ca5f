"""Force bitsandbytes' AVX512-BF16 CPU repack of 4-bit weights on every CPU, so no test machine hides it.

bitsandbytes decides per layer, at construction, from `has_avx512bf16()`: such a layer repacks its weight on its first
inference forward and then runs a fused kernel on the packed layout. `force_cpu_repack` makes every Linear4bit built
afterwards take that path. Where the CPU really lacks AVX512-BF16 the fused kernel is not registered, so
`gemv_4bit` on a packed weight gets a plain-PyTorch reference here (`packed_reference_gemv`) instead.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as F
import bitsandbytes.nn.modules as bnb_modules
import torch


def unpack_cpu_weight(packed: torch.Tensor, state) -> torch.Tensor:
    """The dense [N, K] weight of a `_convert_weight_packed_for_cpu` result (its inverse, without touching state)."""
    n, k = state.shape
    p = packed.contiguous().view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([p & 0xF, (p >> 4) & 0xF], dim=-1)  # 32 low nibbles, then 32 high ones
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    scale = state.absmax.float().T.repeat_interleave(state.blocksize, dim=1)  # absmax is [K / blocksize, N]
    return state.code.float()[codes.long()] * scale


def packed_reference_gemv(original):
    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return original(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B, state=state)
        result = torch.nn.functional.linear(A.float(), unpack_cpu_weight(B, state)).to(A.dtype)
        return result if out is None else out.copy_(result)
    return gemv_4bit


def force_cpu_repack(set_attr=setattr) -> None:
    """Patch with `set_attr` (pytest's `monkeypatch.setattr` in tests, to undo it afterwards; plain in workers)."""
    set_attr(bnb_modules, "has_avx512bf16", lambda: True)
    if not F.has_avx512bf16():
        set_attr(F, "gemv_4bit", packed_reference_gemv(F.gemv_4bit))


def quantized_linear(in_features: int, out_features: int, seed: int = 0) -> bnb.nn.Linear4bit:
    """An NF4 Linear4bit (double quantization, as quant.py loads) of a random dense layer, in eval mode."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu").eval()  # .to() quantizes
