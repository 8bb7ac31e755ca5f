"""launchers/ray_train.py on a real two-node Ray cluster (head + `ray start --address`, this machine, token auth).

What is checked: the pipeline submitted with `ray job submit --working-dir .` runs to the end on 2 workers (one per
node, DeepSpeed ZeRO-3 inside each) and plans what a run without Ray plans; a worker process SIGKILLed
mid-estimation is replaced and the job resumes from its last checkpoint (not from step 0) and ends with the same plan;
bad settings (no recipe, unreachable head, wrong token, more workers than CPUs) end in one `error:` line, fast.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import tiny_recipe_dict
from ray_cluster import REPO, free_port, local_cluster

LAUNCHER = str(REPO / "launchers" / "ray_train.py")
DEEPSPEED = "ds_configs/zero3.json"  # relative: the driver reads it from the job's copy of the working dir
JOB_TIMEOUT = 400
STEPS, CHECKPOINT_EVERY = 60, 4  # the kill lands after the first checkpoint, well before the end, on fast machines too

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray_recipe")
    raw = tiny_recipe_dict(d)
    # LoRA dropout 0: every rank draws its dropout masks from the same per-step seed, so with dropout N ranks do
    # not reproduce one process's masks (a core-loop matter, not Ray's)
    raw["peft"]["dropout"] = 0.0
    raw["estimate"].update(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY)
    raw["train"].update(steps=4, checkpoint_every=2)  # one train checkpoint (after step 2), handed to Ray as well
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(head_cpus=2, worker_cpus=1) as c:
        yield c


def _launch(run_dir: Path, recipe: Path, *extra: str) -> list[str]:
    return ["python", "launchers/ray_train.py", "--config", str(recipe), "--run-dir", str(run_dir),
            "--num-workers", "2", "--placement", "SPREAD", "--deepspeed", DEEPSPEED, *extra]


def _plan(run_dir: Path) -> dict:
    plan = json.loads((run_dir / "plan.json").read_text())
    return {"layers": plan["layers"], "peft_modules": plan["peft_modules"]}


def _driver(args: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, LAUNCHER, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> dict:
    """The plan of a plain single-process run of the same recipe (no Ray, no DeepSpeed)."""
    from lightpeft_dist.cli import main

    run_dir = tmp_path_factory.mktemp("ray_ref") / "run"
    assert main(["estimate", "--config", str(recipe), "--run-dir", str(run_dir)]) == 0
    assert main(["plan", "--run-dir", str(run_dir)]) == 0
    return _plan(run_dir)


@pytest.fixture(scope="module")
def uninterrupted(cluster, recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ray_full") / "run"
    t0 = time.monotonic()
    job = cluster.submit(_launch(run_dir, recipe, "--stage", "all"), timeout=JOB_TIMEOUT)
    return run_dir, job, time.monotonic() - t0


def test_job_submit_runs_the_pipeline_on_two_nodes(uninterrupted, reference):
    run_dir, job, seconds = uninterrupted
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    for out in ("estimate/scores.safetensors", "estimate/adapter/adapter_config.json", "plan.json",
                "pruned_model/config.json", "pruned_adapter/adapter_config.json", "train/train.json", "eval.json",
                "report/summary.md"):
        assert (run_dir / out).is_file(), f"{out} missing after the Ray job ({seconds:.0f}s)"
    record = json.loads((run_dir / "estimate" / "estimate.json").read_text())
    assert record["world_size"] == 2 and record["resumed_from_step"] == 0
    assert json.loads((run_dir / "train" / "train.json").read_text())["world_size"] == 2
    assert not (run_dir / "estimate.ckpt").exists()  # removed once the estimate is written
    # checkpoint.LISTENERS hands every stage's checkpoints to ray.train.report (folders <stage>_step_N); Ray keeps the
    # latest, the train stage's
    assert list((run_dir / "ray").glob("*/train_step_0000001")), "no train checkpoint reached Ray via ray.train.report"
    assert not (run_dir / "train.ckpt").exists()
    assert _plan(run_dir) == reference, "2 Ray workers planned differently from one plain process"


def _train_workers(cluster, since: float) -> dict[int, list[psutil.Process]]:
    """Ray Train worker processes started after `since`, by the index of the node (ray start process) they run on."""
    out: dict[int, list[psutil.Process]] = {}
    for i, node in enumerate(cluster.procs):
        for p in psutil.Process(node.pid).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()) and p.create_time() >= since:
                    out.setdefault(i, []).append(p)
            except psutil.NoSuchProcess:
                pass
    return out


def test_worker_killed_mid_estimation_is_replaced_and_resumes(cluster, recipe, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    started = time.time()
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard_url,
             "--working-dir", str(REPO), "--", *_launch(run_dir, recipe, "--stage", "estimate")],
            env=cluster.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            state = run_dir / "estimate.ckpt" / "state.json"
            deadline = time.monotonic() + JOB_TIMEOUT
            while not state.is_file() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert state.is_file(), "no estimation checkpoint appeared\n" + log_path.read_text()[-4000:]
            killed_after = json.loads(state.read_text())["step"]
            workers = _train_workers(cluster, started)
            assert sorted(workers) == [0, 1] and all(len(v) == 1 for v in workers.values()), \
                f"expected one train worker per node, got {workers}"
            victim = workers[1][0]  # the rank on the second node
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            rc = job.wait(timeout=JOB_TIMEOUT)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = log_path.read_text()
    assert rc == 0, text[-6000:]
    assert "RETRY" in text, "Ray never noticed the lost worker"
    record = json.loads((run_dir / "estimate" / "estimate.json").read_text())
    assert record["resumed_from_step"] > 0, "the replacement workers started over instead of resuming"
    assert record["resumed_from_step"] >= killed_after + 1
    assert subprocess.run([sys.executable, "-m", "lightpeft_dist", "plan", "--run-dir", str(run_dir)],
                          capture_output=True, timeout=300, cwd=REPO, check=False).returncode == 0
    full_dir, full_job, _ = uninterrupted
    assert full_job.returncode == 0
    assert _plan(run_dir) == _plan(full_dir), "the interrupted run planned differently from the uninterrupted one"


def test_error_only_the_workers_see_ends_the_job_without_max_failures_retries(cluster, recipe, tmp_path):
    """With the driver's checks off (inputs only the workers see), a bad model path is found by rank 0's preflight;
    its one-line error must end the job after one restart."""
    job = cluster.submit(["python", "launchers/ray_train.py", "--config", str(recipe), "--run-dir",
                          str(tmp_path / "run"), "--num-workers", "1", "--stage", "estimate", "--max-failures", "3",
                          "--no-driver-preflight", "--model.path=/nonexistent/model"], timeout=JOB_TIMEOUT)
    out = job.stdout + job.stderr
    assert job.returncode != 0, out[-4000:]
    errors = {line for line in out.splitlines() if line.startswith("error: ")}  # `ray job submit` echoes the log
    assert len(errors) == 1 and "/nonexistent/model" in errors.pop(), out[-4000:]
    assert "Error count: 1 (max allowed: 3)" in out and "Error count: 2" not in out
    assert not (tmp_path / "run" / "estimate").exists()


def test_missing_recipe_and_unreachable_head_fail_fast(recipe, tmp_path):
    t0 = time.monotonic()
    no_recipe = _driver(["--run-dir", str(tmp_path / "empty")])
    assert no_recipe.returncode == 2
    assert no_recipe.stderr.strip().splitlines()[-1].startswith("error: no recipe in")

    port = free_port()  # nothing listens there
    no_head = _driver(["--config", str(recipe), "--run-dir", str(tmp_path / "d"), "--address",
                       f"127.0.0.1:{port}", "--connect-timeout", "3"])
    assert no_head.returncode == 2, no_head.stderr[-2000:]
    assert f"error: cannot reach the Ray head at 127.0.0.1:{port}" in no_head.stderr
    assert time.monotonic() - t0 < 150
    assert not (tmp_path / "d").exists()  # nothing written before the cluster was reached


def test_driver_errors_against_a_live_cluster_are_one_line(cluster, recipe, tmp_path):
    bad_model = _driver(["--config", str(recipe), "--run-dir", str(tmp_path / "m"), "--address", cluster.gcs_address,
                         "--model.path=/nonexistent/model"], env=cluster.env)
    assert bad_model.returncode == 2, bad_model.stderr[-2000:]
    last = bad_model.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/model" in last
    assert not (tmp_path / "m").exists()  # refused by the driver's preflight, before anything was written
    too_many = _driver(["--config", str(recipe), "--run-dir", str(tmp_path / "d"), "--address", cluster.gcs_address,
                        "--num-workers", "4"], env=cluster.env)
    assert too_many.returncode == 2, too_many.stderr[-2000:]
    assert too_many.stderr.strip().splitlines()[-1] == \
        "error: --num-workers 4 needs 4 CPU but the cluster has 3; add nodes or lower --num-workers"

    bad_env = {**cluster.env, "RAY_AUTH_TOKEN": "0" * 32}
    t0 = time.monotonic()
    bad_token = _driver(["--config", str(recipe), "--run-dir", str(tmp_path / "d"), "--address", cluster.gcs_address,
                         "--connect-timeout", "3"], env=bad_env)
    assert bad_token.returncode == 2
    assert "rejected this client's token" in bad_token.stderr.strip().splitlines()[-1]
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "d").exists()

    # a single-process stage runs as a Ray task; its own error comes back as the one line
    no_estimate = _driver(["--config", str(recipe), "--run-dir", str(tmp_path / "d"), "--address",
                           cluster.gcs_address, "--stage", "plan"], env=cluster.env)
    assert no_estimate.returncode == 2, no_estimate.stderr[-2000:]
    last = no_estimate.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: run directory {tmp_path / 'd'} does not exist")  # plan continues a run
    assert not (tmp_path / "d").exists()
