"""PrunePEFT's ablation options (docs/method.md, "PrunePEFT", "Ablations"): random removal is k groups a round, a pure
function of (seed, round) that never reads the criteria; `partitions: none` mixes over one partition exactly as a
hand computation does; `criterion` gives every partition that criterion, and bad combinations are one `error:` line
with nothing written; the defaults leave the search key as recorded before the options existed."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from test_prunepeft import one_error_line, prunepeft_dict

from lightpeft_dist.cli import main
from lightpeft_dist.config import recipe_from_dict, recipe_to_dict
from lightpeft_dist.io_utils import sha256_json
from lightpeft_dist.runtime import Runtime
from lightpeft_dist.strategies.prunepeft.assignment import choice_counts, fixed_assignment, warmup_assignment
from lightpeft_dist.strategies.prunepeft.choice import random_removal, round_removal
from lightpeft_dist.strategies.prunepeft.criteria import SIGN
from lightpeft_dist.strategies.prunepeft.mixing import ONE_PARTITION, group_partitions, hybrid_scores, removal
from lightpeft_dist.strategies.prunepeft.search import run_search, search_key
from lightpeft_dist.strategies.prunepeft.section import BANDS, CRITERIA, PrunePeftConfig


def _prunable(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand(n, generator=g, dtype=torch.float64) for m in SIGN}


def test_random_removal_is_k_a_round_a_function_of_the_seed_and_blind_to_the_criteria():
    for n, k in ((8, 3), (60, 6), (5, 5)):
        got = random_removal(n, k, seed=7, round_no=1)
        assert len(got) == k == len(set(got)) and all(0 <= i < n for i in got)
    assert random_removal(60, 6, 7, 1) == random_removal(60, 6, 7, 1)  # the same seed and round: the same draw
    assert random_removal(60, 6, 7, 1) != random_removal(60, 6, 8, 1)  # another seed
    assert random_removal(60, 6, 7, 1) != random_removal(60, 6, 7, 2)  # another round
    assert len(random_removal(60, 6, -3, 1)) == 6  # any integer seed
    torch.manual_seed(0)
    first = random_removal(60, 6, 7, 1)
    torch.rand(100)  # the rounds' training consumes torch's global RNG; the draw must not depend on it
    assert random_removal(60, 6, 7, 1) == first
    parts = ["A"] * 30 + ["B"] * 30
    assigned = {"A": ["weight", "snip"], "B": ["zeros"]}
    rnd = PrunePeftConfig(removal="random", per_round=6, seed=7)
    a, sa = round_removal(rnd, _prunable(0, 60), parts, assigned, 1)
    b, sb = round_removal(rnd, _prunable(1, 60), parts, assigned, 1)  # other criterion values: the same removal
    assert a == b == first and sa is None and sb is None
    hyb = PrunePeftConfig(per_round=6)
    ha, _ = round_removal(hyb, _prunable(0, 60), parts, assigned, 1)
    hb, _ = round_removal(hyb, _prunable(1, 60), parts, assigned, 1)
    assert ha != hb  # the hybrid removal does read them (so the check above could fail)


def test_random_search_removes_k_per_round_whatever_the_training(tmp_path, monkeypatch):
    """End to end on the tiny model: every round removes exactly per_round of the alive groups, the draw the seed and
    round give, and the ranks are asked to agree on each round's removal and on the order by hash, as for the hybrid
    search; other round LRs change the criteria's values but not the order; another seed changes the order."""
    agreed: list[tuple[str, object]] = []
    real = Runtime.agree
    monkeypatch.setattr(Runtime, "agree", lambda self, value, what: (agreed.append((what, value)),
                                                                      real(self, value, what))[1])
    orders, values = {}, {}
    for name, lr, seed in (("a", 1e-2, 42), ("b", 3e-2, 42), ("c", 1e-2, 43)):
        raw = prunepeft_dict(tmp_path / name, removal="random", seed=seed, lr={"lora": lr, "bottleneck": lr})
        agreed.clear()
        record = run_search(recipe_from_dict(raw), tmp_path / name / "run")["prunepeft"]
        for r, rnd in enumerate(record["rounds"]):
            assert len(rnd["removed"]) == 3 and rnd["scores"] is None
            picked = random_removal(len(rnd["alive"]), 3, seed, r + 1)
            assert rnd["removed"] == [rnd["alive"][i] for i in picked]
            assert (f"prunepeft round {r + 1} removal", sha256_json(rnd["removed"])[:16]) in agreed
        assert ("prunepeft removal order", record["order_hash"]) in agreed
        assert record["order_hash"] == sha256_json(record["removal_order"])[:16]
        assert len(record["removal_order"]) == 6 and len(record["kept"]) == 2
        orders[name], values[name] = record["removal_order"], record["rounds"][0]["values"]
    assert orders["a"] == orders["b"] and values["a"]["gradient"] != values["b"]["gradient"]
    assert orders["a"] != orders["c"]


