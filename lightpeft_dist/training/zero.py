"""DeepSpeed behind the loop's engine surface, and the few ZeRO-3 facts every stage has to respect.

Under ZeRO-3 a parameter outside its module's forward is an empty placeholder: reading it, saving it or summing it
silently gives nothing. Everything that must see full values (masks for the plan, adapters for saving, trainable
state for checkpoints) goes through `full_value` / `gathered`, which are collective (call them on every rank) and
plain reads when the parameter is not partitioned. The same code therefore serves a single process, ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import LightPeftError
from ..runtime import Runtime

log = logging.getLogger(__name__)


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed config, checked as far as this toolkit relies on it. The CLI calls this before any rank starts,
    because DeepSpeed itself only objects inside `deepspeed.initialize`, after every rank has loaded its model."""
    path = Path(path)
    if not path.is_file():
        raise LightPeftError(f"DeepSpeed config not found at {path}; pass --deepspeed ds_configs/zero3.json "
                             "(or zero2.json, zero3_offload.json)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LightPeftError(f"DeepSpeed config {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                             f"offset {exc.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise LightPeftError(f"DeepSpeed config {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise LightPeftError(f"DeepSpeed config {path} must be a JSON object")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise LightPeftError(f"DeepSpeed config {path}: zero_optimization must be a JSON object with a \"stage\"")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise LightPeftError(f"DeepSpeed config {path}: zero_optimization.stage is {stage!r}; ZeRO stages are 0, 1, "
                             "2 and 3 (ds_configs/zero3.json uses 3)")
    return cfg


def fill_ds_config(cfg: dict[str, Any], *, batch_size: int, grad_accum: int, max_grad_norm: float, dtype: str,
                   hidden_size: int, min_mask_numel: int | None, world_size: int) -> dict[str, Any]:
    """Replace the config's "auto" fields with values from the recipe, and refuse settings that break the method.

    `batch_size` is the recipe's global batch per optimizer step, so the same recipe gives the same optimisation at
    any world size. The persistence threshold defaults to 0 so that the (small) mask parameters are partitioned like
    every other parameter instead of being silently replicated on every rank.
    """
    cfg = copy.deepcopy(cfg)
    micro = batch_size // (grad_accum * world_size)
    auto = {
        "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum, "gradient_clipping": max_grad_norm,
    }
    for key, value in auto.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif cfg[key] != value:
            raise LightPeftError(f"DeepSpeed config sets {key}={cfg[key]} but the recipe implies {value}; "
                                 f"set it to \"auto\" (the recipe's batch_size/grad_accum decide it)")
    for section, enabled in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        sub = cfg.setdefault(section, {})
        if sub.get("enabled", "auto") == "auto":
            sub["enabled"] = enabled
    zero = cfg.setdefault("zero_optimization", {})
    sizes = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 0}
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for offload in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(offload), dict) and zero[offload].get("pin_memory") == "auto":
            zero[offload]["pin_memory"] = torch.cuda.is_available()
    threshold = zero.get("stage3_param_persistence_threshold", 100_000)
    if zero.get("stage", 0) == 3 and min_mask_numel is not None and threshold >= min_mask_numel:
        raise LightPeftError(
            f"zero_optimization.stage3_param_persistence_threshold={threshold} would keep the pruning masks "
            f"({min_mask_numel} elements) replicated instead of partitioned; set it to \"auto\" or below "
            f"{min_mask_numel}")
    return cfg


# A build of a JIT op (DeepSpeed builds its CPU shared-memory collective, `deepspeed_shm_comm`, at init) holds a
# plain lock file in torch's extensions folder; a process killed mid-build leaves it, and every later process waits
# on it forever, silently. A real build takes about a minute, so an older lock is stale (docs/distributed.md).
STALE_BUILD_LOCK_S = 900
JIT_OPS = ("deepspeed_shm_comm",)


def check_build_locks(now: float | None = None) -> None:
    """Refuse to start when a JIT op's build lock is older than STALE_BUILD_LOCK_S, instead of hanging on it."""
    import time

    from torch.utils.cpp_extension import _get_build_directory

    now = time.time() if now is None else now
    for name in JIT_OPS:
        try:
            lock = Path(_get_build_directory(name, verbose=False)) / "lock"
            age = now - lock.stat().st_mtime
        except (OSError, RuntimeError):
            continue
        if age > STALE_BUILD_LOCK_S:
            raise LightPeftError(f"{lock} is a build lock left {age / 60:.0f} min ago by a process that was stopped "
                                 f"while building DeepSpeed's {name} op; every run would wait on it forever. If no "
                                 "build is running, delete that file and start again")


def prepare_ds_config(path: str | Path | None, stage_cfg, dtype: str, hidden_size: int,
                      min_mask_numel: int | None, world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config for one stage (`stage_cfg` is the recipe's estimate or train section), or None."""
    if path is None:
        return None
    import deepspeed
    import torch.distributed as dist

    check_build_locks()
    # DeepSpeed keeps its own view of the process group (deepspeed.comm); point it at ours.
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None,
                               dist_init_required=False)
    return fill_ds_config(load_ds_config(path), batch_size=stage_cfg.batch_size, grad_accum=stage_cfg.grad_accum,
                          max_grad_norm=stage_cfg.max_grad_norm, dtype=dtype, hidden_size=hidden_size,
                          min_mask_numel=min_mask_numel, world_size=world_size)


def zero_stage(cfg: dict[str, Any] | None) -> int:
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def zero3_loading(cfg: dict[str, Any] | None) -> Iterator[None]:
    """While active, `from_pretrained` builds the model under `deepspeed.zero.Init`: no rank ever holds all of it.

    transformers decides this from a live `HfDeepSpeedConfig`; it must stay alive through `deepspeed.initialize`.
    """
    if zero_stage(cfg) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(cfg)
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Full values of `params` inside the block (collective under ZeRO-3; nothing to do otherwise)."""
    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


def full_value(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a trainable parameter (its optimizer master copy under DeepSpeed), on CPU."""
    if getattr(param, "_hp_mapping", None) is not None or getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().cpu().clone()
    with gathered([param]):
        return param.detach().float().cpu().clone()


def full_state(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Gather named trainable parameters one at a time (bounded memory); every rank gets the same dict."""
    return {name: full_value(p) for name, p in named}


class DeepSpeedEngine:
    """`deepspeed.initialize` behind the loop's surface: forward, backward per micro-batch, step per optimizer step.

    DeepSpeed counts micro-batches itself and steps only at the accumulation boundary, so `backward` advances its
    counter for every micro-batch but the last, and `step` closes the optimizer step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds_config: dict,
                 runtime: Runtime):
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        self.grad_accum = int(ds_config["gradient_accumulation_steps"])
        self._micro = 0
        log.info("deepspeed: ZeRO stage %d, %d ranks, micro-batch %d x accumulation %d", zero_stage(ds_config),
                 runtime.world_size, ds_config["train_micro_batch_size_per_gpu"], self.grad_accum)

    def forward(self, batch: dict) -> Any:
        return self.engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self._micro += 1
        if self._micro % self.grad_accum:
            self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> None:
        self.engine.step()

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm DeepSpeed computed for the last optimizer step (None before the first)."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def close(self) -> None:
        """Detach DeepSpeed from the model (its ZeRO-3 hooks and buffers) before the model is rebuilt."""
        self.engine.destroy()
