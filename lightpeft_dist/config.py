"""Recipe schema: one YAML file drives every stage.

The schema is strict (unknown keys are errors) because a typo in a pruning ratio silently falling back to a default
would waste a cluster allocation. Dotted command-line overrides (`--prune.attn_ratio=0.4`) are applied to the raw
mapping before validation, so they get the same checks as the file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, SerializationInfo, Tag, ValidationError,
                      field_serializer, field_validator, model_validator)

from .errors import LightPeftError

# Adapter kinds and strategies live above this module. The schema finds their descriptors (kind names and defaults,
# strategy sections) through their registries by module name: the one place where the ground layer looks the layers
# above it up (docs/architecture.md, "Layers").
ADAPTER_REGISTRY = "lightpeft_dist.adapters.registry"
STRATEGY_REGISTRY = "lightpeft_dist.strategies.registry"


def _registry(name: str):
    return importlib.import_module(name)

Scope = Literal["layerwise", "global"]
# FFN neurons may also be ranked globally on scores divided by their layer's mean (plan.py): score scales differ
# between layers, which is what makes plain global ranking break layers (docs/results.md).
FfnScope = Literal["layerwise", "global", "global_normalized"]
# unit scores that estimate a loss change on one scale in every layer: the only ones `prune.allocation: budget`
# compares across layers and kinds (pruning/allocation.py)
FIRST_ORDER_SCORES = ("taylor", "salience")


class _Strict(BaseModel):
    # `.inf` and `.nan` are valid YAML floats; a NaN learning rate passes every `gt=0` bound and diverges a run
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(_Strict):
    path: str = Field(description="HF model folder (safetensors), or 'embedded:smollm2' for the offline default")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] | None = Field(
        "auto", description="auto: flash_attention_2 if flash_attn is usable on CUDA, else sdpa (attention.py)")
    tokenizer: str | None = Field(None, description="tokenizer folder; defaults to model.path")


class DataConfig(_Strict):
    format: Literal["sft", "classification", "text", "chat"]
    train_file: str
    eval_file: str | None = None
    test_file: str | None = None
    labels: dict[str, str] | None = Field(None, description="classification: label -> verbalizer word")
    template: str = "{text}\n"
    max_train_examples: int | None = Field(None, ge=1, description="unset = all rows")
    max_eval_examples: int | None = Field(None, ge=1, description="unset = all rows")

    @model_validator(mode="after")
    def _classification_needs_labels(self) -> "DataConfig":
        if self.format == "classification":
            if not self.labels:
                raise ValueError("data.labels (label -> verbalizer word) is required for format 'classification'")
            if "{text}" not in self.template:
                raise ValueError("data.template must contain '{text}'")
            _check_label_words(self.labels)
        return self


def _check_label_words(labels: dict[str, str]) -> None:
    """Training supervises only the verbalizer tokens and evaluation ranks them: an empty word gives no token to
    learn, and two labels sharing a word cannot be told apart, so either would run to the end and mean nothing."""
    seen: dict[str, str] = {}
    for label, word in labels.items():
        if not word.strip():
            raise ValueError(f"data.labels: label {label!r} has an empty verbalizer word; give it a word, e.g. "
                             f"{label}: {label}")
        key = word.strip()
        if key in seen:
            raise ValueError(f"data.labels: labels {seen[key]!r} and {label!r} share the verbalizer word {key!r}; "
                             "every label needs its own word")
        seen[key] = label


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
        resolve = _registry(ADAPTER_REGISTRY).resolve

        try:
            return resolve(word).name
        except LightPeftError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v:  # no adapter at all: estimation would learn nothing and the plan would keep no module
            raise ValueError("peft.targets is empty; list the projections to adapt, e.g. [q_proj, v_proj]")
        return v

    @model_validator(mode="after")
    def _kind_defaults(self) -> "PeftConfig":
        """Keys the spec leaves unset take its kind's values (bottleneck: the reference's o_proj + down_proj,
        dropout 0.1, scaling 1.0)."""
        KINDS = _registry(ADAPTER_REGISTRY).KINDS

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
    # mask variants (docs/method.md); each default is the reference's behaviour, outside cache keys (keys.py)
    mask_warmup_steps: int = Field(0, ge=0, description="mask groups' LR warm-up steps, then linear decay")
    l1_per_mask: bool = Field(False, description="L1 term = l1 x mean|m| over all masks instead of l1 x sum|m|")
    loss_on: Literal["label", "all_tokens"] = Field(
        "label", description="estimation loss on the data's labelled tokens, or on every real token of the example")


class PruneConfig(_Strict):
    attn_ratio: float = 1 / 3
    ffn_ratio: float = 1 / 3
    module_ratio: float = 0.75
    rank_ratio: float = 0.5
    ffn_scope: FfnScope = "global"
    rank_scope: Scope = "global"
    uniform: bool = False
    random: bool = Field(False, description="control: seeded noise for the head and FFN scores; the PEFT module "
                         "and rank choices stay the scored plan's")
    random_peft: bool = Field(False, description="with random: the PEFT module and rank scores are noise too")
    unit_scores: Literal["masks", "activation", "taylor", "movement", "salience"] = Field(
        "masks", description="rank heads and FFN neurons by the learned masks (Light-PEFT), by their measured "
                             "activations times output weight norms (activation.py), by first-order Taylor "
                             "importance at the masks' position (taylor.py), by the masks' accumulated "
                             "movement sum|delta m| over the estimate (movement.py), or by APT's salience "
                             "sum|z| x sum|dL/dz| from the same hook (taylor.py)")
    seed: int = 0
    allocation: Literal["layerwise", "budget"] = Field(
        "layerwise", description="layerwise: the ratios per layer; budget: the ratios' parameter count, spent across "
                                 "layers and kinds by unit score per parameter (pruning/allocation.py); needs "
                                 "unit_scores: taylor or salience")
    multiple_of: int = Field(1, ge=1, description="kept FFN widths, and KV-group widths (groups x head_dim) where "
                             "needed, rounded to a multiple of this (plan.py); 1 = off")

    @field_validator("attn_ratio", "ffn_ratio", "module_ratio", "rank_ratio")
    @classmethod
    def _ratio_in_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"pruning ratio {v} is outside [0, 1); use e.g. 0.3 to prune 30%")
        return v

    @model_validator(mode="after")
    def _random_peft_needs_random(self) -> "PruneConfig":
        if self.random_peft and not self.random:
            raise ValueError("random_peft randomises the PEFT choices of the random control; set random: true too")
        if self.allocation == "budget":
            if self.unit_scores not in FIRST_ORDER_SCORES:
                raise ValueError(f"allocation: budget ranks units by score per parameter across layers, which needs "
                                 f"first-order scores that compare across layers; unit_scores {self.unit_scores} "
                                 "are not: set unit_scores: taylor (or salience), or allocation: layerwise")
            if self.uniform or self.multiple_of > 1:
                raise ValueError("allocation: budget chooses each layer's widths itself, so it cannot be combined with "
                                 "uniform: true or multiple_of > 1; set allocation: layerwise")
        return self


LrScheduler = Literal["linear", "cosine", "constant"]


class TrainConfig(_Strict):
    steps: int | None = Field(200, ge=1, description="optimizer steps; leave unset when train.epochs is set")
    epochs: int | None = Field(None, ge=1, description="passes over the train split instead of train.steps")
    lr_scheduler: LrScheduler = Field("linear", description="decay after the warm-up (training/schedules.py)")
    checkpoint_every: int = Field(0, ge=0, description="0 = no mid-run checkpoints")
    keep_checkpoints: int = Field(1, ge=1, description="checkpoints kept: the latest and K-1 older ones")
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

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, raw: Any) -> Any:
        """Exactly one of steps and epochs: an epoch count replaces the step default (200); both given is an error,
        since silently preferring one would train for a length the user did not ask for."""
        if isinstance(raw, dict) and raw.get("epochs") is not None:
            if raw.get("steps") is not None:
                raise ValueError(f"set train.steps ({raw['steps']}) or train.epochs ({raw['epochs']}), not both")
            raw = {**raw, "steps": None}
        return raw

    @model_validator(mode="after")
    def _some_length(self) -> "TrainConfig":
        if self.steps is None and self.epochs is None:
            raise ValueError("set train.steps or train.epochs")
        return self


class EvalConfig(_Strict):
    batch_size: int = Field(16, ge=1)
    speed_batches: int = Field(3, ge=1, description="batches timed for tokens/s")
    adapter: Literal["last", "best"] = Field("last", description="the adapter evaluate and export use: the last "
                                             "step's, or the best by validation metric (needs train.eval_every)")


class LoggingConfig(_Strict):
    report_to: list[Literal["tensorboard", "wandb", "none"]] = Field(
        ["tensorboard"], description="metric sinks on rank 0 (training/reporters.py); none = no metric files")


class ReportConfig(_Strict):
    baseline_lora: bool = Field(False, description="also train LoRA on the unpruned model in D/baseline_lora and "
                                "report it beside the pruned model (pipeline/baseline.py); the demo turns it on")
    speed_rounds: int = Field(3, ge=1, description="rounds of the side-by-side inference timing (median kept)")


def _strategies() -> dict:
    return _registry(STRATEGY_REGISTRY).STRATEGIES


class Recipe(_Strict):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # strategy sections (apt:, ...), checked below

    strategy: str = Field("lightpeft", description="what decides the pruning: lightpeft (masked estimate), apt "
                          "(salience-scored, budgeted; section apt:) or prunepeft (PEFT module search; section "
                          "prunepeft:)")
    model: ModelConfig
    data: DataConfig
    peft: PeftSection = Field(PeftConfig(), description="one adapter spec, or a list of them, one per kind")
    estimate: EstimateConfig = EstimateConfig()
    prune: PruneConfig = PruneConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    report: ReportConfig = ReportConfig()

    @field_validator("peft")
    @classmethod
    def _one_spec_per_kind(cls, peft: PeftConfig | list[PeftConfig]) -> PeftConfig | list[PeftConfig]:
        """A list is put in attach order; a list of one is the single form (same model, so the same keys)."""
        if isinstance(peft, PeftConfig):
            return peft
        KINDS = _registry(ADAPTER_REGISTRY).KINDS

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
        KINDS = _registry(ADAPTER_REGISTRY).KINDS

        out = peft.model_dump(mode=info.mode)
        out["type"] = KINDS[peft.type].recipe_word or peft.type
        return out

    @property
    def adapters(self) -> list[PeftConfig]:
        """The adapter specs, in attach order, whichever form the recipe used."""
        return self.peft if isinstance(self.peft, list) else [self.peft]

    @model_validator(mode="after")
    def _strategy_sections(self) -> "Recipe":
        """`strategy` must be registered; a section of another strategy's is an error, an unknown key too."""
        strategies = _strategies()
        if self.strategy not in strategies:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {sorted(strategies)}")
        owners = {s.section: s for s in strategies.values() if s.section_model is not None}
        for key, value in list((self.model_extra or {}).items()):
            owner = owners.get(key)
            if owner is None:
                raise ValueError(f"{key}: unknown key; check its spelling against the recipe reference in README.md")
            if owner.name != self.strategy:
                raise ValueError(f"section '{key}:' belongs to strategy {owner.name}; set strategy: {owner.name} "
                                 f"or remove the section")
            try:
                self.model_extra[key] = owner.section_model.model_validate(value or {})
            except ValidationError as exc:
                raise ValueError(_format_validation_error(exc, "", prefix=key).removeprefix("invalid recipe : "))
        for strategy in strategies.values():  # the chosen strategy's section is there even when not written
            if strategy.name == self.strategy and strategy.section_model is not None and \
                    strategy.section not in (self.model_extra or {}):
                self.model_extra[strategy.section] = strategy.section_model()
        check = strategies[self.strategy].check
        if check is not None:
            check(self)
        return self

    def section(self, name: str) -> BaseModel:
        """A strategy's recipe section (e.g. `recipe.section("apt")`)."""
        return getattr(self, name)


