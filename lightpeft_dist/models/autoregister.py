"""Register the pruned model types with transformers' Auto classes without importing transformers ourselves.

`import lightpeft_dist` promises that `AutoModelForCausalLM.from_pretrained(pruned_dir)` works afterwards
(models/pruned_model.py). Registering needs transformers and torch, which `lightpeft --help` and the CLI's usage
errors should not pay for (~10 s; docs/benchmarks.md, "CLI start"). So the package registers now if transformers is
already imported, and otherwise right after transformers finishes importing, whoever imports it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType


def _register() -> None:
    module = sys.modules.get(f"{__package__}.pruned_model")
    if module is not None and not hasattr(module, "register"):
        return  # pruned_model itself is importing transformers: it registers at the end of its own body
    from .pruned_model import register

    register()


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """A one-shot finder: it lets the usual finders locate transformers, then runs `_register` after its module
    body (the same point at which `import lightpeft_dist` used to register, had transformers come first)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            load(module)
            _register()

        spec.loader.exec_module = exec_then_register  # this module's own loader instance
        return spec


def register_when_transformers_loads() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
