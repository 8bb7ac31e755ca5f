#!/usr/bin/env python
"""Memory and throughput of the streaming prune (lightpeft_dist.pruning.slicing.prune_checkpoint) on a multi-GB checkpoint.

    python benchmarks/bench_prune.py [--size-gb 2.1] [--shard-mb 1024] [--quick] [--out bench_prune.json]

Writes a random-weight sharded LLaMA checkpoint (benchmarks/synth_checkpoint.py, never held in memory), plans a random
1/3 head + 1/3 FFN prune for it, drops the checkpoint from the page cache (cold read), then prunes it in a fresh
child process. The child's peak RSS (which includes file pages it has mapped) is compared with the
checkpoint size (VmHWM of the child, and a psutil time series as a cross-check), next to the child's RSS before
pruning (Python + torch + transformers + peft imports).
The output is checked (index covers every tensor, shapes follow the plan, one tensor equals the sliced source) and
everything generated is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TARGET = 0.25


def child(plan_path: str, src: str, out: str) -> None:
    """Runs in the measured process: import, record the RSS, prune, report JSON on stdout."""
    import psutil

    from lightpeft_dist.pruning.plan import read_plan
    from lightpeft_dist.pruning.slicing import prune_checkpoint

    rss0 = psutil.Process().memory_info().rss
    plan = read_plan(plan_path)
    t0 = time.perf_counter()
    prune_checkpoint(src, plan, Path(out))
    seconds = time.perf_counter() - t0
    print(json.dumps({"rss_before_bytes": rss0, "vm_hwm_bytes": vm_hwm(), "seconds": seconds}))


def vm_hwm() -> int:
    """This process's peak RSS since exec (Linux VmHWM). ru_maxrss is no good here: a spawned child inherits the
    parent's RSS at fork time into ru_maxrss (RUSAGE_SELF and the parent's RUSAGE_CHILDREN alike)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def make_plan_for(ckpt: Path, attn: float, ffn: float, seed: int) -> dict:
    import torch

    from lightpeft_dist.config import PruneConfig
    from lightpeft_dist.models.families import head_dim_of
    from lightpeft_dist.models.loading import fingerprint, load_config
    from lightpeft_dist.pruning.plan import make_plan
    from lightpeft_dist.pruning.scores import Scores

    cfg = load_config(str(ckpt))
    n = cfg.num_hidden_layers
    shapes = [{"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
               "intermediate_size": cfg.intermediate_size}] * n
    zeros = Scores([torch.zeros(cfg.num_attention_heads)] * n, [torch.zeros(cfg.intermediate_size)] * n)
    prune = PruneConfig(attn_ratio=attn, ffn_ratio=ffn, ffn_scope="layerwise")
    return make_plan(zeros.randomized(seed), shapes, prune, fingerprint(cfg), cfg.hidden_size, head_dim_of(cfg))


