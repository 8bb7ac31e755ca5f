"""Recipe schema: one YAML file drives every stage.

The schema is strict (unknown keys are errors) because a typo in a pruning ratio silently falling back to a default
would waste a cluster allocation. Dotted command-line overrides (`--prune.attn_ratio=0.4`) are applied to the raw
mapping before validation, so they get the same checks as the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, SerializationInfo, Tag, ValidationError,
                      field_serializer, field_validator, model_validator)

from .errors import LightPeftError

Scope = Literal["layerwise", "global"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    path: str = Field(description="HF model folder (safetensors), or 'embedded:smollm2' for the offline default")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] | None = Field(
        "auto", description="auto: flash_attention_2 if flash_attn is usable on CUDA, else sdpa (attention.py)")
    tokenizer: str | None = Field(None, description="tokenizer folder; defaults to model.path")


class DataConfig(_Strict):
    format: Literal["sft", "classification", "text"]
    train_file: str
    eval_file: str | None = None
    test_file: str | None = None
    labels: dict[str, str] | None = Field(None, description="classification: label -> verbalizer word")
    template: str = "{text}\n"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    @model_validator(mode="after")
    def _classification_needs_labels(self) -> "DataConfig":
        if self.format == "classification":
            if not self.labels:
                raise ValueError("data.labels (label -> verbalizer word) is required for format 'classification'")
            if "{text}" not in self.template:
                raise ValueError("data.template must contain '{text}'")
        return self


class PeftConfig(_Strict):
    """One adapter spec. `type` holds the kind's registry name (adapters/registry.py; `adapter` reads as
    `bottleneck`); for a bottleneck adapter r is its size and alpha its output scaling."""

    type: str = Field("lora", description="adapter kind: lora, or bottleneck (alias adapter); docs/adapters.md")
    r: int = Field(8, ge=1)
    alpha: float = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    @field_validator("type")
    @classmethod
    def _known_kind(cls, word: str) -> str:
        from .adapters.registry import resolve

        try:
            return resolve(word).name
        except LightPeftError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _kind_defaults(self) -> "PeftConfig":
        """Keys the spec leaves unset take its kind's values (bottleneck: the reference's o_proj + down_proj,
        dropout 0.1, scaling 1.0)."""
        from .adapters.registry import KINDS

        for key, value in KINDS[self.type].defaults.items():
            if key not in self.model_fields_set:
                object.__setattr__(self, key, list(value) if isinstance(value, list) else value)
        return self


_ONE, _LIST = "<spec>", "<list>"  # tags of the two peft forms; left out of error locations
PeftSection = Annotated[Union[Annotated[PeftConfig, Tag(_ONE)], Annotated[list[PeftConfig], Tag(_LIST)]],
                        Discriminator(lambda v: _LIST if isinstance(v, list) else _ONE)]


class EstimateConfig(_Strict):
    steps: int = Field(100, ge=1)
    l1: float = Field(1e-4, ge=0.0)
    lr: float = Field(3e-4, gt=0.0)
    mask_lr_coef: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=8)
    max_grad_norm: float = 1.0
    seed: int = 42
    checkpoint_every: int = Field(0, ge=0, description="0 = no mid-run checkpoints")


class PruneConfig(_Strict):
    attn_ratio: float = 1 / 3
    ffn_ratio: float = 1 / 3
    module_ratio: float = 0.75
    rank_ratio: float = 0.5
    ffn_scope: Scope = "global"
    rank_scope: Scope = "global"
    uniform: bool = False
    random: bool = Field(False, description="control: replace every score with seeded noise")
    unit_scores: Literal["masks", "activation"] = Field(
        "masks", description="rank heads and FFN neurons by the learned masks (Light-PEFT) or by their measured "
                             "activations times output weight norms (see activation.py)")
    seed: int = 0

    @field_validator("attn_ratio", "ffn_ratio", "module_ratio", "rank_ratio")
    @classmethod
    def _ratio_in_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"pruning ratio {v} is outside [0, 1); use e.g. 0.3 to prune 30%")
        return v


class TrainConfig(_Strict):
    steps: int = Field(200, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=8)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = Field(0, ge=0, description="0 = only at the end")
    seed: int = 42
    warm_start: bool = Field(True, description="start from the sliced estimation adapter, as the reference does")
    load_in_4bit: bool = Field(False, description="QLoRA: the pruned base in 4-bit NF4 (bitsandbytes), LoRA on top")
    gradient_checkpointing: bool = False
    packing: bool = Field(False, description="pack examples into rows of seq_len tokens; batch_size counts rows")
    distill_weight: float = Field(0.0, ge=0.0, le=1.0, description="share of the loss that is KL to the unpruned "
                                  "base model's next-token distribution on every real token (0 = off; distill.py)")
    distill_temperature: float = Field(1.0, gt=0.0)


class EvalConfig(_Strict):
    batch_size: int = Field(16, ge=1)
    speed_batches: int = Field(3, ge=1, description="batches timed for tokens/s")


class Recipe(_Strict):
    model: ModelConfig
    data: DataConfig
    peft: PeftSection = Field(PeftConfig(), description="one adapter spec, or a list of them, one per kind")
    estimate: EstimateConfig = EstimateConfig()
    prune: PruneConfig = PruneConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("peft")
    @classmethod
    def _one_spec_per_kind(cls, peft: PeftConfig | list[PeftConfig]) -> PeftConfig | list[PeftConfig]:
        """A list is put in attach order; a list of one is the single form (same model, so the same keys)."""
        if isinstance(peft, PeftConfig):
            return peft
        from .adapters.registry import KINDS

        if not peft:
            raise ValueError("the list of adapter specs is empty; give at least one, e.g. {type: lora}")
        names = [s.type for s in peft]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapter kind {twice[0]} appears twice; put all its targets in one entry")
        peft = sorted(peft, key=lambda s: KINDS[s.type].order)
        return peft[0] if len(peft) == 1 else peft

    @field_serializer("peft")
    def _stored_peft(self, peft: PeftConfig | list[PeftConfig], info: SerializationInfo) -> dict | list[dict]:
        """The single form stores the word its kind was given before kinds existed (`adapter` for bottleneck), so
        the stage keys that hash this dict stay those of earlier runs; a list stores registry names."""
        if isinstance(peft, list):
            return [s.model_dump(mode=info.mode) for s in peft]
        from .adapters.registry import KINDS

        out = peft.model_dump(mode=info.mode)
        out["type"] = KINDS[peft.type].recipe_word or peft.type
        return out

    @property
    def adapters(self) -> list[PeftConfig]:
        """The adapter specs, in attach order, whichever form the recipe used."""
        return self.peft if isinstance(self.peft, list) else [self.peft]


def _coerce(text: str) -> Any:
    """Parse an override value the way YAML would ('0.4' -> 0.4, 'true' -> True, '[a,b]' -> list)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise LightPeftError(f"override '{item}' is not of the form --section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LightPeftError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = _coerce(value)
    return raw


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if p not in (_ONE, _LIST)) or "recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling against the recipe reference in README.md"
    elif err["type"] == "missing":
        msg = "required key is missing"
    return f"invalid recipe {source}: {where}: {msg}"


def recipe_from_dict(raw: dict[str, Any], source: str = "(dict)", base_dir: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise LightPeftError(_format_validation_error(exc, source)) from None
    if base_dir is not None:
        _resolve_paths(recipe, base_dir)
    return recipe


def _resolve_paths(recipe: Recipe, base_dir: Path) -> None:
    """Make relative file paths relative to the recipe file, so recipes can ship next to their data."""

    def fix(p: str | None) -> str | None:
        if p is None or p.startswith("embedded:") or Path(p).is_absolute():
            return p
        if Path(p).exists():
            return str(Path(p).resolve())
        cand = base_dir / p
        return str(cand.resolve()) if cand.exists() else p

    recipe.model.path = fix(recipe.model.path)
    recipe.model.tokenizer = fix(recipe.model.tokenizer)
    for name in ("train_file", "eval_file", "test_file"):
        setattr(recipe.data, name, fix(getattr(recipe.data, name)))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise LightPeftError(f"recipe not found at {path}; pass --config with a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LightPeftError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LightPeftError(f"recipe {path} must be a YAML mapping of sections (model, data, peft, ...)")
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, source=str(path), base_dir=path.parent)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
