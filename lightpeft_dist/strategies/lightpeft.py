"""Stage 1, the Light-PEFT scoring strategy: a short masked run that learns what to prune.

Masks on heads and FFN neurons (L1-penalised, their own optimizer groups) train together with the recipe's adapters
(LoRA on all target projections by default; every kind in adapters/registry.py) for a fixed step budget with a
linearly decaying LR; PEFT module and rank importance are tracked on the way, one tracker per kind (importance.py).
The output is a `Scores` file plus the estimation adapters, which warm-start training after pruning (as the
reference does, docs/method.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..pruning.activation import ActivationTracker
from ..pruning.movement import MovementTracker
from ..pruning.taylor import FirstOrderTracker
from ..training.checkpoint import Checkpointing, remove_checkpoints, resume
from ..training.hooks import HookList, StepHooks, Trainee
from ..training.reporters import open_reporter
from ..config import Recipe, recipe_to_dict
from ..models.families import config_layer_shapes, head_dim_of
from ..adapters.registry import AdapterKind, attach_adapters, is_adapter_param, kinds_of, save_adapters
from ..pruning.importance import TrackerSet
from ..errors import LightPeftError
from ..io_utils import atomic_dir, read_json_if_present, remove_owned, sha256_json, write_json
from ..training.finite import DIVERGED, check_tensors
from ..training.loop import make_engine, run_steps, train_batches
from ..training.schedules import lr_factor
from ..config import EstimateConfig
from ..data.batches import IGNORE_INDEX
from ..keys import keyed_section
from ..pruning.masks import L1Sink, attach_masks, mask_parameters
from ..models.loading import fingerprint, load_config, load_model, load_tokenizer
from ..pruning.plan import make_plan
from ..rundir import ADAPTER, ESTIMATE_RECORD, RunDir, SCORE_FILES
from ..runtime import Runtime, current, job_peak_memory, reset_peak_memory
from ..pruning.scores import Scores, save_scores
from .base import Stage, Strategy
from ..training.zero import full_state, full_value, is_partitioned, prepare_ds_config, zero3_loading

log = logging.getLogger(__name__)


def estimate_key(recipe: Recipe, run_dir: Path | None = None) -> str:
    """Hash of everything estimation depends on; a finished estimate with the same key is reused. The mask variants
    added later stay out while off (keys.py), so earlier estimates keep their keys. (`run_dir` is unused: every stage
    key takes (recipe, run_dir).)"""
    d = recipe_to_dict(recipe)
    return sha256_json({**{k: d[k] for k in ("model", "data", "peft")}, "estimate": keyed_section(recipe, "estimate")}
                       )[:16]


def run_estimate(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None) -> dict:
    """Estimate on every rank of the job (collective); rank 0 writes `run_dir/estimate/`.

    With `deepspeed` (a DeepSpeed config path) the model is built under ZeRO-3's `zero.Init` when the config says
    stage 3, and masks, LoRA and optimizer state are partitioned across ranks. With `estimate.checkpoint_every` the
    run checkpoints to `run_dir/estimate.ckpt/` and a rerun with the same recipe resumes from it.
    """
    rt = runtime or current()
    t_stage = time.time()
    reset_peak_memory()
    cfg = recipe.estimate
    key = estimate_key(recipe)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    base_config = load_config(recipe.model.path)
    shapes = config_layer_shapes(base_config)
    ds_cfg = prepare_ds_config(deepspeed, cfg, recipe.model.dtype, base_config.hidden_size,
                               min(min(s["num_attention_heads"], s["intermediate_size"]) for s in shapes),
                               rt.world_size)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)
    kinds = kinds_of(recipe.peft)
    with zero3_loading(ds_cfg):
        model = attach_adapters(load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation),
                                recipe.peft)
        sink = L1Sink()
        activations = ActivationTracker(model, rt)  # its hooks run before the mask hooks (prepended)
        attach_masks(model, sink=sink)
        first_order = FirstOrderTracker(model, rt)  # after the masks: its hooks see the masked unit outputs
        head_masks, ffn_masks = mask_parameters(model)
        tracker = TrackerSet({kind.name: kind.tracker(model, cfg.steps, rt) for kind in kinds})
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        peft_params = [p for n, p in trainable if is_adapter_param(n)]
        mask_lr = cfg.lr * cfg.mask_lr_coef
        optimizer = torch.optim.AdamW([
            {"params": peft_params, "lr": cfg.lr, "name": "peft"},
            {"params": head_masks, "lr": mask_lr, "name": "head_masks"},
            {"params": ffn_masks, "lr": mask_lr, "name": "ffn_masks"},
        ], weight_decay=0.0)
        engine = make_engine(model, optimizer, estimate_schedule(optimizer, cfg), cfg.grad_accum,
                             cfg.max_grad_norm, ds_cfg, rt)
    partitioning = mask_partitioning(head_masks + ffn_masks, rt)
    trainee = Trainee(model, engine, trainable)
    n_masks = sum(int(getattr(m, "ds_numel", m.numel())) for m in head_masks + ffn_masks)
    hooks = EstimateHooks(tracker, activations, first_order, sink, cfg.l1 / n_masks if cfg.l1_per_mask else cfg.l1,
                          MovementTracker(head_masks, ffn_masks), cfg.loss_on)
    start = resume(RunDir(run_dir).checkpoint("estimate"), trainee, hooks, rt, "estimation", accept=_same_recipe(key))
    log.info("estimate: steps %d..%d, batch %d, %d PEFT modules, %d head masks, %d FFN masks", start, cfg.steps,
             cfg.batch_size, len(tracker.modules), sum(s["num_attention_heads"] for s in shapes),
             sum(s["intermediate_size"] for s in shapes))
    reporter = open_reporter(recipe.logging.report_to, RunDir(run_dir).stage_logs("estimate"), "estimate", rt,
                             start, config=recipe_to_dict(recipe), extras=lambda: mask_statistics(head_masks + ffn_masks))
    t0 = time.time()
    try:
        stats = run_steps(trainee, batches, cfg.steps, cfg.grad_accum, rt, "estimate", hooks=HookList([hooks, reporter]),
                          start_step=start, seed=cfg.seed,
                          checkpoint=Checkpointing(RunDir(run_dir).checkpoint("estimate"), cfg.checkpoint_every,
                                                   {"key": key}))
    finally:
        reporter.close()
    module_scores, rank_scores = tracker.results()
    tracker.remove()
    activations.remove()
    first_order.remove()
    move_head, move_ffn = hooks.movement.results()
    scores = Scores(head=[full_value(m) for m in head_masks], ffn=[full_value(m) for m in ffn_masks],
                    module=module_scores, rank=rank_scores)
    act_head, act_ffn = activations.results()
    taylor_head, taylor_ffn = first_order.taylor()
    sal_head, sal_ffn = first_order.salience()
    all_scores = {"masks": scores,
                  "activation": Scores(head=act_head, ffn=act_ffn, module=module_scores, rank=rank_scores),
                  "taylor": Scores(head=taylor_head, ffn=taylor_ffn, module=module_scores, rank=rank_scores),
                  "movement": Scores(head=move_head, ffn=move_ffn, module=module_scores, rank=rank_scores),
                  "salience": Scores(head=sal_head, ffn=sal_ffn, module=module_scores, rank=rank_scores)}
    adapter_state = full_state([(n, p) for n, p in trainable if is_adapter_param(n)])
    # every rank holds these gathered values, so a diverged last step stops all ranks here, before any plan or write
    for kind, kind_scores in all_scores.items():
        check_tensors(f"the estimate's {kind} unit scores", kind_scores.named(), DIVERGED.format(stage="estimate"))
    check_tensors("the estimation adapter's weights", adapter_state, DIVERGED.format(stage="estimate"))
    plan_hash = make_plan(all_scores[recipe.prune.unit_scores], shapes, recipe.prune, fingerprint(base_config),
                          base_config.hidden_size, head_dim_of(base_config))["hash"]
    rt.agree(plan_hash, "plan computed from the gathered scores")
    record = {
        "key": key, "strategy": "lightpeft", "model_path": recipe.model.path,
        "model_fingerprint": fingerprint(base_config), "layer_shapes": shapes,
        "hidden_size": base_config.hidden_size, "head_dim": head_dim_of(base_config),
        "steps": cfg.steps, "resumed_from_step": start, "seed": cfg.seed, "world_size": rt.world_size,
        "deepspeed": ds_cfg, "mask_partitioning": partitioning, "losses": stats.losses, "tokens": stats.tokens * rt.world_size,
        "train_seconds": stats.seconds, "wall_seconds": time.time() - t0, "recipe": recipe_to_dict(recipe),
        "stage_seconds": time.time() - t_stage, "peak_memory": job_peak_memory(rt),
        # what the report's mask diagnostics need: the LR every step gave the mask groups, the masks' start value
        "mask_lrs": mask_lrs(cfg), "mask_init": 1.0, "n_masks": n_masks,
    }
    if rt.is_main:
        write_estimate(RunDir(run_dir).estimate, all_scores, model, adapter_state, kinds, record)
        remove_checkpoints(RunDir(run_dir).checkpoint("estimate"))  # and any kept older ones
    rt.barrier()
    return record


def mask_lr_factor(cfg: EstimateConfig, step: int) -> float:
    """The mask groups' LR multiplier at optimizer step `step`: linear warm-up over `mask_warmup_steps`, then linear
    decay to 0 at `steps` (with no warm-up: the PEFT group's, the reference's schedule)."""
    return lr_factor("linear", step, cfg.steps, cfg.mask_warmup_steps)


def estimate_schedule(optimizer: torch.optim.Optimizer, cfg: EstimateConfig) -> LambdaLR:
    """One LR multiplier per optimizer group (peft, head_masks, ffn_masks): linear decay without warm-up for the PEFT
    group, `mask_lr_factor` for the masks. Pure functions of the step, so a resumed run lands on the same LRs."""
    peft = lambda step: lr_factor("linear", step, cfg.steps)  # noqa: E731
    mask = lambda step: mask_lr_factor(cfg, step)  # noqa: E731
    return LambdaLR(optimizer, [peft if g.get("name") == "peft" else mask for g in optimizer.param_groups])


def mask_lrs(cfg: EstimateConfig) -> list[float]:
    """The LR of the mask groups at every step of the estimate, as the record keeps it."""
    return [cfg.lr * cfg.mask_lr_coef * mask_lr_factor(cfg, s) for s in range(cfg.steps)]


def all_token_labels(batch: dict) -> torch.Tensor:
    """`estimate.loss_on: all_tokens`: every real token of the example is a target (padding stays ignored)."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)