def drop_page_cache(folder: Path) -> None:
    """Evict this folder's files from the page cache (only these files), so the prune reads from disk."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(plan_path: Path, src: Path, out: Path, interval: float = 0.05) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", str(plan_path), str(src), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - t0, ps.memory_info().rss))
            except psutil.Error:
                break
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: the prune child failed ({proc.returncode}): {stderr.strip().splitlines()[-1:]}")
    rec = json.loads(stdout.strip().splitlines()[-1])
    rec["ru_maxrss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # see vm_hwm
    rec["peak_rss_sampled_bytes"] = max((s[1] for s in samples), default=0)
    rec["samples"] = samples[:: max(1, len(samples) // 200)]
    return rec


def verify(src: Path, out: Path, plan: dict) -> dict:
    """Index covers every source tensor, files exist, shapes follow the plan, one tensor equals the sliced source."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    import lightpeft_dist  # noqa: F401 - registers the lightpeft_llama config

    src_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    new_map = index["weight_map"]
    assert set(new_map) == set(src_map), "pruned index does not cover the same tensors"
    total = 0
    for shard in sorted(set(new_map.values())):
        with safe_open(str(out / shard), "pt") as f:
            for name in f.keys():
                assert new_map[name] == shard, f"{name} is in {shard} but the index says {new_map[name]}"
                sl = f.get_slice(name)
                total += torch.Size(sl.get_shape()).numel() * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
    assert total == index["metadata"]["total_size"], "index total_size does not match the shards"
    cfg = AutoConfig.from_pretrained(out)
    hd = cfg.head_dim
    checks = 0
    for i, lp in enumerate(plan["layers"]):
        want = {"self_attn.q_proj.weight": [len(lp["q_heads"]) * hd, cfg.hidden_size],
                "self_attn.k_proj.weight": [len(lp["kv_heads"]) * hd, cfg.hidden_size],
                "mlp.down_proj.weight": [cfg.hidden_size, len(lp["ffn"])]}
        for suffix, shape in want.items():
            name = f"model.layers.{i}.{suffix}"
            with safe_open(str(out / new_map[name]), "pt") as f:
                assert list(f.get_slice(name).get_shape()) == shape, f"{name}: shape != plan"
            checks += 1
    name = "model.layers.0.mlp.gate_proj.weight"
    with safe_open(str(src / src_map[name]), "pt") as f:
        expect = f.get_tensor(name).index_select(0, torch.as_tensor(plan["layers"][0]["ffn"]))
    with safe_open(str(out / new_map[name]), "pt") as f:
        assert torch.equal(f.get_tensor(name), expect), f"{name} is not the sliced source"
    return {"tensors": len(new_map), "shape_checks": checks, "value_check": name, "ok": True,
            "config_layer_shapes": len(getattr(cfg, "layer_shapes", None) or [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.1, help="checkpoint size in GB (10^9 bytes)")
    p.add_argument("--shard-mb", type=float, default=1024, help="shard size of the generated checkpoint")
    p.add_argument("--attn-ratio", type=float, default=1 / 3)
    p.add_argument("--ffn-ratio", type=float, default=1 / 3)
    p.add_argument("--quick", action="store_true", help="a ~60 MB checkpoint of a narrow model (seconds)")
    p.add_argument("--work-dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from benchmarks.synth_checkpoint import Shape, layers_for_size, write_checkpoint

    base = Shape(hidden=768, intermediate=2048, heads=12, kv_heads=4, vocab=8000) if args.quick else Shape()
    size = 0.06e9 if args.quick else args.size_gb * 1e9
    shard = (8 if args.quick else args.shard_mb) * 2**20
    work = Path(tempfile.mkdtemp(prefix="bench_prune.", dir=args.work_dir))
    try:
        src, out = work / "src", work / "pruned"
        t0 = time.perf_counter()
        gen = write_checkpoint(src, layers_for_size(int(size), base), int(shard))
        gen_s = time.perf_counter() - t0
        plan = make_plan_for(src, args.attn_ratio, args.ffn_ratio, seed=0)
        (work / "plan.json").write_text(json.dumps(plan))
        drop_page_cache(src)
        rec = run_child(work / "plan.json", src, out)
        out_bytes = sum(f.stat().st_size for f in out.iterdir())
        check = verify(src, out, plan)
        ckpt = gen["disk_bytes"]
        peak = max(rec["vm_hwm_bytes"], rec["peak_rss_sampled_bytes"])
        res = {"checkpoint_bytes": ckpt, "shards": gen["shards"], "layers": gen["layers"], "shard_mb": shard / 2**20,
               "write_seconds": gen_s, "prune_seconds": rec["seconds"], "pruned_bytes": out_bytes,
               "prunable_fraction_pruned": plan["summary"]["prunable_fraction_pruned"],
               "read_mb_per_s": ckpt / 1e6 / rec["seconds"], "write_mb_per_s": out_bytes / 1e6 / rec["seconds"],
               "peak_rss_bytes": peak, "rss_before_prune_bytes": rec["rss_before_bytes"],
               "peak_rss_fraction": peak / ckpt, "prune_rss_fraction": (peak - rec["rss_before_bytes"]) / ckpt,
               "peak_rss_sampled_bytes": rec["peak_rss_sampled_bytes"],
               "ru_maxrss_children_bytes": rec["ru_maxrss_children_bytes"],
               "target_fraction": TARGET, "meets_target": peak / ckpt < TARGET, "verify": check,
               "rss_samples": rec["samples"]}
        print_table(res)
        if args.out:
            args.out.write_text(json.dumps(res, indent=2))
            print(f"results written to {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(r: dict) -> None:
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    rows = [("checkpoint", f"{gb(r['checkpoint_bytes'])} in {r['shards']} shards ({r['layers']} layers)"),
            ("pruned", f"{gb(r['pruned_bytes'])} ({r['prunable_fraction_pruned']:.1%} of prunable params)"),
            ("prune time", f"{r['prune_seconds']:.1f} s"),
            ("throughput", f"{r['read_mb_per_s']:.0f} MB/s read, {r['write_mb_per_s']:.0f} MB/s written"),
            ("RSS before prune (imports)", gb(r["rss_before_prune_bytes"])),
            ("peak RSS", f"{gb(r['peak_rss_bytes'])} = {r['peak_rss_fraction']:.2f} x checkpoint "
                         f"(target < {r['target_fraction']}: {'met' if r['meets_target'] else 'NOT met'})"),
            ("peak RSS - imports", f"{r['prune_rss_fraction']:.2f} x checkpoint"),
            ("output check", f"{r['verify']['tensors']} tensors indexed, {r['verify']['shape_checks']} shapes, "
                             f"values of {r['verify']['value_check']}: ok")]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(w)} | {v} |" for k, v in rows))


if __name__ == "__main__":
    sys.exit(main())
