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
from . import flops
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


def _markdown(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def summary_table(run: str | Path | RunData) -> str:
    """The run's table: base vs pruned + LoRA, or, with the LoRA baseline (report.baseline_lora), three columns and
    the note that says how each row was measured."""
    r = load(run)
    if r.lora is not None:
        return comparison_table(r)
    return _markdown([("", "before (base, zero-shot)", "after (pruned + LoRA)"), *summary_rows(r)])


COMPARISON_HEAD = ("", "unpruned, zero-shot", "LoRA on the unpruned model", "pruned + LoRA")


def _mib(record: dict | None) -> str:
    peak = (record or {}).get("peak_memory")
    return "-" if not peak else f"{peak['bytes'] / 2 ** 20:,.0f} MiB"


def _seconds(record: dict | None) -> float | None:
    record = record or {}
    return record.get("stage_seconds", record.get("wall_seconds"))


def comparison_rows(run: str | Path | RunData) -> list[tuple[str, str, str, str]]:
    """Three columns, every number from a record: the run's eval.json (base and pruned), the baseline's eval.json
    (LoRA), the train and estimate records, and D/baseline_lora.json (inference tokens/s, timed side by side)."""
    r = load(run)
    assert r.lora is not None and r.baseline is not None, "comparison_rows needs the LoRA baseline"
    ev, lora_ev = r.eval or {}, r.lora.eval or {}
    base, lora, pruned = ev.get("base", {}), lora_ev.get("pruned", {}), ev.get("pruned", {})
    metric = "accuracy" if "accuracy" in pruned or "accuracy" in base else "perplexity"
    spec = ".2%" if metric == "accuracy" else ".2f"
    speed = r.baseline.get("infer_tokens_per_s", {})
    est, train, lora_train = r.estimate or {}, r.train or {}, r.lora.train or {}
    lora_s, est_s, train_s = _seconds(lora_train), _seconds(est), _seconds(train)
    plan, lora_plan = (r.plan or {}).get("summary", {}), (r.lora.plan or {}).get("summary", {})
    pruned_wall = "-" if est_s is None or train_s is None else \
        f"{est_s + train_s:,.0f} s (estimate {est_s:,.0f} + train {train_s:,.0f})"
    return [
        (f"{metric} ({ev.get('split', '-')})", _fmt(base.get(metric), spec), _fmt(lora.get(metric), spec),
         _fmt(pruned.get(metric), spec)),
        ("parameters (total)", _fmt(base.get("params", {}).get("total")), _fmt(lora.get("params", {}).get("total")),
         _fmt(pruned.get("params", {}).get("total"))),
        ("trainable parameters", "-", _fmt(lora_train.get("params", {}).get("trainable")),
         _fmt(train.get("params", {}).get("trainable"))),
        ("prunable parameters", _fmt(plan.get("prunable_params_before")), _fmt(lora_plan.get("prunable_params_after")),
         _fmt(plan.get("prunable_params_after"))),
        ("training tokens/s", "-", _fmt(lora_train.get("tokens_per_s"), ",.0f"), _fmt(train.get("tokens_per_s"), ",.0f")),
        ("inference tokens/s", *(_fmt(speed.get(c), ",.0f") for c in ("zero-shot", "lora", "pruned"))),
        ("peak memory, training", "-", _mib(lora_train), _mib(train)),
        ("peak memory, estimate", "-", "-", _mib(est)),
        ("wall time (estimate + train)", "-", "-" if lora_s is None else f"{lora_s:,.0f} s (train)", pruned_wall),
        ("FLOPs (estimate + train)", "-", *_flops_cells(r)),
    ]


def _flops_cells(r: RunData) -> tuple[str, str]:
    """LoRA's training FLOPs and the pruned run's estimate + training FLOPs (reporting/flops.py), with the ratio."""
    lora = flops.run_costs(r.lora.run_dir, r.lora.estimate, r.lora.train)
    mine = flops.run_costs(r.run_dir, r.estimate, r.train)
    lora_f, est_f, train_f = lora["train_flops"], mine["estimate_flops"], mine["train_flops"]
    if lora_f is None or train_f is None:
        return _fmt(lora_f, ".3g"), "-"
    total = train_f + (est_f or 0.0)
    return f"{lora_f:.3g} (train)", (f"{total:.3g} (estimate {est_f or 0:.3g} + train {train_f:.3g}; "
                                     f"{total / lora_f:.2f}x LoRA's)")


def comparison_notes(r: RunData) -> list[str]:
    measure = next((rec["peak_memory"]["measure"] for rec in (r.train, r.lora.train if r.lora else None, r.estimate)
                    if rec and rec.get("peak_memory")), "not recorded")
    steps = (r.train or {}).get("steps")
    return [f"LoRA on the unpruned model: same data, {steps} training steps like the pruned model, fresh LoRA "
            f"(run directory {r.run_dir.name}/{(r.baseline or {}).get('baseline_run_dir', '-')}).",
            f"inference tokens/s: {(r.baseline or {}).get('speed_measure', '-')}.",
            f"peak memory: {measure}; the maximum over ranks.",
            "wall time: each stage from its start to its record, model loading included (prune and evaluate not "
            "counted)."]


def comparison_table(run: str | Path | RunData) -> str:
    r = load(run)
    return _markdown([COMPARISON_HEAD, *comparison_rows(r)]) + "\n\n" + \
        "\n".join(f"- {note}" for note in comparison_notes(r))


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


def report_title(run_dir: Path) -> str:
    """"<strategy label> run: <name>", the strategy read from the run's saved recipe (Light-PEFT when it has none)."""
    from . import methods

    try:
        strategy = run_recipe(run_dir, None).strategy
    except LightPeftError:
        strategy = "lightpeft"
    return f"{methods.label(strategy)} run: {Path(run_dir).name}"


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
    parts = [f"# {report_title(run_dir)}\n\n{summary_table(r)}\n"]
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
                                      "notes": r.notes, "diagnostics": diag,
                                      "comparison": comparison_rows(r) if r.lora is not None else None})
    return out