def _coerce(text: str) -> Any:
    """Parse an override value the way YAML would ('0.4' -> 0.4, 'true' -> True, '[a,b]' -> list)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise LightPeftError(f"override value {text!r} is not valid YAML ({str(exc).splitlines()[0]})") from None


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


def _format_validation_error(exc: ValidationError, source: str, prefix: str = "") -> str:
    err = exc.errors()[0]
    where = ".".join([prefix] * bool(prefix) + [str(p) for p in err["loc"] if p not in (_ONE, _LIST)]) or "recipe"
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


def read_recipe_file(path: Path, what: str = "recipe", fix: str = "") -> dict[str, Any]:
    """The raw mapping in a recipe file; unreadable, non-UTF-8 or non-YAML files are one-line errors ending in
    `fix`, an alternative to fixing the file (the saved recipe of a run directory is read through here too)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LightPeftError(f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start}); save it as UTF-8{fix}") from None
    except OSError as exc:
        raise LightPeftError(f"{what} {path} cannot be read ({exc.strerror or exc}); check its permissions{fix}") \
            from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise LightPeftError(f"{what} {path} is not valid YAML ({str(exc).splitlines()[0]}); fix it{fix}") from None
    if not isinstance(raw, dict):
        raise LightPeftError(f"{what} {path} is not a YAML mapping of sections (model, data, peft, ...); fix it{fix}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise LightPeftError(f"recipe not found at {path}; pass --config with a YAML recipe (see recipes/)")
    raw = apply_overrides(read_recipe_file(path), overrides or [])
    return recipe_from_dict(raw, source=str(path), base_dir=path.parent)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
