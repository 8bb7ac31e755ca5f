"""LoRA rank growth during training (adapters/lora_growth.py, docs/hooks.md): the salience equals its autograd
reference; growth leaves logits and the next loss unchanged, keeps old AdamW moments, zeroes new ones and keeps the
schedule's position; the grown adapter saves as plain PEFT and reloads to identical logits in a fresh process; the
budget rule is the reference's top-half rule.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dist_checks import REPO
from lightpeft_dist.adapters.lora import save
from lightpeft_dist.adapters.lora_growth import budget_at, grow, growth_targets, lora_budget
from lightpeft_dist.adapters.lora_salience import LoraRankSalience
from lightpeft_dist.adapters.lora_structure import lora_layout
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import save_tensors
from lightpeft_dist.pruning.live import lora_parts
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.training.checkpoint import apply_restructure
from lightpeft_dist.training.hooks import HookList, StepHooks
from lightpeft_dist.training.loop import run_steps
from lightpeft_dist.training.zero import full_state
from restructure_kit import STEPS, Batches, Scripted, builder, save_source

Q0, V1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
NEW = {Q0: 6, V1: 7}
FIXED = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("growth") / "model")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=FIXED).logits.float()


def test_salience_equals_the_autograd_reference(source, tmp_path):
    """Activation form == sum_j A_kj * dL/dA_kj from the accumulated .grad (dropout on, 2 micro-batches), EMA 0.85."""
    build = builder(source, tmp_path, Runtime(), dropout=0.1)
    trainee = build()
    tracker = LoraRankSalience(trainee, Runtime())
    expected: dict[str, torch.Tensor] = {}

    class Reference(StepHooks):
        def before_optimizer_step(self, step: int) -> None:
            for name, p in trainee.named:
                parts = lora_parts(name)
                if parts and parts[1] == "A":
                    t = (p.detach().double() * p.grad.double()).sum(1).abs()
                    expected[parts[0]] = 0.85 * expected.get(parts[0], torch.zeros_like(t)) + 0.15 * t

    run_steps(trainee, Batches(), 3, 2, Runtime(), "test", hooks=HookList([tracker, Reference()]), seed=7)
    assert tracker.ema.keys() == expected.keys() and len(expected) == 14
    for m, ref in expected.items():
        assert float(ref.max()) > 0
        torch.testing.assert_close(tracker.ema[m], ref, rtol=1e-5, atol=0)  # fp32 .grad vs float64 sums
    assert tracker.module_scores()[Q0] == pytest.approx(float(expected[Q0].mean()), rel=1e-5)


def test_growth_keeps_logits_moments_and_schedule(source, tmp_path):
    rt = Runtime()
    build = builder(source, tmp_path, rt)
    trainee = build()
    run_steps(trainee, Batches(), 2, 2, rt, "test", seed=7)
    before = logits(trainee.model)
    opt = trainee.engine.optimizer
    old = {n: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for n, p in trainee.named}
    lr, epoch = trainee.engine.scheduler.get_last_lr(), trainee.engine.scheduler.last_epoch
    apply_restructure(trainee, grow(trainee.model, NEW, seed=3), 1, StepHooks(), build, rt)

    assert lora_layout(trainee.model)["ranks"][Q0] == 6 and trainee.structure["lora"]["alphas"][Q0] == 12.0
    assert trainee.model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0
    torch.testing.assert_close(logits(trainee.model), before, rtol=0, atol=1e-6)
    opt = trainee.engine.optimizer
    assert trainee.engine.scheduler.last_epoch == epoch and trainee.engine.scheduler.get_last_lr() == lr
    grown = 0
    for name, p in trainee.named:
        state = opt.state[p]
        assert int(state["step"]) == 2
        module, part, _ = lora_parts(name)
        for k in ("exp_avg", "exp_avg_sq"):
            was, now = old[name][k], state[k]
            if module in NEW:
                dim = 0 if part == "A" else 1
                n_old = was.shape[dim]
                keep, new = now.narrow(dim, 0, n_old), now.narrow(dim, n_old, now.shape[dim] - n_old)
                assert torch.equal(keep, was) and new.numel() > 0 and not new.any()
                grown += 1
            else:
                assert torch.equal(now, was)
    assert grown == 8
    p_a = dict(trainee.named)[f"base_model.model.{Q0}.lora_A.default.weight"]
    bound = 1 / 48 ** 0.5  # kaiming-uniform(a=sqrt 5) on fan-in 48, as PEFT initialises A
    assert p_a[4:].abs().max() <= bound and p_a[4:].abs().max() > bound / 2


def test_next_loss_after_growth_equals_the_run_without(source, tmp_path):
    rt = Runtime()
    plain_build, grown_build = builder(source, tmp_path / "a", rt), builder(source, tmp_path / "b", rt)
    plain = plain_build()
    ref = run_steps(plain, Batches(), STEPS, 2, rt, "test", seed=7, rebuild=plain_build).losses
    grown = grown_build()
    hook = Scripted(grown, {1: lambda t: grow(t.model, NEW, seed=3)})
    losses = run_steps(grown, Batches(), STEPS, 2, rt, "test", hooks=hook, seed=7, rebuild=grown_build).losses
    assert losses[:2] == ref[:2]
    assert losses[2] == pytest.approx(ref[2], rel=1e-6, abs=1e-7)  # the step right after growth
    assert losses[4] != pytest.approx(ref[4], rel=1e-7)  # the new ranks train: the runs part afterwards
    assert grown.engine.scheduler.last_epoch == plain.engine.scheduler.last_epoch == STEPS
    assert trainee_ranks(grown)[Q0] == 6


def trainee_ranks(trainee) -> dict[str, int]:
    return lora_layout(trainee.model)["ranks"]


RELOAD = """
import sys, torch
sys.path.insert(0, {tests!r})
from lightpeft_dist.adapters.lora import load_adapter
from lightpeft_dist.io_utils import save_tensors
from lightpeft_dist.models.loading import load_model
from peft import PeftModel
fixed = torch.tensor({fixed})
out = {{}}
for how, load in (("peft", PeftModel.from_pretrained), ("ours", load_adapter)):
    model = load(load_model({base!r}), {adapter!r}).eval()
    with torch.no_grad():
        out[how] = model(input_ids=fixed).logits.float()
