"""Pruned tiny models made with the project's own plan and prune code, for the fast-path tests.

`save_uneven` gives every layer a different number of query heads, KV heads and FFN neurons (a hand-edited plan,
since a planned ratio keeps the same head count in each layer), which is the case attention kernels must handle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import lightpeft_dist  # noqa: F401  (registers the pruned model types)
from lightpeft_dist.config import PruneConfig
from lightpeft_dist.models.families import head_dim_of, layer_shapes
from lightpeft_dist.models.loading import fingerprint
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.slicing import prune_checkpoint
from lightpeft_dist.pruning.scores import Scores
from tiny import save_tiny

# llama-gqa tiny: 6 query heads in 2 KV groups of 3, FFN 40. Per layer: (kept q heads, kept kv heads, kept FFN).
UNEVEN_LAYERS = [
    ([0, 1, 2, 3, 4, 5], [0, 1], list(range(40))),  # untouched, 3 query heads per KV head
    ([3, 5], [1], list(range(0, 40, 3))),  # one group, 2 query heads per KV head
    ([0, 2, 4, 5], [0, 1], list(range(1, 40, 2))),  # two groups, 2 query heads each
]


def plan_for(base_dir: Path, prune: PruneConfig, seed: int = 1) -> dict:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    shapes, cfg = layer_shapes(model), model.config
    g = torch.Generator().manual_seed(seed)
    scores = Scores(head=[torch.rand(s["num_attention_heads"], generator=g) for s in shapes],
                    ffn=[torch.rand(s["intermediate_size"], generator=g) for s in shapes])
    return make_plan(scores, shapes, prune, fingerprint(cfg), cfg.hidden_size, head_dim_of(cfg))


def save_pruned(tmp_path: Path, layout: str = "llama-gqa", attn_ratio: float = 0.34, ffn_ratio: float = 0.4,
                layers: int = 3) -> Path:
    base_dir = save_tiny(tmp_path / f"base-{layout}", layout, layers=layers)
    plan = plan_for(base_dir, PruneConfig(attn_ratio=attn_ratio, ffn_ratio=ffn_ratio))
    prune_checkpoint(str(base_dir), plan, tmp_path / f"pruned-{layout}")
    return tmp_path / f"pruned-{layout}"


def save_uneven(tmp_path: Path) -> Path:
    base_dir = save_tiny(tmp_path / "base-uneven", "llama-gqa", layers=len(UNEVEN_LAYERS))
    plan = plan_for(base_dir, PruneConfig(attn_ratio=0.0, ffn_ratio=0.0))
    plan["layers"] = [{"q_heads": q, "kv_heads": kv, "ffn": f} for q, kv, f in UNEVEN_LAYERS]
    prune_checkpoint(str(base_dir), plan, tmp_path / "pruned-uneven")
    return tmp_path / "pruned-uneven"
