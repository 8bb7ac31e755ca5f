"""The `apt:` recipe section: APT's settings (docs/method.md, "APT").

Why a schema of its own: a strategy's section is validated by the strategy (config.py looks it up through the
strategy registry), so APT's keys and their checks live next to the code that reads them. Every key is documented
in README.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...config import _Strict


class AptConfig(_Strict):
    mode: Literal["one_shot", "gradual"] = Field(
        "one_shot", description="one_shot: calibrate, prune once to target_density, then LoRA on the pruned model "
                                "(the paper's LLaMA recipe); gradual: dense start, prune physically at checkpoints during "
                                "tuning (calibration then only fixes the cost model)")
    target_density: float = Field(0.7, description="share of the prunable parameters kept, in (0, 1]")
    calibration_samples: int = Field(256, ge=1, description="examples the calibration stage scores on")
    batch_size: int = Field(8, ge=1, description="calibration examples per step (global, any world size)")
    grad_accum: int = Field(1, ge=1, description="calibration micro-batches per step")
    seq_len: int = Field(128, ge=8, description="calibration sequence length")
    seed: int = 42
    beta: float = Field(0.85, ge=0.0, lt=1.0, description="EMA factor of the running salience (gradual mode)")
    use_kurtosis: bool = Field(True, description="add sqrt(max(kurtosis, 0)) of each block's output weights "
                                                 "scaled by its mean input (the outlier term)")
    prune_hidden: bool = Field(False, description="also prune hidden dimensions (one global set kept on the "
                                                  "residual stream; gradual: at the checkpoints, ramped with the "
                                                  "blocks); the budget then counts the whole model, embeddings and "
                                                  "LM head included")
    rank_growth: float = Field(4.0, ge=1.0, description="total LoRA rank budget grows linearly to this x the initial "
                               "one over the growth events (1: no growth)")
    max_rank: int = Field(64, ge=1, description="no LoRA module grows beyond this rank")
    window: int = Field(400, ge=1, description="training steps of the pruning window (gradual: the density follows "
                        "a cubic schedule from 1 to target_density over it) and of the growth events (both modes)")
    ramp: int = Field(100, ge=1, description="gradual: steps before each pruning checkpoint over which the blocks "
                      "it removes are masked by a decreasing value (the paper's 0.01 per step is 100)")
    mask_ramp: bool = Field(True, description="gradual: ramp the masks of the blocks a checkpoint removes "
                            "(strategies/apt/ramp.py); false removes them at the checkpoint at once; one-shot mode "
                            "has no ramp and reads false")
    mask_ramp_step: float = Field(0.01, ge=0.0, le=1.0, description="gradual: the mask decrease per step inside the "
                                  "ramp (0 turns the ramp off)")
    distill_weight: float = Field(0.0, ge=0.0, le=1.0, description="gradual: weight of the distillation from the "
                                  "unpruned base, ramped linearly from 0 over the window, then held (0 = off)")
    distill_temperature: float = Field(1.0, gt=0.0, description="gradual: the distillation's softmax temperature")
    random: bool = Field(False, description="one_shot: APT's random control: keep the scored plan's per-layer counts "
                         "of KV groups and FFN neurons (and the hidden count) but draw the kept units at random, "
                         "seeded by apt.seed")
    checkpoints: int = Field(4, ge=1, description="physical pruning checkpoints in the window (gradual), and the "
                             "number of rank-growth events (both modes)")

    @field_validator("target_density")
    @classmethod
    def _density_in_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"target_density {v} is outside (0, 1]; it is the share kept, e.g. 0.7 keeps 70%")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "AptConfig":
        if self.window < self.ramp:
            raise ValueError(f"window {self.window} is shorter than the ramp ({self.ramp} steps); set window >= ramp")
        if self.window // self.checkpoints < self.ramp:
            raise ValueError(f"window {self.window} over {self.checkpoints} checkpoints leaves "
                             f"{self.window // self.checkpoints} steps between checkpoints, shorter than the ramp "
                             f"({self.ramp}); set window >= checkpoints x ramp = {self.checkpoints * self.ramp}")
        if self.random and self.mode == "gradual":
            raise ValueError("apt.random (the random control at the scored plan's counts) is for mode one_shot: the "
                             "gradual mode chooses its blocks during training; set mode: one_shot or random: false")
        if self.mode == "one_shot" and self.distill_weight > 0:
            raise ValueError("apt.distill_weight is for gradual mode; in one-shot mode distil with "
                             "train.distill_weight, or set apt.mode: gradual")
        if self.mode == "one_shot" or self.mask_ramp_step == 0:
            self.mask_ramp = False  # nothing to ramp: keys and records read "off"
        return self

    def check_recipe(self, recipe) -> None:
        """Checks that need the rest of the recipe (the strategy descriptor's `check`, called by config.py)."""
        if self.distill_weight > 0 and recipe.train.distill_weight > 0:
            raise ValueError("apt.distill_weight and train.distill_weight are both set: gradual APT distils with "
                             "its ramped weight; set train.distill_weight: 0")
        for spec in recipe.adapters:
            if spec.type != "lora":
                raise ValueError(f"strategy apt tunes LoRA adapters; peft type {spec.type} is not supported, use "
                                 "type: lora")
            if self.max_rank < spec.r:
                raise ValueError(f"apt.max_rank {self.max_rank} is below peft.r {spec.r}: rank growth cannot cap "
                                 f"below the starting rank; set apt.max_rank >= {spec.r}")
