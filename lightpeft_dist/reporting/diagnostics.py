"""Why a unit ranking works or not: diagnostics of an estimate's score files, for `lightpeft report`.

The masks of a short estimate rank units close to chance (docs/results.md, docs/method.md "Mask variants"); these
numbers say which of the explanations holds for a given run:
- per-layer Spearman rank correlation between every pair of score kinds (heads and FFN neurons apart): do the
  rankings agree at all?
- the share of masks at the L1 floor: under AdamW a mask moves by about its LR per step whatever the gradient's
  size, so a unit whose task gradient stays below lambda slides to m0 - sum of the mask LRs (the floor), and all
  such units tie there in arbitrary order. A mask counts as at the floor when it lies within FLOOR_TOLERANCE x
  (sum of LRs) of it.
- mask movement |m - m0| / (sum of the mask LRs): the fraction of the largest distance the optimizer could have
  moved it (1 = every step pushed the same way).
The sum of the mask LRs comes from the estimate record's `mask_lrs` (every step's LR of the mask groups); records
written before it existed get the schedule they ran with, rebuilt from their recipe (linear decay, no warm-up).
The perplexity damage of the pruned base is opt-in (`lightpeft report --damage`, damage.py).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import LightPeftError
from ..pruning.scores import Scores, load_scores
from ..rundir import SCORE_FILES, RunDir

log = logging.getLogger(__name__)
FLOOR_TOLERANCE = 0.02  # of the sum of the mask LRs: a mask this close to the floor counts as at it
UNITS = (("head", "heads"), ("ffn", "FFN neurons"))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata does)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None when either side is constant or too short."""
    x, y = (np.asarray(t, dtype=np.float64).reshape(-1) for t in (a, b))
    if x.size != y.size:
        raise LightPeftError(f"rank correlation of {x.size} and {y.size} scores; the score files disagree in shape")
    if x.size < 2:
        return None
    rx, ry = average_ranks(x) - (x.size + 1) / 2.0, average_ranks(y) - (y.size + 1) / 2.0
    denom = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if denom == 0.0 else float((rx * ry).sum() / denom)


def rank_correlations(scores: dict[str, Scores]) -> dict[str, dict[str, list[float | None]]]:
    """{unit: {"a~b": per-layer rho}} for every pair of score kinds present, units "head" and "ffn"."""
    out: dict[str, dict[str, list[float | None]]] = {unit: {} for unit, _ in UNITS}
    for (ka, sa), (kb, sb) in itertools.combinations(scores.items(), 2):
        for unit, _ in UNITS:
            out[unit][f"{ka}~{kb}"] = [spearman(x, y) for x, y in zip(getattr(sa, unit), getattr(sb, unit),
                                                                       strict=True)]
    return out


def mask_lr_sum(record: dict) -> float | None:
    """Sum of the mask groups' LRs over the estimate: the record's `mask_lrs`, or rebuilt for an older record."""
    if record.get("mask_lrs") is not None:
        return float(sum(record["mask_lrs"]))
    from ..config import EstimateConfig
    from ..strategies.lightpeft import mask_lrs

    try:
        cfg = EstimateConfig.model_validate((record.get("recipe") or {}).get("estimate") or {})
    except ValueError:
        return None
    return float(sum(mask_lrs(cfg.model_copy(update={"steps": int(record.get("steps", cfg.steps))}))))


def mask_statistics(masks: Scores, lr_sum: float, init: float = 1.0,
                    tolerance: float = FLOOR_TOLERANCE) -> dict[str, dict]:
    """Per unit kind: share of masks at the floor (init - lr_sum, within tolerance x lr_sum), mean and max movement
    |m - init| / lr_sum over all layers, and the per-layer floor share and mean movement."""
    if lr_sum <= 0:
        raise LightPeftError(f"the mask LRs sum to {lr_sum}; the estimate record is damaged, rerun estimate")
    floor = init - lr_sum
    out = {}
    for unit, _ in UNITS:
        layers = [t.double().reshape(-1) for t in getattr(masks, unit)]
        at_floor = [(t <= floor + tolerance * lr_sum).double() for t in layers]
        moved = [(t - init).abs() / lr_sum for t in layers]
        flat_floor, flat_moved = torch.cat(at_floor), torch.cat(moved)
        out[unit] = {"floor_share": float(flat_floor.mean()), "movement_mean": float(flat_moved.mean()),
                     "movement_max": float(flat_moved.max()),
                     "layers": [{"floor_share": float(f.mean()), "movement_mean": float(m.mean())}
                                for f, m in zip(at_floor, moved, strict=True)]}
    return {"floor": floor, "mask_lr_sum": lr_sum, "tolerance": tolerance, **out}


