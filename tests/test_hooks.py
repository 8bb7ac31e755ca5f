"""Step hooks (docs/hooks.md): a no-op restructure changes nothing, bit for bit, on 1 process and on 2 ZeRO-3 ranks;
a hook's extra loss is added exactly; a hook's state survives a checkpoint and resume.

Most checks drive `run_steps` directly on a tiny LoRA model (seconds); the train-stage ones reuse the multi-process
tests' pruned run (`dist_single`) and launcher helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import get_peft_model
from safetensors.torch import load_file

from dist_checks import BIN, REPO, ZERO3, launch
from hooks_worker import NoOpRestructure
from lightpeft_dist.config import PeftConfig, load_recipe
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.pipeline.train import run_train
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.training import checkpoint
from lightpeft_dist.training.checkpoint import Checkpointing, resume
from lightpeft_dist.training.hooks import HookList, Restructure, StepHooks, Trainee
from lightpeft_dist.training.loop import PlainEngine, linear_schedule, run_steps
from tiny import randomize_lora, tiny_model

STEPS = 6


class Batches:
    """Step-indexed random batches with some padding (what StepBatches provides, without a data set)."""

    def batch_for_step(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(3, 60, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def make_trainee(dropout: float = 0.1, grad_accum: int = 2) -> Trainee:
    """The same tiny LoRA model, AdamW and warm-up + decay schedule every time it is called."""
    model = get_peft_model(tiny_model("llama-gqa"), lora_config(PeftConfig(r=4, alpha=8, dropout=dropout,
                                                                             targets=["q_proj", "v_proj"])))
    randomize_lora(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.01)
    engine = PlainEngine(model, optimizer, linear_schedule(optimizer, STEPS, warmup=2), grad_accum, 1.0)
    return Trainee(model, engine, named)


def train(hooks: StepHooks | None = None, grad_accum: int = 2, **kwargs) -> tuple[list[float], Trainee]:
    trainee = make_trainee(grad_accum=grad_accum)
    stats = run_steps(trainee, Batches(), STEPS, grad_accum, Runtime(), "test", hooks=hooks, seed=7,
                      rebuild=lambda meta: make_trainee(grad_accum=grad_accum), **kwargs)
    return stats.losses, trainee


def params(trainee: Trainee) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainee.named}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_noop_restructure_on_one_process_is_bit_identical():
    """(a) Dropout on, 2 micro-batches per step, a warm-up schedule: rebuild after step 2 and resume from memory."""
    ref_losses, ref = train()
    hook = NoOpRestructure(at=2)
    losses, trainee = train(hook)
    assert hook.rebuilt == 1  # a new model and engine really replaced the first ones
    assert losses == ref_losses
    assert_identical(params(trainee), params(ref))
    state = trainee.engine.optimizer.state  # moments and step count carried over
    for (_, p), (_, q) in zip(trainee.named, ref.named, strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[p][key], ref.engine.optimizer.state[q][key]), key


class Scale(StepHooks):
    """A restructure that doubles every parameter value after the last step (moments untouched)."""

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        if step != STEPS - 1:
            return None
        return Restructure(lambda t, m: ({k: v * 2 if k.startswith("param/") else v for k, v in t.items()}, m))


def test_transform_reaches_the_rebuilt_model_and_bad_shapes_are_refused():
    _, ref = train()
    _, trainee = train(Scale())
    assert_identical(params(trainee), {k: 2 * v for k, v in params(ref).items()})

    def drop_a_row(tensors, meta):
        name = next(k for k in tensors if k.startswith("param/") and "lora_A" in k)
        return {**tensors, name: tensors[name][1:]}, meta

    class Bad(StepHooks):
        def after_optimizer_step(self, step, loss):
            return Restructure(drop_a_row, "drop a rank row") if step == 1 else None

    with pytest.raises(LightPeftError, match="built for another structure"):
        train(Bad())
    with pytest.raises(LightPeftError, match="no way to rebuild"):
        run_steps(make_trainee(), Batches(), 2, 2, Runtime(), "test", hooks=NoOpRestructure(at=0))


class LoraPenalty(StepHooks):
    """c * sum of squares of the LoRA A weights of modules named `which` (a term with a gradient of its own)."""

    def __init__(self, trainee: Trainee, c: float, which: str):
        self.trainee, self.c, self.which = trainee, c, which

    def extra_loss(self, batch, output) -> torch.Tensor:
        return self.c * sum(p.pow(2).sum() for n, p in self.trainee.named if "lora_A" in n and self.which in n)


def test_extra_loss_is_added_exactly():
    """(c) Loop loss and update equal a hand-written step on `output.loss + extra_1 + extra_2`."""
    hooked, manual = make_trainee(dropout=0.0, grad_accum=1), make_trainee(dropout=0.0, grad_accum=1)
    hooks = HookList([LoraPenalty(hooked, 0.37, "q_proj"), LoraPenalty(hooked, 0.11, "v_proj")])
    stats = run_steps(hooked, Batches(), 1, 1, Runtime(), "test", hooks=hooks, seed=5)

    torch.manual_seed(5 * 1_000_003)
    out = manual.model(**Batches().batch_for_step(0))
    extras = [c * sum(p.pow(2).sum() for n, p in manual.named if "lora_A" in n and which in n)
              for c, which in ((0.37, "q_proj"), (0.11, "v_proj"))]
    loss = out.loss + extras[0] + extras[1]
    assert float(extras[0] + extras[1]) > 0.1 * float(out.loss)  # the extras are not negligible
    assert stats.losses == [float(loss)]
    loss.backward()
    ps = [p for _, p in manual.named]
    torch.nn.utils.clip_grad_norm_(ps, 1.0)
    manual.engine.optimizer.step()
    assert_identical(params(hooked), params(manual))


class RunningLoss(StepHooks):
    """State that steers training: the running loss sum scales an extra term, so losing it changes the result."""

    def __init__(self) -> None:
        self.total, self.steps = torch.zeros(()), torch.zeros((), dtype=torch.int64)

    def extra_loss(self, batch, output) -> torch.Tensor:
        return 1e-2 * self.total * output.logits.float().pow(2).mean()

    def after_optimizer_step(self, step: int, loss: float) -> None:
        self.total += loss
        self.steps += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"running.total": self.total.clone(), "running.steps": self.steps.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total, self.steps = state["running.total"].clone(), state["running.steps"].clone()


@contextlib.contextmanager
def listening(listener):
    """`listener(path, step)` hears every checkpoint written inside the block (checkpoint.LISTENERS)."""
    checkpoint.LISTENERS.append(listener)
    try:
        yield
    finally:
        checkpoint.LISTENERS.remove(listener)


class Killed(Exception):
    pass


def test_hook_state_round_trips_through_the_checkpoint(tmp_path):
    """(d) Killed right after the checkpoint at step 3; a new loop resumes and ends where an unkilled one does."""
    ref_hook = RunningLoss()
    ref_losses, ref = train(ref_hook)

    def kill(path: Path, step: int) -> None:
        if step == 3:
            raise Killed

    with listening(kill), pytest.raises(Killed):
        train(RunningLoss(), checkpoint=Checkpointing(tmp_path / "ckpt", 2, {"run": "test"}))
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["step"] == 3

    hook, trainee = RunningLoss(), make_trainee()
    start = resume(tmp_path / "ckpt", trainee, hook, Runtime(), "test",
                   accept=lambda meta, tensors: None if meta.get("run") == "test" else "another run")
    assert start == 4 and int(hook.steps) == 4
    stats = run_steps(trainee, Batches(), STEPS, 2, Runtime(), "test", hooks=hook, seed=7, start_step=start)
    assert stats.losses == ref_losses[4:]
    assert_identical(params(trainee), params(ref))
    assert torch.equal(hook.total, ref_hook.total) and int(hook.steps) == STEPS


class Relabel(StepHooks):
    """A no-op restructure after step 1 that records a structure, as a rank-resizing transform would."""

    def after_optimizer_step(self, step: int, loss: float) -> Restructure | None:
        if step != 1:
            return None
        return Restructure(lambda t, m: (t, {**m, "structure": {"ranks": "as before"}}), "relabel")


def test_checkpoint_after_a_restructure_resumes_into_the_rebuilt_structure(tmp_path):
    ref_losses, ref = train()
    seen: list[dict] = []

    def rebuild(meta: dict) -> Trainee:
        seen.append(meta.get("structure"))
        return make_trainee()

    def kill(path: Path, step: int) -> None:
        if step == 3:
            raise Killed

    with listening(kill), pytest.raises(Killed):
        run_steps(make_trainee(), Batches(), STEPS, 2, Runtime(), "test", hooks=Relabel(), seed=7, rebuild=rebuild,
                  checkpoint=Checkpointing(tmp_path / "ckpt", 2, {}))
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["structure"] == {"ranks": "as before"}
    trainee = make_trainee()
    start = resume(tmp_path / "ckpt", trainee, Relabel(), Runtime(), "test", rebuild=rebuild)
    assert start == 4 and seen == [{"ranks": "as before"}] * 2 and trainee.structure == {"ranks": "as before"}
    stats = run_steps(trainee, Batches(), STEPS, 2, Runtime(), "test", hooks=Relabel(), seed=7, start_step=start)
    assert stats.losses == ref_losses[4:]
    assert_identical(params(trainee), params(ref))


# The train stage, 1 process and 2 ZeRO-3 ranks: the pruned run of the multi-process tests, 2 micro-batches a step.

@pytest.fixture(scope="module")
def train_recipe(dist_recipe, tmp_path_factory) -> Path:
    raw = yaml.safe_load(dist_recipe.read_text())
    raw["train"].update(grad_accum=2, warmup_ratio=0.3)
    path = tmp_path_factory.mktemp("hooks") / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def pruned_copy(single: Path, dest: Path) -> Path:
    shutil.copytree(single, dest, ignore=shutil.ignore_patterns("train", "eval.json", "export", "report"))
    return dest


def trained(run: Path) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses = json.loads((run / "train" / "train.json").read_text())["losses"]
    return losses, load_file(run / "train" / "adapter" / "adapter_model.safetensors")


def test_noop_restructure_in_the_train_stage_on_one_process(train_recipe, dist_single, tmp_path):
    recipe = load_recipe(train_recipe)
    plain, restructured = (pruned_copy(dist_single, tmp_path / n) for n in ("plain", "restructured"))
    run_train(recipe, plain, Runtime())
    hook = NoOpRestructure(at=2)
    run_train(recipe, restructured, Runtime(), hooks=hook)
    assert hook.rebuilt == 1
    (l1, a1), (l2, a2) = trained(plain), trained(restructured)
    assert l1 == l2 and len(l1) == recipe.train.steps
    assert_identical(a1, a2)


@pytest.mark.timeout(1200)
def test_noop_restructure_on_two_zero3_ranks(train_recipe, dist_single, tmp_path):
    """(b) A fresh DeepSpeed engine under ZeRO-3 after step 2: same losses, same gathered adapter, bit for bit."""
    plain, restructured = (pruned_copy(dist_single, tmp_path / n) for n in ("plain", "restructured"))
    launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(REPO / "tests" / "hooks_worker.py"),
            str(train_recipe), ZERO3, str(plain), str(restructured), "2"],
           env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"})  # this checkout's package, not an installed one
    assert [json.loads((restructured / f"rebuilt.rank{r}.json").read_text())["rebuilt"] for r in (0, 1)] == [1, 1]
    (l1, a1), (l2, a2) = trained(plain), trained(restructured)
    record = json.loads((restructured / "train" / "train.json").read_text())
    assert record["world_size"] == 2 and record["deepspeed"]["zero_optimization"]["stage"] == 3
    assert l1 == l2 and len(l1) == record["steps"]
    assert_identical(a1, a2)
