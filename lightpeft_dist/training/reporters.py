"""Metric logging (`logging.report_to`): TensorBoard event files under D/logs/<stage>/, and wandb when installed.

Why a hook: the loop already hands every step's numbers to `StepHooks.on_metrics` on every rank, so a reporter
needs no code in the loop and no stage has to know which sinks exist. Only rank 0 writes; the other ranks hold a
reporter without sinks, which still runs the collective `extras` (statistics that every rank must help gather,
such as ZeRO-3-partitioned masks) so that all ranks take part in the same collectives.

Steps are counted as optimizer steps taken (1-based), as the eval records count them. A resumed run opens its
writer with `purge_step` = the first step it will log again, so the steps logged between the last checkpoint and a
crash are hidden by TensorBoard (and by `read_scalars`) instead of appearing twice.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from ..runtime import Runtime
from .hooks import StepHooks

log = logging.getLogger(__name__)
SINKS = ("tensorboard", "wandb", "none")


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """wandb, offline unless WANDB_MODE says otherwise (these machines reach no tracking server)."""

    def __init__(self, log_dir: Path, name: str, config: dict[str, Any] | None):
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lightpeft"), name=name, dir=str(log_dir),
                              mode=os.environ.get("WANDB_MODE", "offline"), config=config, reinit=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


def open_sinks(report_to: Iterable[str], log_dir: Path, name: str, purge_step: int | None = None,
               config: dict[str, Any] | None = None) -> list:
    """The sinks `report_to` asks for; one that is not installed is left out with a warning, never an error."""
    sinks: list = []
    for kind in dict.fromkeys(report_to):
        try:
            if kind == "tensorboard":
                sinks.append(TensorBoardSink(log_dir, purge_step))
            elif kind == "wandb":
                sinks.append(WandbSink(log_dir, name, config))
        except ImportError as exc:
            log.warning("logging.report_to %s: %s is not installed (%s); not logging there", kind, kind, exc)
    return sinks


def wanted(report_to: Iterable[str]) -> bool:
    """Whether any sink is asked for (decided from the recipe, so every rank agrees)."""
    return any(k != "none" for k in report_to)


class Reporter(StepHooks):
    """Writes each step's metrics as `<prefix>/<name>` scalars; `extras()` adds more (called on every rank)."""

    def __init__(self, sinks: list, prefix: str, enabled: bool = True,
                 extras: Callable[[], dict[str, float]] | None = None):
        self.sinks, self.prefix, self.enabled, self.extras = sinks, prefix, enabled, extras

    def on_metrics(self, step: int, metrics: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        values = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items() if v is not None}
        if self.extras is not None:
            values.update({f"{self.prefix}/{k}": float(v) for k, v in self.extras().items()})
        self.log(values, step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars at `step` (optimizer steps taken); a no-op off rank 0."""
        for sink in self.sinks:
            sink.scalars(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def open_reporter(report_to: Iterable[str], log_dir: Path, stage: str, runtime: Runtime, start_step: int = 0,
                  config: dict[str, Any] | None = None,
                  extras: Callable[[], dict[str, float]] | None = None) -> Reporter:
    """A stage's reporter: sinks on rank 0 only; `start_step` > 0 (a resume) purges what was logged after it."""
    report_to = list(report_to)
    sinks = open_sinks(report_to, log_dir, f"{Path(log_dir).parent.parent.name}-{stage}",
                       purge_step=start_step + 1 if start_step else None, config=config) if runtime.is_main else []
    return Reporter(sinks, stage, enabled=wanted(report_to), extras=extras)


def log_once(report_to: Iterable[str], log_dir: Path, values: dict[str, float], step: int = 0) -> None:
    """Scalars from a single-process stage (the plan's kept counts, the final evaluation), written and closed."""
    sinks = open_sinks(list(report_to), log_dir, Path(log_dir).name)
    for sink in sinks:
        sink.scalars(values, step)
        sink.close()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under `log_dir`, as (step, value) in step order; {} when there are no
    event files or tensorboard is not installed. Purged steps (see the module doc) are already left out."""
    if not Path(log_dir).is_dir() or not any(Path(log_dir).glob("events.out.tfevents.*")):
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, list[tuple[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: float(e.value) for e in acc.Scalars(tag)}  # a repeated step keeps its last value
        out[tag] = sorted(by_step.items())
    return out
