"""The one training loop, its engines (plain, DeepSpeed), checkpoints and distillation."""
