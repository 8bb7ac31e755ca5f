"""Shared pieces of the benchmarks: model presets, pruned variants made by the project's own plan/prune code,
per-process measurement (each variant runs in a fresh process, so CPU peak memory is its own), MFU, and output.

Benchmarks measure the real artefacts: a random-weight LLaMA checkpoint is planned with `plan.make_plan` (random
scores at the requested head/FFN ratios, global FFN ranking, so layers get different widths), sliced with
`prune.prune_checkpoint`/`prune_adapter`, and loaded with `models.load_model` like the train stage does. Speed does
not depend on weight values, so random weights are fine.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

import lightpeft_dist  # noqa: F401  (registers the pruned model types)
from lightpeft_dist.config import PeftConfig, PruneConfig
from lightpeft_dist.models.families import FAMILIES, head_dim_of
from lightpeft_dist.io_utils import write_json
from lightpeft_dist.models.loading import fingerprint, load_config
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.slicing import prune_adapter, prune_checkpoint
from lightpeft_dist.pruning.scores import Scores
from lightpeft_dist.rundir import RunDir

log = logging.getLogger("bench")
RATIOS = (0.2, 0.3, 0.4, 0.5)
# LLaMA-architecture shapes. "quick" runs in a couple of minutes on 2 CPU cores; "cpu" has ~270M params; "1b" ~1.04B
# for an H100. hidden_size is chosen so that every head count the planner picks at 20-50% (GQA-valid counts) divides
# it: transformers 5 refuses a LlamaConfig whose hidden_size is not a multiple of num_attention_heads, even with an
# explicit head_dim (see docs/benchmarks.md).
PRESETS: dict[str, dict[str, int]] = {
    "quick": dict(vocab_size=4096, hidden_size=384, head_dim=48, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "cpu": dict(vocab_size=32000, hidden_size=1152, head_dim=72, intermediate_size=3072, num_hidden_layers=14,
                num_attention_heads=16, num_key_value_heads=4),
    "1b": dict(vocab_size=32000, hidden_size=2304, head_dim=144, intermediate_size=6144, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=4),
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets; the first matching name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} logical cores, torch {torch.__version__})"


def peak_flops(override_tflops: float | None) -> float | None:
    """Peak FLOP/s for MFU: --peak-tflops, else the table for the GPU, else None (CPU: no meaningful peak)."""
    if override_tflops:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12
        log.warning("no peak-FLOPs entry for %s; pass --peak-tflops to get MFU", name)
    return None


def logical_numel(p: torch.Tensor) -> int:
    """Parameter count of a weight; a 4-bit weight's numel() counts packed storage, its quant_state the real shape."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None else p.numel()


def base_params(model: torch.nn.Module) -> int:
    """Parameters of the base model (LoRA excluded), counting 4-bit weights at their logical size."""
    return sum(logical_numel(p) for n, p in model.named_parameters() if "lora_" not in n)


