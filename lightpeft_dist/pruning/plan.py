"""Turn importance scores into a pruning plan: which heads, FFN neurons, PEFT modules and LoRA ranks survive.

Planning is shared by every scoring strategy: it sees only `Scores` (per-unit numbers, higher = keep) and the
model's per-layer shapes. Deliberate deviations from the reference, documented in docs/method.md:
- exact counts: k_pruned = round(ratio * n) with a top-k, instead of `score > quantile` (which prunes more, and
  prunes every tie at the threshold); ties break toward the lower index, so plans are deterministic;
- a layer never loses all of its heads or all of its FFN neurons (global ranking then prunes the next-lowest unit
  elsewhere, keeping the total exact);
- GQA: query heads are kept in equal numbers inside each kept KV group (see `choose_heads`).
Opt-in `prune.ffn_scope: global_normalized` ranks FFN neurons across layers on each layer's scores divided by the
layer's mean |score|: unit score scales differ between layers, so plain global ranking empties the layers with small
scales (7-29x worse perplexity than per-layer ranking, docs/results.md); the layer mean removes exactly that factor.
Opt-in `prune.allocation: budget` keeps the parameter count of the per-layer ratios but spends it across layers
and kinds by score per parameter (allocation.py).
Opt-in `prune.multiple_of: m` (default 1, which plans exactly as above) rounds widths for matrix kernels (GPU tiles,
bitsandbytes' packed CPU kernel, quant.py): each layer's kept FFN count goes to the nearest multiple of m (halves up),
at least m, never above the layer's width (a layer narrower than m keeps all of it), and the layer keeps its
top-scored neurons; global totals are then no longer exact. KV groups are kept in multiples of m / gcd(m, head_dim),
so kept KV and query widths (heads x head_dim) are multiples of m (a layer whose own group count is not such a multiple
loses groups even at attn_ratio 0); where a layer has too few KV groups for one, its heads are planned as without the
option (logged).

A plan is also the artefact people are tempted to edit by hand, and slicing trusts it. `read_plan` is therefore the
only way any stage, report or benchmark reads one back: it checks every index against the model's shapes and
recomputes the hash (docs/architecture.md, "Trusted artefacts").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..config import PruneConfig
from ..keys import without_later_defaults
from ..errors import LightPeftError
from ..io_utils import read_json, sha256_json
from .allocation import budget_units
from .scores import Scores, check_shapes

log = logging.getLogger(__name__)
PLAN_VERSION = 1
# Written after the hash: the summary is derived from the hashed fields, `key` is added by the plan stage.
UNHASHED = ("summary", "hash", "key")


def n_pruned(ratio: float, n: int) -> int:
    return int(round(ratio * n))


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Indices from most to least important; ties keep the lower index first (float64 scores are kept as they are,
    float32 otherwise)."""
    return torch.sort(scores if scores.dtype == torch.float64 else scores.float(), descending=True, stable=True).indices


def _best_groups(scores: torch.Tensor, n_kv: int, groups: int, per_group: int) -> tuple[float, list[int], list[int]]:
    rep = scores.numel() // n_kv
    by_group = scores.float().view(n_kv, rep)
    top_in_group = [_order(by_group[g])[:per_group] for g in range(n_kv)]
    group_score = torch.stack([by_group[g][idx].sum() for g, idx in enumerate(top_in_group)])
    kept_groups = sorted(_order(group_score)[:groups].tolist())
    q_heads = sorted(g * rep + int(i) for g in kept_groups for i in top_in_group[g])
    return float(group_score[kept_groups].sum()), q_heads, kept_groups


def head_shapes(n_heads: int, n_kv: int, target: int, group_step: int = 1) -> list[tuple[int, int]]:
    """Valid (kept KV groups, query heads per group) whose head count is nearest to `target` (ties: more heads);
    kept groups a multiple of `group_step` where the layer has enough groups for one."""
    rep = n_heads // n_kv
    shapes = [(g, q) for g in range(1, n_kv + 1) for q in range(1, rep + 1)]
    shapes = [(g, q) for g, q in shapes if g % group_step == 0] or shapes
    nearest = min(abs(g * q - target) for g, q in shapes)
    count = max(g * q for g, q in shapes if abs(g * q - target) == nearest)
    return [(g, q) for g, q in shapes if g * q == count]


