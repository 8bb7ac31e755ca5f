"""Specification of `lightpeft export`: the merged checkpoint computes what the pruned model plus its trained adapter
computes, loads in a fresh process, and a uniform plan exports a model plain transformers loads on its own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightpeft_dist.cli import main

INPUT = [[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]]

# Runs in a fresh interpreter. With import_lightpeft False it must not touch lightpeft_dist at all.
FRESH_LOGITS = """
import sys, torch
if sys.argv[3] == "1":
    import lightpeft_dist
from transformers import AutoModelForCausalLM
from safetensors.torch import save_file
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    save_file({"logits": m(torch.tensor(%r)).logits.float()}, sys.argv[2])
print(type(m).__name__, "lightpeft_dist" in sys.modules)
""" % (INPUT,)


def _adapter_logits(run) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "pruned_model")
    model = PeftModel.from_pretrained(base, run / "train" / "adapter").eval()
    with torch.no_grad():
        return model(torch.tensor(INPUT)).logits


def _fresh_logits(path, out, import_lightpeft: bool) -> tuple[torch.Tensor, str]:
    proc = subprocess.run([sys.executable, "-c", FRESH_LOGITS, str(path), str(out), str(int(import_lightpeft))],
                          capture_output=True, text=True, check=True)
    return load_file(out)["logits"], proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("uniform", [False, True])
def test_export_equals_pruned_model_with_adapter_in_a_fresh_process(tmp_path, tiny_recipe, uniform):
    tiny_recipe["prune"]["uniform"] = uniform
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--run-dir", str(run)]) == 0
    record = json.loads((run / "export" / "lightpeft_export.json").read_text())
    assert record["plan_hash"] == json.loads((run / "plan.json").read_text())["hash"]
    assert (run / "export" / "tokenizer_config.json").is_file()
    exported = load_file(run / "export" / "model.safetensors")
    assert not any("lora" in k for k in exported)  # merged: no adapter tensors left
    expected = _adapter_logits(run)
    # uniform plans must load with plain transformers, never importing lightpeft_dist
    logits, info = _fresh_logits(run / "export", tmp_path / "logits.safetensors", import_lightpeft=not uniform)
    assert info == ("LlamaForCausalLM False" if uniform else "PrunedLlamaForCausalLM True")
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        base_only = AutoModelForCausalLM.from_pretrained(run / "pruned_model").eval()(torch.tensor(INPUT)).logits
    assert (logits - base_only).abs().max() > 1e-3  # the trained adapter is really merged in


def test_export_without_training_is_one_line_error(tmp_path, tiny_recipe, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(tiny_recipe))
    run = tmp_path / "run"
    for stage in ("estimate", "plan", "prune"):
        assert main([stage, "--run-dir", str(run)] + (["--config", str(cfg)] if stage == "estimate" else [])) == 0
    capsys.readouterr()
    assert main(["export", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no trained adapter") and not (run / "export").exists()
