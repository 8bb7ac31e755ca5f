"""The Slurm scripts against a real one-node Slurm (slurmctld + slurmd + munged on loopback, see slurm_cluster.py).

Jobs are submitted exactly as a user would (`sbatch -n 2 slurm/estimate.sbatch --config R.yaml --run-dir D`, from
another directory, the log in the submit directory), and judged by what Slurm and the run directory say afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slurm():
    try:
        ensure_installed()
    except SlurmUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests for real: {exc}")
        pytest.skip(str(exc))
    cluster = SlurmCluster(cpus=2)
    try:
        cluster.start()
        if not (REPO / ".venv" / "bin" / "python").exists():  # the scripts' default interpreter
            cluster.env["LIGHTPEFT_PYTHON"] = sys.executable
        cluster.env["HF_HUB_OFFLINE"] = "1"
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def workdir(tmp_path, tiny_recipe):
    """A submit directory with the tiny recipe as tiny.yaml (what a user has in their checkout)."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe))
    return tmp_path


def submit(cluster: SlurmCluster, cwd: Path, *args: str, env: dict | None = None) -> str:
    r = cluster.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or cluster.env)
    return r.stdout.strip().split(";")[0]


def log_of(info: dict) -> str:
    path = Path(info["StdOut"])
    return path.read_text(errors="replace") if path.is_file() else f"(no log at {path})"


def finished(cluster: SlurmCluster, job: str, state: str = "COMPLETED") -> tuple[dict, str]:
    info = cluster.wait_job(job, JOB_TIMEOUT_S)
    text = log_of(info)
    errors = "\n".join(line for line in text.splitlines() if line.startswith(("error:", "[lightpeft-slurm]")))
    assert info["JobState"] == state, f"job {job} {info['JobState']} ({info['ExitCode']}):\n{errors}\n{text[-3000:]}"
    return info, text


def cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "lightpeft_dist", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def decisions(plan: dict) -> dict:
    """A plan without `key`, the hash of the scores file it came from (float sums differ in the last bits)."""
    return {k: v for k, v in plan.items() if k != "key"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "zero3"])
def test_estimate_two_ranks_matches_one_process(slurm, workdir, mode):
    extra = ["--deepspeed", str(REPO / "ds_configs" / "zero3.json")] if mode == "zero3" else []
    t0 = time.monotonic()
    job = submit(slurm, workdir, "-n", "2", str(SLURM / "estimate.sbatch"), "--config", "tiny.yaml",
                 "--run-dir", "two", *extra)
    info, log = finished(slurm, job)
    took = time.monotonic() - t0
    assert info["ExitCode"] == "0:0"
    assert Path(info["StdOut"]) == workdir / f"lightpeft-estimate-{job}.out"  # per-job log from #SBATCH
    assert "world size 2" in log and "rendezvous localhost:" in log, log[-3000:]
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log[-3000:]  # both ranks joined one process group
    assert json.loads((workdir / "two" / "estimate" / "estimate.json").read_text())["world_size"] == 2

    cli("plan", "--run-dir", "two", cwd=workdir)
    cli("estimate", "--config", "tiny.yaml", "--run-dir", "one", cwd=workdir)
    cli("plan", "--run-dir", "one", cwd=workdir)
    two = json.loads((workdir / "two" / "plan.json").read_text())
    one = json.loads((workdir / "one" / "plan.json").read_text())
    # Same recipe, same global batch: 2 ranks x half the batch with summed statistics must plan the same pruning.
    assert decisions(two) == decisions(one), {k: (one[k], two.get(k)) for k in one if one[k] != two.get(k)}
    print(f"2-rank {mode} estimate job took {took:.1f}s")


@pytest.mark.parametrize("args, env, message", [
    (["--run-dir", "nowhere"], {}, "error: no recipe: pass --config R.yaml"),
    (["--config", "missing.yaml", "--run-dir", "d"], {}, "error: recipe 'missing.yaml' not found"),
    (["--config", "tiny.yaml", "--run-dir", "d", "--estimate.stepz=3"], {}, "estimate.stepz: unknown key"),
    (["--config", "tiny.yaml"], {}, "error: no --run-dir"),
    # a CPU node asked to run one rank per GPU on 2 GPUs: the per-node check in srun must refuse
    (["--config", "tiny.yaml", "--run-dir", "d"], {"LIGHTPEFT_GPUS_PER_NODE": "2"},
     "2 GPUs per node requested but torch sees 0 CUDA devices"),
], ids=["no-recipe", "missing-recipe-file", "bad-recipe-key", "no-run-dir", "gpus-not-visible"])
def test_bad_submission_fails_fast_with_a_clear_message(slurm, workdir, args, env, message):
    t0 = time.monotonic()
    job = submit(slurm, workdir, "-n", "1", str(SLURM / "estimate.sbatch"), *args, env={**slurm.env, **env})
    info, log = finished(slurm, job, state="FAILED")
    took = time.monotonic() - t0
    assert message in log, log[-3000:]
    assert info["ExitCode"] != "0:0"
    assert took < 90, f"took {took:.0f}s to fail"
    assert not (workdir / "d" / "estimate").exists()


