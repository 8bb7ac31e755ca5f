"""Human-readable summary of a run directory: one table (Markdown) that `demo` and `report` print.

`write_report` adds a per-layer kept-structure table and the PNG figures of plots.py under report/. Works on whatever
stages have finished; missing stages show as '-', missing figures are left out. What it reads comes through
`artefacts.RunData`: an invalid plan or score file, or records of an earlier plan, are left out with a note line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LightPeftError
from ..io_utils import write_json, write_text
from ..rundir import RunDir
from .artefacts import RunData, load

log = logging.getLogger(__name__)


def _fmt(value, spec: str = ",") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def summary_rows(run: str | Path | RunData) -> list[tuple[str, str, str]]:
    r = load(run)
    ev = r.eval or {}
    base, pruned = ev.get("base", {}), ev.get("pruned", {})
    plan = (r.plan or {}).get("summary", {})
    metric = "accuracy" if "accuracy" in pruned or "accuracy" in base else "perplexity"
    spec = ".2%" if metric == "accuracy" else ".2f"
    rows = [
        ("parameters (total)", _fmt(base.get("params", {}).get("total")),
         _fmt(pruned.get("params", {}).get("total"))),
        ("trainable parameters (LoRA)", "-", _fmt(pruned.get("params", {}).get("adapter"))),
        ("prunable parameters", _fmt(plan.get("prunable_params_before")), _fmt(plan.get("prunable_params_after"))),
        (f"{metric} ({ev.get('split', '-')})", _fmt(base.get(metric), spec), _fmt(pruned.get(metric), spec)),
        ("inference tokens/s", _fmt(base.get("tokens_per_s"), ",.0f"), _fmt(pruned.get("tokens_per_s"), ",.0f")),
    ]
    train, est = r.train or {}, r.estimate or {}
    if train:
        rows.append(("training tokens/s", "-", _fmt(train.get("tokens_per_s"), ",.0f")))
    if train and est:
        rows.append(("estimation cost / training", "-", f"{est['train_seconds'] / max(train['train_seconds'], 1e-9):.2f}"))
    return rows


def summary_table(run: str | Path | RunData) -> str:
    rows = [("", "before (base, zero-shot)", "after (pruned + LoRA)"), *summary_rows(run)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def layer_rows(run: str | Path | RunData) -> list[tuple[str, str, str, str]]:
    """Per layer 'kept / original' query heads, KV heads and FFN neurons; empty until a valid plan exists.

    Without estimate.json (original shapes) only the kept counts are shown.
    """
    r = load(run)
    plan = r.plan or {}
    shapes = (r.estimate or {}).get("layer_shapes") or []
    if len(shapes) != len(plan.get("layers", [])):
        shapes = [{}] * len(plan.get("layers", []))
    cell = lambda kept, orig: f"{kept} / {orig}" if orig is not None else str(kept)  # noqa: E731
    return [(str(i), cell(len(lp["q_heads"]), sh.get("num_attention_heads")),
             cell(len(lp["kv_heads"]), sh.get("num_key_value_heads")),
             cell(len(lp["ffn"]), sh.get("intermediate_size")))
            for i, (lp, sh) in enumerate(zip(plan.get("layers", []), shapes))]


def layer_table(run: str | Path | RunData) -> str:
    rows = layer_rows(run)
    if not rows:
        return ""
    head = "| layer | query heads kept | KV heads kept | FFN neurons kept |"
    return "\n".join([head, "|---:|---:|---:|---:|", *("| " + " | ".join(r) + " |" for r in rows)])


def run_recipe(run_dir: Path, record: dict | None):
    """The recipe the run directory was started with (recipe.yaml), else the one its estimate record holds."""
    from ..config import read_recipe_file, recipe_from_dict

    saved = RunDir(run_dir).recipe
    if saved.is_file():
        return recipe_from_dict(read_recipe_file(saved, "saved recipe"), source=str(saved))
    if record and record.get("recipe"):
        return recipe_from_dict(record["recipe"], source="the estimate record's recipe")
    raise LightPeftError(f"no recipe in {run_dir} to prune with for --damage; run estimate there first")


def write_report(run_dir: Path, damage: str | None = None) -> Path:
    """Write report/summary.md (table, per-layer table, score diagnostics, figures) and summary.json; works after
    any finished stage.

    Figures come from `plots.plot_run`; one that cannot be drawn is left out (and its link with it). With `damage`
    (held-out text: 'validation', 'brown' or a text file) the diagnostics also measure the pruned base's perplexity
    per score kind (damage.py), which costs a pruned checkpoint and a pass over the text per kind.
    """
    from .diagnostics import diagnostics, diagnostics_markdown
    from .plots import plot_run

    run_dir = Path(run_dir)
    r = RunData.load(run_dir)
    for note in r.notes:
        log.warning("report: %s", note)
    out = RunDir(run_dir).report
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_run(r, out)
    diag = diagnostics(run_dir, r.estimate, r.notes)
    if damage is not None:
        if diag is None:
            raise LightPeftError(f"--damage needs an estimate's score files in {run_dir}; run `lightpeft estimate`")
        from .damage import damage as measure_damage
        from .diagnostics import load_score_files

        diag["damage"] = measure_damage(run_recipe(run_dir, r.estimate), r.estimate,
                                        load_score_files(run_dir, r.estimate, []), damage)
    parts = [f"# Light-PEFT run: {run_dir.name}\n\n{summary_table(r)}\n"]
    if r.notes:
        parts.append("\n".join(f"> note: {note}" for note in r.notes) + "\n")
    if table := layer_table(r):
        parts.append(f"## Kept structure per layer\n\n{table}\n")
    if diag is not None:
        parts.append(diagnostics_markdown(diag))
    if plots:
        parts.append("## Figures\n\n" + "\n".join(f"![{name[:-4].replace('_', ' ')}]({name})\n"
                                                   for name in plots))
    write_text(out / "summary.md", "\n".join(parts))
    write_json(out / "summary.json", {"rows": summary_rows(r), "layers": layer_rows(r), "plots": list(plots),
                                      "notes": r.notes, "diagnostics": diag})
    return out
