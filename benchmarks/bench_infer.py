"""Inference speed: forward throughput and generation latency, unpruned vs Light-PEFT-pruned, in one run.

Each variant (the unpruned model, and the model pruned at 20/30/40/50% of heads and FFN neurons by the project's
plan/prune code) is loaded as the evaluate stage loads it and runs, in its own process, the same batch shapes:
a no-grad forward over batch x seq_len tokens, and greedy generation of a fixed number of new tokens (KV cache on,
EOS ignored so every run generates the same count). LoRA is left out: merged into the base for deployment it costs
nothing, so the base models are what is compared.

    .venv/bin/python benchmarks/bench_infer.py --quick --out runs/bench/infer_quick.json
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PRESETS, RATIOS, PeakMemory, add_ratios, build_base, device_name, in_fresh_process,  # noqa: E402
                    make_variant, matmul_params, peak_flops, plot_vs_ratio, print_table, setup_child, synthetic_batch,
                    time_steps, write_outputs)

from lightpeft_dist.config import PeftConfig  # noqa: E402

log = logging.getLogger("bench")


def infer_child(model_dir: str, s: dict) -> dict:
    from lightpeft_dist.adapters.registry import count_parameters
    from lightpeft_dist.models.loading import load_model

    device = setup_child(s["seed"], s["cpu_threads"])
    mem = PeakMemory()
    model = load_model(model_dir, s["dtype"], s["attn"]).to(device).eval()
    attn = model.config._attn_implementation
    batch = synthetic_batch(s["batch"], s["seq"], s["vocab"], s["seed"], device)["input_ids"]
    prompt = synthetic_batch(s["gen_batch"], s["prompt_len"], s["vocab"], s["seed"] + 1, device)["input_ids"]
    new = s["new_tokens"]

    @torch.inference_mode()
    def forward(_: int) -> None:
        model(input_ids=batch, use_cache=False)

    @torch.inference_mode()
    def generate(_: int) -> int:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
        return out.shape[1] - prompt.shape[1]

    fwd = time_steps(forward, s["warmup"], s["steps"], mem)
    gen = time_steps(generate, 1, max(2, s["steps"] // 2), mem)
    if gen["last"] != new:
        raise RuntimeError(f"generation produced {gen['last']} tokens instead of {new}")
    tps = s["batch"] * s["seq"] / fwd["step_s"]
    n = matmul_params(model)
    peak = peak_flops(s["peak_tflops"])
    return {"tokens_per_s": tps, "step_s": fwd["step_s"], "clock": fwd["clock"], "wall_step_s": fwd["wall_step_s"],
            "gen_latency_s": gen["step_s"], "gen_ms_per_token": 1000 * gen["step_s"] / new,
            "gen_wall_latency_s": gen["wall_step_s"], "peak_mem_bytes": mem.peak(),
            "mfu": 2 * n * tps / peak if peak else None, "matmul_params": n, "attention": attn,
            "params_total": count_parameters(model)["total"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few repeats: a couple of minutes on CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON result (a PNG plot is written next to it)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: quick / cpu / 1b (on GPU)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--batch-size", type=int, default=None, help="forward batch")
    p.add_argument("--seq-len", type=int, default=None, help="forward sequence length")
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed forward passes per variant")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if gpu else "float32")
    p.add_argument("--attn", default="auto", help="auto | sdpa | eager | flash_attention_2")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: GPU table)")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per variant on CPU (see common.py)")
    p.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    args = p.parse_args(argv)
    preset = args.model or ("quick" if args.quick else "1b" if gpu else "cpu")
    # batch, seq, prompt, new tokens, steps, warmup
    shape = {"quick": (4, 128, 32, 32, 5, 1), "cpu": (2, 256, 64, 32, 3, 1), "1b": (8, 2048, 512, 128, 10, 3)}[preset]
    args.model = preset
    args.batch_size, args.seq_len = args.batch_size or shape[0], args.seq_len or shape[1]
    args.prompt_len, args.new_tokens = args.prompt_len or shape[2], args.new_tokens or shape[3]
    args.steps = args.steps or shape[4]
    args.warmup = args.warmup if args.warmup is not None else shape[5]
    args.out = args.out or Path("runs/bench") / f"bench_infer_{preset}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = {"batch": args.batch_size, "seq": args.seq_len, "gen_batch": args.gen_batch,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "steps": args.steps,
                "warmup": args.warmup, "dtype": args.dtype, "attn": args.attn, "peak_tflops": args.peak_tflops,
                "vocab": PRESETS[args.model]["vocab_size"], "seed": 0, "cpu_threads": args.cpu_threads}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lightpeft-bench-"))
    try:
        base = build_base(work / "base", args.model, getattr(torch, args.dtype))
        log.info("unpruned model")
        rows = [{"prune_ratio": 0.0, "prunable_fraction_pruned": 0.0, "total_fraction_pruned": 0.0,
                 **in_fresh_process(infer_child, str(base), settings)}]
        for ratio in args.ratios:
            log.info("Light-PEFT pruned at %.0f%%", 100 * ratio)
            summary = make_variant(base, None, ratio, work / f"r{ratio}", PeftConfig(), 0.0, 0.0)
            out = in_fresh_process(infer_child, str(work / f"r{ratio}" / "pruned_model"), settings)
            rows.append({"prune_ratio": ratio, "prunable_fraction_pruned": summary["prunable_fraction_pruned"],
                         "total_fraction_pruned": 1 - summary["params"] / rows[0]["params_total"], **out})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios(rows, {"tokens_per_s": "tokens_per_s_ratio", "peak_mem_bytes": "peak_mem_ratio"})
    for row in rows:
        row["gen_speedup"] = rows[0]["gen_latency_s"] / row["gen_latency_s"]
        row["peak_mem_mib"] = row["peak_mem_bytes"] / 2**20
    result = {"benchmark": "bench_infer", "device": device_name(), "clock": rows[0]["clock"],
              "model": f"llama-{args.model} (random weights, {rows[0]['params_total'] / 1e6:.0f}M params)",
              "dtype": args.dtype, "attention": rows[0]["attention"], "mem_metric": PeakMemory().metric,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}
              | {"workdir": str(args.workdir) if args.workdir else None}, "rows": rows}
    print_table(f"bench_infer: {result['model']}, {result['device']}, forward {args.batch_size} x {args.seq_len}, "
                f"generate {args.gen_batch} x ({args.prompt_len} + {args.new_tokens}), {args.dtype}, attention "
                f"{result['attention']}, clock {result['clock']}, memory {result['mem_metric']}", rows, [
        ("prune_ratio", "prune", ".2f"), ("prunable_fraction_pruned", "prunable cut", ".3f"),
        ("total_fraction_pruned", "params cut", ".3f"), ("tokens_per_s", "fwd tok/s", ".1f"),
        ("tokens_per_s_ratio", "fwd speed-up", ".2f"), ("gen_ms_per_token", "gen ms/tok", ".2f"),
        ("gen_speedup", "gen speed-up", ".2f"), ("peak_mem_mib", "peak MiB", ".0f"),
        ("peak_mem_ratio", "mem ratio", ".2f"), ("mfu", "MFU", ".3f")])
    write_outputs(args.out, result, lambda r, png: plot_vs_ratio(
        r, png, [("tokens_per_s_ratio", "forward tokens/s"), ("gen_speedup", "generation (1 / latency)")],
        [("peak_mem_ratio", "inference peak memory")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
