"""The built wheel carries what the installed package needs, read from outside the source tree."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    (path,) = out.glob("anatcl_infer-*.whl")
    return path


def test_wheel_carries_the_weights_folder_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("anatcl_infer/weights/published/manifest.json",
                   "anatcl_infer/weights/published/cards/anatcl-global.md",
                   "anatcl_infer/weights/published/cards/anatcl-local.md",
                   "anatcl_infer/inputs/data/mni152_gm_1p5mm.nii.gz",
                   "anatcl_infer/inputs/data/mni152_t1_3mm.nii.gz",
                   "anatcl_infer/qc/templates/report.html.j2"):
        assert needed in names, needed
    source = json.loads((ROOT / "weights" / "manifest.json").read_text())
    packed = json.loads(zipfile.ZipFile(wheel).read("anatcl_infer/weights/published/manifest.json"))
    assert packed == source


def test_installed_wheel_loads_the_manifest_outside_the_source_tree(wheel, tmp_path):
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import anatcl_infer, pathlib, sys\n"
        "from anatcl_infer.weights import registry\n"
        "d = registry.published_dir()\n"
        "assert 'site-packages' in str(d), d\n"
        "assert pathlib.Path(anatcl_infer.__file__).resolve().is_relative_to(pathlib.Path(sys.prefix).resolve())\n"
        "print(sorted(registry.load_manifest()['models']))\n"
        "print(registry.model_card('anatcl-global').splitlines()[1])\n"
    )
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['anatcl-global', 'anatcl-local']", "library_name: anatcl-infer"]
