"""Perplexity on held-out running text, to see what pruning costs a model outside the fine-tuning task.

The text is the Brown corpus or a local text file; fetching, windows and the perplexity itself live in the package
(lightpeft_dist/data/heldout.py, training/lm_eval.py), which `lightpeft report --damage` uses too. Tests pass a small
local text file instead.
"""

from __future__ import annotations


from lightpeft_dist.data.heldout import (BROWN_DIR, BROWN_PACKAGE, BROWN_SHA256, brown_dir,  # noqa: F401
                                         brown_text, running_text, token_windows)
from lightpeft_dist.training.lm_eval import perplexity  # noqa: F401 (damage.py and run_quality import it here)


def load_windows(tokenizer, corpus: str, length: int, count: int) -> tuple[list[dict], dict] | None:
    """Windows and a description for `corpus`: 'brown', 'none', or a path to a plain-text file."""
    if corpus == "none":
        return None
    text, source = running_text(corpus, "--ppl-text", "a plain-text file, 'brown' or 'none'")
    wins = token_windows(tokenizer, text, length, count)
    return wins, {"source": source, "windows": len(wins), "window_tokens": length}