class EstimateHooks(StepHooks):
    """The estimate's additions to the loop: recording switches, the masks' L1 term, per-step statistics.

    Recording is on only from before the forward to after the loss, so gradient-checkpointing recomputes and evals
    are not counted; the trackers' totals are the checkpointed state. `l1` is the weight of sum|m| (already divided
    by the number of masks under `estimate.l1_per_mask`); `loss_on` is `estimate.loss_on`.
    """

    def __init__(self, tracker: TrackerSet, activations: ActivationTracker, first_order: FirstOrderTracker,
                 sink: L1Sink, l1: float, movement: MovementTracker, loss_on: str = "label"):
        self.tracker, self.activations, self.first_order = tracker, activations, first_order
        self.sink, self.l1, self.movement, self.loss_on = sink, l1, movement, loss_on

    def before_forward(self, batch: dict) -> None:
        if self.loss_on == "all_tokens":
            batch["labels"] = all_token_labels(batch)
        self.tracker.recording, self.tracker.token_mask, self.sink.active = True, batch["attention_mask"], True
        self.activations.recording, self.activations.token_mask = True, batch["attention_mask"]
        self.first_order.recording, self.first_order.token_mask = True, batch["attention_mask"]

    def extra_loss(self, batch: dict, output) -> torch.Tensor:
        # sum|m| over every mask element, not a mean: lambda is per element, as in the reference (docs/method.md)
        return self.l1 * self.sink.pop()

    def after_forward(self) -> None:
        self.tracker.recording = self.sink.active = self.activations.recording = self.first_order.recording = False

    def before_optimizer_step(self, step: int) -> None:
        self.movement.before_step()

    def after_optimizer_step(self, step: int, loss: float) -> None:
        self.movement.after_step()
        self.tracker.end_step(step)
        self.activations.end_step()
        self.first_order.end_step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return (self.tracker.state_dict() | {f"act.{k}": v for k, v in self.activations.state_dict().items()}
                | {f"taylor.{k}": v for k, v in self.first_order.state_dict().items()}
                | {f"move.{k}": v for k, v in self.movement.state_dict().items()})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tracker.load_state_dict(state)
        self.activations.load_state_dict({k.removeprefix("act."): v for k, v in state.items() if k.startswith("act.")})
        self.first_order.load_state_dict({k.removeprefix("taylor."): v for k, v in state.items()
                                          if k.startswith("taylor.")})
        self.movement.load_state_dict({k.removeprefix("move."): v for k, v in state.items() if k.startswith("move.")})


