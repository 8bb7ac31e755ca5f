"""APT gradual mode's mask ramp and ramped distillation (strategies/apt/ramp.py, strategies/apt/distill.py): at ramp
value 0 the masked model (adapter attached) computes the physically pruned model's logits, at value 1 exactly the
unmasked ones; the ramp windows sit before each checkpoint; the distillation loss at a step is (1 - w) task + w KL
computed by hand with the ramped w; switching the new features off keeps the old train-stage cache key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model

import lightpeft_dist  # noqa: F401  (registers pruned model types)
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.config import PeftConfig
from lightpeft_dist.keys import without_later_defaults
from lightpeft_dist.models.loading import load_config, load_model
from lightpeft_dist.pruning.importance import lora_modules
from lightpeft_dist.pruning.slicing import model_reference, prune_adapter, prune_checkpoint
from lightpeft_dist.strategies.apt.distill import RampedDistiller
from lightpeft_dist.strategies.apt.plan import make_apt_plan
from lightpeft_dist.strategies.apt.ramp import RampMasks, ramp_value, ramp_windows
from lightpeft_dist.strategies.apt.section import AptConfig
from lightpeft_dist.strategies.apt.tuning import TRAIN_KEYS
from tiny import LAYOUTS, randomize_lora, save_tiny, tiny_model

IDS = torch.tensor([[5, 9, 12, 7, 20, 4, 8, 11], [6, 3, 15, 9, 22, 2, 2, 2]])
MASK = (IDS != 2).long()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_ramp_windows_start_ramp_steps_before_each_checkpoint_and_after_the_previous():
    assert ramp_windows({24: 1, 49: 2, 74: 3, 99: 4}, 25) == {24: 0, 49: 25, 74: 50, 99: 75}
    assert ramp_windows({2: 1, 5: 2}, 2) == {2: 0, 5: 3}
    assert ramp_windows({1: 1, 3: 2}, 2) == {1: 0, 3: 2}  # not before step 0, nor at the previous checkpoint
    assert ramp_windows({0: 1}, 1) == {}  # nothing before the first step: chosen at the checkpoint
    assert [ramp_value(t, 3, 0.5) for t in (4, 5, 6)] == [0.5, 0.0, 0.0]
    assert ramp_value(101, 1, 0.01) == 0.0 and ramp_value(2, 1, 0.01) == 0.99


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ramp_at_zero_equals_the_physically_pruned_model_and_at_one_the_unmasked(layout, tmp_path):
    base_dir = save_tiny(tmp_path / "base", layout)
    base = load_model(str(base_dir)).eval()
    model = get_peft_model(base, lora_config(PeftConfig(r=2, alpha=4, dropout=0.0, targets=ALL)))
    randomize_lora(model)  # LoRA on o_proj and down_proj too: its branch must see the masked input
    model.save_pretrained(tmp_path / "adapter")
    ref = model_reference(load_config(str(base_dir)))
    g = torch.Generator().manual_seed(5)
    scores = {"group": [torch.rand(s["num_key_value_heads"], generator=g).double() for s in ref["layer_shapes"]],
              "ffn": [torch.rand(s["intermediate_size"], generator=g).double() for s in ref["layer_shapes"]]}
    record = {**ref, "biases": ["qkv"] if layout == "qwen2-bias" else [],
              "lora_modules": {n: m.r["default"] for n, m in lora_modules(model)}}
    plan = make_apt_plan(scores, record, 0.5)
    drop = [sorted(set(range(s["num_key_value_heads"])) - set(layer["kv_heads"]))
            for layer, s in zip(plan["layers"], ref["layer_shapes"])]
    drop_ffn = [sorted(set(range(s["intermediate_size"])) - set(layer["ffn"]))
                for layer, s in zip(plan["layers"], ref["layer_shapes"])]
    assert any(drop) and any(drop_ffn)
    with torch.no_grad():
        plain = model(IDS, attention_mask=MASK).logits
        masks = RampMasks(model, drop, drop_ffn)
        at_one = model(IDS, attention_mask=MASK).logits
        masks.value = 0.5
        half = model(IDS, attention_mask=MASK).logits
        masks.value = 0.0
        at_zero = model(IDS, attention_mask=MASK).logits
        masks.remove()
        assert torch.equal(model(IDS, attention_mask=MASK).logits, plain)
    assert torch.equal(at_one, plain)  # value 1 is the unmasked forward, bit for bit

    prune_checkpoint(str(base_dir), plan, tmp_path / "pruned")
    prune_adapter(tmp_path / "adapter", plan, base.config, tmp_path / "pruned", tmp_path / "pruned_adapter")
    pruned = PeftModel.from_pretrained(load_model(str(tmp_path / "pruned")), tmp_path / "pruned_adapter").eval()
    with torch.no_grad():
        physical = pruned(IDS, attention_mask=MASK).logits
    torch.testing.assert_close(at_zero, physical, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(physical, plain, atol=1e-2)  # pruning changed the model
    assert not torch.allclose(half, physical, atol=1e-2) and not torch.allclose(half, plain, atol=1e-2)


def test_distillation_loss_is_the_ramped_mix_of_task_and_kl_by_hand():
    student = get_peft_model(tiny_model("mistral-gqa", seed=1), lora_config(PeftConfig(r=2, alpha=4, dropout=0.0)))
    randomize_lora(student)
    teacher = tiny_model("mistral-gqa", seed=2)
    labels = IDS.masked_fill(MASK == 0, -100)
    hook = RampedDistiller(teacher, peak=0.5, window=4, temperature=2.0, pad_token_id=2)
    assert hook.weight == 0.0
    weights = []
    for step in range(6):
        weights.append(hook.weight)
        hook.after_optimizer_step(step, 0.0)
    assert weights == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]  # 0.5 x min(1, t / 4), then held

    resumed = RampedDistiller(teacher, peak=0.5, window=4, temperature=2.0, pad_token_id=2)
    saved = RampedDistiller(teacher, peak=0.5, window=4, temperature=2.0, pad_token_id=2)
    saved.after_optimizer_step(1, 0.0)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.weight == 0.25  # what step 2 uses, after a resume from the checkpoint after step 1

    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": labels}
    out = student(**batch)
    loss = resumed.loss(batch, out, out.loss)
    # by hand: token-mean next-token CE, and T^2 sum_v p_t (log p_t - log p_s) averaged over the attended positions
    logits = out.logits.detach().double()
    task = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    with torch.no_grad():
        t_logits = teacher(input_ids=IDS, attention_mask=MASK).logits.double()
    p_t = torch.softmax(t_logits / 2.0, -1)
    p_s = torch.softmax(logits / 2.0, -1)
    per_pos = (p_t * (p_t.log() - p_s.log())).sum(-1)
    kl = 4.0 * per_pos[MASK.bool()].mean()
    expected = 0.75 * task + 0.25 * kl
    assert abs(float(loss) - float(expected)) < 1e-5, (float(loss), float(expected))
    assert float(kl) > 1e-3  # the KL term is not vacuous


def test_switching_ramp_and_distillation_off_keeps_the_old_train_key_fields():
    old = ("mode", "rank_growth", "max_rank", "window", "checkpoints", "beta", "target_density", "use_kurtosis")
    for apt in (AptConfig(mode="gradual", window=400, mask_ramp=False),
                AptConfig(mode="gradual", window=400, mask_ramp_step=0.0), AptConfig()):
        values = apt.model_dump(mode="json")
        assert not apt.mask_ramp
        assert without_later_defaults("apt", {k: values[k] for k in TRAIN_KEYS}) == {k: values[k] for k in old}
    on = AptConfig(mode="gradual", window=400, distill_weight=0.3).model_dump(mode="json")
    keyed = without_later_defaults("apt", {k: on[k] for k in TRAIN_KEYS})
    assert keyed["mask_ramp"] and {"ramp", "mask_ramp_step", "distill_weight", "distill_temperature"} <= keyed.keys()
    with pytest.raises(ValueError, match="apt.distill_weight is for gradual mode"):
        AptConfig(distill_weight=0.2)
