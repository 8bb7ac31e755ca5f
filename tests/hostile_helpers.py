"""Shared checks of the hostile-input modules (issue 16): one snapshot of a tree of files, one check of a refusal.

test_hostile.py (classes 2, 3, 5, 8), test_hostile_plans.py (class 4) and test_hostile_rundir.py (classes 1, 6, 7)
compare a folder before and after a command with `tree`, and check what the command printed with `one_error`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightpeft_dist.rundir import RunDir

RUN_METADATA = frozenset({RunDir(".").marker.name, RunDir(".").lock.name})  # a run directory's own bookkeeping
RUN_LOCK = frozenset({RunDir(".").lock.name})  # rewritten with its own pid by every command that opens the run


def tree(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, object]:
    """Everything under `root`, links not followed: relative path -> the file's bytes, 'dir', or ('link', target).
    Entries whose file name is in `skip` (such as the run marker or lock) are left out."""
    out: dict[str, object] = {}
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs + [f for f in files if f not in skip]:
            p = Path(top) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def one_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one `error:` line on stderr (holding every needle), no traceback. Returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, err[-4000:])
    assert "Traceback" not in err, err[-4000:]
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]
