"""Atomic, pickle-free persistence for run-directory artefacts.

Stages talk only through files, so a crash must never leave a file that a later stage would mistake for a finished
one: everything is written to a temporary sibling and renamed into place. Only JSON and safetensors are read back.

A folder is replaced only if we wrote it: `atomic_dir` records every entry it publishes in a manifest, and a later
replacement refuses when the folder holds anything else, never follows a symbolic link, and keeps (renames) a folder
from before manifests instead of deleting it (docs/architecture.md, Guarantees).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LightPeftError
from .rundir import MANIFEST

log = logging.getLogger(__name__)


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


def _entries(folder: Path) -> set[str]:
    """Every path under `folder`, relative, folders with a trailing '/'. Links are listed, never followed."""
    out: set[str] = set()
    for top, dirs, files in os.walk(folder):  # followlinks=False: a link to a folder is listed in dirs, not walked
        rel = Path(top).relative_to(folder)
        out.update((rel / d).as_posix() + ("" if (Path(top) / d).is_symlink() else "/") for d in dirs)
        out.update((rel / f).as_posix() for f in files)
    return out


def _manifest(folder: Path) -> set[str] | None:
    """The entries we published in `folder`, or None when it has no readable manifest (not ours, or older)."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text()).get("entries")
    except (OSError, ValueError, AttributeError):
        return None
    return set(entries) if isinstance(entries, list) and all(isinstance(e, str) for e in entries) else None


def foreign_entries(folder: str | Path) -> list[str] | None:
    """What `folder` holds that its manifest does not list (sorted, relative), or None when it has no manifest."""
    folder = Path(folder)
    ours = _manifest(folder)
    return None if ours is None else sorted(_entries(folder) - ours - {MANIFEST})


def check_replaceable(path: str | Path, shown: Path | None = None) -> None:
    """Refuse (one line) to replace `path` unless it is missing or a real folder holding nothing we did not write;
    `shown` is the name to give it in the message."""
    path = Path(path)
    shown = shown or path
    if path.is_symlink():
        raise LightPeftError(f"{shown} is a symbolic link; lightpeft never writes through a link nor replaces one "
                             "(its target may not be ours): remove the link, or use another --run-dir")
    if not path.exists():
        return
    if not path.is_dir():
        raise LightPeftError(f"{shown} is a file where lightpeft writes a folder; move it away and rerun")
    foreign = foreign_entries(path) or []
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise LightPeftError(f"{shown / foreign[0]}{more} was not written by lightpeft, and replacing {shown} would "
                             f"delete it; move it out of {shown} and rerun")


def _dispose(old: Path, shown: Path) -> None:
    """Delete a folder taken out of the way, if we wrote all of it; one from before manifests is kept, renamed."""
    if _manifest(old) is not None:
        shutil.rmtree(old)
    elif not any(old.iterdir()):
        old.rmdir()
    else:
        kept = shown.with_name(f"{shown.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(old, kept)
        log.warning("%s has no manifest (written by an older lightpeft, or not by lightpeft), so it was kept as %s "
                    "instead of deleted; delete that yourself once nothing in it is needed", shown, kept)


def _take_away(path: Path) -> Path | None:
    """Move `path` to a fresh temporary sibling in one rename (after checking it), or None if it does not exist."""
    if not (path.exists() or path.is_symlink()):
        return None
    check_replaceable(path)
    old = _tmp_sibling(path, directory=True)
    os.replace(path, old)  # an empty directory is replaced; nobody can add to the folder after this
    try:
        check_replaceable(old, shown=path)  # again: something may have been added since the first check
    except LightPeftError:
        os.replace(old, path)
        raise
    return old


def remove_owned(path: str | Path) -> None:
    """Delete a folder that we wrote (a finished stage's checkpoint, say); see `check_replaceable`."""
    path = Path(path)
    old = _take_away(path)
    if old is not None:
        _dispose(old, path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block finishes without error.

    The published folder carries a manifest of its entries; `path` is replaced only when it holds nothing else
    (checked before the block runs, so a refusal costs no work, and again at the swap).
    """
    path = Path(path)
    check_replaceable(path)
    tmp = _tmp_sibling(path, directory=True)
    try:
        yield tmp
        write_json(tmp / MANIFEST, {"written_by": "lightpeft-dist", "entries": sorted(_entries(tmp) - {MANIFEST})})
        _publishable(tmp)
        old = _take_away(path)
        os.replace(tmp, path)
        if old is not None:
            _dispose(old, path)
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
