"""Study rows of the other strategies, APT and PrunePEFT, and the LoRA rows PrunePEFT is measured against.

Each row is one run directory driven through its strategy's own stages and then the shared plan, prune and train
(rows.drive_row), with the study's model, data, training steps, evaluation and seed; only the strategy, its
section and (for PrunePEFT) the PEFT candidates change, so the rows compare directly with the LoRA and Light-PEFT
rows of the same study. The settings are the shipped recipes' (recipes/smollm2_sentiment_apt*.yaml,
recipes/smollm2_sentiment_prunepeft*.yaml), scaled to the study's training steps.

- `apt_oneshot` (per level): APT's calibration (salience + kurtosis on 256 examples), its plan at density
  1 - level, then a fresh LoRA with rank growth. The calibration does not depend on the density, so a seed's
  calibration runs once (folder `apt-calibrate`) and is hard-linked into each level's row.
- `apt_random` (per level): APT's random control, `apt.random`: the one-shot plan's per-layer counts of KV groups
  and FFN neurons with the units drawn at random (same calibration, same parameter count).
- `apt_gradual` (per level): dense start, three physical pruning checkpoints in the first 3/4 of the training,
  masks ramped before each, rank growth at the same checkpoints.
- `prunepeft` (no level): the LLaMA port's supernet (LoRA r=8 on q, v and a 32-unit bottleneck after attention and
  MLP; 60 groups on 30 layers), 5 rounds removing 6 groups each, warm-up assignment; the survivors train fresh.
- `prunepeft_base` (per level): the same search on the base pruned like the `salience_budget` row (the seed's
  estimate's salience scores, budget allocation, the level's ratios), so the two differ only in the PEFT choice.
- `lora_qv` (no level): LoRA r=8 on q and v only on the full model, the usual LoRA default and the port's LoRA part.
- `supernet` (no level): PrunePEFT's whole supernet trained without any search (the paper's "no pruning" row).
- The paper's other ablation rows (no level), each the `prunepeft` row with one thing changed (ABLATIONS,
  docs/method.md "PrunePEFT", "Ablations"): `prunepeft_random` (each round removes its groups at random; the warm-up
  and the rounds still train, so the cost is the search's), `prunepeft_nopart` (hybrid without partitions: one
  partition, the warm-up over it), `prunepeft_lowfi` (low-fidelity search: 1 step per round and for the warm-up
  instead of 8, on a seeded 1% of the train rows), and `prunepeft_<criterion>` for each of the six criteria (that
  criterion in every kind x band partition; `assignment: default`, since a single criterion leaves the warm-up nothing
  to choose).
"""

from __future__ import annotations

import copy
from pathlib import Path

from lightpeft_dist.config import Recipe, recipe_from_dict
from lightpeft_dist.io_utils import read_json
from lightpeft_dist.rundir import ESTIMATE_RECORD, RunDir
from lightpeft_dist.strategies.prunepeft.section import CRITERIA, PORT_PEFT

# per level: the row's strategy section is built from the level; the others have no level
LEVEL_ROWS = ("apt_oneshot", "apt_random", "apt_gradual", "prunepeft_base")
# the `prunepeft` row's section with what each ablation changes
SINGLE_CRITERION = {f"prunepeft_{c}": {"criterion": c, "assignment": "default"} for c in CRITERIA}
# low fidelity: each round and the warm-up train 1 step instead of 8, on a seeded 1% of the rows (the paper's
# trimmed set), so the search really costs about 1/8 of the full one (data_fraction alone changes only the rows)
LOW_FIDELITY = {"steps": 1, "warmup_steps": 1, "data_fraction": 0.01}
ABLATIONS: dict[str, dict] = {"prunepeft_random": {"removal": "random"}, "prunepeft_nopart": {"partitions": "none"},
                              "prunepeft_lowfi": LOW_FIDELITY, **SINGLE_CRITERION}
