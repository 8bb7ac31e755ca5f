"""Specification of adapter kinds (lightpeft_dist/adapters/registry.py, docs/adapters.md): LoRA and bottleneck
adapters on one model go through estimate -> plan -> prune with masked == pruned logits; the two kinds on one o_proj
keep distinct keys and fates; old bottleneck scores and plans are upgraded on read; `bottleneck` is `adapter`;
single-form recipes keep their keys; and a third kind is one module plus one registry line (`SHIFT`, defined here,
goes through the whole pipeline next to LoRA)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lightpeft_dist  # noqa: F401  (registers pruned model types)
from lightpeft_dist.adapters import registry
from lightpeft_dist.adapters.bottleneck import adapter_modules, target_paths
from lightpeft_dist.adapters.registry import (attach_adapters, bare_kind, load_adapters, save_adapters,
                                              slice_adapters, upgrade_keys)
from lightpeft_dist.cli import main
from lightpeft_dist.config import PeftConfig, PruneConfig, recipe_from_dict, recipe_to_dict
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import read_json, sha256_json, write_json
from lightpeft_dist.models.families import head_dim_of, layer_shapes, unwrap
from lightpeft_dist.models.loading import fingerprint
from lightpeft_dist.pipeline.stages import plan_key, stages_for
from lightpeft_dist.rundir import MANIFEST
from lightpeft_dist.pruning.importance import ImportanceTracker, TrackerSet, _Module, lora_modules
from lightpeft_dist.pruning.masks import attach_masks, set_masks_from_plan
from lightpeft_dist.pruning.plan import make_plan
from lightpeft_dist.pruning.scores import Scores, load_scores, save_scores
from lightpeft_dist.pruning.slicing import prune_checkpoint
from lightpeft_dist.runtime import Runtime
from conftest import tiny_recipe_dict
from tiny import save_tiny

INPUT = torch.tensor([[3, 5, 7, 9, 11, 13, 4, 6], [8, 10, 12, 14, 16, 18, 20, 22]])
MIXED = [{"type": "lora", "targets": ["q_proj", "v_proj", "o_proj"], "r": 4, "alpha": 8, "dropout": 0.0},
         {"type": "bottleneck", "targets": ["o_proj", "down_proj"], "r": 4, "dropout": 0.0}]
O0, O1 = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"


def entries(folder: Path) -> list[str]:
    """What a folder holds, less our own manifest (MANIFEST: the entries we wrote, docs/architecture.md)."""
    return sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)


def stage_names(recipe) -> list[str]:
    return [s.name for s in stages_for(recipe)]


def write_recipe(tmp_path, raw: dict):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "recipe.yaml")


def randomize_files(adapter_dir, seed: int = 5) -> None:
    """Replace every saved weight with N(0, 0.3): a 6-step estimate leaves adapters too small for the checks to bite."""
    g = torch.Generator().manual_seed(seed)
    for f in sorted(adapter_dir.rglob("adapter_model.safetensors")):
        save_file({k: torch.randn(v.shape, generator=g) * 0.3 for k, v in load_file(f).items()}, str(f),
                  metadata={"format": "pt"})


@torch.no_grad()
def zero_dropped(model, kept: dict[str, list[int]]) -> None:
    """The masked twin of adapter pruning, per kind: a dropped LoRA rank has A row 0; a dropped bottleneck unit has
    down row and bias 0 (ReLU(0) = 0); a dropped bottleneck module has up 0."""
    for name, m in lora_modules(model):
        keep = torch.zeros(m.r["default"], dtype=torch.bool)
        keep[kept.get(name, [])] = True
        m.lora_A["default"].weight[~keep] = 0.0
    for name, m in adapter_modules(model):
        units = kept.get(f"bottleneck:{name}")
        if units is None:
            m.up.weight.zero_()
            m.up.bias.zero_()
            continue
        keep = torch.zeros(m.size, dtype=torch.bool)
        keep[units] = True
        m.down.weight[~keep] = 0.0
        m.down.bias[~keep] = 0.0


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT).logits


def test_mixed_lora_and_bottleneck_estimate_plan_prune_masked_equals_pruned(tmp_path, tiny_recipe, capsys):
    raw = {**tiny_recipe, "peft": MIXED,
           # 7 of 10 modules kept (so both kinds survive), half of each module's units
           "prune": {**tiny_recipe["prune"], "module_ratio": 0.3, "rank_scope": "layerwise"}}
    cfg, run = write_recipe(tmp_path, raw), tmp_path / "run"
    assert main(["estimate", "--config", cfg, "--run-dir", str(run)]) == 0
    est = run / "estimate" / "adapter"
    assert entries(est) == ["bottleneck", "lora"]  # several kinds: one subdir each
    assert read_json(est / "lora" / "adapter_config.json")["peft_type"] == "LORA"  # a standard PEFT directory
    scores = load_scores(run / "estimate" / "scores.safetensors")
    lora_keys = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")}
    bn_keys = {f"bottleneck:model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(scores.module) == lora_keys | bn_keys
    assert all(v > 0 for v in scores.module.values())  # both kinds' trackers ran
    assert all(scores.rank[k].shape == (4,) and scores.rank[k].abs().max() > 0 for k in scores.rank)

    randomize_files(est)
    assert main(["plan", "--run-dir", str(run)]) == 0 and main(["prune", "--run-dir", str(run)]) == 0
    plan = read_json(run / "plan.json")
    kept = plan["peft_modules"]
    assert len(kept) == 7 and set(kept) & lora_keys and set(kept) & bn_keys
    assert entries(run / "pruned_adapter") == ["bottleneck", "lora"]

    model_dir = tiny_recipe["model"]["path"]
    full = load_adapters(AutoModelForCausalLM.from_pretrained(model_dir), est)
    before = logits(full)
    attach_masks(full)
    set_masks_from_plan(full, plan)
    zero_dropped(full, kept)
    masked = logits(full)
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned_model")
    pruned_base = logits(pruned)
    adapted = logits(load_adapters(pruned, run / "pruned_adapter"))
    assert (adapted - masked).abs().max() < 1e-4, (adapted - masked).abs().max()
    from peft import PeftModel

    lora_only = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "pruned_model"),
                                                 run / "pruned_adapter" / "lora"))
    # pruning changed something, and each kind is really in the pruned logits
    assert (masked - before).abs().max() > 1e-3
    assert (lora_only - pruned_base).abs().max() > 1e-3 and (adapted - lora_only).abs().max() > 1e-3

    # the rest of the pipeline: both kinds train, evaluate runs, export is left out and refused
    assert main(["run", "--config", cfg, "--run-dir", str(run)]) == 0
    train = read_json(run / "train" / "train.json")
    pruned_w, trained = ({k: load_file(run / d / k / "adapter_model.safetensors") for k in ("lora", "bottleneck")}
                         for d in ("pruned_adapter", "train/adapter"))
    n = sum(t.numel() for w in pruned_w.values() for t in w.values())
    assert train["params"]["trainable"] == train["params"]["adapter"] == n  # no kind froze the other
    for k in pruned_w:
        assert trained[k].keys() == pruned_w[k].keys()
        assert any(not torch.equal(trained[k][t], pruned_w[k][t]) for t in trained[k]), k
    assert read_json(run / "eval.json")["pruned"]["params"]["adapter"] == n
    assert "export" not in stage_names(recipe_from_dict(raw)) and not (run / "export").exists()
    capsys.readouterr()
    assert main(["export", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: a bottleneck adapter") and "cannot be merged" in err


def test_lora_and_bottleneck_on_one_o_proj_keep_distinct_keys_and_fates(tmp_path):
    base_dir = save_tiny(tmp_path / "base", "llama-mha")
    specs = [PeftConfig(type="lora", targets=["o_proj"], r=2, dropout=0.0),
             PeftConfig(type="bottleneck", targets=["o_proj"], r=3, dropout=0.0)]
    model = attach_adapters(AutoModelForCausalLM.from_pretrained(base_dir), specs)
    kinds = registry.kinds_of(specs)
    trackers = TrackerSet({k.name: k.tracker(model, 1, Runtime()) for k in kinds})
    trackers.recording = True
    model(input_ids=INPUT, labels=INPUT).loss.backward()
    trackers.recording = False
    trackers.end_step(0)
    module, rank = trackers.results()
    assert set(module) == {O0, O1, f"bottleneck:{O0}", f"bottleneck:{O1}"}
    assert module[O0] != module[f"bottleneck:{O0}"]
    assert rank[O0].shape == (2,) and rank[f"bottleneck:{O0}"].shape == (3,)
    again = TrackerSet({k.name: k.tracker(model, 1, Runtime()) for k in kinds})
    again.load_state_dict(trackers.state_dict())  # checkpoint state: one prefix per kind
    assert again.results()[0] == module

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_adapters(tmp_path / "adapter", model, trainable, kinds)
    shapes, cfg = layer_shapes(model), model.config
    for favoured in ("lora", "bottleneck"):  # each kind kept on one layer's o_proj and dropped on the other's
        hi = {O0: 1.0, f"bottleneck:{O0}": 0.0, O1: 0.0, f"bottleneck:{O1}": 1.0}
        if favoured == "bottleneck":
            hi = {k: 1.0 - v for k, v in hi.items()}
        sc = Scores([torch.ones(4)] * 2, [torch.ones(40)] * 2, hi, {k: torch.ones(2 if ":" not in k else 3)
                                                                        for k in hi})
        plan = make_plan(sc, shapes, PruneConfig(attn_ratio=0.0, ffn_ratio=0.0, module_ratio=0.5, rank_ratio=0.0),
                         fingerprint(cfg), cfg.hidden_size, head_dim_of(cfg))
        kept = {k for k, v in hi.items() if v == 1.0}
        assert set(plan["peft_modules"]) == kept
        out = tmp_path / f"pruned_{favoured}"
        prune_checkpoint(str(base_dir), plan, out / "model")
        slice_adapters(tmp_path / "adapter", plan, "lora", cfg, out / "model", out / "adapter")
        lora_kept = read_json(out / "adapter" / "lora" / "adapter_config.json")["target_modules"]
        bn_kept = read_json(out / "adapter" / "bottleneck" / "adapter_config.json")["targets"]
        assert lora_kept == [k for k in kept if ":" not in k]
        assert bn_kept == {k.removeprefix("bottleneck:"): 3 for k in kept if ":" in k}


def _strip_qualifiers(path) -> None:
    """Rewrite a scores file as a `peft.type: adapter` run wrote it before kinds existed: bare keys."""
    scores = load_scores(path)
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "modules"}
    bare = {k: k.removeprefix("bottleneck:") for k in scores.module}
    save_scores(path, Scores(scores.head, scores.ffn, {bare[k]: v for k, v in scores.module.items()},
                             {bare[k]: v for k, v in scores.rank.items()}), meta)


def test_old_bottleneck_scores_and_plan_are_upgraded_on_read(tmp_path, tiny_recipe):
    raw = {**tiny_recipe, "peft": {"type": "adapter", "r": 4}}
    cfg, new = write_recipe(tmp_path, raw), tmp_path / "new"
    assert main(["estimate", "--config", cfg, "--run-dir", str(new)]) == 0
    old = tmp_path / "old"
    shutil.copytree(new, old)
    for name in ("scores.safetensors", "activation_scores.safetensors"):
        _strip_qualifiers(old / "estimate" / name)
    old_scores = load_scores(old / "estimate" / "scores.safetensors")
    assert not any(":" in k for k in old_scores.module)
    # the plan the old code made from them: make_plan never looked at the keys
    recipe, est = recipe_from_dict(raw), read_json(old / "estimate" / "estimate.json")
    old_plan = make_plan(old_scores, est["layer_shapes"], recipe.prune, est["model_fingerprint"], est["hidden_size"],
                         est["head_dim"])
    write_json(old / "plan.json", {**old_plan, "key": plan_key(recipe, old)})
    assert main(["prune", "--run-dir", str(old)]) == 0  # an old plan: bare keys read as bottleneck keys
    for stage in ("plan", "prune"):
        assert main([stage, "--run-dir", str(new)]) == 0
    new_plan = read_json(new / "plan.json")
    assert new_plan["peft_modules"] == upgrade_keys(old_plan["peft_modules"], "bottleneck")
    assert all(k.startswith("bottleneck:") for k in new_plan["peft_modules"])
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        a, b = old / "pruned_adapter" / f, new / "pruned_adapter" / f
        assert (read_json(a) == read_json(b)) if f.endswith(".json") else load_file(a).keys() == load_file(b).keys()
    assert all(torch.equal(v, load_file(new / "pruned_adapter" / "adapter_model.safetensors")[k])
               for k, v in load_file(old / "pruned_adapter" / "adapter_model.safetensors").items())
    # re-planning the old run reads its old scores upgraded: the new run's plan, hash included
    assert main(["plan", "--run-dir", str(old)]) == 0
    replanned = read_json(old / "plan.json")
    assert replanned["peft_modules"] == new_plan["peft_modules"] and replanned["hash"] == new_plan["hash"]
    # which kind a bare key means comes from the estimate record; a LoRA run's keys are never touched
    assert bare_kind(est) == "bottleneck" and bare_kind({"recipe": {"peft": {"type": "lora"}}}) == "lora"
    assert bare_kind({"recipe": {"peft": MIXED}}) == "lora" and bare_kind(None) == "lora"
    assert upgrade_keys({O0: 1, "bottleneck:x": 2}, "lora") == {O0: 1, "bottleneck:x": 2}


BASE = {"model": {"path": "m"}, "data": {"format": "text", "train_file": "t"}}


def test_bottleneck_is_the_adapter_word():
    as_adapter, as_bottleneck = (recipe_from_dict({**BASE, "peft": {"type": t, "r": 4}})
                                 for t in ("adapter", "bottleneck"))
    assert recipe_to_dict(as_adapter) == recipe_to_dict(as_bottleneck)
    assert recipe_to_dict(as_bottleneck)["peft"]["type"] == "adapter"  # the word earlier runs' keys hash
    assert as_adapter.peft == as_bottleneck.peft == PeftConfig(type="bottleneck", r=4)
    assert as_bottleneck.peft.type == "bottleneck" and as_bottleneck.peft.targets == ["o_proj", "down_proj"]
    # a list of one is the single form; a list stores registry names, in attach order
    assert recipe_to_dict(recipe_from_dict({**BASE, "peft": [{"type": "bottleneck", "r": 4}]})) == \
        recipe_to_dict(as_adapter)
    listed = recipe_to_dict(recipe_from_dict({**BASE, "peft": [{"type": "adapter"}, {"type": "lora"}]}))["peft"]
    assert [s["type"] for s in listed] == ["lora", "bottleneck"]
    with pytest.raises(LightPeftError, match=r"peft\.type: unknown adapter kind 'bottle'.*\(alias adapter\)"):
        recipe_from_dict({**BASE, "peft": {"type": "bottle"}})
    with pytest.raises(LightPeftError, match="kind bottleneck appears twice"):
        recipe_from_dict({**BASE, "peft": [{"type": "adapter"}, {"type": "bottleneck"}]})
    assert "export" in stage_names(recipe_from_dict(BASE))
    assert "export" not in stage_names(as_bottleneck)


def test_single_form_recipes_keep_their_keys(tmp_path):
    """Values computed with the code before adapter kinds existed (commit 601ee58): estimate keys hash
    recipe_to_dict, so a change here would silently invalidate every finished estimate. The second value hashes every
    section as stage keys see it (`keyed_section`: features added since, and off, are left out)."""
    from lightpeft_dist.keys import keyed_section
    from lightpeft_dist.strategies.lightpeft import estimate_key

    raw = tiny_recipe_dict(tmp_path)
    raw["model"]["path"] = "/fixed/model"
    raw["data"].update(train_file="/fixed/train.jsonl", eval_file="/fixed/eval.jsonl")
    expected = {"lora": ("9b89b66f0ae51ed8", "d5fb6c884f50c00e6cc1b686d80bba56c9b030334cc6b0c272bfce2ecd7121c3"),
                "adapter": ("00ddde3d54f2dfc6", "91f4c90c8ee8a808f70dc4ecc483d0e7d561294b63c55ddf65f5ca46fd247397"),
                "default": ("5a36388b95dff55f", "4cf2ab566c5786345ccf3a7430c28e80149e04548d529041137944b50b0cd404")}
    sections = ("model", "data", "peft", "estimate", "prune", "train", "eval")
    for name, peft in (("lora", {"r": 4, "alpha": 8}), ("adapter", {"type": "adapter", "r": 4}), ("default", None)):
        r = {k: v for k, v in raw.items() if k != "peft"} | ({"peft": peft} if peft else {})
        recipe = recipe_from_dict(r)
        keyed = {k: keyed_section(recipe, k) for k in sections}
        assert (estimate_key(recipe), sha256_json(keyed)) == expected[name], name
        if name == "adapter":  # the new word, and the list of one, share the old key
            for same in ({"type": "bottleneck", "r": 4}, [{"type": "bottleneck", "r": 4}]):
                assert estimate_key(recipe_from_dict({**r, "peft": same})) == expected[name][0]


# --- a third kind: a learned output shift (out + b) on hidden-size projections, one unit per module -----------------
# Everything it needs is this section plus one `register` call, which stands for the registry's import line.

class Shift(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.b = nn.Parameter(torch.randn(hidden, generator=torch.Generator().manual_seed(hidden)) * 0.1)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out + self.b


def shift_attach_paths(model, paths: list[str], trainable: bool = True):
    base = unwrap(model)
    for name, p in base.named_parameters():
        if not registry.is_adapter_param(name):
            p.requires_grad_(False)
    for path in paths:
        parent_path, _, proj = path.rpartition(".")
        parent = base.get_submodule(parent_path)
        shift = Shift(base.config.hidden_size).requires_grad_(trainable)
        parent.add_module(proj + "_shift", shift)
        getattr(parent, proj).register_forward_hook(lambda mod, args, out, s=shift: s(out))
    return model


def shift_modules(model) -> list[tuple[str, Shift]]:
    return [(n.removesuffix("_shift"), m) for n, m in unwrap(model).named_modules() if isinstance(m, Shift)]


def shift_save(model, out_dir, state) -> None:
    out_dir.mkdir(parents=True)
    save_file({k.removeprefix("base_model.model."): v.contiguous() for k, v in state.items()},
              str(out_dir / "adapter_model.safetensors"))
    write_json(out_dir / "adapter_config.json", {"peft_type": "test_shift", "targets": [n for n, _ in
                                                                                        shift_modules(model)]})


def shift_owns(path) -> bool:
    return (path / "adapter_config.json").is_file() and read_json(path / "adapter_config.json")["peft_type"] == \
        "test_shift"


def shift_load(model, path, trainable: bool, weights: bool):
    model = shift_attach_paths(model, read_json(path / "adapter_config.json")["targets"], trainable)
    if weights:
        unwrap(model).load_state_dict(load_file(path / "adapter_model.safetensors"), strict=False)
    return model


def shift_slice(adapter_dir, plan, config, model_dir, out_dir) -> dict:
    w = load_file(adapter_dir / "adapter_model.safetensors")
    kept = {f"{m}_shift.b": w[f"{m}_shift.b"] for m in plan["peft_modules"]}  # one unit per module: keep or drop
    out_dir.mkdir(parents=True)
    save_file(kept, str(out_dir / "adapter_model.safetensors"))
    write_json(out_dir / "adapter_config.json", {"peft_type": "test_shift", "targets": list(plan["peft_modules"])})
    return {"modules": len(kept), "params": sum(t.numel() for t in kept.values())}


class ShiftTracker(ImportanceTracker):
    """Module score ||b|| / ||out||; unit score |sum_tokens b . dL/dout|."""

    def __init__(self, model, total_steps: int, runtime):
        self._setup(model, total_steps, runtime, [_Module(n, m, 1, m.b.numel(), m.b.numel())
                                                  for n, m in shift_modules(model)])
        for i, mod in enumerate(self.modules):
            self._handles.append(mod.layer.register_forward_hook(self._hook(i)))

    _taylor_shape = staticmethod(lambda mod: (1,))
    _rank_score = staticmethod(lambda mod, t: t.abs())

    def _hook(self, i: int):
        def hook(module, args, out):
            if not self.recording:
                return
            base = args[0].detach().double()
            self._add_ratio(i, module.b.detach().double().norm().expand(base.shape[:-1]), base.norm(dim=-1), out)
            if out.requires_grad:
                b = module.b.detach().double()

                def grad_hook(g: torch.Tensor) -> None:
                    self._taylor[i] += (g.double() * b).sum().reshape(1)

                out.register_hook(grad_hook)
        return hook


SHIFT = registry.AdapterKind(
    name="shift", aliases=(), order=2, is_param=lambda n: "_shift." in n, save=shift_save, owns=shift_owns,
    attach=lambda model, cfg: shift_attach_paths(model, target_paths(model, cfg.targets)),
    load=shift_load, slice=shift_slice, tracker=ShiftTracker, not_mergeable="is a test kind that is never merged",
    defaults={"targets": ["o_proj"]})


@pytest.fixture
def shift_kind():
    registry.register(SHIFT)  # in the package: `from . import ..., shift` at the bottom of registry.py
    yield SHIFT
    registry.KINDS.pop(SHIFT.name)


def test_a_third_kind_is_one_module_and_one_registry_line(tmp_path, tiny_recipe, shift_kind):
    raw = {**tiny_recipe, "peft": [{"type": "shift"}, {"type": "lora", "targets": ["q_proj", "v_proj"], "r": 4}],
           "prune": {**tiny_recipe["prune"], "module_ratio": 0.0, "rank_scope": "layerwise"}}
    run = tmp_path / "run"
    assert main(["run", "--config", write_recipe(tmp_path, raw), "--run-dir", str(run)]) == 0
    assert [s["type"] for s in read_json(run / "estimate" / "estimate.json")["recipe"]["peft"]] == ["lora", "shift"]
    shifted = {f"shift:{O0}", f"shift:{O1}"}
    scores = load_scores(run / "estimate" / "scores.safetensors")
    assert shifted < set(scores.module) and all(scores.module[k] > 0 and scores.rank[k].shape == (1,) for k in shifted)
    assert shifted < set(read_json(run / "plan.json")["peft_modules"])
    for d in ("estimate/adapter", "pruned_adapter", "train/adapter"):
        assert entries(run / d) == ["lora", "shift"], d
    trained = load_file(run / "train" / "adapter" / "shift" / "adapter_model.safetensors")
    pruned = load_file(run / "pruned_adapter" / "shift" / "adapter_model.safetensors")
    assert trained.keys() == {f"{O0}_shift.b", f"{O1}_shift.b"} and not torch.equal(trained[f"{O0}_shift.b"],
                                                                                   pruned[f"{O0}_shift.b"])
    assert (run / "eval.json").is_file() and not (run / "export").exists()  # not mergeable: no export stage
