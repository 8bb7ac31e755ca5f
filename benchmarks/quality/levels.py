"""Translate "prune X% of the prunable parameters" into the planner's attention and FFN ratios.

The planner takes per-unit ratios (fraction of heads per layer, fraction of FFN neurons), but users think in parameters
pruned. Heads are coarse (SmolLM2 has 9 query heads in 3 KV groups, so only a few head counts are GQA-valid), FFN
neurons are fine, so: attn_ratio = X, and ffn_ratio is solved by bisection on the real planner's own
`prunable_fraction_pruned` until the achieved fraction matches X. Planning is cheap (scores only, no model).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightpeft_dist.config import PruneConfig
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import read_json
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.scores import Scores, load_scores
from lightpeft_dist.rundir import ESTIMATE_RECORD, RunDir, SCORE_FILES

log = logging.getLogger("quality.levels")
MAX_RATIO = 0.99


def achieved_fraction(scores: Scores, est: dict, cfg: PruneConfig) -> float:
    plan = make_plan(scores, est["layer_shapes"], cfg, est["model_fingerprint"], est["hidden_size"], est["head_dim"])
    return float(plan["summary"]["prunable_fraction_pruned"])


def solve_level(estimate_dir: Path, base: PruneConfig, target: float, iterations: int = 30) -> tuple[dict, float]:
    """(attn_ratio, ffn_ratio) for which the scored plan prunes `target` of the prunable parameters, and the achieved
    fraction. Raises if the target is out of reach at attn_ratio = target (e.g. above ~0.97)."""
    if not 0.0 < target < MAX_RATIO:
        raise LightPeftError(f"pruning level {target} must be in (0, {MAX_RATIO}); use e.g. 0.35 for 35%")
    est = read_json(estimate_dir / ESTIMATE_RECORD, "estimate record")
    scores = load_scores(estimate_dir / SCORE_FILES["masks"], est)

    def at(ffn: float) -> float:
        return achieved_fraction(scores, est, base.model_copy(update={"attn_ratio": target, "ffn_ratio": ffn,
                                                                       "random": False}))

    lo, hi = 0.0, MAX_RATIO
    f_lo, f_hi = at(lo), at(hi)
    if f_lo >= target:
        return {"attn_ratio": target, "ffn_ratio": 0.0}, f_lo
    if f_hi < target:
        raise LightPeftError(f"pruning level {target:.0%} is out of reach (at most {f_hi:.1%} with attn_ratio "
                             f"{target})")
    for _ in range(iterations):  # achieved fraction is non-decreasing in ffn_ratio
        mid = (lo + hi) / 2
        f_mid = at(mid)
        if f_mid < target:
            lo, f_lo = mid, f_mid
        else:
            hi, f_hi = mid, f_mid
        if hi - lo < 1e-5:
            break
    ffn, got = (lo, f_lo) if abs(f_lo - target) <= abs(f_hi - target) else (hi, f_hi)
    ratios = {"attn_ratio": round(target, 6), "ffn_ratio": round(ffn, 6)}
    log.info("level %.0f%%: attn_ratio %.3f, ffn_ratio %.4f -> %.2f%% of prunable parameters", 100 * target,
             ratios["attn_ratio"], ratios["ffn_ratio"], 100 * got)
    return ratios, got