def test_one_partition_mixing_matches_a_hand_worked_example():
    """partitions: none, five groups of two kinds in one partition scored by weight, zeros and snip together."""
    assert group_partitions([("lora", 0), ("lora", 3), ("bottleneck", 1)], 4, "none") == [ONE_PARTITION] * 3
    assert group_partitions([("lora", 0), ("bottleneck", 3)], 4) == ["lora/0-20", "bottleneck/50-80"]
    theta = {"weight": torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4]), "zeros": torch.tensor([0.0, 0.5, 0.5, 0.0, 0.1]),
             "snip": torch.tensor([3.0, 0.0, 1.0, 2.0, 1.5])}
    prunable = {"weight": -theta["weight"], "zeros": theta["zeros"], "snip": -theta["snip"]}
    got = hybrid_scores(prunable, [ONE_PARTITION] * 5, {ONE_PARTITION: ["weight", "zeros", "snip"]})

    def w(rank):
        return 5 / (1 + math.exp(rank - 3))

    def soft(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    # weight, smallest first: 1 (0.1), 3 (0.2), 2 (0.3), 4 (0.4), 0 (0.5) -> ranks 4, 0, 2, 1, 3
    sw, rw = soft([-0.5, -0.1, -0.3, -0.2, -0.4]), [4, 0, 2, 1, 3]
    # zeros, largest first: 1 and 2 tie at 0.5 (lower index first), 4 (0.1), then 0 and 3 at 0 -> ranks 3, 0, 1, 4, 2
    sz, rz = soft([0.0, 0.5, 0.5, 0.0, 0.1]), [3, 0, 1, 4, 2]
    # snip, smallest first: 1 (0), 2 (1.0), 4 (1.5), 3 (2.0), 0 (3.0) -> ranks 4, 0, 1, 3, 2
    ss, rs = soft([-3.0, 0.0, -1.0, -2.0, -1.5]), [4, 0, 1, 3, 2]
    expect = [(w(rw[g]) * sw[g] + w(rz[g]) * sz[g] + w(rs[g]) * ss[g]) / 3 for g in range(5)]
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64))
    assert removal(got, 2) == sorted(range(5), key=lambda g: -expect[g])[:2]
    # the same groups in two partitions give other scores: the partitioning is what the ablation removes
    split = hybrid_scores(prunable, ["A", "A", "A", "B", "B"], {p: ["weight", "zeros", "snip"] for p in "AB"})
    assert not torch.allclose(split, got)


def test_one_partition_assignment_default_union_and_warmup():
    cfg = PrunePeftConfig(partitions="none")  # the official table: its union is all six, in SIGN's order
    assert fixed_assignment(cfg, ["lora", "bottleneck"]) == {ONE_PARTITION: list(SIGN)}
    assert fixed_assignment(cfg, ["lora"]) == {ONE_PARTITION: ["zeros", "threshold", "activation", "gradient"]}
    table = {"lora": {b: ["snip"] for b in BANDS}, "bottleneck": {b: ["zeros", "weight"] for b in BANDS}}
    cfg = PrunePeftConfig(partitions="none", table=table)
    assert fixed_assignment(cfg, ["lora", "bottleneck"]) == {ONE_PARTITION: ["weight", "zeros", "snip"]}
    # the warm-up over one partition: every criterion counts all its choices there, so all six are assigned
    counts = choice_counts(_prunable(3, 8), [ONE_PARTITION] * 8, top=4)
    assert counts == {m: {ONE_PARTITION: 4} for m in SIGN}
    assert warmup_assignment(counts) == {ONE_PARTITION: list(SIGN)}


