"""Specification of the first-order unit scores (`prune.unit_scores: taylor`, pruning/taylor.py): per example,
|m_u dL_e/dm_u| summed over examples, taken from autograd directly; APT's salience from the same hook; dead units
score exactly 0; forwards that are not recorded do not count; totals checkpoint and resume, in the tracker and
through an interrupted estimate (the 2-rank and ZeRO-3 runs are compared in test_deepspeed.py)."""

from __future__ import annotations

import json
import shutil

import torch
import yaml
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.pruning.masks import attach_masks, mask_parameters
from lightpeft_dist.pruning.scores import load_scores
from lightpeft_dist.pruning.taylor import FirstOrderTracker
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.training import checkpoint
from tiny import randomize_lora, tiny_model

IDS = torch.tensor([[5, 9, 12, 7, 20, 4, 8, 11], [6, 3, 15, 9, 22, 2, 2, 2], [14, 4, 10, 18, 5, 7, 9, 2]])
MASK = (IDS != 2).long()  # right padding (pad id 2): pads come after every real token, so no gradient reaches them
LABELS = IDS.masked_fill(MASK == 0, -100)


def masked_lora_model(targets: list[str], seed: int = 0):
    """A tiny GQA model with LoRA on `targets` and masks attached after it (as the estimate does), masks set to
    values other than 1 so that the m factor of m dL/dm is exercised."""
    model = get_peft_model(tiny_model("llama-gqa", seed=seed), lora_config(PeftConfig(r=2, alpha=4, dropout=0.0,
                                                                                     targets=targets)))
    randomize_lora(model)
    attach_masks(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sum(mask_parameters(model), []):
            m.copy_(0.5 + torch.rand(m.shape, generator=g))
    return model


def per_token_loss(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch loss as HF computes it (mean over label tokens) and each example's share of it."""
    logits = model(input_ids=IDS, attention_mask=MASK).logits[:, :-1].float()
    target = LABELS[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    share = ce.sum(1) / (target != -100).sum()
    return share.sum(), share


def recorded_step(model, tracker: FirstOrderTracker, captured: dict | None = None):
    tracker.recording, tracker.token_mask = True, MASK
    loss, _ = per_token_loss(model)
    tracker.recording = False
    if captured is None:
        loss.backward()
    else:  # dL/dz for the captured unit outputs z, from autograd
        grads = torch.autograd.grad(loss, list(captured.values()))
        captured.update({("g",) + k: g for k, g in zip(list(captured), grads)})
    model.zero_grad(set_to_none=True)
    return tracker.end_step()


def test_taylor_score_is_per_example_abs_of_mask_times_its_gradient():
    model = masked_lora_model(["q_proj", "v_proj", "o_proj", "down_proj"])
    heads, ffns = mask_parameters(model)
    masks = heads + ffns
    _, shares = per_token_loss(model)
    reference = [torch.zeros(m.shape, dtype=torch.float64) for m in masks]
    for share in shares:  # example e's loss: m * dL_e/dm per example, then abs, then summed over examples
        grads = torch.autograd.grad(share, masks, retain_graph=True)
        for acc, m, g in zip(reference, masks, grads):
            acc += (m.detach() * g).double().abs()
    tracker = FirstOrderTracker(model, Runtime())
    recorded_step(model, tracker)
    got_heads, got_ffn = tracker.taylor()
    for got, ref in zip(got_heads + got_ffn, reference, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-7)
        assert float(ref.min()) > 0
    # the abs is per example: the abs of the batch sum (all examples at once) is a different, smaller number
    batch = torch.autograd.grad(shares.sum(), masks)
    assert any(float(((m.detach() * g).abs() - r).abs().max()) > 1e-4 for m, g, r in zip(masks, batch, reference))


def test_salience_is_apts_product_of_summed_magnitudes_at_the_mask_position():
    model = masked_lora_model(["q_proj", "o_proj", "down_proj"], seed=1)
    tracker = FirstOrderTracker(model, Runtime())
    captured: dict = {}
    base = model.base_model.model.model
    for i, layer in enumerate(base.layers):  # registered last: they see what the tracker sees, x * m
        for kind, proj in (("head", layer.self_attn.o_proj), ("ffn", layer.mlp.down_proj)):
            proj.register_forward_pre_hook(lambda mod, args, key=(kind, i): captured.setdefault(key, args[0]))
    taylor_step, salience_step = recorded_step(model, tracker, captured)
    w = MASK.double()[..., None]
    hd = model.config.hidden_size // model.config.num_attention_heads
    for i in range(len(base.layers)):
        for kind, got_sal, got_taylor in (("head", salience_step.head[i], taylor_step.head[i]),
                                          ("ffn", salience_step.ffn[i], taylor_step.ffn[i])):
            z, g = captured[(kind, i)].detach().double(), captured[("g", kind, i)].double()
            per_coord = (z.abs() * w).sum((0, 1)) * (g.abs() * w).sum((0, 1))
            group = hd if kind == "head" else 1
            torch.testing.assert_close(got_sal.double(), per_coord.reshape(-1, group).sum(-1), rtol=1e-5, atol=1e-9)
            per_example = ((z * g * w).reshape(*z.shape[:2], -1, group).sum(-1).sum(1)).abs().sum(0)
            torch.testing.assert_close(got_taylor.double(), per_example, rtol=1e-4, atol=1e-8)
    heads, ffns = tracker.salience()
    torch.testing.assert_close(heads[0], salience_step.head[0].float())


def test_dead_units_score_exactly_zero():
    model = masked_lora_model(["q_proj", "k_proj", "v_proj"], seed=2)
    heads, ffns = mask_parameters(model)
    base = model.base_model.model.model
    with torch.no_grad():
        heads[0][1] = 0.0  # masked off: its output x * m is 0
        ffns[1][:4] = 0.0
        base.layers[0].mlp.down_proj.weight[:, 5] = 0.0  # writes nothing: no gradient reaches it
        hd = model.config.hidden_size // model.config.num_attention_heads
        base.layers[1].self_attn.o_proj.weight[:, 2 * hd:3 * hd] = 0.0
    tracker = FirstOrderTracker(model, Runtime())
    recorded_step(model, tracker)
    dead = {("head", 0): [1], ("head", 1): [2], ("ffn", 0): [5], ("ffn", 1): [0, 1, 2, 3]}
    for name, (h, f) in (("taylor", tracker.taylor()), ("salience", tracker.salience())):
        for key, scores in [(("head", i), t) for i, t in enumerate(h)] + [(("ffn", i), t) for i, t in enumerate(f)]:
            off = torch.zeros(scores.numel(), dtype=torch.bool)
            off[dead[key]] = True
            assert torch.all(scores[off] == 0.0), (name, key, scores)
            assert float(scores[~off].min()) > 0, (name, key, scores)


def test_unrecorded_forwards_do_not_count_and_totals_resume():
    model = masked_lora_model(["v_proj", "o_proj"], seed=3)
    whole = FirstOrderTracker(model, Runtime())
    for _ in range(3):
        recorded_step(model, whole)
    per_token_loss(model)[0].backward()  # a forward while not recording (a recompute, an eval) must not count
    model.zero_grad(set_to_none=True)
    assert whole.end_step()[0].ffn[0].abs().max() == 0
    whole.remove()
    first = FirstOrderTracker(model, Runtime())
    recorded_step(model, first)
    recorded_step(model, first)
    state = first.state_dict()
    first.remove()
    resumed = FirstOrderTracker(model, Runtime())
    resumed.load_state_dict(state)
    recorded_step(model, resumed)
    for a, b in zip([*whole.taylor(), *whole.salience()], [*resumed.taylor(), *resumed.salience()], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    assert (whole.steps, resumed.steps) == (4, 3)  # the unrecorded step is a step with nothing in it


def test_an_interrupted_estimate_resumes_to_the_same_taylor_scores(tmp_path, tiny_recipe, monkeypatch):
    """In one process: the estimate's checkpoint (copied as a launcher would keep it) resumes to the same scores; a
    checkpoint without the Taylor totals (written before they existed) is ignored and the run starts over."""
    tiny_recipe["estimate"]["checkpoint_every"] = 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run, kept = tmp_path / "run", tmp_path / "kept.ckpt"

    def keep(path, step):
        if step == 3:
            shutil.copytree(path, kept)

    monkeypatch.setattr(checkpoint, "LISTENERS", [keep])
    assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    assert kept.is_dir() and not (run / "estimate.ckpt").exists()
    whole = load_scores(run / "estimate" / "taylor_scores.safetensors")
    whole_movement = load_scores(run / "estimate" / "movement_scores.safetensors")
    whole_salience = load_scores(run / "estimate" / "salience_scores.safetensors")
    assert all(float(t.min()) >= 0 for t in whole.head + whole.ffn) and float(whole.ffn[0].max()) > 0
    monkeypatch.setattr(checkpoint, "LISTENERS", [])
    for strip, resumed_from in ((False, 4), (True, 0)):
        shutil.rmtree(run / "estimate")
        shutil.copytree(kept, run / "estimate.ckpt")
        if strip:
            state = load_file(run / "estimate.ckpt" / "state.safetensors")
            save_file({k: v for k, v in state.items() if not k.startswith("extra/taylor.")},
                      run / "estimate.ckpt" / "state.safetensors")
        assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
        record = json.loads((run / "estimate" / "estimate.json").read_text())
        assert record["resumed_from_step"] == resumed_from
        again = load_scores(run / "estimate" / "taylor_scores.safetensors")
        for x, y in zip(whole.head + whole.ffn, again.head + again.ffn, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        moved = load_scores(run / "estimate" / "movement_scores.safetensors")  # the mask path lengths resume too
        for x, y in zip(whole_movement.head + whole_movement.ffn, moved.head + moved.ffn, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        salience = load_scores(run / "estimate" / "salience_scores.safetensors")  # APT's salience, same hook
        for x, y in zip(whole_salience.head + whole_salience.ffn, salience.head + salience.ffn, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)


def test_plan_reads_the_taylor_file_of_the_same_estimate(tmp_path, tiny_recipe):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=taylor"]) == 0
    taylor_plan = json.loads((run / "plan.json").read_text())
    assert main(["plan", "--run-dir", str(run)]) == 0
    masks_plan = json.loads((run / "plan.json").read_text())
    assert taylor_plan["prune"]["unit_scores"] == "taylor" and taylor_plan["key"] != masks_plan["key"]
    assert taylor_plan["layers"] != masks_plan["layers"]
    # the salience file, planned per layer and with the budget allocation (the per-layer count, spent across layers)
    assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=salience"]) == 0
    layerwise = json.loads((run / "plan.json").read_text())
    assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=salience", "--prune.allocation=budget"]) == 0
    budget_plan = json.loads((run / "plan.json").read_text())
    assert budget_plan["prune"]["allocation"] == "budget" and budget_plan["key"] != layerwise["key"]
    assert budget_plan["summary"]["prunable_params_after"] <= layerwise["summary"]["prunable_params_after"]
