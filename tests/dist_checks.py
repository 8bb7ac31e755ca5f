"""Shared by the multi-process tests: launching a command the way a user would, and comparing estimation outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightpeft_dist.cli import main
from lightpeft_dist.pruning.scores import load_scores

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ZERO3 = str(REPO / "ds_configs" / "zero3.json")


def launch(cmd: list[str], env: dict | None = None, expect_ok: bool = True,
           timeout: int = 1100) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LIGHTPEFT_DIST_TIMEOUT_S": "120", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_stages(run_dir: Path, *stages: str, config: Path | None = None) -> None:
    for stage in stages:
        args = [stage, "--run-dir", str(run_dir)] + (["--config", str(config)] if config else [])
        assert main(args) == 0


def assert_same_scores(a: Path, b: Path, tol: float = 1e-5) -> None:
    """Mask scores, activation, Taylor and movement unit scores, module and rank scores of two estimates agree."""
    sa, sb = load_scores(a / "estimate" / "scores.safetensors"), load_scores(b / "estimate" / "scores.safetensors")
    for x, y in zip(sa.head + sa.ffn, sb.head + sb.ffn, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)
    act_a, act_b = (load_scores(d / "estimate" / "activation_scores.safetensors") for d in (a, b))
    for x, y in zip(act_a.head + act_a.ffn, act_b.head + act_b.ffn, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    taylor_a, taylor_b = (load_scores(d / "estimate" / "taylor_scores.safetensors") for d in (a, b))
    for x, y in zip(taylor_a.head + taylor_a.ffn, taylor_b.head + taylor_b.ffn, strict=True):
        assert float(x.max()) > 0  # a file of zeros would agree with anything
        torch.testing.assert_close(x, y, atol=1e-6 * float(x.max()), rtol=1e-4)
    move_a, move_b = (load_scores(d / "estimate" / "movement_scores.safetensors") for d in (a, b))
    for x, y in zip(move_a.head + move_a.ffn, move_b.head + move_b.ffn, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)
    assert sa.module.keys() == sb.module.keys()
    for name in sa.module:
        assert sa.module[name] == pytest.approx(sb.module[name], rel=1e-4)
        torch.testing.assert_close(sa.rank[name], sb.rank[name], rtol=1e-4, atol=1e-12)
