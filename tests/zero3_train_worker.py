"""Launched by torchrun in tests: ZeRO-3 training, then logits of fixed inputs from the live, partitioned model.

Usage: zero3_train_worker.py RECIPE RUN_DIR DS_CONFIG OUT.safetensors
"""

import sys
from pathlib import Path

import torch

from lightpeft_dist.config import load_recipe
from lightpeft_dist.io_utils import save_tensors
from lightpeft_dist.runtime import init_distributed, shutdown
from lightpeft_dist.train import run_train

FIXED_INPUTS = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])


def main() -> None:
    recipe_path, run_dir, ds_config, out = sys.argv[1:5]
    rt = init_distributed(require_group=True)

    @torch.no_grad()
    def record_logits(model: torch.nn.Module) -> None:
        model.eval()
        logits = model(input_ids=FIXED_INPUTS.to(rt.device)).logits.float().cpu()  # collective under ZeRO-3
        if rt.is_main:
            save_tensors(out, {"logits": logits})

    try:
        run_train(load_recipe(recipe_path), Path(run_dir), rt, deepspeed=ds_config, on_trained=record_logits)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
