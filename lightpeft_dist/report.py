"""Human-readable summary of a run directory: one table (Markdown) that `demo` and `report` print.

Works on whatever stages have finished; missing stages show as '-'.
"""

from __future__ import annotations

from pathlib import Path

from .io_utils import read_json, write_json


def _maybe(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _fmt(value, spec: str = ",") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def summary_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    ev = _maybe(run_dir / "eval.json")
    base, pruned = ev.get("base", {}), ev.get("pruned", {})
    plan = _maybe(run_dir / "plan.json").get("summary", {})
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
    train = _maybe(run_dir / "train" / "train.json")
    est = _maybe(run_dir / "estimate" / "estimate.json")
    if train:
        rows.append(("training tokens/s", "-", _fmt(train.get("tokens_per_s"), ",.0f")))
    if train and est:
        rows.append(("estimation cost / training", "-", f"{est['train_seconds'] / max(train['train_seconds'], 1e-9):.2f}"))
    return rows


def summary_table(run_dir: Path) -> str:
    rows = [("", "before (base, zero-shot)", "after (pruned + LoRA)"), *summary_rows(run_dir)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def write_report(run_dir: Path) -> Path:
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = f"# Light-PEFT run: {run_dir.name}\n\n{summary_table(run_dir)}\n"
    tmp = out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    write_json(out / "summary.json", {"rows": summary_rows(run_dir)})
    return out
