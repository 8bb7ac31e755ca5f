"""Which folder is a run directory, and which one process writes it now (docs/architecture.md, Guarantees).

`--run-dir D` names a folder we write into and replace parts of, so a typo or an empty shell variable must not turn
the user's own folder into one: a run directory carries a marker we wrote, a non-empty folder without one is refused
(unless everything in it is a run-directory artefact, as in run directories made before markers: those are adopted),
and only the stages that start a run may create one. Two processes writing one run directory would redo each other's
stages, so the writer holds an advisory lock (flock) on a file in it; the kernel drops the lock when the holder dies,
so a killed run leaves no stale lock, and the file names the holder for the next one's error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import LightPeftError
from .io_utils import check_replaceable, write_json
from .rundir import CHECKPOINT_RECORD, MANIFEST, RunDir
from .runtime import Runtime, current

log = logging.getLogger(__name__)
MARKER_FORMAT = 1


def run_dir_arg(raw: str | os.PathLike) -> Path:
    """`--run-dir` as given; an empty value (an unset shell variable) would mean the current directory."""
    if not str(raw).strip():
        raise LightPeftError("--run-dir is empty (an unset shell variable?); name the run directory, e.g. "
                             "--run-dir runs/my-run")
    return Path(raw)


def _names(run_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(run_dir))
    except OSError as exc:
        raise LightPeftError(f"cannot read run directory {run_dir}: {exc.strerror}") from None


def require_run(run_dir: Path) -> None:
    """Stages that continue a run need its folder, holding a run; creating it (or writing into an empty one) would
    hide a typo behind an empty result."""
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
    elif not RunDir(run_dir).marker.is_file() and all(n.startswith(".") for n in _names(run_dir)):
        what = "holds no run yet"
    else:
        return
    raise LightPeftError(f"run directory {run_dir} {what}; start a run there first (`lightpeft run --config R.yaml "
                         f"--run-dir {run_dir}`, or a strategy's first stage such as `estimate`)")


def _own_name(d: RunDir, name: str) -> bool:
    """A top-level name that we write: an artefact, a stage checkpoint, or the temporary sibling of either."""
    tmp = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)  # io_utils._tmp_sibling: .<name>.<random>.tmp
    base = tmp.group(1) if tmp else name
    return base in d.top_level_names() or d.is_checkpoint_name(base)


def _check_entry(d: RunDir, name: str) -> None:
    """A top-level artefact must be what we would write there. A folder that a stage replaces holds nothing we did
    not write (its manifest says what we wrote; one from before manifests must at least hold its stage record); no
    folder we write into is a link; where we write a file there is no folder."""
    path = d.root / name
    folders = d.replaced_folders()
    if name in folders or d.is_checkpoint_name(name):
        check_replaceable(path)
        record = folders.get(name, CHECKPOINT_RECORD)
        if not (path / MANIFEST).is_file() and any(path.iterdir()) and not (path / record).is_file():
            raise LightPeftError(f"{path} was not written by lightpeft (it has neither {MANIFEST} nor {record}); "
                                 "move it away, or use another --run-dir")
    elif name in (d.report.name, d.ray.name, d.live_models.name):  # folders we write into (live-* copies)
        if path.is_symlink():
            check_replaceable(path)
    elif name == d.baseline_lora.name:  # a run directory of its own: checked as one when the baseline stage opens it
        if path.is_symlink() or not path.is_dir():
            check_replaceable(path)
    elif name != d.logs.name and path.is_dir() and not path.is_symlink():
        raise LightPeftError(f"{path} is a folder where lightpeft writes a file; move it away and rerun")


def check_run_dir(run_dir: Path, create: bool) -> bool:
    """Refuse a folder that is not (and may not become) a run directory; True when it needs the marker written."""
    d = RunDir(run_dir)
    if not create:
        require_run(run_dir)
    elif not (run_dir.exists() or run_dir.is_symlink()):
        return True
    elif not run_dir.is_dir():
        raise LightPeftError(f"--run-dir {run_dir} is not a directory")
    names = _names(run_dir)
    marked = d.marker.is_file() and not d.marker.is_symlink()
    if not marked:
        foreign = [n for n in names if not _own_name(d, n)]
        if foreign:
            raise LightPeftError(f"{run_dir} holds {foreign[0]}{' and more' if len(foreign) > 1 else ''} but no "
                                 f"{d.marker.name}, so it is not a run directory and lightpeft will not write in it; "
                                 "use a new or empty folder for --run-dir")
    for name in names:
        if _own_name(d, name) and not name.startswith("."):
            _check_entry(d, name)
    return not marked


def _version() -> str:
    try:
        return importlib.metadata.version("lightpeft-dist")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH (slurm/_launch.sh, Ray's copy)
        return "unknown"


def _mark(run_dir: Path, adopted: bool) -> None:
    write_json(RunDir(run_dir).marker, {"format": MARKER_FORMAT, "written_by": f"lightpeft-dist {_version()}",
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
                                        "pid": os.getpid(), "adopted": adopted})
    if adopted:
        log.info("adopted %s as a run directory (it holds only run-directory artefacts)", run_dir)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"
    out = f"pid {pid} on {host} ({info.get('command', '?')}, since {info.get('since', '?')})"
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # the lock outlived the process: a child forked from it still holds the file
            out += f"; pid {pid} is gone, so a process it started holds the lock: stop that one"
        except PermissionError:
            pass
    return out


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str = "lightpeft") -> Iterator[None]:
    """Hold the run directory's lock for the block, or refuse naming the holder. The lock is an flock on
    `RunDir.lock`: released when the block ends or the process dies, however it dies."""
    path = RunDir(run_dir).lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise LightPeftError(f"cannot open the run directory's lock {path}: {exc.strerror}"
                             f"{' (it is a symbolic link; remove it)' if exc.errno == errno.ELOOP else ''}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LightPeftError(f"run directory {run_dir} is in use by {_holder(fd)}; wait for that run to end, "
                                 "or stop it, then rerun") from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
            log.warning("cannot lock %s (%s); not guarded against a second run in the same run directory", path,
                        exc.strerror)
            yield
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting it would let two processes lock two files)


@contextlib.contextmanager
def open_run_dir(run_dir: Path, create: bool, command: str = "lightpeft",
                 runtime: Runtime | None = None) -> Iterator[None]:
    """The one way an entry point starts writing a run directory: rank 0 checks it (creating and marking it when
    `create` allows), takes the lock and holds it for the block; every rank raises the same error if that fails,
    so no rank goes on to wait in a collective for a rank that stopped. Other ranks of the job take no lock."""
    rt = runtime or current()
    with contextlib.ExitStack() as stack:
        error = None
        if rt.is_main:
            try:
                unmarked = check_run_dir(run_dir, create)
                fresh = not run_dir.exists()
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise LightPeftError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
                stack.enter_context(run_lock(run_dir, command))
                d = RunDir(run_dir)
                if unmarked and not d.marker.is_file():
                    _mark(run_dir, adopted=not fresh and bool(set(_names(run_dir)) - {d.lock.name, d.logs.name}))
            except LightPeftError as exc:
                error = str(exc)
            except OSError as exc:  # unreadable or unwritable: the user's to fix, not a bug
                error = f"cannot use run directory {run_dir}: {exc}"
        errors = [e for e in rt.all_gather_object(error) if e]
        if errors:
            raise LightPeftError(str(errors[0]))
        yield
