"""The strategy registry: one line per strategy.

A recipe names its strategy (`strategy: lightpeft`, the default); the pipeline, the CLI, the launchers and the
reports look it up here. Adding a strategy is one module that defines a `Strategy` descriptor plus one line below
(docs/architecture.md shows it with a no-op strategy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LightPeftError
from .base import Strategy
from .apt import STRATEGY as APT
from .lightpeft import STRATEGY as LIGHTPEFT
from .prunepeft import STRATEGY as PRUNEPEFT

if TYPE_CHECKING:
    from ..config import Recipe

STRATEGIES: dict[str, Strategy] = {
    LIGHTPEFT.name: LIGHTPEFT,
    APT.name: APT,
    PRUNEPEFT.name: PRUNEPEFT,
}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy at run time (tests and plug-ins); the listing above is for the shipped ones."""
    if strategy.name in STRATEGIES and STRATEGIES[strategy.name] is not strategy:
        raise LightPeftError(f"a strategy named {strategy.name!r} is already registered")
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise LightPeftError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None


def strategy_for(recipe: "Recipe") -> Strategy:
    return get_strategy(recipe.strategy)
