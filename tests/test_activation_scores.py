"""Specification of the activation unit scores (`prune.unit_scores: activation`): a head or FFN neuron scores its
mean activation size on real tokens times the norm of the output weights it writes through; the weight norms are
read by probing, which must agree with the weights themselves; an estimate without these scores fails clearly."""

from __future__ import annotations

import torch
from peft import get_peft_model

from lightpeft_dist.pruning.activation import ActivationTracker, base_layer, input_column_norms, output_weight_norms
from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig
from lightpeft_dist.models.families import head_dim_of
from lightpeft_dist.adapters.lora import lora_config
from lightpeft_dist.runtime import Runtime
from tiny import randomize_lora, tiny_model


def test_probe_reads_the_weight_column_norms_of_plain_and_lora_wrapped_layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 5, bias=True)
    torch.nn.init.normal_(linear.bias, std=3.0)  # a bias must not leak into the column norms
    torch.testing.assert_close(input_column_norms(linear, 12), linear.weight.norm(dim=0))
    per_group = linear.weight.reshape(5, 4, 3).norm(dim=(0, 2))  # 4 heads of 3 columns each
    torch.testing.assert_close(input_column_norms(linear, 12, head_dim=3), per_group)

    model = get_peft_model(tiny_model("llama-gqa"), lora_config(PeftConfig(r=2, alpha=4, targets=["o_proj"])))
    randomize_lora(model)
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    plain = base_layer(o_proj)
    assert plain is not o_proj and isinstance(plain, torch.nn.Linear)
    torch.testing.assert_close(input_column_norms(plain, 48), plain.weight.norm(dim=0))


def test_a_bottleneck_adapter_on_the_projection_does_not_leak_into_its_weight_norms():
    from lightpeft_dist.adapters.bottleneck import attach

    model = tiny_model("llama-gqa")
    mlp = model.model.layers[0].mlp
    adapter = attach(model, {"model.layers.0.mlp.down_proj": 4})["model.layers.0.mlp.down_proj"]
    torch.nn.init.normal_(adapter.up.weight, std=1.0)  # a live adapter (its init is near zero)
    assert not torch.allclose(mlp.down_proj(torch.eye(40)), torch.eye(40) @ mlp.down_proj.weight.T)
    torch.testing.assert_close(output_weight_norms(mlp, "down_proj", 40), mlp.down_proj.weight.norm(dim=0))
    assert adapter.scaling == 1.0  # restored


def test_scores_are_mean_activation_on_real_tokens_times_output_weight_norm():
    model = tiny_model("qwen2-bias", layers=2)
    hd = head_dim_of(model.config)
    tracker = ActivationTracker(model, Runtime())
    inputs = {}  # the first call only: results() probes the same projections afterwards

    def capture(key):
        def hook(module, args):
            inputs.setdefault(key, args[0])
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.o_proj.register_forward_pre_hook(capture(("o", i)))
        layer.mlp.down_proj.register_forward_pre_hook(capture(("d", i)))
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # pad tokens must not count
    tracker.recording, tracker.token_mask = True, mask
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    tracker.recording = False
    with torch.no_grad():  # a forward while not recording (a recompute, an eval) must not count either
        model(input_ids=ids, attention_mask=mask)
    tracker.end_step()
    heads, ffns = tracker.results()
    w = mask.double()[..., None]
    for i, layer in enumerate(model.model.layers):
        x, a = inputs[("o", i)].double(), inputs[("d", i)].double()
        head_act = (x.unflatten(-1, (-1, hd)).norm(dim=-1) * w).sum((0, 1)) / w.sum()
        o = layer.self_attn.o_proj.weight.double()
        expected_heads = head_act * o.reshape(o.shape[0], -1, hd).norm(dim=(0, 2))
        expected_ffn = (a.abs() * w).sum((0, 1)) / w.sum() * layer.mlp.down_proj.weight.double().norm(dim=0)
        torch.testing.assert_close(heads[i].double(), expected_heads, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ffns[i].double(), expected_ffn, rtol=1e-5, atol=1e-8)


def test_checkpointed_totals_resume_into_the_same_scores():
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 60, (2, 6))

    def run(tracker, steps):
        for _ in range(steps):
            tracker.recording = True
            with torch.no_grad():
                model(input_ids=ids)
            tracker.recording = False
            tracker.end_step()

    whole = ActivationTracker(model, Runtime())
    run(whole, 3)
    expected = whole.results()
    whole.remove()
    first = ActivationTracker(model, Runtime())
    run(first, 2)
    state = first.state_dict()
    first.remove()
    resumed = ActivationTracker(model, Runtime())
    resumed.load_state_dict(state)
    run(resumed, 1)
    (heads, ffns), (heads2, ffns2) = expected, resumed.results()
    for a, b in zip(heads + ffns, heads2 + ffns2, strict=True):
        torch.testing.assert_close(a, b)


def test_planning_on_activation_scores_of_an_older_estimate_is_a_one_line_error(tmp_path, tiny_recipe, capsys):
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    (run / "estimate" / "activation_scores.safetensors").unlink()  # as an estimate from before this option
    capsys.readouterr()
    assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=activation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "activation_scores.safetensors not found" in err[-1]
    assert "rerun `lightpeft estimate`" in err[-1]
    assert not (run / "plan.json").exists()
    assert main(["plan", "--run-dir", str(run)]) == 0  # the mask scores still plan
