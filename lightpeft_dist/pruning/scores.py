"""The seam between scoring strategies and the shared planner.

A strategy (Light-PEFT's masked estimation today; APT's and PrunePEFT's salience scores later) only has to produce a
`Scores`: one number per head, FFN neuron, PEFT module and LoRA rank, higher meaning "keep". Planning, pruning and
training never look at how the numbers were made. On disk a `Scores` is one safetensors file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LightPeftError
from ..io_utils import load_tensors, save_tensors


@dataclass
class Scores:
    """What a scoring strategy produces. Rank scores are per LoRA module, keyed like module scores."""

    head: list[torch.Tensor]  # per layer, [num_attention_heads]
    ffn: list[torch.Tensor]  # per layer, [intermediate_size]
    module: dict[str, float] = field(default_factory=dict)
    rank: dict[str, torch.Tensor] = field(default_factory=dict)

    def randomized(self, seed: int, peft: bool = True) -> "Scores":
        """The random-pruning control: seeded uniform noise of the same shapes for heads and FFN neurons and, with
        `peft`, for the PEFT module and rank scores. Without `peft` those stay, so a plan keeps the scored PEFT
        choices and the control isolates the unit ranking. Unit noise is drawn first: the same either way."""
        g = torch.Generator().manual_seed(seed)
        noise = lambda t: torch.rand(t.shape, generator=g)  # noqa: E731
        head, ffn = [noise(t) for t in self.head], [noise(t) for t in self.ffn]
        if not peft:
            return Scores(head, ffn, dict(self.module), dict(self.rank))
        return Scores(head, ffn, {k: float(torch.rand(1, generator=g)) for k in self.module},
                      {k: noise(v) for k, v in self.rank.items()})



def save_scores(path: str | Path, scores: Scores, metadata: dict[str, str] | None = None) -> None:
    tensors = {f"head.{i}": t for i, t in enumerate(scores.head)}
    tensors.update({f"ffn.{i}": t for i, t in enumerate(scores.ffn)})
    tensors.update({f"module.{k}": torch.tensor(v, dtype=torch.float32) for k, v in scores.module.items()})
    tensors.update({f"rank.{k}": v for k, v in scores.rank.items()})
    meta = dict(metadata or {})
    meta["modules"] = json.dumps(list(scores.module))  # keeps module order (safetensors sorts keys)
    save_tensors(path, {k: v.float() for k, v in tensors.items()}, metadata=meta)


def load_scores(path: str | Path) -> Scores:
    from safetensors import safe_open

    tensors = load_tensors(path, "scores file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        n_layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("head."))
        modules = json.loads(meta.get("modules", "[]"))
        return Scores(head=[tensors[f"head.{i}"] for i in range(n_layers)],
                      ffn=[tensors[f"ffn.{i}"] for i in range(n_layers)],
                      module={k: float(tensors[f"module.{k}"]) for k in modules},
                      rank={k: tensors[f"rank.{k}"] for k in modules})
    except (KeyError, ValueError) as exc:
        raise LightPeftError(f"scores file {path} is incomplete ({exc}); delete it and rerun estimate") from None
