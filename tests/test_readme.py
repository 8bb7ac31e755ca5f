"""The README is kept honest by tests: its recipe-key table, its shell commands and its layout block.

Docs drift silently: a key added to the schema without a row, a command whose flag was renamed, a folder that moved.
Each check here reads the live source of truth (the pydantic schema, the CLI's parsers, the tree), so a change on
either side that is not made on the other fails, including keys and modules other branches add: that is intended.

Shell commands (```bash blocks): every command is either run here, or listed in NOT_RUN with why it is not run and
the test that covers it instead. `lightpeft` lines with placeholders (D, R.yaml, [...]) are synopses: each flag they
name must exist in that stage's --help. `lightpeft` lines on a concrete run directory are run as written, in README
order, on a tiny run made from conftest.tiny_recipe_dict; the launcher lines before them run as their
single-process stand-ins so the run directory has what the next line needs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import types
import typing
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from pydantic import BaseModel

from conftest import tiny_recipe_dict
from lightpeft_dist.cli import main
from lightpeft_dist.config import Recipe

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
PACKAGE = "lightpeft_dist"


class NotRun(NamedTuple):
    why: str
    covered_by: tuple[str, ...]  # "tests/file.py::test_name" (or a file): where the behaviour is tested instead
    stand_in: str | None = None  # what the tiny README run runs in its place (single process, same run directory)


SLURM_WHY = "submits to Slurm; the test brings up a one-node Slurm on loopback and submits the same script"
# Every README command that this file does not run. A README command in neither place fails the tests; so does an
# entry here that the README no longer has.
NOT_RUN: dict[str, NotRun] = {
    "make demo": NotRun("builds .venv and runs the full demo (about 15 minutes on 2 CPU cores)",
                        ("tests/test_recipes.py::test_recipe_runs_a_few_steps_on_real_assets",
                         "tests/test_wheel.py::test_installed_demo_starts")),
    "make test": NotRun("is the test suite itself: CI runs exactly this", (".ci/run",)),
    "sbatch -N 2 --gpus-per-node 8 slurm/estimate.sbatch --config recipes/R.yaml --run-dir runs/r1 "
    "--deepspeed ds_configs/zero3.json":
        NotRun("2 nodes x 8 GPUs; CI has one CPU node: the test submits it with 2 CPU ranks, plain and ZeRO-3",
               ("tests/test_slurm.py::test_estimate_two_ranks_matches_one_process",)),
    "sbatch -n 2 slurm/estimate.sbatch --config recipes/R.yaml --run-dir runs/r1":
        NotRun(SLURM_WHY, ("tests/test_slurm.py::test_estimate_two_ranks_matches_one_process",)),
    "sbatch slurm/stage.sbatch plan,prune --run-dir runs/r1":
        NotRun(SLURM_WHY + " (pipeline.sh submits stage.sbatch plan,prune)",
               ("tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval",)),
    "sbatch -N 1 --gpus-per-node 8 slurm/train.sbatch --run-dir runs/r1":
        NotRun(SLURM_WHY + " (pipeline.sh submits train.sbatch, on CPU ranks)",
               ("tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval",)),
    "sbatch --gpus-per-node 1 slurm/stage.sbatch evaluate,report --run-dir runs/r1":
        NotRun(SLURM_WHY + " (pipeline.sh submits stage.sbatch evaluate; stage lists as plan,prune)",
               ("tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval",)),
    "sbatch slurm/stage.sbatch export --run-dir runs/r1":
        NotRun("no test submits stage.sbatch export; stage.sbatch is tested through pipeline.sh, the export stage "
               "on its own", ("tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval",
                              "tests/test_export.py::test_export_equals_pruned_model_with_adapter_in_a_fresh_process")),
    "slurm/pipeline.sh -N 2 --gpus-per-node 8 -p gpu -t 12:00:00 -- --config recipes/R.yaml --run-dir runs/r1":
        NotRun(SLURM_WHY + " (with -n 2 on CPU); a failing stage cancels the rest",
               ("tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval",
                "tests/test_slurm.py::test_pipeline_cancels_the_chain_when_a_stage_fails")),
    "squeue --me": NotRun("Slurm's own job list, for the user to watch; what it shows (a failed stage cancels the "
                          "later ones) is tested",
                          ("tests/test_slurm.py::test_pipeline_cancels_the_chain_when_a_stage_fails",)),
    "deepspeed --num_gpus N --module lightpeft_dist estimate --config recipes/R.yaml --run-dir runs/r1 "
    "--deepspeed ds_configs/zero3.json":
        NotRun("several ranks and minutes; the test launches it with --num_gpus 2 on CPU (gloo)",
               ("tests/test_deepspeed.py::test_two_rank_zero3_estimate_gives_the_single_process_plan",),
               stand_in="lightpeft estimate --config recipes/R.yaml --run-dir runs/r1"),
    "deepspeed --num_gpus N --module lightpeft_dist train --run-dir runs/r1 --deepspeed ds_configs/zero3.json":
        NotRun("several ranks; ZeRO-3 training is tested on 2 CPU ranks (torchrun), and `-m lightpeft_dist train` "
               "under torchrun by the Slurm pipeline",
               ("tests/test_deepspeed.py::test_zero3_training_on_two_ranks_matches_one_process_and_reloads",
                "tests/test_slurm.py::test_pipeline_chains_dependent_jobs_to_eval"),
               stand_in="lightpeft train --run-dir runs/r1"),
    "torchrun --nproc-per-node N -m lightpeft_dist run --config recipes/R.yaml --run-dir runs/r1 "
    "--deepspeed ds_configs/zero3.json":
        NotRun("several ranks; `run` on a process group (rank 0 alone for plan/prune/evaluate) is tested through the "
               "Ray launcher's --stage all, torchrun launches through the estimate tests",
               ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",
                "tests/test_deepspeed.py::test_two_ranks_without_deepspeed_average_gradients_like_one_process")),
    "deepspeed --hostfile hosts --master_addr HEAD --module lightpeft_dist estimate --config recipes/R.yaml "
    "--run-dir /shared/r1 --deepspeed ds_configs/zero3.json":
        NotRun("several machines; the test runs two nodes on loopback with --no_ssh --node_rank i",
               ("tests/test_multinode.py::test_deepspeed_hostfile_two_nodes",)),
    "torchrun --nnodes 2 --nproc-per-node 8 --node-rank I --rdzv-backend c10d --rdzv-endpoint HEAD:29500 "
    "-m lightpeft_dist estimate --config recipes/R.yaml --run-dir /shared/r1 --deepspeed ds_configs/zero3.json":
        NotRun("several machines; the test runs two nodes on loopback, one rank each",
               ("tests/test_multinode.py::test_torchrun_two_nodes_c10d_rendezvous",)),
    "source .venv/bin/activate":
        NotRun("shell set-up on each node; the test cluster starts from the test's own interpreter",
               ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",)),
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=...":
        NotRun("a placeholder token; the test cluster runs with token auth and a wrong token is refused",
               ("tests/test_ray.py::test_driver_errors_against_a_live_cluster_are_one_line",)),
    "ray start --head --port 6379 --dashboard-host 0.0.0.0 --dashboard-port 8265":
        NotRun("starts a Ray head; the test starts one on loopback (tests/ray_cluster.py)",
               ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",)),
    "ray start --address HEAD:6379":
        NotRun("joins a node; the test joins a second node on loopback",
               ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",)),
    "ray job submit --address http://HEAD:8265 --working-dir . -- python launchers/ray_train.py --config "
    "recipes/R.yaml --run-dir /shared/runs/r1 --num-workers 8 --deepspeed ds_configs/zero3.json "
    "[--stage estimate|train|all] [--section.key=value ...]":
        NotRun("needs a Ray cluster; the test submits it with --num-workers 2, a worker killed in one run",
               ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",
                "tests/test_ray.py::test_worker_killed_mid_estimation_is_replaced_and_resumes")),
    "ray job logs --follow JOB_ID": NotRun("Ray's own job CLI, for the user to watch",
                                           ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",)),
    "ray stop": NotRun("stops the Ray node; the test cluster stops its nodes at teardown",
                       ("tests/test_ray.py::test_job_submit_runs_the_pipeline_on_two_nodes",)),
}


# ------------------------------------------------------------------------------------------------------ parsing


def section(title: str) -> str:
    """The README text under `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def readme_commands() -> list[str]:
    """Every command of the README's ```bash blocks, in order: continuation lines joined, comments dropped,
    whitespace normalised (shell words joined by one space)."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = " ".join(shlex.split(pending + line, comments=True))
            pending = ""
            if command:
                out.append(command)
    return out


