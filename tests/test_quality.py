"""The quality study's --quick path (issue 6) on a tiny random GQA model: rows, shared estimate, ratio-0 identity,
random vs scored plans, the aggregated table, the docs section and `lightpeft report --compare`.

Accuracy on a tiny random model is meaningless; what is checked is the machinery the real study relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightpeft_dist import cli
from lightpeft_dist.reporting.compare import COLUMNS
from lightpeft_dist.reporting.flops import run_costs
from lightpeft_dist.io_utils import read_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.quality import damage, run_quality  # noqa: E402
from benchmarks.quality.aggregate import figure_name, markers  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def study(tmp_path, tiny_recipe):
    raw = dict(tiny_recipe)
    raw["data"] = {**raw["data"], "test_file": raw["data"]["eval_file"]}
    raw["prune"] = {"module_ratio": 0.5, "rank_ratio": 0.5}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "ppl.txt").write_text(" ".join(["the movie was good and the plot was great ."] * 30))
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nHand-written demo section.\n")
    args = ["--out-dir", str(tmp_path / "out"), "--recipe", str(tmp_path / "recipe.yaml"), "--quick",
            "--ppl-text", str(tmp_path / "ppl.txt"), "--ppl-window-tokens", "12", "--write-docs", str(docs)]
    return tmp_path, args


def kept(plan: dict) -> tuple:
    return ([(lp["q_heads"], lp["ffn"]) for lp in plan["layers"]], plan["peft_modules"])


def test_quick_study_rows_table_docs_and_compare(study, capsys):
    root, args = study
    out = root / "out"
    assert run_quality.main([*args, "--seeds", "0", "1", "--levels", "0.35"]) == 0
    res = read_json(out / "quality.json")

    # one group per method/level, with the expected number of seeds
    groups = [(g["method"], g["level"], g["value"]["n"]) for g in res["groups"]]
    assert groups == [("zero-shot", None, 1), ("lora", None, 2), ("lightpeft", 0.35, 2), ("activation", 0.35, 2),
                      ("taylor", 0.35, 2), ("random", 0.35, 2)]
    table = (out / "quality.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header == "| " + " | ".join(c.format(metric="accuracy") for c in COLUMNS) + " |"
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split(" | ")[0] for line in body] == ["| zero-shot (unpruned, no training)",
                                                        "| LoRA, full model (all ratios 0)", "| Light-PEFT",
                                                        "| Light-PEFT, activation unit scores",
                                                        "| Light-PEFT, Taylor unit scores", "| random pruning"]
    assert all(len(line.split(" | ")) == len(COLUMNS) for line in body)

    # end-to-end cost against LoRA's training: each row's estimate + train FLOPs (reporting/flops.py) over the LoRA
    # row's, per group mean; the LoRA row pays no estimate, zero-shot has no cost
    by = {g["method"]: g for g in res["groups"]}
    cost = {(m, s): run_costs(out / f"seed{s}" / (m if m == "lora" else f"{m}-35")) for m in ("lora", "taylor")
            for s in (0, 1)}
    lora_f = sum(cost["lora", s]["train_flops"] for s in (0, 1)) / 2
    taylor_f = sum(cost["taylor", s]["train_flops"] + cost["taylor", s]["estimate_flops"] for s in (0, 1)) / 2
    assert by["lora"]["flops_of_lora"] == pytest.approx(1.0)
    assert by["taylor"]["flops_of_lora"] == pytest.approx(taylor_f / lora_f)
    assert by["zero-shot"]["flops_of_lora"] is None
    taylor_line = next(line for line in body if line.startswith("| Light-PEFT, Taylor unit scores |"))
    assert taylor_line.split(" | ")[-2] == f"{taylor_f / lora_f:.2f}x"

    zero = read_json(out / "zero-shot" / "eval.json")["base"]
    # every row (zero-shot included) was timed in the interleaved speed pass, and the table shows that median
    timed = {g["method"]: g["infer_tokens_per_s"]["mean"] for g in res["groups"]}
    zq = read_json(out / "zero-shot" / "quality.json")
    assert len(zq["infer_rounds"]) == 1 and timed["zero-shot"] == zq["infer_tokens_per_s"] > 0
    for seed in (0, 1):
        sd = out / f"seed{seed}"
        shared = sd / "estimate-run" / "estimate" / "estimate.json"
        for row in ("lora", "lightpeft-35", "activation-35", "taylor-35", "random-35"):
            assert (sd / row / "estimate" / "estimate.json").samefile(shared)  # estimated once per seed
            assert read_json(sd / row / "eval.json")["base"] == zero
            assert len(read_json(sd / row / "quality.json")["infer_rounds"]) == 1
        lp, rnd = read_json(sd / "lightpeft-35" / "plan.json"), read_json(sd / "random-35" / "plan.json")
        assert kept(lp) != kept(rnd)
        act = read_json(sd / "activation-35" / "plan.json")  # same ratios, same estimate, other unit scores
        assert act["prune"] == {**lp["prune"], "unit_scores": "activation"} and lp["prune"]["unit_scores"] == "masks"
        tay = read_json(sd / "taylor-35" / "plan.json")
        assert tay["prune"] == {**lp["prune"], "unit_scores": "taylor"} and tay["peft_modules"] == lp["peft_modules"]
        assert [lay["q_heads"] for lay in act["layers"]] != [lay["q_heads"] for lay in lp["layers"]] or \
            [lay["ffn"] for lay in act["layers"]] != [lay["ffn"] for lay in lp["layers"]]
        assert lp["prune"]["attn_ratio"] == rnd["prune"]["attn_ratio"] == 0.35
        assert lp["prune"]["ffn_ratio"] == rnd["prune"]["ffn_ratio"] > 0
        assert abs(lp["summary"]["prunable_fraction_pruned"] - 0.35) < 0.03  # FFN granularity of the tiny model

        # ratio 0 keeps every unit, so the LoRA row's "pruned" model is the base model, tensor for tensor
        lora_plan = read_json(sd / "lora" / "plan.json")
        assert lora_plan["summary"]["prunable_fraction_pruned"] == 0
        assert all(len(r) == 4 for r in lora_plan["peft_modules"].values()) and len(lora_plan["peft_modules"]) == 14
        base_w = load_file(str(root / "model" / "model.safetensors"))
        pruned_w = load_file(str(sd / "lora" / "pruned_model" / "model.safetensors"))
        assert base_w.keys() == pruned_w.keys()
        assert all(torch.equal(base_w[k], pruned_w[k]) for k in base_w)
        assert read_json(sd / "lora" / "quality.json")["ppl"]["pruned_base"] == pytest.approx(
            read_json(out / "zero-shot" / "quality.json")["ppl"]["pruned_base"], rel=1e-5)
    assert read_json(out / "seed0" / "estimate-run" / "estimate" / "estimate.json")["key"] != \
        read_json(out / "seed1" / "estimate-run" / "estimate" / "estimate.json")["key"]

    # the damage diagnostic rebuilds a row's pruned base from the study folder alone: the activation row's ratios on
    # the estimate's activation scores give that row's perplexity, and ratio 0 gives the unpruned base's
    act = read_json(out / "seed0" / "activation-35" / "quality.json")
    dmg = root / "damage.json"
    row_plan = f"{act['prune']['attn_ratio']}:{act['prune']['ffn_ratio']}"
    damage_args = ["--study", str(out), "--seed", "0", "--out", str(dmg), "--ppl-text", str(root / "ppl.txt"),
                   "--ppl-window-tokens", "12", "--ppl-windows", "2"]  # the quick study's perplexity windows
    assert damage.main([*damage_args, "--scores", "estimate-activation", "--plans", row_plan, "0:0"]) == 0
    pruned, unpruned = read_json(dmg)["rows"]
    assert pruned["fraction_pruned"] == pytest.approx(act["achieved_fraction"])
    assert pruned["ppl"] == pytest.approx(act["ppl"]["pruned_base"], rel=1e-4)
    assert unpruned["ppl"] == pytest.approx(read_json(out / "zero-shot" / "quality.json")["ppl"]["pruned_base"],
                                            rel=1e-4)
    assert damage.main([*damage_args, "--scores", "estimate", "--plans", row_plan]) == 0
    masks_row = read_json(dmg)["rows"][-1]  # the lightpeft row: same ratios, mask scores
    assert masks_row["ppl"] == pytest.approx(read_json(out / "seed0" / "lightpeft-35" / "quality.json")["ppl"]
                                             ["pruned_base"], rel=1e-4)

    # docs: the generated section is added once, the hand-written text is kept, the figure is a PNG
    docs = root / "results.md"
    (docs.parent / "results.md").write_text(docs.read_text() + "\n## Later hand-written section\n")
    assert run_quality.main([*args, "--aggregate-only"]) == 0
    text = docs.read_text()
    begin, end = markers("out")
    assert text.count(begin) == 1 and text.count(end) == 1
    assert text.startswith("# Results\n\nHand-written demo section.") and "## Later hand-written section" in text
    assert "| Light-PEFT | 35% |" in text and "median of 1 rounds" in text
    assert "Light-PEFT not run at: 20%, 50%; random pruning not run at: 20%, 50%" in text
    assert (root / figure_name("out")).read_bytes()[:8] == PNG and (out / "accuracy_vs_ratio.png").read_bytes()[:8] == PNG

    # the records alone (JSON and YAML, no weights) rebuild the same table and verdict once the study folder is gone
    assert run_quality.main([*args, "--aggregate-only", "--save-records", str(root / "records")]) == 0
    saved = root / "records" / "out"
    assert not list(saved.rglob("*.safetensors")) and (saved / "seed0" / "lora" / "eval.json").is_file()
    table = (out / "quality.md").read_text()
    moved = root / "gone"
    out.rename(moved)  # runs/ lost
    assert run_quality.main(["--out-dir", str(saved), "--aggregate-only"]) == 0
    assert (saved / "quality.md").read_text() == table
    assert read_json(saved / "quality.json")["verdict"] == read_json(moved / "quality.json")["verdict"]
    moved.rename(out)

    # the CLI compares any run directories
    capsys.readouterr()
    lp0, rnd0 = out / "seed0" / "lightpeft-35", out / "seed0" / "random-35"
    assert cli.main(["report", "--run-dir", str(out / "seed0" / "lora"), "--compare", str(lp0), str(rnd0)]) == 0
    compare = (out / "seed0" / "lora" / "report" / "compare.md").read_text()
    assert "Comparison of 3 runs" in compare and compare.count("| Light-PEFT |") == 1
    assert cli.main(["report", "--run-dir", str(lp0), "--compare", str(root / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_level_is_a_one_line_error(study, capsys):
    root, args = study
    assert run_quality.main([*args, "--levels", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --levels [1.5]")
    assert not (root / "out").exists()


def test_activation_scores_have_the_estimate_shapes_and_see_dead_units(tmp_path, tiny_recipe):
    """The damage diagnostic's training-free scorer: one score per head and FFN neuron; a neuron whose down_proj
    column is zero, or a head whose o_proj columns are zero, contributes nothing and must score exactly 0."""
    from benchmarks.quality.activation_scores import activation_scores
    from lightpeft_dist.config import recipe_from_dict
    from lightpeft_dist.models.loading import load_model, load_tokenizer
    from lightpeft_dist.pruning.scores import Scores

    recipe = recipe_from_dict(tiny_recipe)
    model = load_model(recipe.model.path)
    layer = model.model.layers[1]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        layer.mlp.down_proj.weight[:, 5] = 0
        layer.self_attn.o_proj.weight[:, 2 * head_dim:3 * head_dim] = 0
    like = Scores(head=[], ffn=[], module={"m": 1.0}, rank={"m": torch.ones(2)})
    s = activation_scores(model, load_tokenizer(recipe.model), recipe, like, examples=8, batch_size=4)
    assert [t.shape[0] for t in s.head] == [6, 6] and [t.shape[0] for t in s.ffn] == [40, 40]
    assert s.ffn[1][5] == 0 and s.head[1][2] == 0
    assert (s.ffn[0] > 0).all() and (s.head[0] > 0).all() and s.module == like.module


def test_strategy_rows_share_the_study_and_differ_only_where_they_should(study):
    """APT, PrunePEFT and the LoRA rows PrunePEFT is measured against (benchmarks/quality/strategy_rows.py)."""
    root, args = study
    out = root / "out"
    rows = ["salience_budget", "apt_oneshot", "apt_random", "apt_gradual", "prunepeft", "prunepeft_base", "lora_qv",
            "supernet"]
    assert run_quality.main([*args, "--seeds", "0", "--levels", "0.35", "--methods", "lora", *rows,
                             "--speed-rounds", "1"]) == 0
    sd = out / "seed0"
    plan = {name: read_json(sd / name / "plan.json") for name in
            ("lora", "lora_qv", "supernet", "prunepeft", "prunepeft_base-35",
             "salience_budget-35", "apt_oneshot-35", "apt_random-35", "apt_gradual-35")}
    # APT's calibration ran once and is the one-shot row's estimate; its plan prunes the level to within a block
    assert (sd / "apt_oneshot-35" / "estimate" / "estimate.json").samefile(sd / "apt-calibrate" / "estimate" /
                                                                           "estimate.json")
    assert read_json(sd / "apt_oneshot-35" / "estimate" / "estimate.json")["strategy"] == "apt"
    assert abs(plan["apt_oneshot-35"]["summary"]["prunable_fraction_pruned"] - 0.35) < 0.05
    # APT's random control: the same calibration and per-layer counts, other units
    assert (sd / "apt_random-35" / "estimate" / "estimate.json").samefile(sd / "apt-calibrate" / "estimate" /
                                                                          "estimate.json")
    counts = lambda p: [(len(lay["kv_heads"]), len(lay["ffn"])) for lay in p["layers"]]  # noqa: E731
    assert counts(plan["apt_random-35"]) == counts(plan["apt_oneshot-35"])
    assert plan["apt_random-35"]["layers"] != plan["apt_oneshot-35"]["layers"]
    assert read_json(sd / "apt_gradual-35" / "train" / "train.json")["structure"] is not None  # pruned while tuning
    # PrunePEFT on the pruned base keeps exactly the salience budget row's heads and neurons, only the PEFT differs:
    # its modules are supernet modules (LoRA on q, v and the bottlenecks), and its search keeps half of the groups
    layers = len(plan["lora"]["layers"])
    group = lambda k: (k.split(":")[0] if ":" in k else "lora", k.split(".")[2])  # noqa: E731  (kind, layer)
    supernet = set(plan["supernet"]["peft_modules"])
    assert plan["prunepeft_base-35"]["layers"] == plan["salience_budget-35"]["layers"]
    assert set(plan["prunepeft_base-35"]["peft_modules"]) < supernet
    assert len({group(k) for k in plan["prunepeft_base-35"]["peft_modules"]}) == layers
    # the search on the full model prunes no base unit and keeps half of the supernet's 2 groups per layer
    assert plan["prunepeft"]["summary"]["prunable_fraction_pruned"] == 0
    assert set(plan["prunepeft"]["peft_modules"]) < supernet
    assert len({group(k) for k in plan["prunepeft"]["peft_modules"]}) == 2 * layers - layers
    assert {k.rsplit(".", 1)[-1] for k in plan["lora_qv"]["peft_modules"]} == {"q_proj", "v_proj"}
    assert len(plan["supernet"]["peft_modules"]) == 4 * layers  # q, v LoRA and two bottlenecks per layer, all kept
    assert plan["lora"]["layers"] == plan["lora_qv"]["layers"] == plan["supernet"]["layers"]  # nothing pruned
    # every row is in the table, costs included, and the PrunePEFT verdict is computed
    res = read_json(out / "quality.json")
    by = {(g["method"], g["level"]): g for g in res["groups"]}
    for method, level in [("apt_oneshot", 0.35), ("apt_random", 0.35), ("apt_gradual", 0.35), ("prunepeft", None),
                          ("prunepeft_base", 0.35), ("lora_qv", None), ("supernet", None)]:
        assert by[method, level]["value"]["n"] == 1 and by[method, level]["flops_of_lora"] > 0
    assert by["prunepeft", None]["flops_of_lora"] > by["supernet", None]["flops_of_lora"]  # the search costs extra
    assert any(line.startswith("- PrunePEFT (search on the full model)") for line in res["verdict"])
    assert any("Light-PEFT's best row at this level" in line for line in res["verdict"])
    assert any("APT one-shot" in line for line in res["verdict"]) and \
        any("Random units at the same per-layer counts" in line for line in res["verdict"])


def test_prunepeft_ablation_rows_change_one_thing_and_keep_the_search_budget(study):
    """The paper's ablation rows (benchmarks/quality/strategy_rows.py, ABLATIONS): each is the `prunepeft` row's
    search with one setting changed, removes as many groups, and gets a line in the ablation verdict."""
    from benchmarks.quality.strategy_rows import ABLATIONS, STRATEGY_ROWS
    from lightpeft_dist.reporting import methods
    from lightpeft_dist.strategies.prunepeft.choice import random_removal
    from lightpeft_dist.strategies.prunepeft.criteria import SIGN

    assert all(methods.label(m) != m and m in methods.ORDER for m in STRATEGY_ROWS)  # every row is labelled
    assert set(methods.PRUNEPEFT_ABLATIONS) == set(ABLATIONS)
    root, args = study
    out = root / "out"
    rows = ["prunepeft", "prunepeft_random", "prunepeft_nopart", "prunepeft_lowfi", "prunepeft_snip"]
    assert run_quality.main([*args, "--seeds", "0", "--levels", "0.35", "--methods", "lora", *rows,
                             "--speed-rounds", "0"]) == 0
    sd = out / "seed0"
    search = {r: read_json(sd / r / "estimate" / "estimate.json") for r in rows}
    base = search["prunepeft"]["recipe"]["prunepeft"]
    for r in rows[1:]:  # the prunepeft row's section, changed only where the ablation says
        changed = {k: v for k, v in search[r]["recipe"]["prunepeft"].items() if base[k] != v}
        assert changed == ABLATIONS[r]
    rec = {r: s["prunepeft"] for r, s in search.items()}
    n_removed = len(rec["prunepeft"]["removal_order"])
    assert n_removed > 0 and all(len(rec[r]["removal_order"]) == n_removed for r in rows)
    per_round = base["per_round"]
    for r, rnd in enumerate(rec["prunepeft_random"]["rounds"]):  # random: the seed's draw, no scores
        assert rnd["scores"] is None
        assert rnd["removed"] == [rnd["alive"][i] for i in random_removal(len(rnd["alive"]), per_round, 0, r + 1)]
    assert set(rec["prunepeft_nopart"]["partitions"]) == {"all"}
    assert rec["prunepeft_nopart"]["assignment"] == {"all": list(SIGN)} and "warmup" in rec["prunepeft_nopart"]
    # low fidelity: the same rounds at 1 training step each, warm-up included, so the search really costs less
    rounds = len(rec["prunepeft"]["rounds"])
    assert search["prunepeft_lowfi"]["steps"] == rounds + 1 < search["prunepeft"]["steps"]
    assert search["prunepeft_lowfi"]["tokens"] < search["prunepeft"]["tokens"]
    assert "warmup" not in rec["prunepeft_snip"] and len(set(rec["prunepeft_snip"]["partitions"])) > 1
    assert all(v == ["snip"] for v in rec["prunepeft_snip"]["assignment"].values())

    def groups_kept(plan: dict) -> set:
        return {(k.split(":")[0] if ":" in k else "lora", k.split(".")[2]) for k in plan["peft_modules"]}

    plans = {r: read_json(sd / r / "plan.json") for r in rows}
    assert all(plans[r]["summary"]["prunable_fraction_pruned"] == 0 for r in rows)
    assert len({len(groups_kept(plans[r])) for r in rows}) == 1  # the same number of groups in every plan
    res = read_json(out / "quality.json")
    by = {g["method"]: g for g in res["groups"]}
    assert all(by[r]["value"]["n"] == 1 for r in rows)
    lines = res["verdict"]
    head = next(i for i, line in enumerate(lines) if line.startswith("- PrunePEFT's ablations"))
    body = lines[head + 1:head + 6]
    for line, r in zip(body[:4], rows[1:], strict=True):
        assert line.startswith(f"  - {methods.label(r)}: ") and line.endswith("of 1 paired seeds.")
    assert body[4].startswith("  - Best single criterion (1 of 6 run): **snip**")


def test_a_stopped_study_still_records_its_command_and_finished_seeds(tmp_path):
    """invocations.json is rewritten after every seed: one entry per invocation, which says the seeds done until
    the invocation finishes; the docs line says where a stopped one stopped."""
    from benchmarks.quality.aggregate import _invocation

    argv, started = ["--out-dir", str(tmp_path), "--seeds", "0", "1"], 1.8e9
    run_quality.record_invocation(tmp_path, argv, started, [])
    run_quality.record_invocation(tmp_path, argv, started, [0])
    (entry,) = read_json(tmp_path / "invocations.json")
    assert entry["seeds_done"] == [0] and "--seeds 0 1" in entry["command"]
    assert _invocation(entry).endswith("min, stopped after seed(s) 0")
    run_quality.record_invocation(tmp_path, argv, started + 60, [])  # a second invocation: its own entry
    run_quality.record_invocation(tmp_path, argv, started)  # the first one finished
    first, second = read_json(tmp_path / "invocations.json")  # in the order they started
    assert "seeds_done" not in first and first["started"] < second["started"]
    assert _invocation(first).endswith(" min") and _invocation(second).endswith("before its first seed finished")
