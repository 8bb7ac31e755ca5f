"""Process-group awareness for every stage.

Stages are written once and run single-process or under a launcher (deepspeed, torchrun, Slurm, Ray). This module is
the only place that asks torch.distributed anything; with no process group every call is a cheap no-op, so the
single-process path carries no distributed code of its own.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import LightPeftError

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 1800
_owned_group = False  # True when init_distributed created the group (Ray, for one, brings its own)


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks in place and return it (CPU tensors travel via the device when the backend is nccl)."""
        if self.distributed:
            if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
                moved = tensor.to(self.device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def agree(self, value: object, what: str) -> None:
        """Fail loudly unless every rank holds the same `value` (e.g. a plan hash)."""
        values = self.all_gather_object(value)
        if any(v != values[0] for v in values):
            raise LightPeftError(f"ranks disagree on the {what}: {values}; the ranks saw different data or code "
                                 "(check that every node runs the same version and reads the same files)")

    def all_gather_object(self, obj: object) -> list[object]:
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def current() -> Runtime:
    """The runtime as set up by the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK), or single-process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:  # no process group: this process is the whole job, whatever RANK a launcher exported
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=device)


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait for a peer before the job fails (a dead rank must end the job, not hang it)."""
    raw = os.environ.get("LIGHTPEFT_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        return datetime.timedelta(seconds=float(raw))
    except ValueError:
        raise LightPeftError(f"LIGHTPEFT_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(require_group: bool = False) -> Runtime:
    """Join the process group a launcher described in the environment (torchrun contract), if any.

    deepspeed, torchrun, our Slurm scripts and Ray all export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT (Ray creates the group itself). The backend follows the device: nccl on CUDA, gloo on CPU.
    `require_group` makes a one-rank group for a single process that still needs one (DeepSpeed does).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if require_group and world == 1 and dist.is_available() and not dist.is_initialized():
        os.environ.update({"RANK": "0", "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"), "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", world_size=1, rank=0,
                                timeout=collective_timeout())
        _set_owned()
        return current()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LightPeftError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with deepspeed, "
                                 "torchrun, slurm/*.sbatch or launchers/ray_train.py")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=collective_timeout())
        _set_owned()
        log.info("joined process group: rank %d of %d, backend %s", dist.get_rank(), world, backend)
    return current()


def _set_owned() -> None:
    global _owned_group
    _owned_group = True


def shutdown() -> None:
    """Leave the process group if we created it."""
    global _owned_group
    if _owned_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _owned_group = False


# --- peak memory of one stage ------------------------------------------------------------------------------------
# A stage's records say how much memory it took (docs/architecture.md, "Stages"). On CUDA that is the allocator's
# peak, exact per stage. On CPU it is the process's peak resident set: Linux lets a process reset its high-water
# mark (writing 5 to /proc/self/clear_refs resets VmHWM and with it getrusage's ru_maxrss), so several stages in one
# process each get their own peak; it still counts what the process held when the stage began (libraries, tokenizer).
CPU_STAGE_PEAK = "peak resident set of the process during the stage (VmHWM, reset at its start)"
CPU_PROCESS_PEAK = "peak resident set of the process since it started (ru_maxrss; this system cannot reset it)"
CUDA_PEAK = "CUDA max_memory_allocated during the stage"
_cpu_measure = CPU_PROCESS_PEAK


def reset_peak_memory() -> str:
    """Start measuring a stage's peak memory; returns what `peak_memory` will measure. Memory freed by earlier
    stages is handed back to the system first (garbage collection, malloc_trim), so it is not counted again."""
    global _cpu_measure
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return CUDA_PEAK
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _cpu_measure = CPU_STAGE_PEAK
    except OSError:
        _cpu_measure = CPU_PROCESS_PEAK
    return _cpu_measure


def peak_memory() -> dict:
    """{"bytes": the peak since `reset_peak_memory` (see the measure), "measure": what was measured}."""
    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "measure": CUDA_PEAK}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "measure": _cpu_measure}


def job_peak_memory(rt: Runtime) -> dict:
    """`peak_memory` of the rank that used the most (collective: call it on every rank)."""
    peaks = rt.all_gather_object(peak_memory())
    top = max(peaks, key=lambda p: p["bytes"])
    return {**top, "ranks": len(peaks)}