def choose_heads(scores: torch.Tensor, n_kv: int, ratio: float, shape: tuple[int, int] | None = None,
                 group_step: int = 1) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) of one layer.

    HF attention maps query head h to KV head h // (H / n_kv), so a valid pruned layer keeps some KV groups and the
    same number of query heads in each. Among the valid shapes whose head count is nearest round-exact to the target,
    pick the one whose kept query-head scores sum highest. For MHA (n_kv = H) this is plain top-k; for GQA it can
    choose between dropping whole groups and thinning every group, whichever the scores favour.
    """
    n_heads = scores.numel()
    target = max(1, n_heads - n_pruned(ratio, n_heads))
    candidates = [shape] if shape else head_shapes(n_heads, n_kv, target, group_step)
    best = max((_best_groups(scores, n_kv, g, q) for g, q in candidates), key=lambda r: r[0])
    return best[1], best[2]


def _keep_global(scores: list[torch.Tensor], ratio: float) -> list[list[int]]:
    """Global top-k over all layers' units, never emptying a layer; total pruned is exactly round(ratio * n)."""
    flat = torch.cat([s if s.dtype == torch.float64 else s.float() for s in scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    local = torch.cat([torch.arange(s.numel()) for s in scores])
    to_prune = n_pruned(ratio, flat.numel())
    left = [s.numel() for s in scores]
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    # ascending, ties: higher global index pruned first (mirror of "lower index kept first")
    for j in reversed(_order(flat).tolist()):
        if to_prune == 0:
            break
        if left[owner[j]] > 1:
            pruned[j] = True
            left[owner[j]] -= 1
            to_prune -= 1
    return [sorted(local[(owner == i) & ~pruned].tolist()) for i in range(len(scores))]


def _keep_layerwise(scores: list[torch.Tensor], ratio: float) -> list[list[int]]:
    return [sorted(_order(s)[: max(1, s.numel() - n_pruned(ratio, s.numel()))].tolist()) for s in scores]


def normalized_by_layer(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores over the layer's mean |score| (float64; a layer of all-zero scores stays zero), so that a
    layer whose scores are all c times larger ranks the same."""
    out = []
    for s in scores:
        mean = s.double().abs().mean()
        out.append(s.double() / mean if mean > 0 else s.double())
    return out


def plan_ffn(scores: list[torch.Tensor], ratio: float, scope: str) -> list[list[int]]:
    if scope == "global_normalized":
        return _keep_global(normalized_by_layer(scores), ratio)
    return (_keep_global if scope == "global" else _keep_layerwise)(scores, ratio)


def plan_heads(scores: list[torch.Tensor], kv_heads: list[int], ratio: float, uniform: bool, group_step: int = 1):
    if not uniform:
        return [choose_heads(s, kv, ratio, group_step=group_step) for s, kv in zip(scores, kv_heads)]
    n_heads, n_kv = scores[0].numel(), kv_heads[0]
    target = max(1, n_heads - n_pruned(ratio, n_heads))
    shapes = head_shapes(n_heads, n_kv, target, group_step)
    total = {sh: sum(_best_groups(s, n_kv, *sh)[0] for s in scores) for sh in shapes}
    shape = max(shapes, key=lambda sh: total[sh])
    return [choose_heads(s, n_kv, ratio, shape) for s in scores]


def round_to_multiple(kept: int, width: int, multiple: int) -> int:
    """`kept` rounded to the nearest multiple (halves up), at least one multiple, at most the layer's `width`."""
    if width < multiple:
        return width
    return min(max(multiple, (kept + multiple // 2) // multiple * multiple), width // multiple * multiple)


def round_ffn(scores: list[torch.Tensor], kept: list[list[int]], multiple: int) -> list[list[int]]:
    """Each layer's kept count rounded (`round_to_multiple`); the layer keeps its top-scored neurons."""
    counts = [round_to_multiple(len(k), s.numel(), multiple) for s, k in zip(scores, kept)]
    return [sorted(_order(s)[:c].tolist()) for s, c in zip(scores, counts)]


def kv_group_step(multiple: int, head_dim: int) -> int:
    """Fewest KV groups whose width (groups x head_dim) is a multiple of `multiple`."""
    return multiple // math.gcd(multiple, head_dim)


def plan_peft(module: dict[str, float], rank: dict[str, torch.Tensor], cfg: PruneConfig) -> dict[str, list[int]]:
    """Kept LoRA modules -> kept rank indices. Modules rank globally, as in the reference (docs/method.md); ranks per `rank_scope`."""
    names = list(module)
    if not names:
        return {}
    n_keep = max(1, len(names) - n_pruned(cfg.module_ratio, len(names)))
    keep = [names[i] for i in sorted(_order(torch.tensor([module[n] for n in names]))[:n_keep].tolist())]
    rank_scores = [rank[n] for n in keep]
    if cfg.rank_scope == "global":
        kept = _keep_global_allow_empty(rank_scores, cfg.rank_ratio)
    else:
        kept = _keep_layerwise(rank_scores, cfg.rank_ratio)
    # A module whose every rank is pruned is dropped, as in the reference (docs/method.md).
    return {n: k for n, k in zip(keep, kept) if k}


def _keep_global_allow_empty(scores: list[torch.Tensor], ratio: float) -> list[list[int]]:
    flat = torch.cat([s.float() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[_order(flat)[: flat.numel() - n_pruned(ratio, flat.numel())]] = True
    out, start = [], 0
    for s in scores:
        out.append(torch.nonzero(keep[start:start + s.numel()]).flatten().tolist())
        start += s.numel()
    return out


def make_plan(scores: Scores, shapes: list[dict[str, int]], cfg: PruneConfig, model_fingerprint: str,
              hidden_size: int, head_dim: int) -> dict:
    scored = scores
    if cfg.random:
        scores = scores.randomized(cfg.seed, peft=cfg.random_peft)
    if len(scores.head) != len(shapes):
        raise LightPeftError(f"scores cover {len(scores.head)} layers but the model has {len(shapes)}; "
                             "re-run estimate for this model")
    check_shapes(scores, shapes, "scores", "re-run estimate for this model")
    if cfg.uniform:
        if len({s["intermediate_size"] for s in shapes}) > 1 or len({s["num_attention_heads"] for s in shapes}) > 1:
            raise LightPeftError("prune.uniform needs a model whose layers all have the same shape; set uniform: false")
    step = kv_group_step(cfg.multiple_of, head_dim)
    too_few = [i for i, s in enumerate(shapes) if s["num_key_value_heads"] < step]
    if too_few:
        log.warning("prune.multiple_of %d needs KV groups in multiples of %d (head_dim %d); layers %s have fewer, "
                    "so their heads are not rounded", cfg.multiple_of, step, head_dim, too_few)
    # budget allocation: the scored per-layer plan's parameter count, spent by score per parameter (allocation.py)
    ranked = scored if cfg.allocation == "budget" else scores
    heads = plan_heads(ranked.head, [s["num_key_value_heads"] for s in shapes], cfg.attn_ratio, cfg.uniform, step)
    ffn = plan_ffn(ranked.ffn, cfg.ffn_ratio, "layerwise" if cfg.uniform else cfg.ffn_scope)
    if cfg.allocation == "budget":
        heads, ffn = budget_units(scored, shapes, hidden_size, head_dim,
                                  [(q, kv, f) for (q, kv), f in zip(heads, ffn)], scores if cfg.random else None)
    if cfg.multiple_of > 1:
        ffn = round_ffn(scores.ffn, ffn, cfg.multiple_of)
    peft = plan_peft(scores.module, scores.rank, cfg)
    layers = [{"q_heads": q, "kv_heads": kv, "ffn": f} for (q, kv), f in zip(heads, ffn)]
    plan = {"version": PLAN_VERSION, "model_fingerprint": model_fingerprint, "prune": without_later_defaults("prune", cfg.model_dump(mode="json")),
            "layers": layers, "peft_modules": peft}
    plan["summary"] = summarize(plan, shapes, hidden_size, head_dim)
    plan["hash"] = plan_hash(plan)
    return plan


def plan_hash(plan: dict) -> str:
    """A plan's identity: everything the planner decided. `make_plan` and `read_plan` both call this, so a stored
    hash is checked exactly as it was made."""
    return sha256_json({k: v for k, v in plan.items() if k not in UNHASHED})[:16]


def prunable_params(shapes: list[dict[str, int]], hidden_size: int, head_dim: int) -> int:
    """Weights of the projections that pruning can shrink (biases and norms are negligible and left out)."""
    return sum(hidden_size * head_dim * (2 * s["num_attention_heads"] + 2 * s["num_key_value_heads"])
               + 3 * hidden_size * s["intermediate_size"] for s in shapes)


SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def summarize(plan: dict, shapes: list[dict[str, int]], hidden_size: int, head_dim: int) -> dict:
    after_shapes = kept_shapes(plan)
    before_p = prunable_params(shapes, hidden_size, head_dim)
    after_p = prunable_params(after_shapes, kept_hidden_size(plan, hidden_size), head_dim)
    kept = summarize_kept(plan)
    out = {"before": {k: sum(s[k] for s in shapes) for k in SHAPE_KEYS}, "after": kept["after"],
           "prunable_params_before": before_p, "prunable_params_after": after_p,
           "prunable_fraction_pruned": round(1 - after_p / before_p, 6),
           **{k: kept[k] for k in ("uniform", "peft_modules_kept", "lora_ranks_kept")}}
    if "hidden" in plan:  # only plans that prune hidden dimensions say so: older summaries stay as they were
        out["before"]["hidden_size"] = hidden_size
    return out


def summarize_kept(plan: dict) -> dict:
    """The part of the summary that the plan alone decides (no model shapes needed)."""
    after_shapes = kept_shapes(plan)
    after = {k: sum(s[k] for s in after_shapes) for k in SHAPE_KEYS}
    if "hidden" in plan:
        after["hidden_size"] = len(plan["hidden"])
    return {"after": after,
            "uniform": all(s == after_shapes[0] for s in after_shapes),
            "peft_modules_kept": len(plan["peft_modules"]),
            "lora_ranks_kept": sum(len(r) for r in plan["peft_modules"].values())}


def kept_hidden_size(plan: dict, hidden_size: int) -> int:
    """The pruned model's hidden size: the kept hidden dimensions when the plan prunes them (APT), else unchanged."""
    return len(plan["hidden"]) if "hidden" in plan else hidden_size


def kept_shapes(plan: dict) -> list[dict[str, int]]:
    return [{"num_attention_heads": len(lp["q_heads"]), "num_key_value_heads": len(lp["kv_heads"]),
             "intermediate_size": len(lp["ffn"])} for lp in plan["layers"]]


def read_plan(path: str | Path, reference: dict | None = None) -> dict:
    """The plan at `path`, checked before anyone slices with it or believes its hash.

    `reference` is a record of the model the plan is for (`model_fingerprint`, `layer_shapes`, and for the summary
    `hidden_size`, `head_dim`): the estimate record, or `slicing.model_reference` of the model config. It is used
    only when its fingerprint is the plan's; a plan for another model is the caller's error to name. Without it,
    indices can only be checked for sign, order and uniqueness; the hash still catches any edit.
    """
    plan = read_json(path, "plan")
    where = f"plan {path}"
    if reference is not None and (not isinstance(plan, dict)
                                  or reference.get("model_fingerprint") != plan.get("model_fingerprint")):
        reference = None
    check_plan_structure(plan, reference, where)
    _check_summary(plan, reference, where)
    stored, actual = plan["hash"], plan_hash(plan)
    if stored != actual:
        raise LightPeftError(f"{where} records hash {stored} but its contents hash to {actual}: it was edited or "
                             "corrupted after `lightpeft plan` wrote it; rerun `lightpeft plan`")
    return plan


def _bad(where: str, problem: str) -> LightPeftError:
    return LightPeftError(f"{where} is invalid: {problem}; it was edited or corrupted, rerun `lightpeft plan`")


def _indices(value, what: str, n: int | None, where: str) -> list[int]:
    """Kept indices as the planner writes them: non-empty, sorted, unique, within [0, n)."""
    if not isinstance(value, list) or not all(type(i) is int for i in value):
        raise _bad(where, f"{what} is not a list of integers")
    if not value:
        raise _bad(where, f"{what} keeps nothing")
    if len(set(value)) != len(value):
        seen: set[int] = set()
        raise _bad(where, f"{what} repeats index {next(i for i in value if i in seen or seen.add(i))}")
    if value != sorted(value):
        raise _bad(where, f"{what} is not sorted")
    if value[0] < 0:
        raise _bad(where, f"{what} has negative index {value[0]}")
    if n is not None and value[-1] >= n:
        raise _bad(where, f"{what} has index {value[-1]}, out of range for {n}")
    return value


def check_plan_structure(plan, reference: dict | None = None, where: str = "plan") -> None:
    """Fields, indices and GQA validity; with `reference`, ranges and layer count against the model's shapes."""
    if not isinstance(plan, dict):
        raise _bad(where, "it is not a JSON object")
    missing = [k for k in ("version", "model_fingerprint", "layers", "peft_modules", "summary", "hash")
               if k not in plan]
    if missing:
        raise _bad(where, f"field {missing[0]!r} is missing")
    if plan["version"] != PLAN_VERSION:
        raise _bad(where, f"version {plan['version']!r} is not {PLAN_VERSION}")
    layers, peft = plan["layers"], plan["peft_modules"]
    if not isinstance(layers, list) or not layers or not all(isinstance(lp, dict) for lp in layers):
        raise _bad(where, "'layers' is not a non-empty list of layers")
    shapes = (reference or {}).get("layer_shapes")
    if shapes is not None and len(shapes) != len(layers):
        raise _bad(where, f"it has {len(layers)} layers but the model has {len(shapes)}")
    for i, lp in enumerate(layers):
        sh = shapes[i] if shapes is not None else {}
        n_heads, n_kv = sh.get("num_attention_heads"), sh.get("num_key_value_heads")
        q = _indices(lp.get("q_heads"), f"layer {i} q_heads", n_heads, where)
        kv = _indices(lp.get("kv_heads"), f"layer {i} kv_heads", n_kv, where)
        _indices(lp.get("ffn"), f"layer {i} ffn", sh.get("intermediate_size"), where)
        if n_heads is not None and n_kv:
            rep = n_heads // n_kv
            per_group = {g: sum(1 for h in q if h // rep == g) for g in sorted({h // rep for h in q})}
            if list(per_group) != kv:
                raise _bad(where, f"layer {i} keeps query heads of KV groups {list(per_group)} but KV heads {kv}")
            if len(set(per_group.values())) > 1:
                raise _bad(where, f"layer {i} keeps {list(per_group.values())} query heads in its KV groups; "
                                  "GQA needs the same number in each kept group")
    if "hidden" in plan:  # kept hidden dimensions: one global set on the residual stream (APT's prune_hidden)
        _indices(plan["hidden"], "hidden", (reference or {}).get("hidden_size"), where)
    if not isinstance(peft, dict):
        raise _bad(where, "'peft_modules' is not an object")
    for name, ranks in peft.items():
        _indices(ranks, f"peft module {name} ranks", None, where)
    if not isinstance(plan["hash"], str):
        raise _bad(where, "'hash' is not a string")


def _check_summary(plan: dict, reference: dict | None, where: str) -> None:
    """The recorded counts are the layers' counts: recomputed whole when the model's shapes are known."""
    summary = plan.get("summary")
    ref = reference or {}
    if all(ref.get(k) is not None for k in ("layer_shapes", "hidden_size", "head_dim")):
        expect = summarize(plan, ref["layer_shapes"], ref["hidden_size"], ref["head_dim"])
    elif isinstance(summary, dict):
        expect = summarize_kept(plan)
        summary = {k: v for k, v in summary.items() if k in expect}
    else:
        raise _bad(where, "'summary' is not an object")
    if summary != expect:
        raise _bad(where, "its summary counts do not match its layers and the model's shapes")
