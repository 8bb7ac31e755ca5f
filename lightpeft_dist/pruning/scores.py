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
from ..training.finite import check_tensors


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

    def named(self) -> dict[str, torch.Tensor]:
        """Every score under the name it has on disk (`head.3`, `module.<path>`, ...)."""
        tensors = {f"head.{i}": t for i, t in enumerate(self.head)}
        tensors.update({f"ffn.{i}": t for i, t in enumerate(self.ffn)})
        tensors.update({f"module.{k}": torch.tensor(v, dtype=torch.float32) for k, v in self.module.items()})
        tensors.update({f"rank.{k}": v for k, v in self.rank.items()})
        return tensors


def save_scores(path: str | Path, scores: Scores, metadata: dict[str, str] | None = None) -> None:
    """Refuses non-finite scores: the planner would rank NaN as if it were a number (docs/architecture.md)."""
    tensors = scores.named()
    check_tensors("the unit scores to save", tensors, "the estimate diverged; lower estimate.lr and rerun estimate")
    meta = dict(metadata or {})
    meta["modules"] = json.dumps(list(scores.module))  # keeps module order (safetensors sorts keys)
    save_tensors(path, {k: v.float() for k, v in tensors.items()}, metadata=meta)


FIX = "delete it and rerun estimate (`lightpeft estimate`)"


def load_scores(path: str | Path, reference: dict | None = None) -> Scores:
    """The scores at `path`, checked: one 1-D tensor per layer and kind, finite values (a diverged estimate or a
    damaged file gives NaN, which would sort into a meaningless plan), and with `reference` (a record with
    `layer_shapes`, such as the estimate record) one score per head and FFN neuron of each layer."""
    from safetensors import safe_open

    tensors = load_tensors(path, "scores file")
    where = f"scores file {path}"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    for name, t in tensors.items():
        if name.startswith(("head.", "ffn.", "rank.", "module.")):
            if t.dim() != (0 if name.startswith("module.") else 1) or t.numel() == 0:
                raise LightPeftError(f"{where}: {name} has shape {list(t.shape)}, not one score per unit; {FIX}")
            if not bool(torch.isfinite(t).all()):
                raise LightPeftError(f"{where}: {name} holds non-finite values (NaN or inf); the estimate diverged "
                                     f"or the file is corrupt: {FIX}")
    try:
        n_layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("head."))
        modules = json.loads(meta.get("modules", "[]"))
        scores = Scores(head=[tensors[f"head.{i}"] for i in range(n_layers)],
                        ffn=[tensors[f"ffn.{i}"] for i in range(n_layers)],
                        module={k: float(tensors[f"module.{k}"]) for k in modules},
                        rank={k: tensors[f"rank.{k}"] for k in modules})
    except (KeyError, ValueError, TypeError) as exc:
        raise LightPeftError(f"{where} is incomplete ({exc}); {FIX}") from None
    layers = {f"{kind}.{i}" for kind in ("head", "ffn") for i in range(n_layers)}
    if extra := sorted(k for k in set(tensors) - layers if k.startswith(("head.", "ffn."))):
        raise LightPeftError(f"{where} holds {extra[0]} but head scores for {n_layers} layers; {FIX}")
    check_shapes(scores, (reference or {}).get("layer_shapes"), where)
    return scores


def check_shapes(scores: Scores, shapes: list[dict] | None, where: str = "scores", fix: str = FIX) -> None:
    """One score per head and FFN neuron of each layer of the model (`shapes`: its per-layer shapes)."""
    if shapes is None:
        return
    if len(shapes) != len(scores.head):
        raise LightPeftError(f"{where} covers {len(scores.head)} layers but the model has {len(shapes)}; {fix}")
    for i, (sh, head, ffn) in enumerate(zip(shapes, scores.head, scores.ffn)):
        if head.numel() != sh["num_attention_heads"] or ffn.numel() != sh["intermediate_size"]:
            raise LightPeftError(f"{where}: layer {i} has {head.numel()} head and {ffn.numel()} FFN scores but the "
                                 f"model has {sh['num_attention_heads']} heads and {sh['intermediate_size']} FFN "
                                 f"neurons; {fix}")
