"""Light-PEFT early pruning for LLaMA-family models: estimate -> plan -> prune -> train -> evaluate.

Importing the package registers the `lightpeft_<family>` model types, so pruned models with per-layer shapes load
through `transformers.AutoModelForCausalLM`.
"""

from .models.pruned_model import register as _register

_register()

__version__ = "0.1.0"
