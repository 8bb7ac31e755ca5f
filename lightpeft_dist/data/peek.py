"""A cheap look at a data file before any stage runs: it exists, is UTF-8 jsonl, and its first row has the columns
the format needs.

`load_rows` checks every row, but only when a stage reads the split: a broken eval file used to surface at
evaluate, after estimate, prune and train had run. Reading one line per file costs nothing and catches a wrong path,
a wrong format or a wrong column name at validation (docs/architecture.md, "Guarantees").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from .. import assets
from ..config import DataConfig
from ..errors import LightPeftError
from .batches import _SPLIT_KEY, REQUIRED_COLUMNS


def first_row(path: Path, where: str) -> dict | None:
    """The first non-blank line of a jsonl file as a mapping; None for a JSON array file (datasets reads those too,
    and checks them at load)."""
    try:
        with open(path, "rb") as f:
            number, line = 0, b""
            for number, line in enumerate(f, 1):
                if line.strip():
                    break
            else:
                raise LightPeftError(f"{where} is empty; it needs one JSON object per line")
    except OSError as exc:
        raise LightPeftError(f"{where} cannot be read ({exc.strerror or exc})") from None
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise LightPeftError(f"{where}: line {number} is not UTF-8 text; save the file as UTF-8 jsonl") from None
    if text.startswith("["):
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LightPeftError(f"{where}: line {number} is not JSON ({exc.msg}); write one JSON object per line") \
            from None
    if not isinstance(row, dict):
        raise LightPeftError(f"{where}: line {number} is a JSON {type(row).__name__}, not an object; write one JSON "
                             "object per line")
    return row


def peek_split(cfg: DataConfig, split: Literal["train", "eval", "test"]) -> None:
    """Check the file of one split as far as its first row; the split must be set."""
    key = _SPLIT_KEY[split]
    path = getattr(cfg, key)
    if path is None:
        raise LightPeftError(f"data.{key} is not set but the '{split}' split is needed; add data.{key} to the recipe")
    real = Path(assets.resolve(path))
    if not real.is_file():
        raise LightPeftError(f"data.{key} not found at {path}; fix the path in the recipe (relative paths are resolved "
                             "against the recipe's folder)")
    where = f"data.{key} at {path}"
    row = first_row(real, where)
    if row is None:
        return
    required = REQUIRED_COLUMNS[cfg.format]
    for col in required:
        if col not in row:
            raise LightPeftError(f"{where} lacks column '{col}' required by data.format '{cfg.format}' (its first "
                                 f"row has {', '.join(map(repr, row)) or 'no keys'}); every line needs keys "
                                 f"{', '.join(required)}")
        kind = list if col == "messages" else str  # chat rows: a list of role/content turns (chat.py checks them)
        if col != "label" and not isinstance(row[col], kind):
            raise LightPeftError(f"{where}: column '{col}' on the first row is {type(row[col]).__name__}, not a "
                                 f"{'list' if kind is list else 'string'}; fix that line")
    if cfg.format == "classification" and cfg.labels is not None and str(row["label"]) not in cfg.labels:
        raise LightPeftError(f"{where} has label {str(row['label'])!r} not in data.labels "
                             f"({', '.join(map(repr, cfg.labels))}); add it to data.labels")