def wait_for_checkpoint(slurm, job: str, state: Path) -> None:
    """Until the stage's first checkpoint is written; the file is polled often and the (slower) scontrol seldom, so
    the signal sent next lands while the job is still running."""
    deadline, polls = time.monotonic() + JOB_TIMEOUT_S, 0
    while not state.is_file():
        assert time.monotonic() < deadline, f"no checkpoint {state} within the job timeout"
        if polls % 20 == 0:
            assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), log_of(slurm.job(job))[-3000:]
        polls += 1
        time.sleep(0.05)


@pytest.mark.slow
def test_requeued_estimate_resumes_from_its_checkpoint(slurm, workdir, tiny_recipe):
    """USR1 (what `--signal=B:USR1@300` sends before the time limit) after a checkpoint: requeue, rerun, resume."""
    # Long enough that the signal lands mid-run on a fast machine too (CI ran 80 steps in about 1 s): the run must
    # still be going when USR1 arrives, or there is nothing to requeue.
    tiny_recipe["estimate"].update(steps=1200, checkpoint_every=20)
    (workdir / "long.yaml").write_text(yaml.safe_dump(tiny_recipe))
    t0 = time.monotonic()
    job = submit(slurm, workdir, "-n", "1", str(SLURM / "estimate.sbatch"), "--config", "long.yaml", "--run-dir", "rq")
    state = workdir / "rq" / "estimate.ckpt" / "state.json"
    wait_for_checkpoint(slurm, job, state)
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    info, log = finished(slurm, job)
    assert info["Restarts"] == "1", info
    assert "requeueing job" in log and "restart 1" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed estimation from" in line]
    assert resumed and " after step 0 " not in resumed[0], log[-3000:]
    assert json.loads((workdir / "rq" / "estimate" / "estimate.json").read_text())["key"]
    print(f"requeue + resume took {time.monotonic() - t0:.1f}s; {resumed[0]}")


@pytest.mark.slow
def test_requeued_training_resumes_from_its_checkpoint(slurm, workdir, tiny_recipe):
    """The same for the train stage: USR1 after a train checkpoint requeues the job, and the rerun continues
    training from that checkpoint, not from step 0."""
    tiny_recipe["train"].update(steps=1200, checkpoint_every=20)
    (workdir / "long.yaml").write_text(yaml.safe_dump(tiny_recipe))
    for stage in ("estimate", "plan", "prune"):
        cli(stage, "--config", "long.yaml", "--run-dir", "rt", cwd=workdir)
    t0 = time.monotonic()
    job = submit(slurm, workdir, "-n", "1", str(SLURM / "train.sbatch"), "--run-dir", "rt")
    state = workdir / "rt" / "train.ckpt" / "state.json"
    wait_for_checkpoint(slurm, job, state)
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    info, log = finished(slurm, job)
    assert info["Restarts"] == "1", info
    assert "requeueing job" in log and "restart 1" in log and "train.ckpt" in log, log[-3000:]
    resumed = [line for line in log.splitlines() if "resumed training from" in line]
    assert resumed and " after step 0 " not in resumed[0], log[-3000:]
    record = json.loads((workdir / "rt" / "train" / "train.json").read_text())
    assert record["resumed_from_step"] > 0 and len(record["losses"]) == 1200
    assert not (workdir / "rt" / "train.ckpt").exists()
    print(f"train requeue + resume took {time.monotonic() - t0:.1f}s; {resumed[0]}")


