"""APT's gradual mode with hidden-dimension pruning (`apt.prune_hidden`; strategies/apt/gradual.py, pruning/live.py,
pruning/hidden_mask.py's HiddenRamp): a live prune that cuts hidden dimensions rebuilds the model whose logits equal
the pre-prune model with the same blocks and hidden dimensions masked (adapter attached; the ramp's hooks at value 0
and hidden_mask.py's masked twin alike, at value 1 exactly the unmasked model), and every LoRA tensor and AdamW
moment is the sliced original, on its unit side and its residual side; a later plan that keeps a hidden dimension an
earlier prune removed is refused, and a second prune composes (source coordinates; its model equals the once-pruned
one masked at the current positions). Through `lightpeft train`, on a tied (Llama GQA) and an untied (Llama MHA)
model: every pruning checkpoint prunes hidden dimensions, its kept count (whole model: embeddings and LM head
included) is the scheduled budget within one block, the final pruned model has exactly the recorded count and the
plan's hidden width, and a training SIGKILLed after the first hidden-pruning checkpoint, inside the second ramp,
resumes to the uninterrupted result."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import launch, run_stages
from lightpeft_dist.adapters.lora_structure import lora_layout
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.models.families import config_layer_shapes, family_for, head_dim_of
from lightpeft_dist.models.loading import fingerprint, load_config, load_model
from lightpeft_dist.pruning.hidden_mask import HiddenRamp, attach_hidden_mask
from lightpeft_dist.pruning.live import live_prune, lora_parts, relative_hidden, relative_layers
from lightpeft_dist.pruning.masks import attach_masks, set_masks_from_plan
from lightpeft_dist.pruning.plan import plan_hash, read_plan, summarize
from lightpeft_dist.pruning.slicing import model_reference, slicing_table
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.strategies.apt.gradual import GradualPrune, base_plan, cubic_density
from lightpeft_dist.training.checkpoint import apply_restructure
from lightpeft_dist.training.hooks import StepHooks
from lightpeft_dist.training.loop import run_steps
from restructure_kit import Batches, builder, make_test_plan, save_source
from test_apt import write_recipe
from test_apt_gradual import BEFORE_TRAIN, assert_resumed_like_uninterrupted, n_params
from tiny import save_tiny

pytestmark = pytest.mark.timeout(1200)
FIXED = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])
TARGET = 0.6
# as test_apt_gradual.py: checkpoints after steps 2 and 5, chosen after 0 and 3, killed after 4 (inside the second
# ramp, after the first hidden prune). Without the kurtosis term: on the tiny models it sums over every o/down row and
# makes hidden dimensions so salient per parameter that none would go at this density (test_apt_hidden.py's one-shot
# run needs 0.2); with first-order salience both checkpoints cut hidden dimensions.
APT = {"mode": "gradual", "target_density": TARGET, "calibration_samples": 4, "batch_size": 4, "seq_len": 24,
       "window": 6, "checkpoints": 2, "ramp": 2, "mask_ramp_step": 0.5, "rank_growth": 2.0, "distill_weight": 0.5,
       "prune_hidden": True, "use_kurtosis": False}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=FIXED).logits.float()


def with_hidden(plan: dict, config, hidden: list[int]) -> dict:
    """The plan keeping also these source hidden dimensions (summary and hash remade, as a planner would)."""
    plan = {k: v for k, v in plan.items() if k not in ("summary", "hash")}
    plan["hidden"] = hidden
    plan["summary"] = summarize(plan, config_layer_shapes(config), config.hidden_size, head_dim_of(config))
    plan["hash"] = plan_hash(plan)
    return plan


@pytest.mark.parametrize("layout", ["llama-gqa", "qwen2-bias"])  # tied GQA / untied with q/k/v biases
def test_live_hidden_prune_equals_the_masked_model_and_slices_lora_and_moments(layout, tmp_path):
    src, rt = save_source(tmp_path / "model", layout), Runtime()
    config = load_config(str(src))
    build = builder(src, tmp_path / "work", rt)
    trainee = build()
    run_steps(trainee, Batches(), 2, 2, rt, "test", seed=7, rebuild=build)  # real moments
    d = config.hidden_size
    hidden = sorted(torch.randperm(d, generator=torch.Generator().manual_seed(1))[: d * 2 // 3].tolist())
    plan = with_hidden(make_test_plan(src, peft=lora_layout(trainee.model)["ranks"]), config, hidden)
    removed = sorted(set(range(d)) - set(hidden))
    before = {n: {"param": p.detach().clone(), **{k: trainee.engine.optimizer.state[p][k].clone()
                                                  for k in ("exp_avg", "exp_avg_sq")}} for n, p in trainee.named}

    twin = copy.deepcopy(trainee.model).eval()  # the pre-prune model, masked: blocks, then hidden dimensions
    unmasked = logits(twin)
    attach_masks(twin)
    set_masks_from_plan(twin, plan)
    blocks_only = logits(twin)
    ramp = HiddenRamp(twin, removed)
    assert torch.equal(logits(twin), blocks_only)  # value 1: exactly the unmasked forward
    ramp.value = 0.5
    half = logits(twin)
    ramp.value = 0.0
    ramped = logits(twin)
    ramp.remove()
    attach_hidden_mask(twin, hidden)
    masked = logits(twin)

    apply_restructure(trainee, live_prune(plan, config, lora_layout(trainee.model)), 1, StepHooks(), build, rt)
    trainee.model.eval()
    live = logits(trainee.model)
    base = trainee.model.base_model.model
    assert base.config.hidden_size == len(hidden) and base.model.embed_tokens.weight.shape[1] == len(hidden)
    assert base.lm_head.weight.shape[1] == len(hidden)
    assert (base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()) == (layout == "llama-gqa")
    torch.testing.assert_close(live, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(live, ramped, rtol=0, atol=1e-5)
    assert (live - blocks_only).abs().max() > 1e-2 and (half - blocks_only).abs().max() > 1e-3  # not vacuous
    assert (half - live).abs().max() > 1e-3 and (blocks_only - unmasked).abs().max() > 1e-2

    table = slicing_table(family_for(config), plan, head_dim_of(config))
    h = torch.as_tensor(hidden, dtype=torch.long)
    residual = 0
    for name, p in trainee.named:
        module, part, _ = lora_parts(name)
        side, idx = table[module]
        state = trainee.engine.optimizer.state[p]
        for kind, want in before[name].items():
            if side == "out":  # q/k/v/gate/up: units are B's rows, the residual stream A's columns
                want = want.index_select(0, idx) if part == "B" else want.index_select(1, h)
            else:  # o/down: units are A's columns, the residual stream B's rows
                want = want.index_select(1, idx) if part == "A" else want.index_select(0, h)
            got = p.detach() if kind == "param" else state[kind]
            assert torch.equal(got, want), (name, kind)
        residual += (side == "out") == (part == "A")
        assert int(state["step"]) == 2
    assert residual == 14  # every module (2 layers x 7 projections) lost its residual-side entries once

    # a second prune composes: it keeps a subset of the source dimensions the first kept (source coordinates), and
    # the model it rebuilds equals the once-pruned one masked at those dimensions' current positions
    ranks = lora_layout(trainee.model)["ranks"]
    second = with_hidden(make_test_plan(src, ffn_ratio=0.6, peft=ranks), config, hidden[1::2])
    twin = copy.deepcopy(trainee.model).eval()
    attach_masks(twin)
    set_masks_from_plan(twin, {"layers": relative_layers(plan, second)})
    attach_hidden_mask(twin, [hidden.index(v) for v in second["hidden"]])
    masked = logits(twin)
    apply_restructure(trainee, live_prune(second, config), 2, StepHooks(), build, rt)
    trainee.model.eval()
    assert trainee.model.base_model.model.config.hidden_size == len(second["hidden"])
    torch.testing.assert_close(logits(trainee.model), masked, rtol=0, atol=1e-5)

    back = with_hidden(make_test_plan(src, ffn_ratio=0.6, peft=ranks), config, sorted(second["hidden"] + removed[:1]))
    with pytest.raises(LightPeftError, match="keeps hidden dimensions .* which an earlier prune removed"):
        apply_restructure(trainee, live_prune(back, config), 3, StepHooks(), build, rt)


def test_checkpoint_plans_map_kept_hidden_positions_to_source_dimensions(tmp_path):
    """gradual.base_plan: the budget search's kept hidden dimensions are positions in the current (pruned) model;
    the plan holds the source dimensions they are, so a second checkpoint's plan composes with the first's."""
    src = save_source(tmp_path / "model", "llama-gqa")
    config = load_config(str(src))
    record = {**model_reference(config), "model_fingerprint": fingerprint(config)}
    d, shapes = config.hidden_size, record["layer_shapes"]
    start = with_hidden(make_test_plan(src, attn_ratio=0.0, ffn_ratio=0.0), config, list(range(d)))
    every = {"group": [list(range(s["num_key_value_heads"])) for s in shapes],
             "ffn": [list(range(s["intermediate_size"])) for s in shapes]}
    first = base_plan({**every, "hidden": list(range(0, d, 2))}, start, record, {})  # the even source dimensions
    assert first["hidden"] == list(range(0, d, 2))
    ffn = [[1, 3], [0, 2, 5]]
    second = base_plan({"group": [[1], [0]], "ffn": ffn, "hidden": [0, 1, 5]}, first, record, {})
    assert second["hidden"] == [0, 2, 10]  # positions 0, 1, 5 of the even ones
    assert [layer["kv_heads"] for layer in second["layers"]] == [[1], [0]]
    assert [layer["ffn"] for layer in second["layers"]] == ffn
    assert second["summary"]["after"]["hidden_size"] == 3
    live_prune(second, config)  # a valid live plan (source fingerprint, GQA, hash)
    assert "hidden" not in base_plan({**every, "hidden": None}, start, record, {})  # prune_hidden off: no field


def lora_state(trainee) -> dict[str, dict[str, torch.Tensor]]:
    state = trainee.engine.optimizer.state
    return {n: {"param": p.detach().clone(), "exp_avg": state[p]["exp_avg"].clone(),
                "exp_avg_sq": state[p]["exp_avg_sq"].clone()} for n, p in trainee.named}


def check_each_checkpoint(patch) -> list[dict]:
    """Inside the gradual run: right before each pruning checkpoint's restructure, the model's logits (its ramp masks,
    blocks and hidden dimensions, at 0) and LoRA state; right after the rebuild and restore, the rebuilt model's
    logits equal them (masked == pruned, adapter attached; the growth at the same checkpoint adds zero B columns), and
    every LoRA tensor and moment, cut to its old ranks, is the original sliced on its unit and its residual side."""
    seen: list[dict] = []
    step_fn, load_fn = GradualPrune.after_optimizer_step, GradualPrune.load_state_dict

    def after_optimizer_step(self, step, loss):
        if step in self.checkpoints:
            t = self.ctx.trainee
            assert self.masks is not None and self.masks.value == 0.0 and self.masks.hidden is not None
            seen.append({"step": step, "logits": logits(t.model), "state": lora_state(t),
                         "plan": t.structure.get("plan") or self.ctx.start_plan})
        return step_fn(self, step, loss)

    def load_state_dict(self, state):
        load_fn(self, state)
        if not seen or "checked" in seen[-1]:
            return
        t, before, config = self.ctx.trainee, seen[-1], self.ctx.source_config
        plan = t.structure["plan"]
        hidden = relative_hidden(before["plan"], plan, config.hidden_size)
        assert hidden is not None and len(hidden) < len(before["plan"]["hidden"])  # this checkpoint cut some
        torch.testing.assert_close(logits(t.model), before["logits"], rtol=0, atol=1e-5)
        table = slicing_table(family_for(config), {"layers": relative_layers(before["plan"], plan)},
                              head_dim_of(config))
        for name, now in lora_state(t).items():
            module, part, _ = lora_parts(name)
            side, idx = table[module]
            for kind, want in before["state"][name].items():
                if side == "out":
                    want = want.index_select(0, idx) if part == "B" else want.index_select(1, hidden)
                else:
                    want = want.index_select(1, idx) if part == "A" else want.index_select(0, hidden)
                got = now[kind][:want.shape[0]] if part == "A" else now[kind][:, :want.shape[1]]  # old ranks
                assert torch.equal(got, want), (before["step"], name, kind)
        before["checked"] = True

    patch.setattr(GradualPrune, "after_optimizer_step", after_optimizer_step)
    patch.setattr(GradualPrune, "load_state_dict", load_state_dict)
    return seen


def gradual_recipe(tmp_path, layout: str):
    recipe = write_recipe(tmp_path, APT)
    if layout != "llama-gqa":  # write_recipe's model is the tied Llama GQA one
        shutil.rmtree(tmp_path / "model")
        save_tiny(tmp_path / "model", layout)
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update(checkpoint_every=2, keep_checkpoints=1, steps=7)
    raw["peft"]["dropout"] = 0.0
    recipe.write_text(yaml.safe_dump(raw))
    return recipe


@pytest.mark.parametrize("layout", ["llama-gqa", "llama-mha"])  # tied / untied embeddings
def test_gradual_hidden_pruning_on_schedule_and_resumes_across_a_hidden_prune(tmp_path, layout):
    recipe = gradual_recipe(tmp_path, layout)
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stages(full, *BEFORE_TRAIN, config=recipe)
    shutil.copytree(full, killed)
    start = json.loads((full / "plan.json").read_text())
    source = load_model(str(tmp_path / "model"))
    d = source.config.hidden_size
    assert start["hidden"] == list(range(d))  # the dense start keeps every hidden dimension
    with pytest.MonkeyPatch.context() as patch:
        seen = check_each_checkpoint(patch)
        run_stages(full, "train", config=recipe)
    assert [c["step"] for c in seen if c.get("checked")] == [2, 5]

    ref = model_reference(load_config(str(tmp_path / "model")))
    plan = read_plan(full / "plan.json", ref)
    history = plan["apt"]["history"]
    assert [h["checkpoint"] for h in history] == [1, 2] and [h["step"] for h in history] == [2, 5]
    assert d > history[0]["hidden_size"] > history[1]["hidden_size"] == len(plan["hidden"])  # cut at both
    assert history[0]["kept_params"] > history[1]["kept_params"]
    for h in history:  # the whole-model count (embeddings, LM head) is the schedule's budget within one block
        assert h["dense_params"] == n_params(source)
        assert h["scheduled_density"] == pytest.approx(cubic_density(TARGET, h["checkpoint"], 2))
        assert h["target_params"] == int(h["scheduled_density"] * h["dense_params"])
        assert h["kept_params"] <= h["target_params"] < h["kept_params"] + h["next_block_params"]
    pruned = load_model(str(full / "pruned_model"))
    assert pruned.config.hidden_size == len(plan["hidden"])
    assert pruned.get_output_embeddings().weight.shape == (source.config.vocab_size, len(plan["hidden"]))
    tied = pruned.get_output_embeddings().weight.data_ptr() == pruned.get_input_embeddings().weight.data_ptr()
    assert tied == (layout == "llama-gqa")
    assert n_params(pruned) == history[-1]["kept_params"]
    assert abs(n_params(pruned) / n_params(source) - TARGET) <= history[-1]["next_block_params"] / n_params(source)
    train = json.loads((full / "train" / "train.json").read_text())
    assert train["plan_hash"] == plan["hash"] != train["start_plan_hash"]

    # killed after step 4: resumed from the checkpoint after step 3, whose model is the first prune's (hidden cut)
    cmd = [sys.executable, "-m", "lightpeft_dist", "train", "--config", str(recipe), "--run-dir", str(killed)]
    proc = launch(cmd, env={"LIGHTPEFT_FAULT_AFTER": "0:4"}, expect_ok=False)
    assert proc.returncode != 0 and not (killed / "train").exists(), proc.stderr[-3000:]
    state = json.loads((killed / "train.ckpt" / "state.json").read_text())
    assert state["step"] == 3 and state["structure"]["plan"]["apt"]["checkpoint"] == 1
    assert len(state["structure"]["plan"]["hidden"]) == history[0]["hidden_size"] < d
    saved = load_file(killed / "train.ckpt" / "state.safetensors")  # the running hidden salience, at the new width
    assert saved["extra/apt.hidden.0"].shape == (history[0]["hidden_size"],) and "extra/apt.ramp" in saved
    run_stages(killed, "train", config=recipe)
    resumed = json.loads((killed / "train" / "train.json").read_text())
    assert resumed["resumed_from_step"] == 4
    assert read_plan(killed / "plan.json", ref)["hash"] == plan["hash"]
    assert_resumed_like_uninterrupted(full, killed, resumed, train, f"gradual hidden ({layout})")
