"""Ray Train driver: run the pipeline's stages on a Ray cluster, surviving lost workers.

    ray job submit --working-dir . -- python launchers/ray_train.py --config R.yaml --run-dir /shared/D \
        --num-workers N [--stage estimate|train|all] [--deepspeed ds_configs/zero3.json]

Why Ray: estimate and train are collective (every rank steps; rank 0 writes), and on a cluster of preemptible or flaky
nodes a lost rank must not throw the run away. The job is one `TorchTrainer` (Ray creates the torch process group,
gloo on CPU and nccl on GPU; DeepSpeed joins it inside each worker) with `FailureConfig(max_failures)`: when a worker
dies, Ray replaces the worker group and calls the stages again; finished stages are skipped by their recorded keys
and estimation and training resume from their last checkpoints (`estimate.checkpoint_every`,
`train.checkpoint_every`), which are also handed to `ray.train.report` (checkpoint.LISTENERS, whatever the stage) so
Ray keeps a copy under `run_dir/ray/`. Plan, prune, evaluate and report run on rank 0 inside
the same workers (the others wait), or, asked for alone with --stage, as one Ray task.

The run directory must be on storage that every node and the driver can reach (as Ray's own storage_path must be):
stages talk only through it. Wrong settings fail here, before anything is scheduled, with one `error:` line: the
driver runs the same input checks as `lightpeft run` (model files, data splits; pipeline/preflight.py). Where the
model and data are visible only to the workers, `--no-driver-preflight` skips that; rank 0 then runs the checks
before any stage, and the error still ends the job after one restart instead of `max_failures`.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a checkout or the copy `ray job submit --working-dir .` makes
    sys.path.insert(0, str(REPO))

from lightpeft_dist.cli import guarded, starts_a_run
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.io_utils import atomic_dir, write_json
from lightpeft_dist.ownership import open_run_dir, require_run, run_dir_arg
from lightpeft_dist.pipeline import stages as pipeline
from lightpeft_dist.pipeline.preflight import check_inputs
from lightpeft_dist.rundir import CHECKPOINT_RECORD, RunDir
from lightpeft_dist.training import checkpoint
from lightpeft_dist.training.zero import load_ds_config

log = logging.getLogger("lightpeft.ray")
IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by the job supervisor for the entrypoint


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="ray_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="recipe YAML (default: the run directory's recipe.yaml)")
    p.add_argument("--run-dir", required=True, help="absolute path on storage shared by all nodes")
    p.add_argument("--num-workers", type=int, default=1, help="ranks for estimate and train")
    p.add_argument("--stage", default="all", choices=["all", *pipeline.all_stages()])
    p.add_argument("--deepspeed", help="DeepSpeed config JSON for estimate/train, e.g. ds_configs/zero3.json "
                   "(read by the driver; workers read its copy in D/ray/)")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts per job (-1: unlimited)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"),
                   help="Ray cluster: GCS host:port, 'auto' (the one on this node), or 'local' (start a throw-away "
                   "one here); default $RAY_ADDRESS or auto")
    p.add_argument("--connect-timeout", type=float, default=15.0, help="seconds to wait for the head")
    p.add_argument("--collective-timeout", type=float, default=1800.0,
                   help="seconds a collective waits for a peer before the rank fails, so a hung rank ends the try "
                   "(Ray notices a dead one by itself); must exceed the longest prune/evaluate on rank 0")
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--placement", choices=["PACK", "SPREAD"], default="PACK",
                   help="PACK fills nodes in turn; SPREAD puts ranks on different nodes")
    p.add_argument("--no-driver-preflight", dest="driver_preflight", action="store_false",
                   help="skip the driver's input checks (model and data visible only to the workers); rank 0 "
                   "runs them before the first stage")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=")[0])]
    if bad:
        p.error(f"unrecognized arguments {bad}; recipe overrides look like --section.key=value")
    if args.num_workers < 1:
        p.error("--num-workers must be at least 1")
    return args, rest


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[lightpeft] %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_run_dir(raw: str) -> Path:
    run_dir = run_dir_arg(raw)
    if IN_RAY_JOB and not run_dir.is_absolute():
        raise LightPeftError(f"--run-dir {run_dir} is relative, but a Ray job runs in a temporary copy of its "
                             "--working-dir that disappears with the cluster; pass an absolute path on storage "
                             "every node can reach")
    return run_dir.resolve()


def check_batches(recipe, num_workers: int, stages: list) -> None:
    """The only per-world-size recipe constraint; checked here so Ray does not retry a user error."""
    for name in (s.name for s in stages if s.collective):
        cfg = getattr(recipe, name)
        if cfg.batch_size % (cfg.grad_accum * num_workers):
            raise LightPeftError(f"{name}.batch_size {cfg.batch_size} is not divisible by grad_accum x "
                                 f"--num-workers ({cfg.grad_accum} x {num_workers}); change one of them")


def connect(address: str, timeout: float) -> None:
    """ray.init, but an unreachable head or a wrong token is one error line after ~`timeout` s, not a retry loop."""
    os.environ.setdefault("RAY_NUM_REDIS_GET_RETRIES", str(max(1, int(timeout))))  # ~1 s apart; read at import
    try:
        import ray
    except ImportError:
        raise LightPeftError(f"ray is not installed for {sys.executable}; `pip install -e '.[ray]'`, and start "
                             "the cluster from that environment so jobs run its python") from None
    if address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except (OSError, ValueError) as exc:
            raise LightPeftError(f"cannot reach the Ray head at {address} ({exc}); start it with "
                                 "`ray start --head`, or fix --address / RAY_ADDRESS") from None
    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
        if "AuthenticationError" in f"{type(exc).__name__} {exc} {exc.__cause__}":
            raise LightPeftError(f"the Ray cluster at {address} rejected this client's token; export "
                                 "RAY_AUTH_MODE=token and the head's RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LightPeftError(f"cannot connect to Ray at {address}: {first}") from None


def check_resources(num_workers: int, cpus: float, use_gpu: bool) -> None:
    """A request the cluster can never satisfy would wait forever for resources; refuse it instead."""
    import ray

    total = ray.cluster_resources()
    need = {"CPU": num_workers * cpus, **({"GPU": float(num_workers)} if use_gpu else {})}
    for kind, amount in need.items():
        if total.get(kind, 0.0) < amount:
            raise LightPeftError(f"--num-workers {num_workers} needs {amount:g} {kind} but the cluster has "
                                 f"{total.get(kind, 0.0):g}; add nodes or lower --num-workers")


def _restore_from_ray(run_dir: Path) -> None:
    """After a restart, put Ray's latest checkpoint back if the run directory lost its own copy. Its folder name
    says which stage wrote it (`<stage>_step_NNNNNNN`, see `_report_checkpoint`)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    stage = Path(ckpt.path).name.rpartition("_step_")[0]
    target = RunDir(run_dir).checkpoint(stage)
    if not stage or (target / CHECKPOINT_RECORD).is_file():
        return
    with atomic_dir(target) as tmp:  # replaces only a folder we wrote, never through a link
        ckpt.to_directory(str(tmp))
    log.info("restored the %s checkpoint from Ray's copy %s", stage, ckpt.path)


