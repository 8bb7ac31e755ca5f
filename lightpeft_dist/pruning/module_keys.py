"""Module keys of scores and plans: which adapter kind a PEFT module belongs to, and its path.

A LoRA and a bottleneck adapter may sit on the same projection (docs/adapters.md), so a key names the kind as well
as the path. LoRA, the default kind, keeps bare paths: every LoRA score file and plan written before kinds existed
reads unchanged. Other kinds are `<kind>:<path>`.
"""

from __future__ import annotations

from typing import Any

DEFAULT_KIND = "lora"  # the kind a bare module key means
SEP = ":"


def qualify(kind: str, path: str) -> str:
    return path if kind == DEFAULT_KIND else f"{kind}{SEP}{path}"


def split_key(key: str) -> tuple[str, str]:
    """(kind, module path) of a scores / plan key; module paths never contain the separator."""
    kind, sep, path = key.partition(SEP)
    return (kind, path) if sep else (DEFAULT_KIND, key)


def upgrade_keys(mapping: dict[str, Any], bare: str) -> dict[str, Any]:
    """Keys as written now: bare keys of a run whose bare kind is not LoRA get qualified (order kept)."""
    return {(qualify(bare, k) if SEP not in k else k): v for k, v in mapping.items()}


def by_kind(mapping: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{kind: {module path: value}} of a mapping with (upgraded) module keys."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in mapping.items():
        kind, path = split_key(key)
        out.setdefault(kind, {})[path] = value
    return out
