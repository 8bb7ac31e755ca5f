"""Atomic, pickle-free persistence for run-directory artefacts.

Stages talk only through files, so a crash must never leave a file that a later stage would mistake for a finished
one: everything is written to a temporary sibling and renamed into place. Only JSON and safetensors are read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LightPeftError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publishable(tmp: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; published artefacts get the usual umask-based modes."""
    mask = _umask()
    if tmp.is_dir():
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        tmp.chmod(0o666 & ~mask)


def _tmp_sibling(path: Path, directory: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_text(path: str | Path, text: str) -> None:
    """Atomic text write (recipes, reports): a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text)
        _publishable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_if_present(path: str | Path, what: str = "file") -> Any | None:
    """`read_json`, or None when the file does not exist (a stage that has not run yet); corrupt is still an error."""
    return read_json(path, what) if Path(path).is_file() else None


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise LightPeftError(f"{what} not found at {path}; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LightPeftError(f"{what} at {path} is corrupt ({exc.__class__.__name__}); delete it and rerun its stage")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _publishable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise LightPeftError(f"{what} not found at {path}; run the stage that writes it first")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LightPeftError(f"{what} at {path} is corrupt or truncated ({exc}); delete it and rerun its stage")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error."""
    path = Path(path)
    tmp = _tmp_sibling(path, directory=True)
    try:
        yield tmp
        _publishable(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