def _report_checkpoint(path: Path, step: int) -> None:
    """A checkpoint listener (training.checkpoint): hand each stage checkpoint to Ray as well. Called on every
    rank, since ray.train.report is a barrier; only rank 0 has the files to give."""
    import ray.train

    from lightpeft_dist.runtime import current

    stage = path.name.removesuffix(".ckpt")
    ckpt = ray.train.Checkpoint.from_directory(str(path)) if current().is_main else None
    ray.train.report({"stage": stage, "step": step}, checkpoint=ckpt, checkpoint_dir_name=f"{stage}_step_{step:07d}")


def worker_loop(config: dict) -> None:
    """One rank of the job inside a Ray Train worker (the process group is already set up by Ray).

    Runs `config["stages"]` the way `lightpeft run` does: stages whose recorded key still matches are skipped (on
    every rank alike), so the call Ray repeats after a lost worker continues where the job was. Single-process stages
    run on rank 0 while the other ranks wait (pipeline.run_stage). A LightPeftError (bad input: the same on every try)
    is written to `user_error` before the rank fails; after the one restart this costs, every rank finds the file
    and returns, so the driver reports the error instead of Ray retrying it `max_failures` times.
    """
    from lightpeft_dist.runtime import current

    _setup_logging()
    os.environ["LIGHTPEFT_DIST_TIMEOUT_S"] = str(config["timeout_s"])
    recipe, run_dir, user_error = config["recipe"], Path(config["run_dir"]), Path(config["user_error"])
    rt = current()
    if user_error.is_file():
        return
    ds = config["deepspeed"]
    stages = [pipeline.stage_named(name, recipe) for name in config["stages"]]
    if _report_checkpoint not in checkpoint.LISTENERS:
        checkpoint.LISTENERS.append(_report_checkpoint)
    try:
        if rt.is_main:
            check_inputs(recipe, "all" if len(stages) > 1 else stages[0].name)
            _restore_from_ray(run_dir)
        rt.barrier()
        for stage in pipeline.pending(recipe, run_dir, stages, runtime=rt):
            t0 = time.time()
            pipeline.run_stage(stage.name, recipe, run_dir, deepspeed=ds, runtime=rt, stage=stage)
            log.info("stage %s done in %.1fs", stage.name, time.time() - t0)
    except LightPeftError as exc:
        user_error.parent.mkdir(parents=True, exist_ok=True)
        tmp = user_error.with_suffix(f".{rt.rank}.tmp")
        tmp.write_text(str(exc))
        os.replace(tmp, user_error)
        raise