def rank_pid(job: str, rank: int) -> int | None:
    """The pid of the CLI process that runs `rank` of `job` (from its environment, as torchrun set it)."""
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(kv.split("=", 1) for kv in env_file.read_bytes().decode(errors="replace").split("\0") if "=" in kv)
            cmd = (env_file.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("RANK") == str(rank) and "-m lightpeft_dist" in cmd:
            return int(env_file.parent.name)
    return None


@pytest.mark.slow
def test_a_hung_rank_ends_the_job_within_the_collective_timeout(slurm, workdir, tiny_recipe):
    """Freeze rank 1 mid-run (SIGSTOP: alive but silent, the worst case): rank 0's next collective must time out
    after LIGHTPEFT_DIST_TIMEOUT_S and the whole job must end FAILED instead of hanging."""
    tiny_recipe["estimate"].update(steps=5000)
    (workdir / "long.yaml").write_text(yaml.safe_dump(tiny_recipe))
    env = {**slurm.env, "LIGHTPEFT_DIST_TIMEOUT_S": "15"}
    job = submit(slurm, workdir, "-n", "2", str(SLURM / "estimate.sbatch"), "--config", "long.yaml",
                 "--run-dir", "hang", env=env)
    deadline, pid = time.monotonic() + JOB_TIMEOUT_S, None
    while pid is None or "estimate:" not in log_of(slurm.job(job)):  # both ranks are stepping
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), \
            log_of(slurm.job(job))[-3000:]
        pid = rank_pid(job, 1)
        time.sleep(0.5)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        info = slurm.wait_job(job, 180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    took = time.monotonic() - t0
    log = log_of(info)
    assert info["JobState"] == "FAILED", (info["JobState"], log[-3000:])
    assert "collective timeout 15s" in log and "timed out" in log.lower(), log[-3000:]
    assert took < 120, f"the job took {took:.0f}s to end after rank 1 froze"
    print(f"job ended {took:.1f}s after rank 1 froze (timeout 15s)")


@pytest.mark.slow
def test_pipeline_chains_dependent_jobs_to_eval(slurm, workdir):
    t0 = time.monotonic()
    r = slurm.run([str(SLURM / "pipeline.sh"), "-n", "2", "--", "--config", "tiny.yaml", "--run-dir", "run"],
                  cwd=workdir)
    jobs = dict(line.split() for line in r.stdout.strip().splitlines())
    assert list(jobs) == ["estimate", "prune", "train", "evaluate"]
    assert slurm.job(jobs["train"])["Dependency"] in (f"afterok:{jobs['prune']}(unfulfilled)",
                                                      f"afterok:{jobs['prune']}")
    for stage, job in jobs.items():
        info, _ = finished(slurm, job)
        assert info["ExitCode"] == "0:0", stage
    print(f"pipeline (4 jobs) took {time.monotonic() - t0:.1f}s")
    run = workdir / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["key"] and "pruned" in json.dumps(ev)
    assert (run / "plan.json").is_file() and (run / "pruned_model" / "config.json").is_file()
    logs = sorted(p.name for p in (run / "logs").glob("*.out"))  # beside them: the stages' metric logs (folders)
    assert logs == sorted(f"lightpeft-{s}-{j}.out" for s, j in jobs.items())
    starts = [slurm.job(j)["StartTime"] for j in jobs.values()]
    ends = [slurm.job(j)["EndTime"] for j in jobs.values()]
    assert all(ends[i] <= starts[i + 1] for i in range(3)), (starts, ends)  # each waited for the one before


def test_pipeline_cancels_the_chain_when_a_stage_fails(slurm, workdir):
    r = slurm.run([str(SLURM / "pipeline.sh"), "-n", "1", "--", "--config", "tiny.yaml", "--run-dir", "bad",
                   "--estimate.lr=-1x"], cwd=workdir)
    jobs = dict(line.split() for line in r.stdout.strip().splitlines())
    finished(slurm, jobs["estimate"], state="FAILED")
    for stage in ("prune", "train", "evaluate"):  # cancelled, not pending forever
        assert slurm.wait_job(jobs[stage], 60)["JobState"] == "CANCELLED", stage


def test_pipeline_refuses_at_the_terminal_without_a_recipe(slurm, workdir):
    r = slurm.run([str(SLURM / "pipeline.sh"), "-n", "2", "--", "--run-dir", "empty"], cwd=workdir, check=False)
    assert r.returncode == 2 and "error: no recipe" in r.stderr
    assert slurm.run(["squeue", "-h"]).stdout.strip() == ""  # nothing was queued


STUB_SBATCH = """#!/bin/bash
n=$(( $(cat "$STUB_DIR/n" 2>/dev/null || echo 100) + 1 )); echo $n > "$STUB_DIR/n"
echo "$*" >> "$STUB_DIR/calls"
echo "$n;cluster"
"""


@pytest.mark.parametrize("strategy,first", [("lightpeft", "estimate"), ("apt", "calibrate")])
def test_pipeline_walks_the_strategys_stages(tmp_path, tiny_recipe, strategy, first):
    """Without Slurm (a stub sbatch that records its arguments): the chain starts with the recipe's strategy's own
    stages, as `lightpeft run` does (APT: calibrate on the allocation, then its plan with prune as one job)."""
    if strategy == "apt":
        tiny_recipe.pop("estimate"), tiny_recipe.pop("prune")
        tiny_recipe.update(strategy="apt", apt={"calibration_samples": 4})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))
    stub = tmp_path / "bin" / "sbatch"
    stub.parent.mkdir()
    stub.write_text(STUB_SBATCH)
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path),
           "LIGHTPEFT_PYTHON": sys.executable}
    r = subprocess.run([str(SLURM / "pipeline.sh"), "-n", "2", "--", "--config", "r.yaml", "--run-dir", "run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = dict(line.split() for line in r.stdout.strip().splitlines())
    assert list(jobs) == [first, "prune", "train", "evaluate"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert f"--job-name=lightpeft-{first} " in calls[0] and f"estimate.sbatch {first} --config r.yaml" in calls[0]
    assert "-n 2" in calls[0] and "-n 2" in calls[2] and "stage.sbatch plan,prune" in calls[1]
    assert all(f"--dependency=afterok:{jobs[a]}" in calls[i + 1] for i, a in enumerate(list(jobs)[:-1]))