def test_one_partition_search_records_scores_the_hand_formula_gives(tmp_path):
    raw = prunepeft_dict(tmp_path, partitions="none", rounds=1)
    record = run_search(recipe_from_dict(raw), tmp_path / "run")["prunepeft"]
    assert record["partitions"] == [ONE_PARTITION] * 8 and record["assignment"] == {ONE_PARTITION: list(SIGN)}
    rnd = record["rounds"][0]
    prunable = {m: SIGN[m] * torch.tensor(v, dtype=torch.float64) for m, v in rnd["values"].items()}
    expect = hybrid_scores(prunable, [ONE_PARTITION] * 8, record["assignment"])
    torch.testing.assert_close(torch.tensor(rnd["scores"], dtype=torch.float64), expect)
    assert rnd["removed"] == [rnd["alive"][i] for i in removal(expect, 3)]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_gives_every_partition_that_one(criterion):
    cfg = PrunePeftConfig(criterion=criterion)
    got = fixed_assignment(cfg, ["lora", "bottleneck"])
    assert len(got) == 2 * len(BANDS) and all(v == [criterion] for v in got.values())
    assert fixed_assignment(PrunePeftConfig(criterion=criterion, partitions="none"),
                            ["lora", "bottleneck"]) == {ONE_PARTITION: [criterion]}


def test_criterion_search_assigns_it_everywhere(tmp_path):
    raw = prunepeft_dict(tmp_path, criterion="snip", rounds=1)
    record = run_search(recipe_from_dict(raw), tmp_path / "run")["prunepeft"]
    # kind x band partitions kept: 2 kinds x 3 bands on 4 layers (depths 0, 25, 50, 75 percent)
    assert len(set(record["partitions"])) == 6
    assert set(record["assignment"]) == set(record["partitions"])
    assert all(v == ["snip"] for v in record["assignment"].values())


@pytest.mark.parametrize("section, message", [
    ({"criterion": "snip", "assignment": "warmup"},
     "criterion 'snip' sets every partition's criteria, so the warm-up would count for nothing; use assignment: "
     "default or remove prunepeft.criterion"),
    ({"criterion": "weight", "table": {k: {b: ["snip"] for b in BANDS} for k in ("lora", "bottleneck")}},
     "remove prunepeft.table or prunepeft.criterion"),
    ({"criterion": "snipp"}, "unknown criterion 'snipp'; choose from ['weight', 'zeros'"),
    ({"removal": "shuffle"}, "prunepeft.removal"),
    ({"partitions": "layer"}, "prunepeft.partitions"),
])
def test_bad_ablation_settings_are_one_error_line_and_write_nothing(tmp_path, capsys, section, message):
    raw = prunepeft_dict(tmp_path, **section)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["run", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) != 0
    assert message in one_error_line(capsys)
    assert not run.exists() or not any(run.iterdir())


# A recipe with fixed paths and the search keys the code computed for it before the ablation options existed (commit
# 54ac376): a run directory searched then must not be searched again.
RECORDED = {"model": {"path": "/recorded/tiny-model"},
            "data": {"format": "classification", "train_file": "/recorded/train.jsonl",
                     "eval_file": "/recorded/eval.jsonl", "labels": {"positive": "positive", "negative": "negative"},
                     "template": "review : {text} sentiment :"},
            "train": {"steps": 6, "batch_size": 4, "seq_len": 24, "lr": 1e-2}, "strategy": "prunepeft",
            "prunepeft": {"rounds": 2, "per_round": 3, "steps": 2, "batch_size": 4, "seq_len": 24,
                          "lr": {"lora": 1e-2, "bottleneck": 1e-2}}}
RECORDED_KEYS = {"default": "9b8b214893f967a9", "warmup": "1cdcb0e880d857d8"}


def test_defaults_keep_the_recorded_search_keys():
    def key(**section) -> str:
        raw = copy.deepcopy(RECORDED)
        raw["prunepeft"].update(section)
        return search_key(recipe_from_dict(raw))

    assert key() == RECORDED_KEYS["default"] and key(assignment="warmup") == RECORDED_KEYS["warmup"]
    # the defaults written out (as a saved recipe writes them) are the same recipe
    assert key(removal="hybrid", partitions="kind_band", criterion=None) == RECORDED_KEYS["default"]
    ablations = [key(removal="random"), key(partitions="none"), key(criterion="snip"), key(criterion="weight"),
                 key(removal="random", assignment="warmup"), key(partitions="none", assignment="warmup")]
    assert len(set(ablations)) == len(ablations) and not set(ablations) & set(RECORDED_KEYS.values())
    saved = json.loads(json.dumps(recipe_to_dict(recipe_from_dict(copy.deepcopy(RECORDED)))))
    assert search_key(recipe_from_dict(saved)) == RECORDED_KEYS["default"]  # a saved recipe, reloaded