def single_stage(stage: str, recipe, run_dir: str) -> None:
    _setup_logging()
    pipeline.run_stage(stage, recipe, Path(run_dir))


def run_collective(stages: list[str], recipe, run_dir: Path, args: argparse.Namespace, use_gpu: bool) -> None:
    """One TorchTrainer (one worker group, one start-up) for all of `stages`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    name = f"{'-'.join(stages) if len(stages) < 3 else 'all'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    user_error = run_dir / "ray" / name / "user_error.txt"
    ds = None
    if args.deepspeed:  # a copy next to Ray's records: workers on any node read it from the shared run dir
        ds = run_dir / "ray" / name / Path(args.deepspeed).name
        write_json(ds, load_ds_config(args.deepspeed))
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"stages": stages, "recipe": recipe, "run_dir": str(run_dir), "deepspeed": ds and str(ds),
                           "timeout_s": args.collective_timeout, "user_error": str(user_error)},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu, placement_strategy=args.placement,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(args.collective_timeout)),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError once max_failures is spent
        raise LightPeftError(user_error.read_text() if user_error.is_file() else
                             f"{name} failed on the Ray cluster after {args.max_failures} restart(s): "
                             f"{str(exc).strip().splitlines()[-1]}") from None
    if user_error.is_file():
        raise LightPeftError(user_error.read_text())


def run_single(stage: str, recipe, run_dir: Path, args: argparse.Namespace, use_gpu: bool) -> None:
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=max(args.max_failures, 0))(single_stage)
    try:
        ray.get(task.remote(stage, recipe, str(run_dir)))
    except Exception as exc:  # a RayTaskError; `.cause` is the stage's own exception
        cause = getattr(exc, "cause", exc)
        raise LightPeftError(str(cause) if isinstance(cause, LightPeftError) else
                             f"stage {stage} failed on the Ray cluster: {str(exc).strip().splitlines()[-1]}") from None


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    _setup_logging()
    return guarded(lambda: _run(args, overrides))


def _run(args: argparse.Namespace, overrides: list[str]) -> None:
    run_dir = check_run_dir(args.run_dir)
    creates = starts_a_run(args.stage)
    if not creates:
        require_run(run_dir)
    recipe = pipeline.resolve_recipe(run_dir, args.config, overrides)
    if args.deepspeed:
        load_ds_config(args.deepspeed)  # a missing or broken file is an error now, not on the workers
        args.deepspeed = str(Path(args.deepspeed).resolve())  # ray.init may change the working directory
    stages = pipeline.stages_for(recipe) if args.stage == "all" else [pipeline.stage_named(args.stage, recipe)]
    check_batches(recipe, args.num_workers, stages)
    if args.driver_preflight:
        check_inputs(recipe, "all" if args.stage == "all" else args.stage)  # before the cluster is even reached
    connect(args.address, args.connect_timeout)
    import ray

    use_gpu = {"yes": True, "no": False}.get(args.use_gpu, ray.cluster_resources().get("GPU", 0) >= 1)
    collective = any(s.collective for s in stages)
    check_resources(args.num_workers if collective else 1, args.cpus_per_worker, use_gpu)
    # The driver holds the run directory for the whole job; the workers are the same job and take no lock.
    with open_run_dir(run_dir, create=creates, command=f"ray_train.py --stage {args.stage}"):
        if args.stage == "all" or stages[0] is pipeline.strategy_for(recipe).stages[0]:
            pipeline.save_recipe(run_dir, recipe)
        log.info("Ray cluster %s: %s; %s on %d worker(s), gpu=%s", args.address,
                 {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}, args.stage,
                 args.num_workers, use_gpu)
        t0 = time.time()
        if collective:
            run_collective([s.name for s in stages], recipe, run_dir, args, use_gpu)
        else:
            run_single(args.stage, recipe, run_dir, args, use_gpu)
        log.info("%s done in %.1fs", args.stage, time.time() - t0)


if __name__ == "__main__":
    sys.exit(main())