MASK_FLOOR = 1e-2  # |m| at or below this: the L1 term has driven the unit's mask to (about) zero


def mask_statistics(masks: list[torch.Tensor]) -> dict[str, float]:
    """Mean mask value and the share of mask values at the L1 floor, for the metric logs. Collective under ZeRO-3
    (the reporter calls it on every rank)."""
    values = torch.cat([full_value(m).reshape(-1) for m in masks]) if masks else torch.zeros(1)
    return {"mask_mean": float(values.mean()), "mask_at_floor_share": float((values.abs() <= MASK_FLOOR).float().mean())}


def _same_recipe(key: str) -> Callable[[dict, dict[str, torch.Tensor]], str | None]:
    """Why a checkpoint is not this estimate's to resume from, or None."""

    def accept(meta: dict, tensors: dict[str, torch.Tensor]) -> str | None:
        if meta.get("key") != key:
            return f"it was written for another recipe (key {meta.get('key')}, now {key})"
        if not {"extra/act.tokens", "extra/taylor.steps", "extra/move.head.0"} <= set(tensors):
            return "it predates activation, Taylor or movement statistics; estimating from step 0"
        return None

    return accept


def mask_partitioning(masks: list[torch.Tensor], rt: Runtime) -> dict | None:
    """How ZeRO-3 placed the masks (elements held by each rank, any kept persistent); None when not partitioned."""
    if not masks or not is_partitioned(masks[0]):
        return None
    local = sum(m.ds_tensor.numel() for m in masks)
    persistent = sum(bool(getattr(m, "ds_persist", False)) for m in masks)
    out = {"total_elements": sum(m.ds_numel for m in masks), "elements_per_rank": rt.all_gather_object(local),
           "persistent_masks_per_rank": rt.all_gather_object(persistent)}
    log.info("masks are ZeRO-3 partitioned: elements per rank %s of %d, persistent %s", out["elements_per_rank"],
             out["total_elements"], out["persistent_masks_per_rank"])
    return out