PLAIN_ROWS = ("prunepeft", "lora_qv", "supernet", *ABLATIONS)
STRATEGY_ROWS = LEVEL_ROWS + PLAIN_ROWS
ZERO = {"attn_ratio": 0.0, "ffn_ratio": 0.0, "module_ratio": 0.0, "rank_ratio": 0.0, "random": False}


def _apt(mode: str, level: float, train: dict, seed: int) -> dict:
    apt = {"mode": mode, "target_density": round(1.0 - level, 6), "batch_size": train["batch_size"],
           "seq_len": train["seq_len"], "use_kurtosis": True, "seed": seed, "rank_growth": 4.0, "max_rank": 64}
    if mode == "one_shot":
        return {**apt, "calibration_samples": 256}
    window = max(1, (3 * train["steps"]) // 4)  # prune in the first 3/4, tune the pruned model in the rest
    checkpoints = min(3, window)
    return {**apt, "calibration_samples": 16, "beta": 0.85, "window": window, "checkpoints": checkpoints,
            "ramp": max(1, window // checkpoints)}


def _prunepeft(train: dict, seed: int, layers: int, base_scores: str = "none") -> dict:
    """The port's budget: half of the supernet's 2 groups per layer removed, in 5 rounds (fewer on shallow models)."""
    rounds = min(5, layers)
    return {"rounds": rounds, "per_round": layers // rounds, "steps": 8, "batch_size": train["batch_size"],
            "seq_len": train["seq_len"], "assignment": "warmup", "warmup_examples": 100, "warmup_steps": 8,
            "between_rounds": "rebuild", "seed": seed, "base_scores": base_scores}


def strategy_recipe(base: dict, method: str, level: float | None, seed: int, shared_estimate: Path,
                    level_ratios: dict | None = None) -> Recipe:
    """The row's recipe: the study's recipe (seeds set as rows.Study.recipe does) with the row's strategy."""
    raw = copy.deepcopy(base)
    for sec in ("estimate", "train", "prune"):
        raw.setdefault(sec, {})["seed"] = seed
    raw["train"]["warm_start"] = False  # every row here starts its adapters fresh, as its recipe does
    raw["train"]["distill_weight"] = 0.0
    defaults = {k: v for k, v in raw["prune"].items() if k not in ("module_ratio", "rank_ratio", "attn_ratio",
                                                                  "ffn_ratio", "random", "random_peft")}
    if method in ("apt_oneshot", "apt_random", "apt_gradual"):
        raw["strategy"] = "apt"
        raw["apt"] = _apt("gradual" if method == "apt_gradual" else "one_shot", level, raw["train"], seed)
        raw["apt"]["random"] = method == "apt_random"
    elif method in ("prunepeft", "prunepeft_base", *ABLATIONS):
        raw["strategy"] = "prunepeft"
        raw["peft"] = copy.deepcopy(PORT_PEFT)
        raw["prune"] = defaults
        scores = "none"
        if method == "prunepeft_base":
            scores = str(RunDir(shared_estimate.parent).scores("salience").resolve())
            raw["prune"] = {**defaults, **{k: level_ratios[k] for k in ("attn_ratio", "ffn_ratio")},
                            "allocation": "budget", "unit_scores": "salience"}
        layers = len(read_json(shared_estimate / ESTIMATE_RECORD, "estimate record")["layer_shapes"])
        raw["prunepeft"] = {**_prunepeft(raw["train"], seed, layers, scores), **ABLATIONS.get(method, {})}
    elif method == "lora_qv":
        raw["peft"] = {**raw["peft"], "targets": ["q_proj", "v_proj"]}
        raw["prune"] = {**raw["prune"], **ZERO}
    elif method == "supernet":
        raw["peft"] = copy.deepcopy(PORT_PEFT)
        raw["prune"] = {**raw["prune"], **ZERO}
    else:
        raise ValueError(f"not a strategy row: {method}")
    return recipe_from_dict(raw, source=f"quality study row {method}")


def shares_first_stage(method: str) -> str | None:
    """The per-seed folder whose first stage a row links in (APT one-shot's calibration), or None: own stages."""
    return "apt-calibrate" if method in ("apt_oneshot", "apt_random") else None
