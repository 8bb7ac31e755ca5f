"""PNG figures of a run directory, for people who would rather look at a pruning plan than read plan.json.

Every figure is drawn on its own `Figure` with an explicit Agg canvas (never pyplot), so plotting needs no display,
leaks no global state into a training process and is safe to call from any thread. Each plot function takes a run dir
(or an already loaded `RunData`) and an output path, and returns the path it wrote, or None when the stage that
produces its inputs has not run yet: reports are written after partial runs too.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import PercentFormatter

from ..pruning.module_keys import DEFAULT_KIND, split_key
from .artefacts import RunData, load
from ..rundir import RunDir
from ..training.reporters import read_scalars

log = logging.getLogger(__name__)
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
KEPT, PRUNED, ORIG, EDGE = "#2b6cb0", "#e07b39", "#d5dbe3", "#8a94a3"
_LAYER = re.compile(r"layers\.(\d+)\.")


def _run(run: str | Path | RunData) -> RunData:
    return load(run)


def _save(fig: Figure, out: str | Path) -> Path:
    """Render to a temporary sibling and rename it into place, so a half-written PNG is never linked."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    FigureCanvasAgg(fig)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _figure(n_layers: int, height: float) -> Figure:
    """Width grows with depth (capped) so a 30-layer model still gets readable bars and cells."""
    return Figure(figsize=(min(22.0, max(7.0, 0.32 * n_layers + 3)), height), layout="constrained")


def _layer_axis(ax, n: int) -> None:
    """Label every layer up to 16 layers, then every 2nd/5th, so 30-80 layer models keep legible ticks."""
    ticks = list(range(0, n, 1 if n <= 16 else 2 if n <= 32 else 5))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("layer")


def module_grid(names: list[str], n_layers: int, value) -> tuple[np.ndarray, list[str]]:
    """[module type, layer] grid of value(name) for names like model.layers.3.mlp.up_proj; NaN where absent.

    Rows are q,k,v,o,gate,up,down plus any other projection type found, and a row per type of another adapter kind
    (`bottleneck:model.layers.3.mlp.down_proj` is row "down (bottleneck)"); names without a layer index are ignored.
    """
    def row(name: str) -> str:
        kind, path = split_key(name)
        t = path.rsplit(".", 1)[-1].removesuffix("_proj")
        return t if kind == DEFAULT_KIND else f"{t} ({kind})"

    parsed = {n: (int(m.group(1)), row(n)) for n in names if (m := _LAYER.search(n))}
    lora = not parsed or any(split_key(n)[0] == DEFAULT_KIND for n in parsed)  # else no LoRA rows to hatch
    types = [*(MODULE_TYPES if lora else ()), *sorted({t for _, t in parsed.values()} - set(MODULE_TYPES))]
    grid = np.full((len(types), max([n_layers, *(i + 1 for i, _ in parsed.values())])), np.nan)
    for name, (layer, t) in parsed.items():
        grid[types.index(t), layer] = value(name)
    return grid, types


