"""A throw-away two-node Ray cluster on this machine, for the Ray launcher tests.

Both nodes are `ray start --block` children of the test process, each in its own session, so tearing down means
SIGTERM to the two pids we started (Ray's own graceful path) and then SIGKILL to whatever of their process trees is
left. We deliberately do not use `ray stop --force`: it kills every Ray process on the machine, including clusters
that other people on a shared host are running.

Token authentication is on (RAY_AUTH_MODE=token with a fresh RAY_AUTH_TOKEN) for the nodes and for every client
command, so the tests also cover the set-up a real cluster should have; nothing is written to ~/.ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRayCluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]  # what a client (ray job submit, ray status, the launcher) needs in its environment
    temp_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=check)

    def alive_nodes(self) -> int:
        out = self.ray("status", "--address", self.gcs_address, check=False, timeout=30).stdout
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return sum(1 for line in active.splitlines() if "node_" in line)

    def submit(self, entrypoint: list[str], timeout: float, working_dir: Path = REPO) -> subprocess.CompletedProcess:
        """`ray job submit` (waits for the job and exits non-zero if it failed); output is returned, not raised."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir), "--",
               *entrypoint]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=working_dir,
                              check=False)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:])
                         for p in self.logs if p.exists())

    def stop(self) -> None:
        trees: list[psutil.Process] = []
        for proc in self.procs:
            try:
                trees += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(self.procs):  # worker node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        _, alive = psutil.wait_procs(trees, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait(predicate, timeout: float, what: str, cluster: LocalRayCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode} while waiting for {what}\n"
                                   + cluster.log_tail())
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n" + cluster.log_tail())


@contextmanager
def local_cluster(head_cpus: int = 2, worker_cpus: int = 1, object_store_bytes: int = 100_000_000
                  ) -> Iterator[LocalRayCluster]:
    """A head node and a second node joined with `ray start --address`, stopped on exit whatever happens."""
    # Short path: Ray puts unix sockets under it and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="lpray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               # the job's entrypoint `python` must be this venv's interpreter: nodes inherit PATH
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               PYTHONUNBUFFERED="1")
    port, dash = free_port(), free_port()
    cluster = LocalRayCluster(gcs_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dash}",
                              env=env, temp_dir=temp_dir)
    common = ["--block", "--disable-usage-stats", "--object-store-memory", str(object_store_bytes)]
    nodes = [
        ["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dir), "--num-cpus", str(head_cpus),
         "--dashboard-agent-listen-port", str(free_port())],
        # same machine, same session log folder: one log monitor, or every worker line reaches the job twice
        ["--address", cluster.gcs_address, "--num-cpus", str(worker_cpus),
         "--dashboard-agent-listen-port", str(free_port()), "--include-log-monitor", "false"],
    ]
    try:
        for i, args in enumerate(nodes):
            log = temp_dir / f"node{i}.log"
            cluster.logs.append(log)
            with open(log, "w") as fh:
                cluster.procs.append(subprocess.Popen([RAY, "start", *args, *common], env=env, stdout=fh,
                                                      stderr=subprocess.STDOUT, start_new_session=True))
            _wait(lambda n=i + 1: cluster.alive_nodes() >= n, 90, f"{i + 1} Ray node(s)", cluster)
        yield cluster
    finally:
        cluster.stop()
