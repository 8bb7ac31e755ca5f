"""APT's outlier term: sqrt(max(kurtosis, 0)) of each block's output weights scaled by the block's mean input.

Why: a block whose output projection has a few very large entries (an outlier feature) can matter far more than its
first-order salience says; APT adds the square root of the excess kurtosis of O = W * mean(x) over the block's
entries (docs/method.md, "APT"). W is the output projection (o_proj for heads, down_proj for FFN neurons), its
columns are the block's input coordinates, and mean(x) is the signed mean of those coordinates over the step's real
tokens on every rank. The reference groups the head blocks wrongly (its reshape mixes rows of all heads into each
"head"); here a head block is exactly its own columns, all d_model rows of them.

Kurtosis is the excess (Fisher) kurtosis mean(z^4) - 3 with z standardised by the unbiased standard deviation, as
in the reference. A block of constant entries (e.g. a dead neuron) has no defined kurtosis and scores 0.
"""

from __future__ import annotations

import torch


def excess_kurtosis(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """mean(z^4) - 3 along `dim`, z = (x - mean) / std (unbiased); 0 where the std is 0. float64."""
    x = x.double()
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, keepdim=True, unbiased=True)
    z = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    kurt = (z ** 4).mean(dim) - 3.0
    return torch.where(std.squeeze(dim) > 0, kurt, torch.zeros_like(kurt))


def outlier_term(weight: torch.Tensor, mean_input: torch.Tensor, block_width: int) -> torch.Tensor:
    """sqrt(max(kurtosis, 0)) per block of `block_width` consecutive input columns of `weight` [d_out, d_in].

    Block b covers columns b*w .. (b+1)*w - 1, so its entries are weight[:, cols] * mean_input[cols]: d_out * w
    numbers (a KV group: every row of its query heads' columns; an FFN neuron: one column)."""
    o = weight.double() * mean_input.double().to(weight.device)[None, :]
    d_out, d_in = o.shape
    blocks = o.reshape(d_out, d_in // block_width, block_width).transpose(0, 1).reshape(d_in // block_width, -1)
    return excess_kurtosis(blocks, -1).clamp_min(0).sqrt().cpu()