def kept_structure(run: str | Path | RunData, out: str | Path) -> Path | None:
    """Per layer, kept vs original query/KV heads and FFN width: where the plan cut, at a glance."""
    r = _run(run)
    sh = (r.estimate or {}).get("layer_shapes")
    if not r.plan or not sh or len(sh) != len(r.plan["layers"]):
        return None
    layers, x, w = r.plan["layers"], np.arange(len(sh)), 0.38
    fig = _figure(len(layers), 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for off, key, plan_key, label, color in ((-w / 2, "num_attention_heads", "q_heads", "query heads", KEPT),
                                             (w / 2, "num_key_value_heads", "kv_heads", "KV heads", "#38a169")):
        top.bar(x + off, [s[key] for s in sh], w, color=ORIG, edgecolor=EDGE, linewidth=0.6)
        top.bar(x + off, [len(lp[plan_key]) for lp in layers], w, color=color, label=f"kept {label}")
    bottom.bar(x, [s["intermediate_size"] for s in sh], 0.7, color=ORIG, edgecolor=EDGE, linewidth=0.6)
    bottom.bar(x, [len(lp["ffn"]) for lp in layers], 0.7, color=KEPT, label="kept FFN neurons")
    for ax, what in ((top, "attention heads"), (bottom, "FFN neurons")):
        ax.set(ylabel=what, title=f"{what} kept per layer", axisbelow=True)
        handles = [*ax.get_legend_handles_labels()[0], Patch(facecolor=ORIG, edgecolor=EDGE, label="original")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(axis="y", alpha=0.3)
    _layer_axis(bottom, len(layers))
    if (frac := r.plan.get("summary", {}).get("prunable_fraction_pruned")) is not None:
        fig.suptitle(f"prunable parameters pruned: {frac:.1%}")
    return _save(fig, out)


def _split(values: list, kept: list[list[int]] | None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, pruned) finite mask values of all layers; everything counts as kept when there is no plan yet."""
    flat = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    mask = np.concatenate([np.isin(np.arange(len(v)), k) for v, k in zip(values, kept)]) if kept else flat == flat
    ok = np.isfinite(flat)
    return flat[mask & ok], flat[~mask & ok]


def mask_distribution(run: str | Path | RunData, out: str | Path) -> Path | None:
    """Histograms of the learned head and FFN masks; with a plan, pruned units are coloured apart from kept ones."""
    r = _run(run)
    if r.scores is None:
        return None
    plan = r.plan if r.plan and len(r.plan.get("layers", [])) == len(r.scores.head) else None
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, vals, key, what in zip(fig.subplots(1, 2), (r.scores.head, r.scores.ffn), ("q_heads", "ffn"),
                                   ("attention-head masks", "FFN-neuron masks")):
        kept, pruned = _split([v.numpy() for v in vals], [lp[key] for lp in plan["layers"]] if plan else None)
        both = np.concatenate([kept, pruned])
        bins = np.histogram_bin_edges(both, bins=min(40, max(8, both.size // 4)))
        if plan:
            ax.hist([pruned, kept], bins=bins, stacked=True, color=[PRUNED, KEPT],
                    label=[f"pruned ({pruned.size})", f"kept ({kept.size})"])
        else:
            ax.hist(kept, bins=bins, color="#718096", label=f"all {kept.size} (no plan yet)")
        ax.legend(frameon=False, fontsize=8)
        ax.set(title=what, xlabel="final mask value", ylabel="units")
        ax.yaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out)


def _heatmap(fig: Figure, grid: np.ndarray, types: list[str], cmap, label: str, title: str, **kw):
    """Module-type rows x layer columns with cell borders; hatched cells are projections that never had LoRA."""
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                   cmap=colormaps[cmap] if isinstance(cmap, str) else cmap, **kw)
    for y, x in zip(*np.nonzero(np.isnan(grid))):
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor="#f4f4f4", hatch="//", edgecolor="#c8c8c8", lw=0))
    ax.set_yticks(range(len(types)), types)
    ax.set_xticks(np.arange(grid.shape[1] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(types) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#cbd5e0", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_ylabel("module")
    ax.set_title(title, loc="right", fontsize=10)
    _layer_axis(ax, grid.shape[1])
    fig.colorbar(im, ax=ax, label=label, pad=0.01, fraction=0.04)
    return ax, im


def module_importance(run: str | Path | RunData, out: str | Path) -> Path | None:
    """PEFT module scores as a layer x projection heatmap; dots mark the modules the plan keeps LoRA on."""
    r = _run(run)
    if r.scores is None or not r.scores.module:
        return None
    names, peft = list(r.scores.module), (r.plan or {}).get("peft_modules", {})
    grid, types = module_grid(names, len(r.scores.head), r.scores.module.__getitem__)
    title = f": {len(peft)} of {len(names)} modules kept" if r.plan else " (no plan yet)"
    fig = _figure(grid.shape[1], 3.6)
    ax, _ = _heatmap(fig, grid, types, "viridis", "module score (higher = keep)", "PEFT module importance" + title)
    if r.plan:
        ys, xs = np.nonzero(module_grid(names, grid.shape[1], lambda n: float(n in peft))[0] == 1.0)
        ax.scatter(xs, ys, s=22 if grid.shape[1] <= 32 else 10, c="white", edgecolors="black", linewidths=0.7,
                   label="kept (LoRA trained)")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8)
    return _save(fig, out)


def kept_ranks(run: str | Path | RunData, out: str | Path) -> Path | None:
    """Kept LoRA rank per module, 0 = dropped. Without scores only the kept modules are known (rest hatched)."""
    r = _run(run)
    if r.plan is None or "peft_modules" not in r.plan:
        return None
    kept, sc = r.plan["peft_modules"], r.scores if r.scores is not None and r.scores.module else None
    names = list(sc.module) if sc else list(kept)
    full = max(len(v) for v in sc.rank.values()) if sc else None
    grid, types = module_grid(names, len(sc.head) if sc else len(r.plan["layers"]), lambda n: len(kept.get(n, [])))
    top = full or max([1, *(len(v) for v in kept.values())])
    cmap = ListedColormap(["#ffffff", *colormaps["YlGnBu"](np.linspace(0.3, 1.0, top))])
    title = f"kept LoRA ranks: {sum(len(v) for v in kept.values())} in {len(kept)} modules"
    fig = _figure(grid.shape[1], 3.6)
    ax, im = _heatmap(fig, grid, types, cmap, f"kept rank (of r={full})" if full else "kept rank", title,
                      norm=BoundaryNorm(np.arange(top + 2) - 0.5, top + 1))
    ticks = list(range(0, top + 1, max(1, (top + 1) // 9)))
    im.colorbar.set_ticks(ticks, labels=["0 (dropped)", *map(str, ticks[1:])])
    if grid.shape[1] <= 24:
        for (y, x), v in np.ndenumerate(grid):
            if not math.isnan(v):
                ax.text(x, y, f"{v:.0f}", ha="center", va="center", fontsize=9 if grid.shape[1] <= 12 else 7,
                        color="white" if v > top / 2 else "black")
    return _save(fig, out)


def logged_losses(run_dir: Path, stage: str, record: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, losses) of a stage: from its metric logs (D/logs/<stage>, `logging.report_to`) when they hold the
    loss, else from its JSON record; steps are optimizer steps taken (1-based)."""
    logged = read_scalars(RunDir(run_dir).stage_logs(stage)).get(f"{stage}/loss")
    if logged:
        return np.asarray([s for s, _ in logged], dtype=float), np.asarray([v for _, v in logged], dtype=float)
    y = np.asarray([math.nan if v is None else v for v in (record or {}).get("losses") or []], dtype=float)
    return np.arange(1, y.size + 1, dtype=float), y


def loss_curves(run: str | Path | RunData, out: str | Path) -> Path | None:
    """Estimation loss (task + mask L1, as optimised) and post-pruning training loss per optimizer step."""
    r, curves = _run(run), []
    for lbl, stage, rec in (("estimation (masked, incl. L1)", "estimate", r.estimate),
                            ("training (pruned + LoRA)", "train", r.train)):
        x, y = logged_losses(r.run_dir, stage, rec)
        if np.isfinite(y).any():  # the loop records a diverged step as NaN: drop those steps
            curves.append((lbl, x[np.isfinite(y)], y[np.isfinite(y)]))
    if not curves:
        return None
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for (lbl, x, y), color in zip(curves, ("#805ad5", KEPT)):
        if (win := y.size // 25) > 1:  # long runs are noisy: faint raw steps plus a moving average
            ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
            y, x = np.convolve(y, np.ones(win) / win, mode="valid"), x[win - 1:]
        ax.plot(x, y, color=color, label=lbl, linewidth=1.6, marker="o" if x.size <= 30 else None, markersize=3)
    ax.set(xlabel="optimizer step", ylabel="loss", title="loss curves")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _save(fig, out)


PLOTS = {"kept_structure.png": kept_structure, "mask_distribution.png": mask_distribution,
         "module_importance.png": module_importance, "kept_ranks.png": kept_ranks, "loss_curves.png": loss_curves}


def plot_run(run: str | Path | RunData, out_dir: str | Path) -> dict[str, Path]:
    """Draw every figure whose inputs exist into out_dir; a figure that fails is logged, never fatal to the report.

    Figures of an earlier report whose inputs are gone now (e.g. plan.json deleted) are removed, so a stale picture
    never sits next to fresh numbers.
    """
    r, out_dir, made = _run(run), Path(out_dir), {}
    for name, fn in PLOTS.items():
        try:
            path = fn(r, out_dir / name)
        except Exception:  # noqa: BLE001 - one broken figure must not cost the whole report
            log.warning("plot %s failed; the report is written without it", name, exc_info=True)
            path = None
        if path is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            made[name] = path
    return made
