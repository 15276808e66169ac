"""The source distribution is complete: every file of the repository is in it, and its tests run from it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    (archive,) = out.glob("anatcl_infer-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    (root,) = [p for p in out.iterdir() if p.is_dir()]
    return root


def test_sdist_holds_every_tracked_file(unpacked):
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    missing = [f for f in listed.stdout.splitlines() if f != ".gitignore" and not (unpacked / f).exists()]
    assert not missing, f"files missing from the sdist: {missing[:20]}"


def test_sdist_tests_run_from_the_unpacked_tree(unpacked):
    tests = ["tests/test_package.py::test_ci_runs_exactly_the_readme_test_command",
             "tests/test_layout.py", "tests/test_files.py"]
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=unpacked, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    code = "import anatcl_infer, sys; print(anatcl_infer.__file__)"
    where = subprocess.run([sys.executable, "-c", code], cwd=unpacked, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(unpacked)