def is_synopsis(command: str) -> bool:
    """A usage line (placeholders such as D, R.yaml, [--flag F]) rather than a command to run as written."""
    return any(w.startswith("[") or re.fullmatch(r"[A-Z]+(\.yaml)?", w) for w in command.split())


def lightpeft_parts(command: str) -> list[list[str]] | None:
    """The argument lists of a `lightpeft ... [&& lightpeft ...]` line, else None."""
    parts = [shlex.split(p) for p in command.split("&&")]
    return [p[1:] for p in parts] if all(p and p[0] == "lightpeft" for p in parts) else None


def schema_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> set[str]:
    """Dotted keys of the recipe schema: a field whose type is a section (a pydantic model, optionally in a union)
    is walked into; every other field is one key."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        sub = _section_type(field.annotation)
        keys |= schema_keys(sub, f"{prefix}{name}.") if sub else {prefix + name}
    return keys


def _section_type(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is typing.Annotated:  # tagged union members (peft: one spec or a list)
        return _section_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return _section_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [t for t in map(_section_type, typing.get_args(annotation)) if t]
        return found[0] if found else None
    return None


def table_rows() -> list[tuple[list[str], list[str]]]:
    """(keys, defaults) for each row of the recipe table; the key cell must be backticked keys and commas only."""
    rows = []
    for line in section("Recipes").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] == "key" or set(cells[0]) <= set("-: "):
            continue
        assert re.fullmatch(r"`[^`]+`(\s*,\s*`[^`]+`)*", cells[0]), \
            f"recipe table row {cells[0]!r}: the first cell must list keys as `section.key`, separated by commas"
        rows.append((re.findall(r"`([^`]+)`", cells[0]), split_values(cells[1])))
    return rows


def split_values(cell: str) -> list[str]:
    """A defaults cell split on the commas outside backticks and brackets (`[o_proj, down_proj]` is one value)."""
    values, current, quoted, depth = [], "", False, 0
    for ch in cell:
        quoted ^= ch == "`"
        depth += (ch == "[") - (ch == "]") if not quoted else 0
        if ch == "," and not quoted and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    return [v for v in values + [current.strip()] if v]


# ------------------------------------------------------------------------------------------------ recipe table


def strategy_section_keys() -> set[str]:
    """Keys of every registered strategy's own section (`prunepeft.rounds`, ...): recipe keys too."""
    from lightpeft_dist.strategies.registry import STRATEGIES

    return {k for s in STRATEGIES.values() if s.section_model is not None
            for k in schema_keys(s.section_model, f"{s.section}.")}


