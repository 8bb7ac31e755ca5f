"""Specification: the package is layered, and strategies and stages plug in through registries.

- Imports only go down the layers of docs/architecture.md (no sub-package imports one above it), and the
  sub-packages import each other without cycles.
- A new strategy is one module plus one registry line: a strategy defined here (Light-PEFT's stages under another
  name, with a recipe section of its own) is run end to end by `lightpeft run`, gets the same plan as Light-PEFT,
  and its section is refused under another strategy.
- Every stage a run goes through comes from the stage registry, and the CLI offers one subcommand per stage.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

import lightpeft_dist
from lightpeft_dist.cli import _parser, main
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pipeline import stage_index, stages as pipeline
from lightpeft_dist.reporting import methods
from lightpeft_dist.rundir import RunDir
from lightpeft_dist.strategies import registry
from lightpeft_dist.strategies.base import Strategy

PKG = Path(lightpeft_dist.__file__).parent
# Lowest first; a module may import from its own layer or any layer below it (docs/architecture.md).
LAYERS = [
    {"errors", "io_utils", "runtime", "config", "keys", "assets", "rundir", "ownership"},
    {"models"}, {"data"}, {"training"}, {"pruning"}, {"adapters"}, {"strategies"}, {"reporting"}, {"pipeline"},
    {"cli", "__main__", "__init__"},
]


def _unit(module: str) -> str:
    """The layer unit of a dotted module path inside the package (`lightpeft_dist.models.loading` -> `models`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def package_imports() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import of a package module, lazy ones included."""
    out = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        module = ".".join(("lightpeft_dist", *rel.parts))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        if path.name == "__init__.py":
            module = package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(module, n, node.lineno) for n in names if n.startswith("lightpeft_dist")]
    return out


def test_every_package_module_belongs_to_a_layer():
    units = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    units |= {p.stem for p in PKG.glob("*.py")}
    assert units == set().union(*LAYERS)


def test_imports_only_go_down_the_layers():
    upward = [f"{src}:{line} imports {dst}" for src, dst, line in package_imports()
              if _layer(_unit(dst)) > _layer(_unit(src))]
    assert not upward


def test_sub_packages_import_each_other_without_cycles():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in package_imports():
        if _unit(src) != _unit(dst):
            graph.setdefault(_unit(src), set()).add(_unit(dst))

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    assert not [u for u in graph if reaches(u, u, set())]


class _ProbeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = "a section of its own"


@pytest.fixture
def probe_strategy():
    """A strategy as a user would add one: a descriptor (here Light-PEFT's stages and scores under another name)
    plus one registry line."""
    lp = registry.STRATEGIES["lightpeft"]
    strategy = registry.register(Strategy(name="probe", label="probe strategy", color="#000000", section="probe",
                                          section_model=_ProbeSection, stages=lp.stages, scores=lp.scores))
    yield strategy
    del registry.STRATEGIES["probe"]


def test_a_registered_strategy_runs_end_to_end_and_plans_like_the_one_it_reuses(tmp_path, tiny_recipe,
                                                                               probe_strategy):
    runs = {}
    for name in ("lightpeft", "probe"):
        raw = dict(tiny_recipe, strategy=name, **({"probe": {"note": "x"}} if name == "probe" else {}))
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        runs[name] = tmp_path / name
        assert main(["run", "--config", str(tmp_path / f"{name}.yaml"), "--run-dir", str(runs[name]),
                     "--train.steps=2"]) == 0
    plans = {n: json.loads(RunDir(d).plan.read_text()) for n, d in runs.items()}
    assert plans["probe"]["hash"] == plans["lightpeft"]["hash"]
    saved = yaml.safe_load(RunDir(runs["probe"]).recipe.read_text())
    assert saved["strategy"] == "probe" and saved["probe"] == {"note": "x"}
    assert methods.label("probe") == "probe strategy" and methods.color("probe") == "#000000"


def test_strategy_sections_are_checked(tiny_recipe, probe_strategy):
    assert recipe_from_dict(dict(tiny_recipe, strategy="probe")).section("probe").note == "a section of its own"
    with pytest.raises(LightPeftError, match="section 'probe:' belongs to strategy probe; set strategy: probe"):
        recipe_from_dict(dict(tiny_recipe, probe={"note": "x"}))
    with pytest.raises(LightPeftError, match="probe.nope: unknown key"):
        recipe_from_dict(dict(tiny_recipe, strategy="probe", probe={"nope": 1}))
    with pytest.raises(LightPeftError, match="unknown strategy 'apt0'; choose from"):
        recipe_from_dict(dict(tiny_recipe, strategy="apt0"))
    with pytest.raises(LightPeftError, match="aptt: unknown key"):
        recipe_from_dict(dict(tiny_recipe, aptt={}))


def test_default_strategy_keeps_existing_recipes_and_keys(tiny_recipe):
    recipe = recipe_from_dict(tiny_recipe)
    assert recipe.strategy == "lightpeft"
    assert [s.name for s in pipeline.stages_for(recipe)] == [
        "estimate", "plan", "prune", "train", "evaluate", "export", "report"]
    assert [s.name for s in pipeline.stages_for(recipe) if s.collective] == ["estimate", "train"]


def test_cli_offers_one_subcommand_per_registered_stage(monkeypatch):
    sub = next(a for a in _parser()._actions if a.dest == "stage")
    assert set(sub.choices) == {"run", "demo", *pipeline.all_stages()}
    for name, stage in pipeline.all_stages().items():
        has_ds = any(a.dest == "deepspeed" for a in sub.choices[name]._actions)
        assert has_ds == stage.collective, name
    # A fresh CLI process builds its subcommands from the shipped listing, without importing any stage: it must say
    # what the registry says, name for name, help for help, in order.
    assert list(stage_index.SHIPPED_STAGES) == stage_index.live_headers()
    monkeypatch.delitem(sys.modules, "lightpeft_dist.strategies.registry")
    assert stage_index.stage_headers() == list(stage_index.SHIPPED_STAGES)


def test_stage_keys_all_take_recipe_then_run_dir(tiny_recipe, tmp_path):
    """One order for every key function; on an empty run directory nothing is up to date."""
    recipe = recipe_from_dict(tiny_recipe)
    for stage in pipeline.stages_for(recipe):
        assert not stage.done(recipe, tmp_path)
    with pytest.raises(LightPeftError, match="not a stage of strategy lightpeft"):
        pipeline.stage_named("calibrate", recipe)
