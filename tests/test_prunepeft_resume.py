"""A PrunePEFT search SIGKILLed in round 2 of 3 (strategies/prunepeft/resume.py) resumes after round 1 and ends with
the uninterrupted search's removal order, hash, per-round scores, module scores and adapter; the warm-start mode
(survivors' weights carried between rounds) is the one that needs the checkpoint's tensors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_checks import launch, run_stages
from test_prunepeft import prunepeft_dict


def test_killed_search_resumes_to_the_uninterrupted_search(tmp_path):
    raw = prunepeft_dict(tmp_path, layers=2, rounds=3, per_round=1, steps=1, between_rounds="warm_start")
    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump(raw))
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stages(full, "search", config=config)

    cmd = [sys.executable, "-m", "lightpeft_dist", "search", "--config", str(config), "--run-dir", str(killed)]
    proc = launch(cmd, env={"LIGHTPEFT_FAULT_ROUND": "0:2"}, expect_ok=False)
    assert proc.returncode != 0 and not (killed / "estimate").exists(), proc.stderr[-3000:]
    ckpt = killed / "search.ckpt"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["rounds_done"] == 1 and len(state["order"]) == 1 and len(state["record"]["rounds"]) == 1
    assert state["counters"]["steps"] == 1 and state["counters"]["wall_seconds"] > 0
    assert sorted(p.name for p in ckpt.iterdir()) == ["round-1.safetensors", "state.json"]  # nothing half-written
    saved = load_file(ckpt / state["tensors"])
    assert any("lora_B" in k for k in saved) and any("_adapter." in k for k in saved)  # the warm-start weights

    run_stages(killed, "search", config=config)
    a, b = (json.loads((d / "estimate" / "estimate.json").read_text()) for d in (full, killed))
    ra, rb = a["prunepeft"], b["prunepeft"]
    assert ra["resumed_from_round"] is None and rb["resumed_from_round"] == 1
    assert rb["removal_order"] == ra["removal_order"] and rb["order_hash"] == ra["order_hash"]
    assert rb["kept"] == ra["kept"] and rb["module_ratio"] == ra["module_ratio"]
    assert rb["rounds"] == ra["rounds"]  # every round's criterion values, mixed scores, removals and losses
    assert (b["steps"], b["tokens"]) == (a["steps"], a["tokens"])
    sa, sb = (load_file(d / "estimate" / "scores.safetensors") for d in (full, killed))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    files = sorted(p.relative_to(full).as_posix() for p in (full / "estimate" / "adapter").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(killed).as_posix()
                           for p in (killed / "estimate" / "adapter").rglob("*.safetensors")) and files
    for name in files:  # the last round's supernet, which warm_start carried from the checkpoint
        wa, wb = load_file(full / name), load_file(killed / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (killed / "search.ckpt").exists() and not (full / "search.ckpt").exists()


def test_checkpoint_of_another_search_is_ignored_and_a_torn_one_refused(tmp_path):
    """state.json is the commit point: another key's checkpoint is skipped, one whose tensor file is not the one it
    names is one error naming the folder; a good one restores the RNG state and the warm-start weights."""
    from lightpeft_dist.errors import LightPeftError
    from lightpeft_dist.runtime import current
    from lightpeft_dist.strategies.prunepeft.resume import Progress, load_progress, save_progress

    names = ["lora.0.q_proj+v_proj", "lora.1.q_proj+v_proj", "bottleneck.0.o_proj+down_proj"]
    weights = {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8)}
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    save_progress(tmp_path, "k1", Progress(2, names[:2], {"rounds": [{}, {}]}, {"steps": 4}, weights), current())
    assert load_progress(tmp_path, "k2", names) is None  # another search: ignored
    torch.manual_seed(0)
    got = load_progress(tmp_path, "k1", names)
    assert got.rounds_done == 2 and got.order == names[:2] and got.record == {"rounds": [{}, {}]}
    assert torch.equal(torch.get_rng_state(), rng)
    assert got.state.keys() == weights.keys() and all(torch.equal(got.state[k], weights[k]) for k in weights)
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / state["tensors"]).write_bytes(b"torn")
    with pytest.raises(LightPeftError, match="is incomplete"):
        load_progress(tmp_path, "k1", names)