save_tensors({out!r}, out)
"""


def test_grown_adapter_saves_as_peft_and_reloads_in_a_fresh_process(source, tmp_path):
    rt = Runtime()
    build = builder(source, tmp_path, rt)
    trainee = build()
    run_steps(trainee, Batches(), 3, 2, rt, "test", seed=7, rebuild=build,
              hooks=Scripted(trainee, {0: lambda t: grow(t.model, NEW, seed=3)}))
    trainee.model.eval()
    live = logits(trainee.model)
    save(trainee.model, tmp_path / "adapter", full_state(trainee.named))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"][Q0] == 6 and cfg["rank_pattern"][V1] == 7
    assert all(cfg["alpha_pattern"][m] / r == 2.0 for m, r in cfg["rank_pattern"].items())
    script = RELOAD.format(tests=str(REPO / "tests"), fixed=FIXED.tolist(), base=str(source),
                           adapter=str(tmp_path / "adapter"), out=str(tmp_path / "reloaded.safetensors"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = load_file(tmp_path / "reloaded.safetensors")
    assert torch.equal(reloaded["peft"], live) and torch.equal(reloaded["ours"], live)


def test_budget_rule_is_the_top_half_rule():
    ranks = {"a": 8, "b": 8, "c": 8, "d": 8, "e": 64}
    scores = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.5, "e": 5.0}
    assert budget_at(96, 4.0, 0, 16) == 96 and budget_at(96, 4.0, 16, 16) == 384 and budget_at(96, 4.0, 4, 16) == 168
    # n = 5 adapters -> top 2 of the candidates (e is at the cap): b, then c (ties go to the path first in order)
    new = growth_targets(ranks, scores, 96 + 32, max_rank=64)
    assert new == {"a": 8, "b": 24, "c": 24, "d": 8, "e": 64}  # rate (128 - 96) / 16 + 1 = 3
    assert growth_targets(ranks, scores, 96 + 2000, max_rank=64)["b"] == 64  # capped
    assert growth_targets(ranks, scores, 90, max_rank=64) == ranks  # no shrinking
    cost = {"a": 10, "b": 20, "c": 10, "d": 10, "e": 10}  # parameters per rank: d_in + d_out
    assert lora_budget(ranks, cost) == 1040
    assert growth_targets(ranks, scores, 1040 + 240, 64, cost) == {**ranks, "b": 16, "c": 16}  # rate 240/240 + 1
    with pytest.raises(LightPeftError, match="max_rank 32 is below the rank 64"):
        growth_targets(ranks, scores, 200, max_rank=32)