def matmul_params(model: torch.nn.Module) -> int:
    """N in 6*N*tokens/s: every weight used in a matmul per token (all but the input embedding table)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = inner.get_input_embeddings().weight
    total = sum(logical_numel(p) for p in inner.parameters())
    tied = emb is inner.get_output_embeddings().weight
    return total - (0 if tied else emb.numel())


def build_base(out_dir: Path, preset: str, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-weight LlamaForCausalLM of the preset's shape, saved as a normal HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**PRESETS[preset], max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out_dir)
    log.info("base %s: %s params -> %s", preset, f"{sum(p.numel() for p in model.parameters()):,}", out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def random_scores(config, peft: PeftConfig, seed: int) -> tuple[Scores, list[dict[str, int]]]:
    spec = FAMILIES["llama"]
    n = config.num_hidden_layers
    shape = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    zeros = Scores(head=[torch.zeros(shape["num_attention_heads"])] * n,
                   ffn=[torch.zeros(shape["intermediate_size"])] * n,
                   module={spec.proj_path(i, t): 0.0 for i in range(n) for t in peft.targets},
                   rank={spec.proj_path(i, t): torch.zeros(peft.r) for i in range(n) for t in peft.targets})
    return zeros.randomized(seed), [dict(shape) for _ in range(n)]


def make_variant(base_dir: Path, estimate_adapter: Path | None, ratio: float, out_dir: Path, peft: PeftConfig,
                 module_ratio: float, rank_ratio: float, seed: int = 0) -> dict[str, Any]:
    """Plan and prune at `ratio` of heads and FFN neurons (and slice the adapter, if given); the plan summary."""
    config = load_config(str(base_dir))
    scores, shapes = random_scores(config, peft, seed)
    prune = PruneConfig(attn_ratio=ratio, ffn_ratio=ratio, module_ratio=module_ratio, rank_ratio=rank_ratio)
    plan = make_plan(scores, shapes, prune, fingerprint(config), config.hidden_size, head_dim_of(config))
    record = prune_checkpoint(str(base_dir), plan, RunDir(out_dir).pruned_model)
    if estimate_adapter is not None:
        prune_adapter(estimate_adapter, plan, config, RunDir(out_dir).pruned_model, RunDir(out_dir).pruned_adapter)
    return {**plan["summary"], "params": record["params"]}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    """Linux peak RSS of this process image (VmHWM). Unlike ru_maxrss it is not inherited across exec (a spawned
    child would otherwise report its parent's size) and `reset` can restart it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakMemory:
    """Peak memory of the timed phase: CUDA max_memory_allocated, or on CPU peak RSS minus the RSS before loading.

    Both are reset after the warm-up, so they hold weights, optimizer state and activations, not load transients.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.metric = "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss_above_preload"
        self.start = rss_bytes()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            log.warning("cannot reset peak RSS (/proc/self/clear_refs); CPU peak includes model loading")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        return _vm_hwm_bytes() - self.start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def setup_child(seed: int, cpu_threads: int) -> torch.device:
    """Per-process set-up. On CPU torch gets `cpu_threads` threads (default 1, see `time_steps`)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lightpeft_dist.models.attention").setLevel(logging.INFO)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads)
    from lightpeft_dist.runtime import current

    return current().device


def time_steps(step: Callable[[int], Any], warmup: int, steps: int, mem: "PeakMemory") -> dict[str, Any]:
    """Median per-step time after `warmup` untimed steps; peak memory is reset after the warm-up.

    `step_s` is wall-clock on GPU. On CPU it is the process's CPU time: on a shared machine wall-clock mostly measures
    the neighbours (our 2-core CI box ran at load ~10), while CPU time with one torch thread is the work itself.
    Both clocks are recorded.
    """
    for i in range(warmup):
        step(i)
    mem.reset()
    wall, cpu, outs = [], [], []
    for i in range(warmup, warmup + steps):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        outs.append(step(i))
        sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"step_s": med(wall) if mem.cuda else med(cpu), "clock": "wall" if mem.cuda else "process_cpu",
            "wall_step_s": med(wall), "cpu_step_s": med(cpu), "last": outs[-1] if outs else None}


def in_fresh_process(fn: Callable[..., dict], *args: Any) -> dict:
    """Run one measurement in a new (spawned) process, so that each variant's peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def add_ratios(rows: list[dict], keys: dict[str, str]) -> list[dict]:
    """`<key>_ratio` = row value / the unpruned row's value, for each `key -> ratio name`."""
    base = rows[0]
    for row in rows:
        for key, name in keys.items():
            row[name] = row[key] / base[key] if row.get(key) is not None and base.get(key) else None
    return rows


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    print(f"\n{title}")
    print("  ".join(f"{h:>12}" for _, h, _ in columns))
    for row in rows:
        cells = [format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns]
        print("  ".join(f"{c:>12}" for c in cells))


def write_outputs(out: Path, result: dict, plot: Callable[[dict, Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"\nwrote {out} and {png}")


def plot_vs_ratio(result: dict, png: Path, speed: list[tuple[str, str]], memory: list[tuple[str, str]]) -> None:
    """Two panels against the pruned fraction of prunable parameters: speed-ups and memory ratios (1 = unpruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["prunable_fraction_pruned"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, series, ylabel in ((axes[0], speed, "speed-up vs unpruned (x)"),
                               (axes[1], memory, "peak memory vs unpruned (x)")):
        for key, label in series:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(x, ys, marker="o", label=label)
        extra = result.get("peft_pruning_only")
        if extra and extra.get(series[0][0]) is not None:
            ax.plot([0.0], [extra[series[0][0]]], marker="x", ls="", ms=9, color="C3",
                    label="PEFT pruning only (base unpruned)")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("fraction of prunable (attention + FFN) parameters pruned")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['benchmark']}: {result['model']} on {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
