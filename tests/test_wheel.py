"""An installed wheel, with no source tree in sight, runs `lightpeft demo` on its shipped recipe.

The demo recipe once lived only in the checkout's `recipes/`, which the wheel did not contain, so `lightpeft demo`
worked from a source checkout and nowhere else. Every other test imports the package from the checkout (editable
install or the working directory), so only a real build-install-run catches that class of bug: files the code reads
at run time that the wheel does not ship.

Offline by construction: the wheel is built with the running interpreter's setuptools (--no-build-isolation), and the
throw-away venv reaches torch, transformers and the asset packages through a `.pth` line naming this interpreter's
site-packages. A plain path line adds that folder without running the `.pth` files inside it, so the editable
install's import hook (which would map `lightpeft_dist` back to the checkout) stays inactive, and the wheel's copy in
the venv's own site-packages, which comes first on sys.path, is the one imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# What a fresh clone would not have: build outputs and local state. The copy keeps the build from writing build/
# and *.egg-info into the checkout, where parallel runs of this test would collide.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "__pycache__", "*.egg-info",
                                    ".pytest_cache", ".cache", "*.pyc")

CHECK_INSTALLED = """
import sys
from importlib import resources
from pathlib import Path

import lightpeft_dist
from lightpeft_dist.assets import EMBEDDED_NAMES
from lightpeft_dist.cli import DEMO_RECIPE
from lightpeft_dist.config import load_recipe

venv = Path(sys.prefix).resolve()
assert Path(lightpeft_dist.__file__).resolve().is_relative_to(venv), lightpeft_dist.__file__
with resources.as_file(DEMO_RECIPE) as path:
    assert Path(path).resolve().is_relative_to(venv), path
    recipe = load_recipe(path)
names = [recipe.model.path, recipe.data.train_file, recipe.data.eval_file, recipe.data.test_file]
assert all(n in EMBEDDED_NAMES for n in names), names  # nothing in the recipe points into a source tree
print("ok", path)
"""


def _venv_bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(venv, environment, working directory outside the checkout) with the freshly built wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    py = sys.executable
    subprocess.run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("lightpeft_dist-*.whl")
    venv = tmp / "venv"
    subprocess.run([py, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(_venv_bin(venv, "python")), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_host_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "--python", str(_venv_bin(venv, "python")), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return venv, env, cwd


def test_wheel_ships_the_demo_recipe(installed):
    venv, env, cwd = installed
    out = subprocess.run([str(_venv_bin(venv, "python")), "-c", CHECK_INSTALLED], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "site-packages" in out.stdout and "smollm2_sentiment.yaml" in out.stdout


def test_installed_cli_runs_demo_help(installed):
    venv, env, cwd = installed
    out = subprocess.run([str(_venv_bin(venv, "lightpeft")), "demo", "--help"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage: lightpeft demo" in out.stdout


def test_installed_demo_starts(installed):
    """The demo gets past its recipe into the pipeline (run_all writes D/recipe.yaml first); then it is stopped, as
    the whole run takes minutes (tests/test_recipes.py runs that recipe through every stage, from the checkout)."""
    venv, env, cwd = installed
    run = cwd / "demo_run"
    proc = subprocess.Popen([str(_venv_bin(venv, "lightpeft")), "demo", "--run-dir", str(run),
                             "--estimate.steps=1"], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "recipe.yaml").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        started = (run / "recipe.yaml").is_file()
    finally:
        # SIGINT, not SIGTERM: a KeyboardInterrupt unwinds atomic_dir, so a first-run asset conversion cut short
        # leaves no temporary folder in the asset cache
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
    assert started, f"demo never wrote its recipe (exit {proc.returncode}): {err[-3000:]}"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["model"]["path"] == "embedded:smollm2" and saved["estimate"]["steps"] == 1