def write_estimate(out_dir: Path, all_scores: dict[str, Scores], peft_model, adapter_state: dict,
                   kinds: list[AdapterKind], record: dict) -> None:
    """Every unit scoring (`SCORE_FILES`) is written; `prune.unit_scores` picks one at plan time, so switching needs
    no new run."""
    with atomic_dir(out_dir) as tmp:
        for kind, scores in all_scores.items():
            save_scores(tmp / SCORE_FILES[kind], scores, metadata={"strategy": record["strategy"], "units": kind})
        save_adapters(tmp / ADAPTER, peft_model, adapter_state, kinds)  # layout: adapters/registry.py
        write_json(tmp / ESTIMATE_RECORD, record)
    masks = torch.cat([*all_scores["masks"].head, *all_scores["masks"].ffn])
    log.info("estimate written to %s: mask range [%.4f, %.4f], mean module score %.4f", out_dir,
             float(masks.min()), float(masks.max()),
             sum(all_scores["masks"].module.values()) / max(1, len(all_scores["masks"].module)))




def _scores(recipe: Recipe, run_dir: Path) -> tuple[Path, Path]:
    """The scores file that `prune.unit_scores` selects, and the estimate record (layer shapes, fingerprint)."""
    d = RunDir(run_dir)
    path = d.scores(recipe.prune.unit_scores)
    if not path.is_file() and d.estimate_record.is_file():
        raise LightPeftError(f"{path} not found: this estimate predates prune.unit_scores="
                             f"{recipe.prune.unit_scores}; delete {path.parent} and rerun `lightpeft estimate`")
    return path, d.estimate_record


def _recorded(run_dir: Path) -> str | None:
    try:
        return (read_json_if_present(RunDir(run_dir).estimate_record) or {}).get("key")
    except LightPeftError:
        return None


STRATEGY = Strategy(
    name="lightpeft", label="Light-PEFT", color="#2b6cb0", section="estimate",
    stages=(Stage("estimate", estimate_key, _recorded,
                  lambda recipe, run_dir, rt, deepspeed: run_estimate(recipe, run_dir, rt, deepspeed) and None,
                  collective=True, help="masked estimation run: learn head/FFN masks and PEFT importance"),),
    scores=_scores)
