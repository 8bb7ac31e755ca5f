#!/usr/bin/env python
"""How much does each part of a plan damage the base model, before any fine-tuning? (a quality-study diagnostic)

    python benchmarks/quality/damage.py --study runs/quality --seed 0 --plans 0.35:0 0:0.376 0.35:0.376 \
        [--random] [--scores estimate|estimate-activation|activation] [--ffn-scope global] \
        [--out runs/quality/damage.json]

For each ATTN:FFN pair, plans from the seed's shared estimate (the study's prune settings otherwise), prunes the base
checkpoint into a temporary folder with the project's prune, and measures the perplexity of the pruned base model on
the study's held-out text (Brown corpus). Cheap next to a training row, and it separates "the plan broke the model"
from "fine-tuning could not recover it".
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks.quality.perplexity import load_windows  # noqa: E402
from lightpeft_dist.config import recipe_from_dict  # noqa: E402
from lightpeft_dist.strategies.lightpeft import SCORE_FILES  # noqa: E402
from lightpeft_dist.io_utils import read_json, write_json  # noqa: E402
from lightpeft_dist.models.loading import load_model, load_tokenizer  # noqa: E402
from lightpeft_dist.reporting.damage import pruned_perplexity  # noqa: E402
from lightpeft_dist.pruning.scores import load_scores  # noqa: E402
from lightpeft_dist.rundir import ESTIMATE_RECORD, RunDir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plans", nargs="+", required=True, help="ATTN:FFN ratio pairs, e.g. 0.35:0")
    p.add_argument("--random", action="store_true", help="random plans (prune.random, seeded by --seed)")
    p.add_argument("--scores", choices=["estimate", "estimate-activation", "activation"], default="estimate",
                   help="rank units by the estimate's masks, by the estimate's activation scores "
                        "(prune.unit_scores=activation), or by calibration activations on the frozen base "
                        "(activation_scores.py)")
    p.add_argument("--ffn-scope", choices=["layerwise", "global"], help="override the study's prune.ffn_scope")
    p.add_argument("--write-scores", type=Path, help="also save the scores used (a scores.safetensors for `lightpeft plan`)")
    p.add_argument("--ppl-text", default="brown")
    p.add_argument("--ppl-windows", type=int, default=16, help="number of perplexity windows")
    p.add_argument("--ppl-window-tokens", type=int, default=256)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[damage] %(message)s")
    base = recipe_from_dict(yaml.safe_load((args.study / "base_recipe.yaml").read_text()))
    est_dir = args.study / f"seed{args.seed}" / "estimate-run" / "estimate"
    est = read_json(est_dir / ESTIMATE_RECORD)
    scores = load_scores(est_dir / SCORE_FILES["activation" if args.scores == "estimate-activation" else "masks"],
                         est)
    tok = load_tokenizer(base.model)
    windows, info = load_windows(tok, args.ppl_text, args.ppl_window_tokens, args.ppl_windows)
    if args.scores == "activation":
        from benchmarks.quality.activation_scores import activation_scores

        scores = activation_scores(load_model(base.model.path, base.model.dtype, base.model.attn_implementation),
                                   tok, base, scores)
    if args.write_scores:
        from lightpeft_dist.pruning.scores import save_scores

        save_scores(args.write_scores, scores)
    rows = []
    for spec in args.plans:
        attn, ffn = (float(x) for x in spec.split(":"))
        cfg = base.prune.model_copy(update={"attn_ratio": attn, "ffn_ratio": ffn, "random": args.random,
                                             "seed": args.seed,
                                             **({"ffn_scope": args.ffn_scope} if args.ffn_scope else {})})
        ppl, plan = pruned_perplexity(base, est, scores, cfg, windows, tok)  # the report's --damage code
        rows.append({"attn_ratio": attn, "ffn_ratio": ffn, "ffn_scope": cfg.ffn_scope, "random": args.random,
                     "scores": args.scores,
                     "fraction_pruned": plan["summary"]["prunable_fraction_pruned"], "ppl": ppl})
        print(f"| attn {attn:.3f} | ffn {ffn:.3f} {cfg.ffn_scope} | {'random' if args.random else args.scores} | "
              f"{rows[-1]['fraction_pruned']:.1%} pruned | ppl {ppl:,.2f} |", flush=True)
    if args.out:
        old = read_json(args.out) if args.out.is_file() else {"rows": []}
        write_json(args.out, {"ppl": info, "seed": args.seed, "rows": old["rows"] + rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