def load_score_files(run_dir: Path, record: dict | None, notes: list[str]) -> dict[str, Scores]:
    """Every score file the estimate wrote (SCORE_FILES order) that passes its checks; the others get a note."""
    out = {}
    for kind in SCORE_FILES:
        path = RunDir(run_dir).scores(kind)
        if not path.is_file():
            continue
        try:
            out[kind] = load_scores(path, record)
        except LightPeftError as exc:
            if not any(str(exc) in note for note in notes):  # the report's own check may have named it already
                notes.append(f"{exc} (left out of the diagnostics)")
    return out


def diagnostics(run_dir: Path, record: dict | None, notes: list[str]) -> dict | None:
    """The diagnostics of a run's estimate, or None before an estimate with score files exists."""
    scores = load_score_files(run_dir, record, notes)
    if not scores:
        return None
    out: dict = {"score_kinds": list(scores), "rank_correlation": rank_correlations(scores)}
    lr_sum = mask_lr_sum(record or {})
    if "masks" in scores and lr_sum:
        out["masks"] = mask_statistics(scores["masks"], lr_sum, float((record or {}).get("mask_init", 1.0)))
    return out


def _cell(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def diagnostics_markdown(diag: dict) -> str:
    """The report's "Score diagnostics" section."""
    parts = ["## Score diagnostics\n"]
    corr = diag["rank_correlation"]
    pairs = list(corr["head"])
    if pairs:
        n_layers = len(corr["head"][pairs[0]])
        parts.append("Spearman rank correlation between score kinds, per layer (heads / FFN neurons; '-': a side is "
                     "constant in that layer).\n")
        parts.append("| layer | " + " | ".join(pairs) + " |")
        parts.append("|---:|" + "---:|" * len(pairs))
        for i in range(n_layers):
            parts.append(f"| {i} | " + " | ".join(f"{_cell(corr['head'][p][i])} / {_cell(corr['ffn'][p][i])}"
                                                 for p in pairs) + " |")
        parts.append("")
    if m := diag.get("masks"):
        parts.append(f"Masks: floor = 1 - sum of mask LRs = {m['floor']:.6g} (sum {m['mask_lr_sum']:.6g}; at the "
                     f"floor = within {m['tolerance']:.0%} of the sum). Movement = |m - 1| / sum of mask LRs.\n")
        parts.append("| units | at the L1 floor | mean movement | max movement |")
        parts.append("|---|---:|---:|---:|")
        for unit, label in UNITS:
            parts.append(f"| {label} | {m[unit]['floor_share']:.1%} | {m[unit]['movement_mean']:.2f} | "
                         f"{m[unit]['movement_max']:.2f} |")
        parts.append("")
    if dmg := diag.get("damage"):
        parts.append(f"Perplexity of the pruned base model (no fine-tuning) on {dmg['text']}, at the planned "
                     f"ratios (attention {dmg['attn_ratio']:.3g}, FFN {dmg['ffn_ratio']:.3g}); unpruned: "
                     f"{dmg['base']:,.2f}.\n")
        parts.append("| unit scores | perplexity | x unpruned | prunable share pruned |")
        parts.append("|---|---:|---:|---:|")
        for row in dmg["rows"]:
            parts.append(f"| {row['scores']} | {row['perplexity']:,.2f} | {row['perplexity'] / dmg['base']:.2f} | "
                         f"{row['fraction_pruned']:.1%} |")
        parts.append("")
    return "\n".join(parts)
