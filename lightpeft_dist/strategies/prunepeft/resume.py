"""Mid-search checkpoints: a search killed in round k resumes after the last finished round.

Why: a search of R rounds at LLaMA scale is hours of training, and a Slurm requeue or a crash in the last round
should not repeat the warm-up and every round before it. After the warm-up (when there is one) and after every round
but the last, rank 0 writes into `D/search.ckpt/` (the search's working folder) a tensor file `round-K.safetensors`,
then `state.json` naming it and its sha256 (each file written atomically; state.json is the commit point, so a kill
between the two leaves the previous round's pair intact; older tensor files are removed after). No pickle. It holds
the search key, the rounds finished, the removal order so far (group names), the record so far (warm-up counts,
assignment, per-round values and scores), the step/token/second counters, torch's RNG state, and with
`between_rounds: warm_start` the survivors' trained weights. Every round reseeds torch itself and its data order is
a function of the step, so the resumed rounds repeat exactly what the uninterrupted search would have done: the same
removal order, module scores and hash (tests/test_prunepeft_resume.py). The last round writes the stage's output
instead, and the folder goes with the rest of the search's working folder when the stage finishes.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import LightPeftError
from ...io_utils import load_tensors, read_json_if_present, save_tensors, sha256_file, write_json
from ...rundir import CHECKPOINT_RECORD
from ...runtime import Runtime

log = logging.getLogger(__name__)
STATE = CHECKPOINT_RECORD  # what marks a stage checkpoint folder as ours (ownership.py)
RNG = "__torch_rng_state__"  # the tensor file's entry for torch's CPU RNG state; the others are adapter weights


@dataclass
class Progress:
    """How far the search got: `rounds_done` rounds (0: only the warm-up) and what they decided."""

    rounds_done: int
    order: list[str]  # removed group names, in removal order
    record: dict  # the search record's warmup / assignment / rounds entries so far
    counters: dict  # steps, tokens, seconds spent so far
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # warm_start: the survivors' trained weights


def save_progress(work: Path, key: str, progress: Progress, rt: Runtime) -> None:
    """Rank 0 writes the round's tensors, then state.json naming them; every rank waits for it (collective)."""
    if rt.is_main:
        name = f"round-{progress.rounds_done}.safetensors"
        save_tensors(work / name, {**progress.state, RNG: torch.get_rng_state()})
        write_json(work / STATE, {"key": key, "rounds_done": progress.rounds_done, "order": progress.order,
                                  "record": progress.record, "counters": progress.counters, "tensors": name,
                                  "tensors_sha256": sha256_file(work / name)})
        for old in work.glob("round-*.safetensors"):
            if old.name != name:
                old.unlink()
        log.info("prunepeft: checkpointed the search after %s", f"round {progress.rounds_done}"
                 if progress.rounds_done else "the warm-up")
    rt.barrier()


def load_progress(work: Path, key: str, group_names: list[str]) -> Progress | None:
    """The checkpoint's progress if it belongs to this search (same key and groups), None otherwise (logged)."""
    meta = read_json_if_present(work / STATE, "search checkpoint")
    if meta is None:
        return None
    if meta.get("key") != key or not set(meta.get("order", [])) <= set(group_names):
        log.warning("prunepeft: ignoring the search checkpoint at %s: it was written for another search (key %s, "
                    "now %s)", work, meta.get("key"), key)
        return None
    path = work / str(meta.get("tensors"))
    if not path.is_file() or sha256_file(path) != meta.get("tensors_sha256"):
        raise LightPeftError(f"the search checkpoint at {work} is incomplete ({path.name} is missing or not the "
                             f"one {STATE} names); delete {work} and rerun the search")
    tensors = load_tensors(path, "search checkpoint tensors")
    if RNG not in tensors:
        raise LightPeftError(f"the search checkpoint at {work} has no RNG state; delete {work} and rerun the search")
    torch.set_rng_state(tensors.pop(RNG))
    log.info("prunepeft: resuming the search after %s (removed so far: %s)",
             f"round {meta['rounds_done']}" if meta["rounds_done"] else "the warm-up", meta["order"])
    return Progress(int(meta["rounds_done"]), list(meta["order"]), meta["record"], meta["counters"], tensors)


def maybe_fault(round_no: int, rt: Runtime) -> None:
    """Fault injection for resume tests: LIGHTPEFT_FAULT_ROUND="RANK:ROUND" SIGKILLs that rank after training
    round ROUND (1-based), before the round is scored or checkpointed."""
    if os.environ.get("LIGHTPEFT_FAULT_ROUND") == f"{rt.rank}:{round_no}":
        os.kill(os.getpid(), signal.SIGKILL)
