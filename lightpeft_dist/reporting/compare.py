"""Compare finished run directories: one table and one accuracy-vs-pruning figure across runs.

A single run's report answers "what did this plan cost"; the question users ask first ("how much accuracy does early
pruning cost?") needs several runs side by side, several seeds per setting and a spread. Runs are grouped by the
optional `quality.json` a study writes next to them (method, target level, seed); a plain run directory without it is
its own group, so `lightpeft report --run-dir D --compare D2 D3` works on any runs.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from ..errors import LightPeftError
from ..io_utils import read_json_if_present, write_json
from ..rundir import RunDir
from . import flops, methods
from .artefacts import RunData
from .plots import _save

log = logging.getLogger(__name__)
COLUMNS = ("method", "target pruned", "achieved pruned", "test {metric}", "% of LoRA", "ppl (pruned base)",
           "total params", "trainable params", "train tokens/s", "inference tokens/s", "estimation / training",
           "FLOPs (est. + train) / LoRA's", "wall (est. + train) / LoRA's")


def _maybe(path: Path) -> dict:
    return read_json_if_present(path) or {}


def run_summary(run_dir: str | Path) -> dict | None:
    """Flat numbers of one run (None if it has no evaluation yet, or none of its current plan: artefacts.py)."""
    d = Path(run_dir)
    data = RunData.load(d)
    for note in data.notes:
        log.warning("compare: %s: %s", d, note)
    ev, plan, train, est = data.eval or {}, data.plan or {}, data.train or {}, data.estimate or {}
    q = _maybe(RunDir(d).quality_record)
    model = ev.get("pruned") or ev.get("base")
    metric = next((m for m in ("accuracy", "perplexity") if model and m in model), None)
    if metric is None:
        return None
    uses_estimate = q.get("uses_estimate", bool(est))
    cost = flops.run_costs(d, data.estimate, data.train)
    parts = [cost["train_flops"]] + ([cost["estimate_flops"]] if uses_estimate else [])
    walls = [cost["train_seconds"]] + ([cost["estimate_seconds"]] if uses_estimate else [])
    return {
        "run": str(d), "method": q.get("method", "run"), "level": q.get("level"), "seed": q.get("seed"),
        "label": q.get("label", d.name), "metric": metric, "value": model[metric],
        "fraction_pruned": plan.get("summary", {}).get("prunable_fraction_pruned", None if plan or
                                                        RunDir(d).plan.is_file() else 0.0),  # no plan: nothing pruned
        "params_total": model.get("params", {}).get("total"),
        "params_trainable": train.get("params", {}).get("trainable", 0 if "pruned" not in ev else None),
        "train_tokens_per_s": train.get("tokens_per_s"),
        "infer_tokens_per_s": q.get("infer_tokens_per_s", model.get("tokens_per_s")),  # interleaved if measured
        "infer_rounds": len(q.get("infer_rounds") or []),
        "estimate_cost": (est["train_seconds"] / train["train_seconds"]
                          if uses_estimate and est and train.get("train_seconds") else None),
        "ppl": q.get("ppl", {}).get("pruned_base"),
        "flops": None if None in parts else sum(parts),  # what the run paid: its estimate (if any) + its training
        "wall": None if None in walls else sum(walls),
    }


def _stats(values: list) -> dict:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def group_runs(summaries: list[dict]) -> list[dict]:
    """Mean and spread per (method, level); runs without study metadata stay one group each."""
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        key = (s["method"], s["level"]) if s["method"] != "run" else ("run", s["run"])
        groups.setdefault(key, []).append(s)

    def order(key: tuple) -> tuple:
        method, level = key
        rank = methods.ORDER.index(method) if method in methods.ORDER else len(methods.ORDER)
        return (rank, level if isinstance(level, (int, float)) else 0.0, str(level))

    out = []
    for key in sorted(groups, key=order):
        runs = groups[key]
        g = {"method": key[0], "level": key[1] if key[0] != "run" else None, "label": runs[0]["label"],
             "metric": runs[0]["metric"], "seeds": [r["seed"] for r in runs], "runs": [r["run"] for r in runs]}
        for field in ("value", "fraction_pruned", "params_total", "params_trainable", "train_tokens_per_s",
                      "infer_tokens_per_s", "estimate_cost", "ppl", "flops", "wall"):
            g[field] = _stats([r[field] for r in runs])
        out.append(g)
    lora = next((g for g in out if g["method"] == "lora"), None)
    for g in out:
        ref = lora["value"]["mean"] if lora else None
        g["of_lora"] = g["value"]["mean"] / ref if ref and g["value"]["mean"] is not None else None
        for field in ("flops", "wall"):  # the end-to-end cost against LoRA's training (issue 14)
            mine, theirs = g[field]["mean"], lora[field]["mean"] if lora else None
            g[f"{field}_of_lora"] = mine / theirs if mine is not None and theirs else None
    return out


def _num(stat: dict, spec: str) -> str:
    return "-" if stat["mean"] is None else format(stat["mean"], spec)


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _value_cell(g: dict) -> str:
    v, pct = g["value"], g["metric"] == "accuracy"
    if v["mean"] is None:
        return "-"
    scale, spec = (100, ".1f") if pct else (1, ".2f")
    cell = format(v["mean"] * scale, spec) + ("%" if pct else "")
    if v["n"] > 1:
        cell += f" ± {format(v['std'] * scale, spec)} (n={v['n']}, {format(v['min'] * scale, spec)}–" \
                f"{format(v['max'] * scale, spec)})"
    return cell


def table_rows(groups: list[dict]) -> list[list[str]]:
    rows = []
    for g in groups:
        level = "-" if g["level"] is None or g["method"] == "run" else f"{g['level']:.0%}"
        rows.append([g["label"], level, _num(g["fraction_pruned"], ".1%"), _value_cell(g),
                     "-" if g["of_lora"] is None else f"{g['of_lora']:.1%}", _num(g["ppl"], ",.1f"),
                     _num(g["params_total"], ",.0f"), _num(g["params_trainable"], ",.0f"),
                     _num(g["train_tokens_per_s"], ",.0f"), _num(g["infer_tokens_per_s"], ",.0f"),
                     _num(g["estimate_cost"], ".2f"), _ratio(g.get("flops_of_lora")), _ratio(g.get("wall_of_lora"))])
    return rows


def markdown_table(groups: list[dict]) -> str:
    metric = groups[0]["metric"] if groups else "accuracy"
    head = [c.format(metric=metric) for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(groups)]
    return "\n".join(lines)


def plot_groups(groups: list[dict], out: str | Path) -> Path | None:
    """Metric vs achieved pruned fraction: one line per pruning method (mean, error bar = std over seeds);
    LoRA on the full model, 97% of it, and zero-shot as horizontal lines."""
    pruned = [g for g in groups if g["method"] not in ("zero-shot", "lora") and g["value"]["mean"] is not None
              and g["fraction_pruned"]["mean"] is not None]
    if not pruned:
        return None
    metric = pruned[0]["metric"]
    scale = 100 if metric == "accuracy" else 1
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    for method in dict.fromkeys(g["method"] for g in pruned):
        pts = sorted((g["fraction_pruned"]["mean"], g["value"]["mean"] * scale, (g["value"]["std"] or 0) * scale)
                     for g in pruned if g["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=4,
                    color=methods.color(method), label=methods.label(method))
    for g in groups:
        if g["method"] == "lora" and g["value"]["mean"] is not None:
            ax.axhline(g["value"]["mean"] * scale, color=methods.color("lora"), label=methods.label("lora"))
            if metric == "accuracy":
                ax.axhline(0.97 * g["value"]["mean"] * scale, color=methods.color("lora"), linestyle=":",
                           label="97% of LoRA")
        if g["method"] == "zero-shot" and g["value"]["mean"] is not None:
            ax.axhline(g["value"]["mean"] * scale, color=methods.color("zero-shot"), linestyle="--",
                       label=methods.label("zero-shot"))
    ax.set(xlabel="fraction of prunable parameters pruned (achieved)",
           ylabel=f"test {metric}" + (" (%)" if metric == "accuracy" else " (lower is better)"))
    right = max(g["fraction_pruned"]["mean"] for g in pruned)
    ax.set_xlim(0, max(0.05, right * 1.15))  # room for the rightmost point and its error bar
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="best")
    return _save(fig, out)


def write_comparison(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """compare.json, compare.md and accuracy_vs_ratio.png for these runs under out_dir; unfinished runs are skipped."""
    out_dir = Path(out_dir)
    summaries = []
    for d in run_dirs:
        if not Path(d).is_dir():
            raise LightPeftError(f"run directory {d} does not exist; pass run directories made by `lightpeft run`")
        s = run_summary(d)
        if s is None:
            log.info("compare: %s has no eval.json yet, skipped", d)
        else:
            summaries.append(s)
    groups = group_runs(summaries)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_groups(groups, out_dir / "accuracy_vs_ratio.png")
    table = markdown_table(groups)
    md = f"# Comparison of {len(summaries)} runs\n\n{table}\n"
    if plot:
        md += f"\n![accuracy vs pruning ratio]({plot.name})\n"
    tmp = out_dir / ".compare.md.tmp"
    tmp.write_text(md)
    tmp.replace(out_dir / "compare.md")
    result = {"runs": summaries, "groups": groups, "table": table, "plot": str(plot) if plot else None}
    write_json(out_dir / "compare.json", result)
    return result
