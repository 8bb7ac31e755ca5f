"""Light-PEFT early pruning for LLaMA-family models: estimate -> plan -> prune -> train -> evaluate.

Importing the package registers the `lightpeft_<family>` model types, so pruned models with per-layer shapes load
through `transformers.AutoModelForCausalLM`. It does so when transformers is imported (at once if it already is),
so that `lightpeft --help` imports neither transformers nor torch (models/autoregister.py).
"""

from .models.autoregister import register_when_transformers_loads as _register

_register()

__version__ = "0.1.0"
