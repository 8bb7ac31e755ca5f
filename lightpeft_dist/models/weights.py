"""Model and adapter folders are read as safetensors only, and checked before any stage starts.

A pickle (`pytorch_model.bin`, `adapter_model.bin`, `*.pt`) can run code when it is read, and "weights-only"
unpickling is a restricted unpickler, not a format without code paths. This toolkit never unpickles: a folder
without safetensors weights is refused with a conversion hint, before the first stage loads anything. The shard
headers are read here too (a few kilobytes each), so a truncated or garbage file is an error line at validation
instead of a library traceback minutes later (docs/architecture.md, "Guarantees").
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import LightPeftError
from ..io_utils import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def conversion_hint(folder: Path) -> str:
    return (f"convert it once, in an environment you trust, with python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\" "
            f"and set model.path to the new folder")


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files holding a model's weights (from the index when there is one)."""
    if (folder / INDEX_FILE).is_file():
        index = read_json(folder / INDEX_FILE, "safetensors weight index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LightPeftError(f"{folder / INDEX_FILE} has no weight_map; re-download or re-save the model")
        shards = [folder / name for name in sorted(set(map(str, weight_map.values())))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise LightPeftError(f"{folder / INDEX_FILE} names shard {missing[0]}, which is not in {folder} "
                                 f"({len(missing)} missing); re-download the model")
        return shards
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickles = _pickles(folder)
    if pickles:
        raise LightPeftError(f"the model at {folder} has only pickle weights ({', '.join(pickles[:3])}), which "
                             f"this toolkit never loads; {conversion_hint(folder)}")
    raise LightPeftError(f"no weights in {folder} (neither {SINGLE_FILE} nor {INDEX_FILE}); point model.path at a "
                         "model folder with safetensors weights")


def check_safetensors(path: Path, what: str = "weights file") -> set[str]:
    """The tensor names in a safetensors file, reading only its header; a truncated or garbage file is an error."""
    try:
        with safe_open(str(path), "pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise LightPeftError(f"{what} {path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it is "
                             "truncated or corrupt: re-download or re-save it") from None


def check_model_weights(folder: Path) -> list[Path]:
    """Every shard of the model at `folder` exists and has a valid header; returns the shards."""
    shards = shard_files(folder)
    for shard in shards:
        check_safetensors(shard, "model weights")
    return shards


def check_adapter(folder: Path) -> None:
    """A PEFT adapter folder holds safetensors weights (PEFT would otherwise unpickle `adapter_model.bin`)."""
    path = folder / ADAPTER_FILE
    if not path.is_file():
        pickles = _pickles(folder) if folder.is_dir() else []
        found = f"only pickle weights ({', '.join(pickles)}), which this toolkit never loads" if pickles else \
            f"no {ADAPTER_FILE}"
        raise LightPeftError(f"the adapter at {folder} has {found}; rerun the stage that writes it")
    check_safetensors(path, "adapter weights")
