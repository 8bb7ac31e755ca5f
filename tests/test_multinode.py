"""Multi-node launches, two "nodes" on loopback: each node is its own launcher process, as on a real cluster where
the same command runs once per host with a different node rank. Both launch paths a user has without a scheduler:

* `torchrun --nnodes 2 --node-rank i` with a c10d rendezvous on the first node;
* `deepspeed --hostfile H` with two hosts. DeepSpeed's default multi-node runner reaches the other hosts over
  pdsh/ssh; `--no_ssh --node_rank i` runs the same per-node launcher (world layout from the hostfile) without ssh,
  which is what we can do on one machine. The rendezvous, ranks and collectives are those of a real 2-node job.

Both must give the one-process plan (conftest.dist_single) with ZeRO-3 across the two nodes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from dist_checks import BIN, REPO, ZERO3, assert_same_scores, run_stages

pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(commands: list[list[str]], log_dir: Path, timeout: int = 600) -> None:
    """Start one launcher per node, wait for all; on failure show every node's log tail."""
    env = {**os.environ, "LIGHTPEFT_DIST_TIMEOUT_S": "120", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    procs, logs = [], []
    for rank, cmd in enumerate(commands):
        log = (log_dir / f"node{rank}.log").open("w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
        for log in logs:
            log.close()
    if any(codes):
        tails = "\n".join(f"--- node {i} (exit {c}) ---\n" + (log_dir / f"node{i}.log").read_text()[-3000:]
                          for i, c in enumerate(codes))
        pytest.fail(f"a node failed:\n{tails}")


def _estimate_args(recipe: Path, run: Path) -> list[str]:
    return ["estimate", "--config", str(recipe), "--run-dir", str(run), "--deepspeed", ZERO3]


def _assert_single_plan(run: Path, single: Path) -> None:
    record = json.loads((run / "estimate" / "estimate.json").read_text())
    assert record["world_size"] == 2
    assert all(0 < n < record["mask_partitioning"]["total_elements"]
               for n in record["mask_partitioning"]["elements_per_rank"])  # ZeRO-3 split the masks across nodes
    assert_same_scores(single, run)
    run_stages(run, "plan")
    assert json.loads((run / "plan.json").read_text())["hash"] == json.loads((single / "plan.json").read_text())["hash"]


def test_torchrun_two_nodes_c10d_rendezvous(dist_recipe, dist_single, tmp_path):
    run, port = tmp_path / "run", _free_port()
    nodes = [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lightpeft-test",
              "-m", "lightpeft_dist", *_estimate_args(dist_recipe, run)] for rank in range(2)]
    _run_nodes(nodes, tmp_path)
    _assert_single_plan(run, dist_single)


def test_deepspeed_hostfile_two_nodes(dist_recipe, dist_single, tmp_path):
    run, port = tmp_path / "run", _free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    nodes = [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
              "--master_addr", "127.0.0.1", "--master_port", str(port),
              "--module", "lightpeft_dist", *_estimate_args(dist_recipe, run)] for rank in range(2)]
    _run_nodes(nodes, tmp_path)
    _assert_single_plan(run, dist_single)
