"""Package-level promises: a cheap import, a complete public surface, one exception hierarchy, CI = README."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap():
    code = (
        "import sys, anatcl_infer\n"
        "heavy = [m for m in ('torch', 'pandas', 'typer', 'nibabel', 'scipy', 'sklearn', 'huggingface_hub', "
        "'matplotlib', 'anatcl_infer.training') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_names_resolve_and_are_documented():
    import anatcl_infer

    for name in anatcl_infer.__all__:
        obj = getattr(anatcl_infer, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_every_error_derives_from_the_package_error():
    import anatcl_infer.errors as errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.AnatCLWarning if issubclass(cls, Warning) else errors.AnatCLError), name
        assert not issubclass(cls, Warning) or issubclass(cls, UserWarning), name


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme.split("## Set-up", 1)[1], flags=re.S)
    main_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "anatcl embed" in main_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_cli_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "anatcl_infer", "--help"], capture_output=True, text=True, check=True)
    for command in ("embed", "qc", "fit-head", "predict", "models", "download", "convert", "push", "train", "finetune"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["embed", "qc", "fit-head", "predict", "convert", "train"])
def test_subcommand_help_teaches(command):
    result = subprocess.run([sys.executable, "-m", "anatcl_infer", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage" in result.stdout


def test_missing_extra_is_a_clear_error(monkeypatch):
    """Without scikit-learn and pandas (a bare install), `anatcl fit-head` names the extra to install."""
    import importlib.util

    from typer.testing import CliRunner

    from anatcl_infer.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("sklearn", "pandas") else real(name, *a))
    result = CliRunner().invoke(app, ["fit-head", "feats.parquet", "labels.csv", "--target", "age", "--out", "h"])
    assert result.exit_code != 0
    assert 'pip install "anatcl-infer[sklearn]"' in result.output
    assert "Traceback" not in result.output
