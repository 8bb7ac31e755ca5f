"""PEFT adapter kinds (LoRA, bottleneck)."""
