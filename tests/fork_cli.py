"""`python -m lightpeft_dist ARGS` as a real child process, without paying the CLI's imports for every case.

Importing the pipeline (torch, transformers, peft) takes 10-20 s on a loaded 2-core machine, and the hostile-input tests
run a dozen short CLI cases that must each be a real process: its own exit code, its own stderr, and a traceback
there if an exception escapes. A multiprocessing forkserver imports the package once; every case is a fresh process
forked from it that runs the package's `__main__` through runpy, which is what `python -m` does, with fds 1 and 2
redirected to files. An exception that escapes `__main__` prints its traceback and exits 1, as the interpreter
would. The forkserver itself never runs torch code, so no thread pool is forked in a half-used state.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

PRELOAD = ["fork_cli", "lightpeft_dist.cli", "lightpeft_dist.pipeline.stages", "lightpeft_dist.strategies.lightpeft",
           "lightpeft_dist.pipeline.train", "lightpeft_dist.pipeline.evaluate", "lightpeft_dist.pipeline.export",
           "lightpeft_dist.pipeline.preflight", "peft"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _main(argv: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The child: `python -m lightpeft_dist *argv` in `cwd` with `env` added, stdout/stderr into files."""
    os.chdir(cwd)
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = [str(Path(sys.modules["lightpeft_dist"].__file__).parent / "__main__.py"), *argv]
    runpy.run_module("lightpeft_dist", run_name="__main__", alter_sys=True)


def run_cli(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the CLI in a forked child; returns its exit code (negative: killed by that signal) and its output."""
    with tempfile.TemporaryDirectory(prefix="fork_cli.") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _forkserver().Process(target=_main, args=(list(argv), str(cwd), dict(env or {}), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise TimeoutError(f"lightpeft {' '.join(argv)} ran past {timeout} s")
        read = lambda p: Path(p).read_text(errors="replace")  # noqa: E731
        return subprocess.CompletedProcess(list(argv), proc.exitcode, read(out), read(err))


def run_python_m(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """The same case as a plain `python -m lightpeft_dist` process, to check `run_cli` against."""
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "lightpeft_dist", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
