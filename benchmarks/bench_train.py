"""Training throughput and peak memory: LoRA on the unpruned model vs Light-PEFT-pruned models, in one run.

Rows: (a) the unpruned model with LoRA on every target projection (plain PEFT), (b) the model pruned at 20/30/40/50%
of attention heads and FFN neurons, trained with the pruned LoRA adapter (modules and ranks pruned as
`prune.module_ratio` / `prune.rank_ratio`), as the train stage does. Same data shapes, same optimizer, each variant
in its own process. Also timed: one estimation step (masks + LoRA + importance tracking on the unpruned model), to
report the estimation stage's cost as a fraction of the training run that follows it.

    .venv/bin/python benchmarks/bench_train.py --quick --out runs/bench/train_quick.json

On a GPU the defaults become the ~1.1B LLaMA shape, bf16, batch 8 x 2048, and MFU is reported.
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
from common import (PRESETS, RATIOS, PeakMemory, add_ratios, base_params, build_base, device_name,  # noqa: E402
                    in_fresh_process, make_variant, matmul_params, peak_flops, plot_vs_ratio, print_table,
                    setup_child, synthetic_batch, time_steps, write_outputs)

from lightpeft_dist.config import EstimateConfig, PeftConfig, PruneConfig, TrainConfig  # noqa: E402

log = logging.getLogger("bench")


def estimate_child(base_dir: str, adapter_out: str, s: dict) -> dict:
    """Time estimation steps (the estimate stage's per-step work) and save its LoRA adapter for pruning."""
    from lightpeft_dist.adapters.registry import attach_adapters
    from lightpeft_dist.pruning.importance import LoraImportanceTracker
    from lightpeft_dist.training.loop import PlainEngine, linear_schedule
    from lightpeft_dist.pruning.masks import attach_masks, mask_parameters
    from lightpeft_dist.models.loading import load_model
    from lightpeft_dist.runtime import current

    device = setup_child(s["seed"], s["cpu_threads"])
    mem = PeakMemory()
    model = attach_adapters(load_model(base_dir, s["dtype"], s["attn"]), PeftConfig(**s["peft"])).to(device)
    attach_masks(model)
    heads, ffns = mask_parameters(model)
    total = s["warmup"] + s["steps"]
    tracker = LoraImportanceTracker(model, total, current())
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora}, {"params": heads}, {"params": ffns}], lr=1e-4)
    engine = PlainEngine(model, opt, linear_schedule(opt, total), 1, 1.0)
    batch = synthetic_batch(s["batch"], s["seq"], s["vocab"], s["seed"], device)
    model.train()

    def step(i: int) -> float:  # what estimate.run_estimate does per step (its before/after_forward, L1, tracking)
        tracker.recording = True
        loss = model(**batch).loss + 1e-4 * sum(m.abs().sum() for m in [*heads, *ffns])
        tracker.recording = False
        engine.backward(loss)
        engine.step()
        tracker.end_step(i)
        return float(loss.detach())

    timing = time_steps(step, s["warmup"], s["steps"], mem)
    timing["loss"] = timing.pop("last")
    tracker.remove()
    model.save_pretrained(adapter_out, safe_serialization=True)
    return {**timing, "tokens_per_s": s["batch"] * s["seq"] / timing["step_s"], "peak_mem_bytes": mem.peak()}


