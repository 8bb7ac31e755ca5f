"""The name, help line and collectivity of every shipped stage, readable without importing any stage's code.

The CLI builds one subcommand per stage at start-up. The stages themselves (pipeline/stages.py and each strategy's
module) import torch, transformers and peft at the top, ~10 s of start-up that `lightpeft --help` and a usage error
should not cost (docs/benchmarks.md, "CLI start"). So the shipped stages' headers are listed here once more, and
tests/test_registries.py checks that this listing equals `all_stages()` field by field, in order. When the stage
registry is already imported (a plug-in registered a strategy, or the caller ran stages), the live registry is used.
"""

from __future__ import annotations

import sys
from typing import NamedTuple


class StageHeader(NamedTuple):
    name: str
    help: str
    collective: bool


SHIPPED_STAGES: tuple[StageHeader, ...] = (  # all_stages() order: each strategy's own stages, then the shared ones
    StageHeader("estimate", "masked estimation run: learn head/FFN masks and PEFT importance", True),
    StageHeader("calibrate", "APT: score KV groups and FFN neurons on calibration examples (salience + kurtosis)",
                True),
    StageHeader("plan", "plan from the strategy's scores (re-plan at other ratios without re-estimating)", False),
    StageHeader("search", "PrunePEFT: prune a LoRA + bottleneck supernet in rounds to choose the PEFT modules", True),
    StageHeader("prune", "slice the base model and the estimation adapter to the plan", False),
    StageHeader("train", "fine-tune the pruned model", True),
    StageHeader("evaluate", "accuracy / perplexity, parameters and tokens/s, base vs pruned", False),
    StageHeader("export", "merge the trained LoRA adapter into the pruned model: one HF checkpoint in RUN_DIR/export",
                False),
    StageHeader("baseline", "LoRA on the unpruned model in RUN_DIR/baseline_lora, timed beside the pruned model "
                "(report.baseline_lora)", True),
    StageHeader("report", "write report/summary.md and print the table", False),
)


def live_headers() -> list[StageHeader]:
    """The headers of `all_stages()` (imports every stage module)."""
    from .stages import all_stages

    return [StageHeader(s.name, s.help, s.collective) for s in all_stages().values()]


def stage_headers() -> list[StageHeader]:
    """Every stage the CLI offers: the live registry once it is imported, else the shipped listing."""
    if "lightpeft_dist.strategies.registry" in sys.modules:
        return live_headers()
    return list(SHIPPED_STAGES)