def test_recipe_table_names_every_schema_key_once_and_nothing_else():
    documented = Counter(k for keys, _ in table_rows() for k in keys)
    schema = schema_keys() | strategy_section_keys()
    assert not (missing := sorted(schema - set(documented))), f"schema keys missing from README's table: {missing}"
    assert not (unknown := sorted(set(documented) - schema)), f"README's table names keys the schema lacks: {unknown}"
    assert not (twice := sorted(k for k, n in documented.items() if n > 1)), f"keys in several rows: {twice}"


def test_recipe_table_gives_one_default_per_key():
    for keys, defaults in table_rows():
        assert len(defaults) == len(keys), f"row {keys}: {len(keys)} keys but defaults {defaults}"


# ------------------------------------------------------------------------------------------------ shell commands


def test_every_readme_command_is_run_here_or_listed_as_not_run():
    commands = readme_commands()
    unaccounted = [c for c in commands if lightpeft_parts(c) is None and c not in NOT_RUN]
    assert not unaccounted, f"README commands neither run by tests/test_readme.py nor in its NOT_RUN: {unaccounted}"
    assert not (stale := sorted(set(NOT_RUN) - set(commands))), f"NOT_RUN lists commands the README lacks: {stale}"


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_not_run_commands_name_real_tests_and_files(command):
    for ref in NOT_RUN[command].covered_by:
        path, _, name = ref.partition("::")
        assert (REPO / path).is_file(), f"{command!r}: covering test file {path} does not exist"
        if name:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{command!r}: no {ref}"
    for word in re.split(r"[\s=]", command):
        if word.startswith(("slurm/", "ds_configs/", "launchers/", f"{PACKAGE}/", "tests/", "benchmarks/")):
            assert (REPO / word).exists(), f"{command!r} names {word}, which is not in the repository"


