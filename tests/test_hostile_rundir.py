"""Hostile input (issue 16), classes 1, 6 and 7: the run directory's ownership, missing run directories, and
concurrency. Files we did not write are never touched, a stage on a missing run directory is an error that creates
nothing, and a second run on a locked run directory is refused naming the holder.

Every CLI case runs as its own process (real stderr, real exit code). Importing the pipeline costs ~10 s of CPU, so
the processes are forked from one server that imported it once; a fork is a fresh process all the same.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict
from hostile_helpers import one_error, tree
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import atomic_dir
from lightpeft_dist.ownership import open_run_dir
from lightpeft_dist.rundir import MANIFEST, RunDir
from lightpeft_dist.runtime import Runtime

OWN_REPO = Path(__file__).resolve().parent.parent
OWN_FEW = ["--estimate.steps=2", "--train.steps=2"]
OWN_SERVER = r"""
import json, os, sys, time, traceback
from pathlib import Path
import lightpeft_dist.pipeline.stages  # every stage module (torch, transformers, peft) once, before any fork
from lightpeft_dist.cli import main
from lightpeft_dist.ownership import run_lock
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    if "reap" in job:
        _, status = os.waitpid(job["reap"], 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            for fd, name in ((1, "out"), (2, "err")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            if job["argv"][0] == "hold-lock":  # a stand-in for a long run: holds the lock through the API
                with run_lock(Path(job["argv"][1]), "lightpeft run"):
                    print("locked", flush=True)
                    time.sleep(120)
            code = main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    if job["wait"]:
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
    else:
        print(json.dumps({"pid": pid}), flush=True)
"""


class OwnCli:
    """Runs `lightpeft ...` in a process forked from the server; returns (exit code, stdout, stderr)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen([sys.executable, "-c", OWN_SERVER], cwd=OWN_REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "ready" in self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the CLI server died"
        return json.loads(line)

    def _send(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def start(self, *argv: str, cwd: Path | None = None, wait: bool = True) -> tuple[dict, Path, Path]:
        self.n += 1
        out, err = self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"
        reply = self._send({"argv": [str(a) for a in argv], "cwd": str(cwd or self.logs), "out": str(out),
                            "err": str(err), "wait": wait})
        return reply, out, err

    def __call__(self, *argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
        reply, out, err = self.start(*argv, cwd=cwd)
        return reply["rc"], out.read_text(), err.read_text()

    def hold_lock(self, run_dir: Path) -> int:
        reply, out, _ = self.start("hold-lock", run_dir, wait=False)
        deadline = time.monotonic() + 60
        while not (out.is_file() and "locked" in out.read_text()):
            assert time.monotonic() < deadline, "the lock holder never took the lock"
            time.sleep(0.05)
        return reply["pid"]

    def reap(self, pid: int) -> int:
        return self._send({"reap": pid})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def own_cli(tmp_path_factory):
    cli = OwnCli(tmp_path_factory.mktemp("own_logs"))
    yield cli
    cli.close()


@pytest.fixture(scope="module")
def own_finished(own_cli, tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, finished run directory): the tiny recipe (conftest.tiny_recipe_dict) run end to end, 2 steps."""
    d = tmp_path_factory.mktemp("own_run")
    (d / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_dict(d)))
    rc, _, err = own_cli("run", "--config", d / "recipe.yaml", "--run-dir", d / "run", *OWN_FEW)
    assert rc == 0, err[-3000:]
    return d / "recipe.yaml", d / "run"


@pytest.fixture
def own_run(own_finished, tmp_path) -> Path:
    """A private copy of the finished run (links kept as links)."""
    shutil.copytree(own_finished[1], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def own_no_half_written(run: Path) -> None:
    """No temporary sibling is left, and every stage folder that exists holds its record (it was published whole)."""
    assert not [p for p in run.rglob("*.tmp")], sorted(run.rglob("*.tmp"))
    for folder, record in RunDir(run).replaced_folders().items():
        assert not (run / folder).exists() or (run / folder / record).is_file(), folder


def test_user_files_in_the_run_dir_or_a_stage_folder_are_never_touched(own_cli, own_finished, own_run, tmp_path):
    recipe, _ = own_finished
    mine = tmp_path / "mine"  # the user's own folder, given as --run-dir by mistake
    (mine / "train").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "train" / "data.jsonl").write_text('{"text": "mine"}\n')
    before = tree(mine)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", mine, *OWN_FEW)
    one_error(rc, err, str(mine), "notes.txt", "not a run directory")
    assert tree(mine) == before  # nothing written, not even a marker or a lock

    (mine / "notes.txt").unlink()  # only a folder named like a stage's: still not one that we wrote
    before = tree(mine)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", mine, *OWN_FEW)
    one_error(rc, err, str(mine / "train"), "not written by lightpeft")
    assert tree(mine) == before

    (own_run / "train" / "notes.txt").write_text("my notes on this run")  # inside a stage folder we wrote
    before = tree(own_run)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
    one_error(rc, err, str(own_run / "train" / "notes.txt"), "not written by lightpeft")
    assert tree(own_run) == before  # refused before any stage ran: train/ was not replaced
    own_no_half_written(own_run)


def test_a_foreign_file_that_appears_during_a_stage_stops_the_swap(tmp_path):
    out = tmp_path / "train"
    with atomic_dir(out) as tmp:
        (tmp / "train.json").write_text("{}")
    with pytest.raises(LightPeftError, match="notes.txt was not written by lightpeft"):
        with atomic_dir(out) as tmp:
            (tmp / "train.json").write_text('{"new": 1}')
            (out / "notes.txt").write_text("added while the stage ran")
    assert (out / "notes.txt").read_text() == "added while the stage ran" and (out / "train.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no temporaries left behind


@pytest.mark.parametrize("stage", ["run", "plan", "report"])
def test_empty_run_dir_is_refused(own_cli, own_finished, tmp_path, stage):
    (tmp_path / "notes.txt").write_text("the current directory is the user's")
    before = tree(tmp_path)
    config = ["--config", own_finished[0]] if stage == "run" else []
    rc, _, err = own_cli(stage, *config, "--run-dir", "", cwd=tmp_path)
    one_error(rc, err, "--run-dir is empty")
    assert tree(tmp_path) == before


def test_a_symlinked_stage_folder_or_run_dir_is_refused(own_cli, own_finished, own_run, tmp_path):
    recipe, _ = own_finished
    elsewhere = tmp_path / "elsewhere"  # the link's target: not ours, whatever it holds
    shutil.move(own_run / "train", elsewhere)
    (elsewhere / "notes.txt").write_text("mine")
    (own_run / "train").symlink_to(elsewhere, target_is_directory=True)
    before, target = tree(own_run), tree(elsewhere)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
    one_error(rc, err, str(own_run / "train"), "symbolic link")
    assert tree(own_run) == before and tree(elsewhere) == target
    own_no_half_written(own_run)

    link = tmp_path / "linked-run"  # a run directory that is a link leads to the user's folder
    link.symlink_to(elsewhere, target_is_directory=True)
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", link, *OWN_FEW)
    one_error(rc, err, "not a run directory")
    assert tree(elsewhere) == target


@pytest.mark.parametrize("stage", ["report", "plan", "prune"])
def test_a_stage_on_a_missing_run_dir_is_an_error_and_creates_nothing(own_cli, tmp_path, stage):
    rc, out, err = own_cli(stage, "--run-dir", tmp_path / "typo" / "run")
    one_error(rc, err, str(tmp_path / "typo" / "run"), "does not exist")
    assert list(tmp_path.iterdir()) == [] and "|" not in out  # no folder, no empty table

    (tmp_path / "empty").mkdir()  # an existing empty folder holds no run either
    rc, _, err = own_cli(stage, "--run-dir", tmp_path / "empty")
    one_error(rc, err, "holds no run yet")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_second_run_is_refused_naming_the_holder(own_cli, own_finished, own_run):
    recipe, _ = own_finished
    holder = own_cli.hold_lock(own_run)
    try:
        before = tree(own_run)
        rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, "--estimate.steps=2", "--train.steps=3")
        one_error(rc, err, f"in use by pid {holder} ", "lightpeft run")
        assert tree(own_run) == before  # not one stage redone or started
    finally:
        os.kill(holder, signal.SIGTERM)
        own_cli.reap(holder)


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(own_cli, own_run):
    holder = own_cli.hold_lock(own_run)
    os.kill(holder, signal.SIGKILL)
    assert own_cli.reap(holder) == -signal.SIGKILL
    assert json.loads(RunDir(own_run).lock.read_text())["pid"] == holder  # the dead holder's note is still there
    rc, _, err = own_cli("plan", "--run-dir", own_run)
    assert rc == 0, err[-3000:]
    assert json.loads(RunDir(own_run).lock.read_text())["pid"] != holder


def test_other_ranks_take_no_lock_and_share_rank_0s_verdict(own_cli, own_run, monkeypatch):
    """Under DeepSpeed, torchrun or Slurm only rank 0 checks and locks; every rank raises rank 0's error."""
    holder = own_cli.hold_lock(own_run)
    try:
        rank1 = Runtime(rank=1, world_size=2)
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: [None, obj])
        with open_run_dir(own_run, create=False, runtime=rank1):  # rank 1 of a job whose rank 0 holds the lock
            pass
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: ["rank 0 was refused", obj])
        with pytest.raises(LightPeftError, match="rank 0 was refused"):
            with open_run_dir(own_run, create=False, runtime=rank1):
                pass
        monkeypatch.setattr(Runtime, "all_gather_object", lambda self, obj: [obj, None])
        with pytest.raises(LightPeftError, match=f"in use by pid {holder} "):
            with open_run_dir(own_run, create=False, runtime=Runtime(rank=0, world_size=2)):
                pass
    finally:
        os.kill(holder, signal.SIGTERM)
        own_cli.reap(holder)


def test_a_run_dir_from_before_markers_is_adopted_and_resumes(own_cli, own_finished, own_run):
    recipe, _ = own_finished
    d = RunDir(own_run)
    d.marker.unlink()
    d.lock.unlink()
    for manifest in own_run.rglob(MANIFEST):
        manifest.unlink()
    (own_run / "train" / "notes.txt").write_text("an old train/ folder cannot prove what is ours")
    old_train = tree(own_run / "train")
    record = d.estimate_record.stat().st_mtime_ns
    rc, _, err = own_cli("run", "--config", recipe, "--run-dir", own_run, *OWN_FEW)
    assert rc == 0, err[-3000:]
    assert "stage train: up to date, skipped" in err and d.estimate_record.stat().st_mtime_ns == record
    assert json.loads(d.marker.read_text())["adopted"] is True

    rc, _, err = own_cli("train", "--run-dir", own_run, "--train.steps=3")
    assert rc == 0, err[-3000:]
    assert json.loads(d.train_record.read_text())["steps"] == 3 and (d.train / MANIFEST).is_file()
    kept = [p for p in own_run.iterdir() if p.name.startswith("train.kept-")]
    assert len(kept) == 1 and tree(kept[0]) == old_train  # moved aside whole, not deleted
    own_no_half_written(own_run)
