"""How each method is named and coloured in tables and figures: the one source for both.

A method is a registered strategy (its descriptor carries its label and colour) or one of the reference rows a
study puts beside the strategies: the unpruned model zero-shot, LoRA on the full model, a strategy's plan ranked by
another unit score, and the random-pruning control.
"""

from __future__ import annotations

from ..strategies.registry import STRATEGIES

# PrunePEFT's ablation rows, each the PrunePEFT row with one thing changed (benchmarks/quality/strategy_rows.py,
# ABLATIONS, whose keys a test holds equal to these)
PRUNEPEFT_ABLATION_LABELS: dict[str, tuple[str, str]] = {
    "prunepeft_random": ("PrunePEFT ablation: random removal", "#fbd38d"),
    "prunepeft_nopart": ("PrunePEFT ablation: hybrid without partitions", "#ed8936"),
    "prunepeft_lowfi": ("PrunePEFT ablation: low-fidelity search (1/8 steps, 1% rows)", "#c05621"),
    "prunepeft_weight": ("PrunePEFT ablation: weight criterion only", "#7b341e"),
    "prunepeft_zeros": ("PrunePEFT ablation: zeros criterion only", "#975a16"),
    "prunepeft_threshold": ("PrunePEFT ablation: threshold criterion only", "#b7791f"),
    "prunepeft_activation": ("PrunePEFT ablation: activation criterion only", "#d69e2e"),
    "prunepeft_snip": ("PrunePEFT ablation: SNIP criterion only", "#744210"),
    "prunepeft_gradient": ("PrunePEFT ablation: gradient criterion only", "#f6ad55"),
}
PRUNEPEFT_ABLATIONS = tuple(PRUNEPEFT_ABLATION_LABELS)

BASELINES: dict[str, tuple[str, str]] = {  # name: (label, colour)
    "zero-shot": ("zero-shot (unpruned, no training)", "#a0aec0"),
    "lora": ("LoRA, full model (all ratios 0)", "#2f855a"),
    "activation": ("Light-PEFT, activation unit scores", "#805ad5"),
    "taylor": ("Light-PEFT, Taylor unit scores", "#d53f8c"),
    "movement": ("Light-PEFT, mask movement scores", "#b7791f"),
    "masks_warmup": ("Light-PEFT masks, mask LR warm-up", "#3182ce"),
    "masks_alltok": ("Light-PEFT masks, loss on all tokens", "#2c7a7b"),
    "taylor_m64": ("Light-PEFT, Taylor unit scores, widths multiple of 64", "#97266d"),
    "taylor_budget": ("Light-PEFT, Taylor unit scores, budget allocation", "#1a365d"),
    "random": ("random pruning", "#e07b39"),
    "random_budget": ("random units at the budget plan's per-layer counts", "#c05621"),
    "salience_budget": ("Light-PEFT, APT salience, budget allocation", "#2a4365"),
    "random_salience_budget": ("random units at the salience budget plan's per-layer counts", "#9c4221"),
    "lora_qv": ("LoRA on q, v only, full model", "#38a169"),
    "supernet": ("PrunePEFT supernet, no search (LoRA q,v + bottleneck)", "#68d391"),
    "apt_oneshot": ("APT one-shot (calibrate, prune, tune with rank growth)", "#c53030"),
    "apt_random": ("random units at APT's per-layer counts", "#fc8181"),
    "apt_gradual": ("APT gradual (pruning during tuning, rank growth)", "#9b2c2c"),
    "prunepeft_base": ("PrunePEFT on the salience-budget-pruned base", "#dd6b20"),
    **PRUNEPEFT_ABLATION_LABELS,
}
ORDER = ("zero-shot", "lora", "lora_qv", "supernet", *STRATEGIES, "apt_oneshot", "apt_gradual", "prunepeft_base",
         *PRUNEPEFT_ABLATIONS,
         "masks_warmup", "masks_alltok", "movement", "activation", "taylor",
         "taylor_m64", "taylor_budget", "salience_budget", "random", "random_budget",
         "random_salience_budget", "apt_random")  # table order
UNKNOWN_COLOR = "#4a5568"


def label(method: str) -> str:
    if method in STRATEGIES:
        return STRATEGIES[method].label
    return BASELINES.get(method, (method, ""))[0]


def color(method: str) -> str:
    if method in STRATEGIES:
        return STRATEGIES[method].color
    return BASELINES.get(method, ("", UNKNOWN_COLOR))[1]