def train_child(model_dir: str, adapter_dir: str | None, s: dict) -> dict:
    """Train steps on one variant, loaded and prepared exactly as the train stage does."""
    from lightpeft_dist.models.fastpath import prepare_for_training
    from lightpeft_dist.training.loop import PlainEngine, linear_schedule
    from lightpeft_dist.adapters.registry import attach_adapters, count_parameters
    from lightpeft_dist.adapters.lora import load_adapter
    from lightpeft_dist.models.loading import load_model

    device = setup_child(s["seed"], s["cpu_threads"])
    mem = PeakMemory()
    model = load_model(model_dir, s["dtype"], s["attn"], load_in_4bit=s["load_in_4bit"])
    attn = model.config._attn_implementation
    model = prepare_for_training(model, TrainConfig(load_in_4bit=s["load_in_4bit"],
                                                    gradient_checkpointing=s["gradient_checkpointing"]))
    if adapter_dir:  # the pruned adapter (per-module ranks), as `train` warm-starts from it
        model = load_adapter(model, adapter_dir, is_trainable=True)
    else:
        model = attach_adapters(model, PeftConfig(**s["peft"]))
    model = model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    total = s["warmup"] + s["steps"]
    engine = PlainEngine(model, opt, linear_schedule(opt, total), 1, 1.0)
    batch = synthetic_batch(s["batch"], s["seq"], s["vocab"], s["seed"], device)
    model.train()

    def step(_: int) -> float:
        loss = model(**batch).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    timing = time_steps(step, s["warmup"], s["steps"], mem)
    timing["loss"] = timing.pop("last")
    tps = s["batch"] * s["seq"] / timing["step_s"]
    n, counts = matmul_params(model), count_parameters(model)
    peak = peak_flops(s["peak_tflops"])
    return {**timing, "tokens_per_s": tps, "peak_mem_bytes": mem.peak(),
            "mfu": 6 * n * tps / peak if peak else None, "matmul_params": n, "attention": attn,
            "params_base": base_params(model), "params_trainable": counts["trainable"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model, few steps: a couple of minutes on CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON result (a PNG plot is written next to it)")
    p.add_argument("--model", choices=sorted(PRESETS), default=None, help="default: quick / cpu / 1b (on GPU)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16" if gpu else "float32")
    p.add_argument("--attn", default="auto", help="auto | sdpa | eager | flash_attention_2")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: every variant's base in 4-bit NF4")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: GPU table)")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads per variant on CPU (see common.py)")
    p.add_argument("--estimate-steps", type=int, default=EstimateConfig().steps)
    p.add_argument("--train-steps", type=int, default=TrainConfig().steps)
    p.add_argument("--workdir", type=Path, default=None, help="keep checkpoints here (default: a temp dir)")
    args = p.parse_args(argv)
    preset = args.model or ("quick" if args.quick else "1b" if gpu else "cpu")
    shape = {"quick": (4, 128, 5, 1), "cpu": (2, 256, 3, 1), "1b": (8, 2048, 10, 3)}[preset]
    args.model = preset
    args.batch_size = args.batch_size or shape[0]
    args.seq_len = args.seq_len or shape[1]
    args.steps = args.steps or shape[2]
    args.warmup = args.warmup if args.warmup is not None else shape[3]
    args.out = args.out or Path("runs/bench") / f"bench_train_{preset}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    peft = PeftConfig()
    settings = {"batch": args.batch_size, "seq": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                "dtype": args.dtype, "attn": args.attn, "load_in_4bit": args.load_in_4bit,
                "gradient_checkpointing": args.gradient_checkpointing, "peak_tflops": args.peak_tflops,
                "vocab": PRESETS[args.model]["vocab_size"], "seed": 0, "peft": peft.model_dump(),
                "cpu_threads": args.cpu_threads}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lightpeft-bench-"))
    try:
        base = build_base(work / "base", args.model, getattr(torch, args.dtype))
        log.info("estimation steps on the unpruned model")
        est = in_fresh_process(estimate_child, str(base), str(work / "estimate_adapter"), settings)
        log.info("LoRA on the unpruned model")
        rows = [{"prune_ratio": 0.0, "prunable_fraction_pruned": 0.0, "total_fraction_pruned": 0.0,
                 **in_fresh_process(train_child, str(base), None, settings)}]
        n_base = rows[0]["params_base"]
        prune = PruneConfig()
        log.info("PEFT pruning only (modules and ranks; the base unpruned)")
        make_variant(base, work / "estimate_adapter", 0.0, work / "peft_only", peft, prune.module_ratio,
                     prune.rank_ratio)
        peft_only = in_fresh_process(train_child, str(work / "peft_only" / "pruned_model"),
                                     str(work / "peft_only" / "pruned_adapter"), settings)
        for ratio in args.ratios:
            log.info("Light-PEFT pruned at %.0f%%", 100 * ratio)
            summary = make_variant(base, work / "estimate_adapter", ratio, work / f"r{ratio}", peft,
                                   prune.module_ratio, prune.rank_ratio)
            out = in_fresh_process(train_child, str(work / f"r{ratio}" / "pruned_model"),
                                   str(work / f"r{ratio}" / "pruned_adapter"), settings)
            rows.append({"prune_ratio": ratio, "prunable_fraction_pruned": summary["prunable_fraction_pruned"],
                         "total_fraction_pruned": 1 - summary["params"] / n_base,
                         "lora_ranks_kept": summary["lora_ranks_kept"], **out})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    add_ratios([rows[0], peft_only], {"tokens_per_s": "tokens_per_s_ratio", "peak_mem_bytes": "peak_mem_ratio"})
    add_ratios(rows, {"tokens_per_s": "tokens_per_s_ratio", "peak_mem_bytes": "peak_mem_ratio"})
    for row in rows:
        row["peak_mem_mib"] = row["peak_mem_bytes"] / 2**20
    for row in rows[1:]:  # the estimate stage runs once, on the unpruned model, before this variant's training
        row["estimate_cost_fraction"] = (est["step_s"] * args.estimate_steps) / (row["step_s"] * args.train_steps)
    result = {"benchmark": "bench_train", "device": device_name(), "clock": rows[0]["clock"],
              "model": f"llama-{args.model} (random weights, {n_base / 1e6:.0f}M params)", "dtype": args.dtype,
              "attention": rows[0]["attention"],
              "mem_metric": PeakMemory().metric, "settings": {k: v for k, v in vars(args).items() if k != "out"}
              | {"workdir": str(args.workdir) if args.workdir else None},
              "estimate": est | {"estimate_steps": args.estimate_steps, "train_steps": args.train_steps},
              "peft_pruning_only": peft_only | {"module_ratio": prune.module_ratio, "rank_ratio": prune.rank_ratio},
              "rows": rows}
    print_table(f"bench_train: {result['model']}, {device_name()}, batch {args.batch_size} x {args.seq_len}, "
                f"{args.dtype}, attention {result['attention']}, clock {result['clock']}, "
                f"memory {result['mem_metric']}", rows, [
        ("prune_ratio", "prune", ".2f"), ("prunable_fraction_pruned", "prunable cut", ".3f"),
        ("total_fraction_pruned", "params cut", ".3f"), ("params_trainable", "trainable", ",d"),
        ("tokens_per_s", "tokens/s", ".1f"), ("tokens_per_s_ratio", "speed-up", ".2f"),
        ("peak_mem_mib", "peak MiB", ".0f"), ("peak_mem_ratio", "mem ratio", ".2f"),
        ("mfu", "MFU", ".3f"), ("estimate_cost_fraction", "est/train", ".3f")])
    print(f"PEFT pruning only (module_ratio {prune.module_ratio}, rank_ratio {prune.rank_ratio}, base unpruned): "
          f"{peft_only['tokens_per_s_ratio']:.2f}x tokens/s, {peft_only['peak_mem_ratio']:.2f}x peak memory")
    print(f"estimation: {est['step_s']:.2f} s/step ({est['tokens_per_s']:.0f} tokens/s); est/train = "
          f"{args.estimate_steps} estimation steps / {args.train_steps} training steps of the row's model")
    write_outputs(args.out, result, lambda r, png: plot_vs_ratio(
        r, png, [("tokens_per_s_ratio", "training tokens/s")], [("peak_mem_ratio", "training peak memory")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
