"""Cache keys of recipe sections: which fields a finished stage's key hashes, so that adding a feature never
invalidates a finished stage (docs/architecture.md, "Stages")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Recipe, recipe_to_dict


@dataclass(frozen=True)
class Follows:
    """The old implicit value of an added field was another field's value."""

    field: str


# Fields added after run directories already existed, grouped by the field that switches the feature on, with the
# value that means "off" (what runs made before the feature had implicitly; `Follows(f)`: the value field f has) and
# the fields that only matter when on. While the switch is off, cache keys and plans leave the whole group out, so
# adding a feature never invalidates a finished stage, and settings that an off feature does not use never change a
# key. random_peft: `random` used to randomise the PEFT choices too, so a random plan keeps its old key only with
# random_peft true (and is then the same plan); a random plan of the new kind gets a new key.
ADDED_LATER: dict[str, list[tuple[str, Any, tuple[str, ...]]]] = {
    "estimate": [("mask_warmup_steps", 0, ()), ("l1_per_mask", False, ()), ("loss_on", "label", ())],
    "train": [("distill_weight", 0.0, ("distill_temperature",)), ("epochs", None, ()),
              ("lr_scheduler", "linear", ())],
    "prune": [("multiple_of", 1, ()), ("allocation", "layerwise", ()), ("random_peft", Follows("random"), ())],
    "eval": [("adapter", "last", ())],
    # the strategy section's train keys (`Strategy.train_keys`, pipeline/train.py) and APT's plan key (apt/plan.py)
    "apt": [("mask_ramp", False, ("mask_ramp_step", "ramp")), ("distill_weight", 0.0, ("distill_temperature",)),
            ("random", False, ())],
    # lr: the rounds' LRs, which the train key reads via train_lr: search. The search key (strategies/prunepeft/
    # search.py) applies every group but train_lr's: lr is always the search's
    "prunepeft": [("train_lr", None, ("lr",)), ("removal", "hybrid", ()), ("partitions", "kind_band", ()),
                  ("criterion", None, ())],
}
# Fields that never change a stage's output (how often to checkpoint, how many to keep): never part of a key, so
# switching checkpoints on for a requeue keeps the stage's key, and the checkpoint it resumes from.
NOT_KEYED: dict[str, tuple[str, ...]] = {"train": ("checkpoint_every", "keep_checkpoints")}


def without_later_defaults(section: str, values: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` of a recipe section without the later-added features that are switched off (and without the
    fields that never change an output). `skip`: switches whose groups a key handles itself (leaves them in)."""
    values = {k: v for k, v in values.items() if k not in NOT_KEYED.get(section, ())}
    for switch, off, dependents in ADDED_LATER.get(section, []):
        if switch in skip:
            continue
        if values.get(switch) == (values.get(off.field) if isinstance(off, Follows) else off):
            for k in (switch, *dependents):
                values.pop(k, None)
    return values


def keyed_section(recipe: Recipe, section: str) -> dict[str, Any]:
    """A recipe section as cache keys (and plans) hash it."""
    return without_later_defaults(section, recipe_to_dict(recipe)[section])