def test_help_lists_every_stage_and_the_readme_documents_each(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    stages = set(re.search(r"\{([a-z,]+)\}", capsys.readouterr().out).group(1).split(","))
    documented = {parts[0][0] for c in readme_commands() if (parts := lightpeft_parts(c)) and is_synopsis(c)}
    # demo is documented as `make demo`, whose recipe is `lightpeft demo` (test_make_targets_in_the_readme_exist)
    assert documented | {"demo"} == stages, f"CLI stages {sorted(stages)}, README synopsis {sorted(documented)}"


@pytest.mark.parametrize("command", [c for c in readme_commands() if lightpeft_parts(c) and is_synopsis(c)])
def test_readme_synopsis_flags_exist(command, capsys):
    (args,) = lightpeft_parts(command)
    with pytest.raises(SystemExit) as exit_:
        main([args[0], "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    flags = [w.strip("[]") for w in args if re.fullmatch(r"--[a-z][a-z0-9-]*", w.strip("[]"))]
    assert flags, command
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", help_text)]
    assert not missing, f"`lightpeft {args[0]} --help` lacks {missing}, which README's `{command}` uses"


def test_readme_run_dir_commands_run_on_a_tiny_run(tmp_path, monkeypatch):
    """The README's concrete `lightpeft` lines, run as written in a folder where recipes/R.yaml is a tiny recipe."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "R.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path)))
    ran = []
    for command in readme_commands():
        parts = lightpeft_parts(command)
        if parts is None and command in NOT_RUN and NOT_RUN[command].stand_in:
            parts = lightpeft_parts(NOT_RUN[command].stand_in)
        elif parts is None or is_synopsis(command):
            continue
        for args in parts:
            assert main(args) == 0, f"README's `{command}` failed (as `lightpeft {' '.join(args)}`)"
            ran.append(args[0])
    assert {"plan", "prune", "evaluate"} <= set(ran), ran
    assert (tmp_path / "runs" / "r1" / "eval.json").is_file()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_targets_in_the_readme_exist():
    """`make demo` and `make test` are not run here (see NOT_RUN); a dry run checks they exist and what they call."""
    for target, expect in (("demo", "lightpeft demo"), ("test", "pytest")):
        out = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and expect in out.stdout, (target, out.stdout, out.stderr)


# ------------------------------------------------------------------------------------------------------- layout


def layout_entries() -> tuple[list[str], list[str]]:
    """(top-level folders, entries under the package) named in the README's Layout block."""
    block = re.search(r"^```\n(.*?)^```", section("Layout"), re.S | re.M)
    assert block, "README's Layout section has no code block"
    top, inner = [], []
    for line in block.group(1).splitlines():
        if line.strip():
            (inner if line.startswith(" ") else top).append(line.split()[0])
    return top, inner


def _tracked_top_folders() -> set[str] | None:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f.split("/")[0] + "/" for f in files.splitlines() if "/" in f and not f.startswith(".")}


def test_layout_block_matches_the_tree():
    top, inner = layout_entries()
    assert f"{PACKAGE}/" in top
    for entry in top:
        assert entry.endswith("/") and (REPO / entry).is_dir(), f"Layout names {entry}, not a folder in the repo"
    for entry in inner:
        assert (REPO / PACKAGE / entry).exists(), f"Layout names {PACKAGE}/{entry}, which does not exist"
    package = REPO / PACKAGE
    actual = {p.name + "/" for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"
              and not p.name.endswith(".egg-info")}
    actual |= {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    assert not (unlisted := sorted(actual - set(inner))), f"{PACKAGE}/ entries missing from README's Layout: {unlisted}"
    tracked = _tracked_top_folders()
    if tracked is not None:
        assert not (unlisted := sorted(tracked - set(top))), f"repo folders missing from README's Layout: {unlisted}"
