"""APT's calibration stage (one-shot mode): score every block on `apt.calibration_samples` examples.

Why a stage of its own: the paper's LLaMA recipe prunes once, before tuning, on a kurtosis-aware salience summed
over ~256 calibration samples (docs/method.md, "APT"). This is the same loop as training (run on every rank, ZeRO-3
partitioned with `--deepspeed`), with LoRA attached as the recipe's `peft` (B = 0, so the gradients are the
pretrained model's) and a learning rate of 0, so each step is one forward and one backward and changes nothing. The
salience comes from those passes (salience.py); no extra pass is run. Rank 0 writes `D/estimate/` (the strategy's
scoring folder): the APT scores, the record (layer shapes, biases, LoRA modules) and the LoRA adapter, which the
shared prune stage slices and the train stage re-initialises or warm-starts.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ...adapters.registry import attach_adapters, is_adapter_param, kinds_of, save_adapters
from ...config import Recipe, recipe_to_dict
from ...errors import LightPeftError
from ...io_utils import atomic_dir, load_tensors, read_json_if_present, save_tensors, sha256_json, write_json
from ...models.families import HEAD_NORMS, config_layer_shapes, family_for, head_dim_of, unwrap
from ...models.loading import fingerprint, load_config, load_model, load_tokenizer
from ...pruning.importance import lora_modules
from ...rundir import ADAPTER, ESTIMATE_RECORD, RunDir
from ...runtime import Runtime, current
from ...training.finite import DIVERGED, check_tensors
from ...training.hooks import StepHooks, Trainee
from ...training.loop import make_engine, run_steps, train_batches
from ...training.zero import full_state, prepare_ds_config, zero3_loading
from .salience import KINDS, AptSalience

log = logging.getLogger(__name__)
SCORES = "apt_scores.safetensors"  # inside the scoring folder (RunDir.estimate), next to the record
CALIBRATION_KEYS = ("calibration_samples", "batch_size", "grad_accum", "seq_len", "seed", "use_kurtosis",
                    "prune_hidden")


def scores_path(run_dir: Path) -> Path:
    return RunDir(run_dir).estimate / SCORES


def calibrate_key(recipe: Recipe, run_dir: Path | None = None) -> str:
    """Everything calibration depends on; the target density is not in it, so re-planning reuses the scores."""
    d = recipe_to_dict(recipe)
    return sha256_json({"model": d["model"], "data": d["data"], "peft": d["peft"],
                        "apt": {k: d["apt"][k] for k in CALIBRATION_KEYS}})[:16]


def biases_of(model: torch.nn.Module) -> list[str]:
    """Which projections carry biases (the cost model counts them): "qkv", "o", "mlp"."""
    base = unwrap(model)
    spec = family_for(base)
    layer = spec.decoder_layers(base)[0]
    has = lambda proj: getattr(getattr(spec.proj(layer, proj), "base_layer", spec.proj(layer, proj)), "bias",  # noqa: E731
                               None) is not None
    return [name for name, proj in (("qkv", "q_proj"), ("o", "o_proj"), ("mlp", "gate_proj")) if has(proj)]


def has_head_norms(model: torch.nn.Module) -> bool:
    """Whether the attention carries per-head q/k norms (Qwen3; models/families.py HEAD_NORMS)."""
    base = unwrap(model)
    spec = family_for(base)
    return all(hasattr(spec.attention(spec.decoder_layers(base)[0]), n) for n in HEAD_NORMS)


class CalibrationHooks(StepHooks):
    """Record the salience during each forward (so recomputes and evals never count) and close it per step."""

    def __init__(self, salience: AptSalience):
        self.salience = salience

    def before_forward(self, batch: dict) -> None:
        self.salience.recording, self.salience.token_mask = True, batch["attention_mask"]

    def after_forward(self) -> None:
        self.salience.recording = False

    def after_optimizer_step(self, step: int, loss: float) -> None:
        self.salience.end_step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"apt.{k}": v for k, v in self.salience.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.salience.load_state_dict({k.removeprefix("apt."): v for k, v in state.items() if k.startswith("apt.")})


def run_calibrate(recipe: Recipe, run_dir: Path, runtime: Runtime | None = None, deepspeed: str | None = None) -> dict:
    """Calibrate on every rank (collective); rank 0 writes `run_dir/estimate/`."""
    rt = runtime or current()
    cfg = recipe.section("apt")
    key = calibrate_key(recipe)
    steps = math.ceil(cfg.calibration_samples / cfg.batch_size)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(recipe.model)
    base_config = load_config(recipe.model.path)
    shapes = config_layer_shapes(base_config)
    stage_cfg = SimpleNamespace(batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_grad_norm=1.0)
    ds_cfg = prepare_ds_config(deepspeed, stage_cfg, recipe.model.dtype, base_config.hidden_size, None, rt.world_size)
    batches = train_batches(recipe.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed, rt)
    with zero3_loading(ds_cfg):
        model = attach_adapters(load_model(recipe.model.path, recipe.model.dtype, recipe.model.attn_implementation),
                                recipe.peft)
        model.enable_input_require_grads()  # every block's input gets a gradient, whichever projections carry LoRA
        salience = AptSalience(model, rt, use_kurtosis=cfg.use_kurtosis, beta=None,  # static: summed over steps
                               hidden=cfg.prune_hidden)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # lr 0: forward and backward only; the LoRA B = 0 start makes the gradients the pretrained model's
        optimizer = torch.optim.AdamW([p for _, p in trainable], lr=0.0, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        engine = make_engine(model, optimizer, scheduler, cfg.grad_accum, 1.0, ds_cfg, rt)
    trainee = Trainee(model, engine, trainable)
    log.info("APT calibration: %d steps of %d examples (%d samples asked), kurtosis %s, %d layers", steps,
             cfg.batch_size, cfg.calibration_samples, "on" if cfg.use_kurtosis else "off", len(shapes))
    t0 = time.time()
    stats = run_steps(trainee, batches, steps, cfg.grad_accum, rt, "calibrate", hooks=CalibrationHooks(salience),
                      seed=cfg.seed)
    salience.remove()
    scores = salience.scores()
    tensors = {f"{kind}.{i}": t for kind in salience.kinds for i, t in enumerate(scores[kind])}
    tensors.update({f"{part}.{kind}.{i}": t for (kind, part), ts in salience.parts.items() for i, t in enumerate(ts)})
    check_tensors("the APT block scores", tensors, DIVERGED.format(stage="calibrate"))
    adapter_state = full_state([(n, p) for n, p in trainable if is_adapter_param(n)])
    record = {
        "key": key, "strategy": "apt", "mode": cfg.mode, "model_path": recipe.model.path,
        "model_fingerprint": fingerprint(base_config), "layer_shapes": shapes, "hidden_size": base_config.hidden_size,
        "head_dim": head_dim_of(base_config), "biases": biases_of(model),
        "head_norms": has_head_norms(model), "vocab_size": base_config.vocab_size,
        "tie_word_embeddings": bool(getattr(base_config, "tie_word_embeddings", False)),
        "lora_modules": {name: int(m.r["default"]) for name, m in lora_modules(model)},
        "steps": steps, "samples": steps * cfg.batch_size, "seed": cfg.seed, "world_size": rt.world_size,
        "deepspeed": ds_cfg, "losses": stats.losses, "tokens": stats.job_tokens, "train_seconds": stats.seconds,
        "wall_seconds": time.time() - t0, "recipe": recipe_to_dict(recipe),
    }
    if rt.is_main:
        d = RunDir(run_dir)
        with atomic_dir(d.estimate) as tmp:
            save_tensors(tmp / SCORES, tensors, metadata={"strategy": "apt", "units": "kv_group,ffn"})
            save_adapters(tmp / ADAPTER, model, adapter_state, kinds_of(recipe.peft))
            write_json(tmp / ESTIMATE_RECORD, record)
        log.info("APT calibration written to %s (%d steps, %.0f s)", d.estimate, steps, record["wall_seconds"])
    rt.barrier()
    return record


def load_apt_scores(run_dir: Path, record: dict, hidden: bool = False) -> dict:
    """The block scores of a calibration, checked against its record's shapes; with `hidden`, also "hidden": one
    tensor of hidden_size scores (a calibration with `apt.prune_hidden` writes it)."""
    path = scores_path(run_dir)
    tensors = load_tensors(path, "APT scores file")
    sizes = {"group": [s["num_key_value_heads"] for s in record["layer_shapes"]],
             "ffn": [s["intermediate_size"] for s in record["layer_shapes"]], "hidden": [record["hidden_size"]]}
    out: dict = {}
    for kind in KINDS + ("hidden",) * hidden:
        out[kind] = []
        for i, n in enumerate(sizes[kind]):
            t = tensors.get(f"{kind}.{i}")
            if t is None or t.shape != (n,) or not bool(torch.isfinite(t).all()):
                raise LightPeftError(f"APT scores file {path}: {kind}.{i} is missing, not {n} finite scores; delete "
                                     f"{path.parent} and rerun `lightpeft calibrate`")
            out[kind].append(t.double())
    if hidden:
        out["hidden"] = out["hidden"][0]  # one global set of scores, as plan_for_budget takes it
    return out


def recorded_key(run_dir: Path) -> str | None:
    try:
        record = read_json_if_present(RunDir(run_dir).estimate_record) or {}
    except LightPeftError:
        return None
    return record.get("key") if record.get("strategy") == "apt" and scores_path(run_dir).is_file() else None
