"""The examples run end to end, offline, on their small synthetic data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    spec = importlib.util.spec_from_file_location(f"_anatcl_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_brain_age_example(tmp_path, capsys):
    res = _main("brain_age")(["--out", str(tmp_path), "--n", "24"])
    assert res["png"].is_file() and res["png"].stat().st_size > 5_000
    assert res["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (res["head"] / "head.json").is_file() and (res["head"] / "head.safetensors").is_file()
    assert (tmp_path / "features.parquet").is_file() and (tmp_path / "brain_age_test.csv").is_file()
    assert res["n_test"] == 7 and np.isfinite(res["mae"]) and np.isfinite(res["mae_corrected"])
    assert 0 < res["bias"]["slope"] < 1.5
    assert "bias correction: pred =" in capsys.readouterr().out


@pytest.mark.slow
def test_classify_folder_example(tmp_path, capsys):
    res = _main("classify_folder")(["--out", str(tmp_path), "--n", "12", "--cv", "2"])
    assert res["n"] == 12
    assert 0.0 <= res["balanced_accuracy"] <= 1.0 and 0.0 <= res["roc_auc"] <= 1.0
    assert res["probe"].task == "classification" and len(res["probe"].metrics["balanced_accuracy"]) == 2
    assert len(list((tmp_path / "embedding-cache").rglob("*.npy"))) == 12  # every map embedded once
    assert "pipeline: balanced accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_bids_to_pandas_example(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its synthetic dataset goes to a temporary folder
    out = tmp_path / "feats.parquet"
    res = _main("bids_to_pandas")(["--n", "3", "--out", str(out)])
    df = res["df"]
    assert out.is_file() and len(df) == 3 and res["X"].shape == (3, 512)
    assert list(df["subject"]) == ["001", "002", "003"]
    assert df["age"].notna().all() and set(df["sex"]) <= {"F", "M"}
    assert res["meta"]["model"]["name"] == "demo-untrained"
