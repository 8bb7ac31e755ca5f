"""Launched by torchrun in tests: ZeRO-3 training, then logits of fixed inputs from the live, partitioned model.

Usage: zero3_train_worker.py RECIPE RUN_DIR DS_CONFIG OUT.safetensors

Next to OUT it writes OUT.json: how ZeRO-3 holds the base's 4-bit (QLoRA) weights on rank 0, if there are any.
A 4-bit run forces bitsandbytes' AVX512-BF16 CPU repack on, whatever the CPU (bnb_cpu.py), as tests/test_qlora.py does.
"""

import json
import sys
from pathlib import Path

import torch

from lightpeft_dist.config import load_recipe
from lightpeft_dist.io_utils import save_tensors
from lightpeft_dist.runtime import init_distributed, shutdown
from lightpeft_dist.pipeline.train import run_train

FIXED_INPUTS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])


def quantized_layout(model: torch.nn.Module) -> dict:
    weights = [m.weight for m in model.modules()
               if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
    return {"linear4bit": len(weights),
            "quant_type": sorted({getattr(getattr(w, "quant_state", None), "quant_type", "?") for w in weights}),
            "full_numel": [int(getattr(w, "ds_numel", w.numel())) for w in weights],
            "local_numel": [int(w.ds_tensor.numel()) if hasattr(w, "ds_tensor") else int(w.numel()) for w in weights]}


def main() -> None:
    recipe_path, run_dir, ds_config, out = sys.argv[1:5]
    rt = init_distributed(require_group=True)

    @torch.no_grad()
    def record_logits(model: torch.nn.Module) -> None:
        model.eval()
        logits = model(input_ids=FIXED_INPUTS.to(rt.device)).logits.float().cpu()  # collective under ZeRO-3
        if rt.is_main:
            save_tensors(out, {"logits": logits})
            Path(out + ".json").write_text(json.dumps(quantized_layout(model)))

    recipe = load_recipe(recipe_path)
    if recipe.train.load_in_4bit:
        from bnb_cpu import force_cpu_repack

        force_cpu_repack()
    try:
        run_train(recipe, Path(run_dir), rt, deepspeed=ds_config, on_trained=record_logits)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
