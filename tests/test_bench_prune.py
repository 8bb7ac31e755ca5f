"""benchmarks/bench_prune.py --quick: the streaming-prune benchmark's code path stays alive (generate a sharded
checkpoint, plan, prune in a child process, verify the output, clean up), in seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_prune  # noqa: E402


def test_quick_benchmark_verifies_output_and_cleans_up(tmp_path, capsys):
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    assert bench_prune.main(["--quick", "--work-dir", str(work), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shards"] > 1 and res["verify"]["ok"] and res["verify"]["tensors"] == 3 * 9 + 3
    assert 0.25 < res["prunable_fraction_pruned"] < 0.4 and res["pruned_bytes"] < res["checkpoint_bytes"]
    # peak RSS is the child's own (VmHWM), at least what it held before pruning, and never the parent's
    assert res["rss_before_prune_bytes"] <= res["peak_rss_bytes"] < 2 * res["rss_before_prune_bytes"]
    assert list(work.iterdir()) == []  # generated checkpoints are deleted
    assert "peak RSS" in capsys.readouterr().out


def test_prune_does_not_import_peft_or_deepspeed():
    """The prune's memory floor is its imports (docs/benchmarks.md): peft alone would add 0.15 GB, so the streaming
    prune must not pull it (or DeepSpeed) in."""
    import subprocess

    code = ("import sys; from lightpeft_dist.pruning.slicing import prune_checkpoint; "
            "print(sorted(m for m in ('peft', 'deepspeed', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
