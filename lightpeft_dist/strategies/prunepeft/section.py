"""The `prunepeft:` recipe section: the search's schema, and the recipe checks that need the whole recipe.

Why a module of its own: the schema, the port's defaults (LoRA r=8 alpha=16 on q,v; a 32-unit bottleneck without
nonlinearity after attention and MLP; 4 rounds x 8 groups; 8 steps per round) and the checks that tie `prunepeft:`
to `peft:`, `prune:` and `train:` are what a user reads first (docs/method.md, "PrunePEFT").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from ...config import Recipe

CRITERIA = ("weight", "zeros", "threshold", "activation", "snip", "gradient")
BANDS = ("0-20", "20-50", "50-80", "80-100")  # relative depth bands, percent
# The official code's fixed allocation (criterion names: weight = minimum_weight, threshold = values_below_threshold).
DEFAULT_TABLE: dict[str, dict[str, list[str]]] = {
    "lora": {"0-20": ["activation", "threshold"], "20-50": ["threshold"], "50-80": ["zeros"], "80-100": ["gradient"]},
    "bottleneck": {"0-20": ["activation", "weight", "snip", "zeros"], "20-50": ["snip", "weight"],
                   "50-80": ["weight", "snip"], "80-100": ["snip"]},
}
PORT_PEFT = [{"type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.1, "targets": ["q_proj", "v_proj"]},
             {"type": "bottleneck", "r": 32, "alpha": 1.0, "dropout": 0.1, "targets": ["o_proj", "down_proj"]}]


class PrunePeftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rounds: int = Field(4, ge=1, description="pruning rounds R")
    per_round: int = Field(8, ge=1, description="module groups removed per round k")
    steps: int = Field(8, ge=1, description="training steps per round before scoring")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=8)
    max_grad_norm: float = 1.0
    seed: int = 42
    data_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the train rows the rounds draw from "
                                 "(1.0 = full data; e.g. 0.01 = the paper's low fidelity)")
    between_rounds: Literal["rebuild", "warm_start"] = Field(
        "rebuild", description="rebuild: fresh supernet of the survivors each round (both references); warm_start: "
                               "survivors keep their trained weights (cheaper, not what the paper evaluated)")
    lr: dict[str, float] = Field({"lora": 2e-4, "bottleneck": 2e-4}, description="round learning rate per kind")
    train_lr: Literal["search"] | dict[str, float] | None = Field(
        None, description="the final training's learning rate per kind: unset = train.lr for every adapter; "
                          "search = the rounds' prunepeft.lr; or kind -> LR (one optimizer group per kind, the "
                          "train schedule scales them all)")
    groups: dict[str, list[list[str]]] = Field(
        {"lora": [["q_proj", "v_proj"]], "bottleneck": [["o_proj", "down_proj"]]},
        description="per kind, the targets pruned together as one group per layer; a peft target in no group is a "
                    "group of its own")
    bottleneck_activation: Literal["none", "relu", "gelu", "silu"] = Field("none", description="the port: none")
    threshold: float = Field(1e-6, gt=0.0, description="the threshold criterion's |w| < t")
    assignment: Literal["default", "warmup"] = Field("default", description="criteria per partition: the official "
                                                     "fixed table, or counted in a warm-up")
    table: dict[str, dict[str, list[str]]] | None = Field(None, description="assignment default: this table instead "
                                                          "of the official one (kind -> band -> criteria)")
    warmup_examples: int = Field(100, ge=1, description="label-balanced warm-up subset size")
    warmup_steps: int = Field(8, ge=1)
    base_scores: str = Field("none", description="none; masks, activation, taylor, movement or salience (Light-PEFT's "
                             "estimate, run "
                             "first with the recipe's estimate: section); or a unit-scores file (e.g. another run's "
                             "estimate/taylor_scores.safetensors): prune heads and FFN neurons at prune.attn_ratio / "
                             "ffn_ratio first, then search the PEFT modules on the pruned base")
    warmup_top: int | None = Field(None, ge=1, description="prune choices counted per criterion (unset: half the "
                                   "groups, like the port's 30 of 64)")
    # the paper's ablations (docs/method.md, "PrunePEFT", "Ablations"); their defaults are today's search, and keys
    # leave them out while they are (keys.ADDED_LATER), so runs made before they existed keep their keys
    removal: Literal["hybrid", "random"] = Field("hybrid", description="which groups a round removes: the top "
                                                 "hybrid scores, or k drawn uniformly from the alive groups (seeded by "
                                                 "prunepeft.seed and the round; the rounds still train)")
    partitions: Literal["kind_band", "none"] = Field("kind_band", description="kind_band: one partition per module "
                                                     "kind x depth band; none: all groups in one partition (hybrid "
                                                     "without partitions)")
    criterion: str | None = Field(None, description="one criterion for every partition (single-criterion search); "
                                  "not with table or assignment: warmup")

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not x > 0]
        if bad:
            raise ValueError(f"prunepeft.lr.{bad[0]} must be > 0")
        return v

    @field_validator("train_lr")
    @classmethod
    def _positive_train_lr(cls, v: "str | dict[str, float] | None") -> "str | dict[str, float] | None":
        bad = [k for k, x in v.items() if not x > 0] if isinstance(v, dict) else []
        if bad:
            raise ValueError(f"prunepeft.train_lr.{bad[0]} must be > 0")
        return v

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v: str | None) -> str | None:
        if v is not None and v not in CRITERIA:
            raise ValueError(f"unknown criterion {v!r}; choose from {list(CRITERIA)}")
        return v

    @model_validator(mode="after")
    def _one_source_of_criteria(self) -> "PrunePeftConfig":
        """`criterion` is a third way to assign criteria; two at once would leave one silently unused."""
        if self.criterion is not None and self.table is not None:
            raise ValueError(f"criterion {self.criterion!r} sets every partition's criteria, so the table "
                             f"would be ignored; remove prunepeft.table or prunepeft.criterion")
        if self.criterion is not None and self.assignment == "warmup":
            raise ValueError(f"criterion {self.criterion!r} sets every partition's criteria, so the warm-up "
                             f"would count for nothing; use assignment: default or remove prunepeft.criterion")
        return self

    @field_validator("table")
    @classmethod
    def _known_criteria(cls, v: dict[str, dict[str, list[str]]] | None) -> dict[str, dict[str, list[str]]] | None:
        if v is None:
            return v
        for kind, bands in v.items():
            if set(bands) != set(BANDS):
                raise ValueError(f"table.{kind} must name exactly the bands {list(BANDS)}, got {sorted(bands)}")
            for band, names in bands.items():
                if not names:
                    raise ValueError(f"table.{kind}.{band} is an empty partition: give it at least one criterion "
                                     f"of {list(CRITERIA)}")
                unknown = [n for n in names if n not in CRITERIA]
                if unknown:
                    raise ValueError(f"table.{kind}.{band}: unknown criterion {unknown[0]!r}; choose from "
                                     f"{list(CRITERIA)}")
        return v


def check_recipe(recipe: "Recipe") -> None:
    """Cross-section rules of a `strategy: prunepeft` recipe; fills the port's defaults where keys are unset.

    The search decides which PEFT modules survive, so the planner's module and rank ratios are the search's and the
    base model is not pruned (docs/method.md); setting those keys by hand is refused rather than silently ignored.
    """
    from ...config import PeftConfig

    cfg: PrunePeftConfig = recipe.section("prunepeft")
    if "peft" not in recipe.model_fields_set:
        object.__setattr__(recipe, "peft", [PeftConfig(**spec) for spec in PORT_PEFT])
    if "warm_start" not in recipe.train.model_fields_set:
        object.__setattr__(recipe.train, "warm_start", False)
    defaults = type(recipe.prune)()
    for key in ("module_ratio", "rank_ratio"):  # a saved recipe writes the defaults, so only other values count
        if getattr(recipe.prune, key) != getattr(defaults, key):
            raise ValueError(f"prune.{key} is decided by the PrunePEFT search (prunepeft.rounds x per_round "
                             f"groups removed, every rank kept); remove it from the recipe")
    from .composition import check_base_recipe

    check_base_recipe(recipe)
    specs = {s.type: s for s in recipe.adapters}
    for kind, groups in cfg.groups.items():
        if kind not in specs:
            continue  # a kind without candidates has nothing to group
        for group in groups:
            missing = [t for t in group if t not in specs[kind].targets]
            if missing:
                raise ValueError(f"prunepeft.groups.{kind} names {missing[0]}, which is not in that kind's "
                                 f"peft targets {specs[kind].targets}; add it there or remove it from the group")
    table = cfg.table or DEFAULT_TABLE
    for kind in specs:
        if cfg.criterion is None and kind not in table:  # a single criterion reads no table
            raise ValueError(f"prunepeft.table has no criteria for kind {kind}; add table.{kind}")
        if kind not in cfg.lr:
            raise ValueError(f"prunepeft.lr has no learning rate for kind {kind}; add lr.{kind}")
        if isinstance(cfg.train_lr, dict) and kind not in cfg.train_lr:
            raise ValueError(f"prunepeft.train_lr has no learning rate for kind {kind}; add train_lr.{kind} (or "
                             f"use train_lr: search for the rounds' prunepeft.lr)")


def kind_lrs(recipe: "Recipe") -> dict[str, float] | None:
    """The final training's LR per adapter kind (`prunepeft.train_lr`), None for train.lr everywhere."""
    cfg: PrunePeftConfig = recipe.section("prunepeft")
    if cfg.train_lr is None:
        return None
    lrs = cfg.lr if cfg.train_lr == "search" else cfg.train_lr
    return {s.type: float(lrs[s.type]) for s in recipe.adapters}
