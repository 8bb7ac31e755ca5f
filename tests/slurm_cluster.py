"""A real one-node Slurm cluster on loopback, for testing the sbatch scripts as a user would run them.

Why a real cluster and not mocks: what breaks sbatch scripts is Slurm itself (the script runs from a spool copy, the
environment srun passes on, dependency handling, output files), and only slurmctld + slurmd show that. The Debian
packages are installed when missing (CI runs as root on a Debian machine); every daemon runs in the foreground as our
child, with its own munge socket, ports, state and logs under a temporary directory, and is stopped by pid at the end,
so nothing on the machine (a system munged or slurmd, other test runs) is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")
NODE = "localhost"  # resolves everywhere; slurmd is started with -N so the machine's hostname does not matter


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (not root, or no apt-get)."""


def ensure_installed(timeout_s: float = 900) -> None:
    """Install the Debian packages if a binary is missing; SlurmUnavailable when that is impossible."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm/munge are not installed and installing them needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=timeout_s, capture_output=True)
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], env=env,
                       timeout=timeout_s, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """slurmctld + slurmd + munged for one node with `cpus` CPUs; `env` is what a client (sbatch, squeue) needs."""

    def __init__(self, cpus: int = 2) -> None:
        self.cpus = cpus
        # Short path: the munge socket path must fit in sun_path (108 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="lpslurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- set-up -------------------------------------------------------------------------------------------------
    def _write_files(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge"):
            (r / d).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(f"""\
ClusterName=lightpeft-test
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def _wait(self, what: str, ok, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}:\n{self.logs()}")

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait("munged", lambda: (m / "munge.socket").exists(), timeout_s)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout_s)
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait("the node to be idle", lambda: self.node_state() == "idle", timeout_s)
        return self

    # -- use ----------------------------------------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout_s: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout_s, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def node_state(self) -> str:
        r = self.run(["sinfo", "-h", "-n", NODE, "-o", "%t"], check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, Reason, ...); no accounting database needed."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout_s: float) -> dict[str, str]:
        """Poll until the job leaves PENDING/RUNNING (and friends); scancel it and fail after timeout_s."""
        live = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") not in live:
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout_s}s:\n{self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        out = []
        for f in ("slurmctld.log", "slurmd.log", "munge/munged.log", "munged.stdout", "slurmctld.stdout",
                  "slurmd.stdout"):
            p = self.root / f
            if p.is_file() and p.stat().st_size:
                out.append(f"--- {f}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- tear-down ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """scancel what is left, then stop slurmd, slurmctld, munged (in that order) by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", "root"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
