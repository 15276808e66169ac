"""Issue 23, "the first hour": the mistakes a newcomer makes cost nothing, and what they meet works.

- a mistyped path, a bad option value, an output already there, a bad BIDS label or root are refused
  before the model is loaded (the loader is never called), and leave no output behind;
- a folder scan names the files it skips; ``anatcl qc`` shows them, flagged;
- Python errors name Python arguments, command-line errors name options;
- ``--fold all`` over a folder of ``fold<k>/`` models; fold advice that fits the model source;
- ``--help`` readable at 80 columns; progress as log lines off a terminal; a colour bar with a unit.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.downstream.heads import HEAD_FORMAT, FoldHead, Head
from anatcl_infer.errors import ConfigError
from anatcl_infer.inputs.discovery import discover_inputs
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights import loading
from anatcl_infer.weights.checkpoint import save_pretrained
from anatcl_infer.weights.sources import fold_advice, fold_sources, source_kind

from anatomy import mni_gm_on_grid

GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))
CPU = ["--device", "cpu", "--workers", "0"]

runner = CliRunner()
REAL_LOAD_MODEL = loading.load_model


def _model(fold: int) -> AnatCL:
    torch.manual_seed(fold)
    return AnatCL(ModelConfig(name="test-model", source="unit-test", fold=fold, preprocess=PREP3))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """``folds/fold0`` and ``folds/fold1``: a folder of fold models, as a cache folder or a CV run holds them."""
    root = tmp_path_factory.mktemp("models") / "folds"
    for k in (0, 1):
        save_pretrained(_model(k), root / f"fold{k}")
    return root


def _scans(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]).astype(np.float32)
    paths = []
    for i in range(n):
        paths.append(folder / f"mwp1sub-{i + 1:02d}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(gm * (1.0 - 0.1 * i), np.array(GRID3_AFFINE)), paths[-1])
    return paths


def _run(*args: object, env: dict[str, str] | None = None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.stdout, result.stderr


class Loaded(Exception):
    """Raised by the stand-in loader: the command got as far as loading the model."""


@pytest.fixture
def no_loading(monkeypatch) -> list[str]:
    """Every command's model loader replaced by one that records the call and stops the command."""
    calls: list[str] = []

    def refuse(source, **kwargs):
        calls.append(str(source))
        raise Loaded(source)

    monkeypatch.setattr(loading, "load_model", refuse)
    return calls


# -- item 4: mistakes cost nothing ------------------------------------------------------------------


def test_a_mistyped_path_loads_no_model_and_leaves_only_the_errors_file(models, tmp_path, no_loading, monkeypatch):
    _scans(tmp_path / "cohort")
    out = tmp_path / "y.parquet"
    code, _, err = _run("embed", tmp_path / "cohrt", "--out", out, "--model", models / "fold0", *CPU)
    assert code == 1 and no_loading == []
    assert "no input exists" in err and "nothing was embedded and no output was written" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "y.parquet.partial").exists()
    assert "cohrt" in (tmp_path / "y.errors.csv").read_text()
    monkeypatch.setattr(loading, "load_model", REAL_LOAD_MODEL)  # the corrected command runs, without --overwrite
    code, _, err = _run("embed", tmp_path / "cohort", "--out", out, "--model", models / "fold0", *CPU, "-q")
    assert code == 0, err
    assert pq.read_table(out).num_rows == 2 and not (tmp_path / "y.errors.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp8"], "must be fp32, bf16 or fp16, got 'fp8'"),
    (["--format", "xlsx"], "--format must be parquet or csv"),
    (["--shard", "5/4"], "need 0 <= I < N"),
    (["--fold", "x"], "--fold x is neither a fold number nor 'all'"),
    (["--fold", "all", "--model", "MODEL0"], "--fold all needs a registry model"),
    (["--head", "NOHEAD"], "is not a head folder"),
    (["--out", "EXISTING"], "already exists; pass --resume"),
], ids=["precision", "format", "shard", "fold", "fold-all-one-model", "head", "exists"])
def test_bad_arguments_are_refused_before_the_model_loads(models, tmp_path, no_loading, args, message):
    scans = tmp_path / "in"
    _scans(scans)
    existing = tmp_path / "done.parquet"
    existing.write_bytes(b"earlier results")
    subs = {"MODEL0": str(models / "fold0"), "NOHEAD": str(tmp_path / "nohead"), "EXISTING": str(existing)}
    args = [subs.get(a, a) for a in args]
    defaults = {"--model": models, "--out": tmp_path / "f.parquet"}
    base = ["embed", scans, *CPU, *[x for k, v in defaults.items() for x in (k, v)]]
    code, _, err = _run("embed", scans, *CPU, *args, *[x for k, v in defaults.items() if k not in args for x in (k, v)])
    assert code == 2 and message in err, err
    assert no_loading == [] and "Traceback" not in err
    assert existing.read_bytes() == b"earlier results" and not (tmp_path / "f.parquet").exists()
    with pytest.raises(Loaded):  # the same command with good arguments does reach the loader
        runner.invoke(app, [str(a) for a in base], catch_exceptions=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_a_device_that_is_not_there_is_an_option_error_before_loading(models, tmp_path, no_loading):
    _scans(tmp_path / "in")
    code, _, err = _run("embed", tmp_path / "in", "--model", models / "fold0", "--out", tmp_path / "f.parquet", "--device", "cuda")
    assert code == 2 and no_loading == []
    assert "--device cpu" in err and "device=" not in err  # command-line errors keep command-line names


def _bids_root(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    _scans(root / "derivatives" / "cat12" / "sub-01" / "mri", 1)
    return root


@pytest.mark.parametrize("case", ["label", "bad-label", "not-bids", "output-is-raw", "exists"])
def test_bids_labels_roots_and_outputs_are_checked_before_the_model_loads(models, tmp_path, no_loading, case):
    ds = _bids_root(tmp_path / "ds")
    out = tmp_path / "out"
    args = {"label": [ds, out, "participant", "--participant-label", "07"],
            "bad-label": [ds, out, "participant", "--participant-label", "sub-0_7"],
            "not-bids": [tmp_path, out, "participant"],
            "output-is-raw": [ds, ds, "participant"],
            "exists": [ds, out, "participant"]}[case]
    if case == "exists":
        feats = out / "sub-01" / "anat" / "sub-01_desc-testmodel_features.parquet"
        feats.parent.mkdir(parents=True)
        feats.write_bytes(b"")
    code, _, err = _run("bids", *args, "--model", models / "fold0", *CPU)
    assert code == 2 and no_loading == [], err
    expected = {"label": "no maps for participant(s) sub-07", "bad-label": "not a BIDS sub label",
                "not-bids": "no dataset_description.json", "output-is-raw": "OUTPUT_DIR", "exists": "already exists"}[case]
    assert expected in err and "Traceback" not in err


def test_every_input_failing_leaves_no_table_even_over_an_old_one(models, tmp_path):
    good, bad = _scans(tmp_path / "in", 1), tmp_path / "bad" / "mwp1sub-09_T1w.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a nifti")
    out = tmp_path / "f.csv"
    assert _run("embed", *good, "--out", out, "--model", models / "fold0", *CPU, "-q")[0] == 0
    code, _, err = _run("embed", bad, "--out", out, "--model", models / "fold0", *CPU, "-q", "--overwrite")
    assert code == 1 and "all 1 inputs failed, so nothing was written" in err
    assert not out.exists() and not (tmp_path / "f.csv.meta.json").exists()  # the replaced table is gone too
    assert "mwp1sub-09" in (tmp_path / "f.errors.csv").read_text()


# -- item 6: skipped files are named ------------------------------------------------------------------


def _cat12_folder(folder: Path, n_other: int) -> None:
    _scans(folder, 2)
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]).astype(np.float32)
    names = ["s6mwp1sub-01_T1w.nii.gz", "sub-01_T1w.nii.gz", "mwp2sub-01_T1w.nii.gz", "p0sub-01_T1w.nii.gz",
             "rp1sub-01_T1w.nii.gz", "wmsub-01_T1w.nii.gz", "other.nii.gz"][:n_other]
    for name in names:
        nib.save(nib.Nifti1Image(gm * 0.5, np.array(GRID3_AFFINE)), folder / name)


def test_a_folder_scan_names_what_it_skips_in_one_warning(tmp_path, caplog):
    _cat12_folder(tmp_path / "few", 2)
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        records = discover_inputs(tmp_path / "few")
    assert [Path(r.path).name for r in records] == ["mwp1sub-01_T1w.nii.gz", "mwp1sub-02_T1w.nii.gz"]
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping 2 NIfTI files" in line and "give them explicitly" in line and ".txt" in line
    assert "s6mwp1sub-01_T1w.nii.gz (a smoothed grey-matter map" in line and "sub-01_T1w.nii.gz (a T1 image)" in line
    caplog.clear()
    _cat12_folder(tmp_path / "many", 7)
    with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
        discover_inputs(tmp_path / "many")
    [line] = [r.getMessage() for r in caplog.records]
    assert "skipping 7 NIfTI files" in line and "and 2 more" in line and line.count(".nii.gz (") == 5
    # listed explicitly, they are taken
    listing = tmp_path / "list.txt"
    listing.write_text("many/sub-01_T1w.nii.gz\nmany/s6mwp1sub-01_T1w.nii.gz\n")
    assert len(discover_inputs(listing)) == 2


def test_qc_of_a_folder_reports_every_nifti_and_flags_the_skipped_ones(tmp_path):
    pytest.importorskip("matplotlib")
    _cat12_folder(tmp_path / "scans", 2)
    code, _, err = _run("qc", tmp_path / "scans", "--out", tmp_path / "qc", "--model", PREP3_MODEL(tmp_path))
    assert code == 0, err
    assert "2 NIfTI files in the folder given would be skipped by `anatcl embed`" in err
    with open(tmp_path / "qc" / "qc_metrics.csv", newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert len(rows) == 4
    assert rows["s6mwp1sub-01_T1w.nii.gz"]["qc_flag"] == "true"
    assert rows["s6mwp1sub-01_T1w.nii.gz"]["qc_reasons"].startswith("skipped by anatcl embed: a smoothed grey-matter map")
    assert rows["sub-01_T1w.nii.gz"]["qc_reasons"].startswith("skipped by anatcl embed: a T1 image")
    assert not rows["mwp1sub-01_T1w.nii.gz"]["qc_reasons"].startswith("skipped")


def PREP3_MODEL(tmp_path: Path) -> Path:  # noqa: N802  (a model folder whose spec is the 3 mm grid; no weights are read)
    folder = tmp_path / "spec-model"
    if not folder.exists():
        save_pretrained(_model(0), folder)
    return folder


# -- item 8: the smaller frictions --------------------------------------------------------------------


def test_python_errors_name_python_arguments():
    model = _model(0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as info:
            model.encode([np.zeros(PREP3.grid_shape, np.float32)], device="cuda")
        assert 'device="cpu"' in str(info.value) and "--device" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        fold_sources(str(Path(__file__)), "all")
    assert "fold='all'" in str(info.value) and "--fold" not in str(info.value)


def test_load_model_takes_a_fold_of_a_folder_of_fold_models(models):
    """Python's load_model(folder, fold=k) as the CLI's --model folder --fold k: fold k's folder."""
    one = loading.load_model(models, fold=1, device="cpu")
    assert one.config.fold == 1
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), _model(1).state_dict().values()))
    with pytest.raises(ConfigError, match=r"fold0, fold1.*fold=<k>"):
        loading.load_model(models, device="cpu")  # which fold: not guessed
    with pytest.raises(ConfigError, match="has no fold3/"):
        loading.load_model(models, fold=3, device="cpu")


def test_fold_all_over_a_folder_of_fold_models(models, tmp_path):
    scans = _scans(tmp_path / "in", 2)
    out = tmp_path / "f.parquet"
    code, _, err = _run("embed", tmp_path / "in", "--out", out, "--model", models, "--fold", "all", *CPU, "-q")
    assert code == 0, err
    table = pq.read_table(out)
    assert table.column("fold").to_pylist() == [0, 1, 0, 1]
    assert table.column("path").to_pylist() == [str(p) for p in scans for _ in (0, 1)]
    one = tmp_path / "one.parquet"
    assert _run("embed", tmp_path / "in", "--out", one, "--model", models, "--fold", "1", *CPU, "-q")[0] == 0
    assert pq.read_table(one).column("fold").to_pylist() == [1, 1]
    assert source_kind(models) == "folds" and [f for _, f in fold_sources(models, "all")] == [None, None]


def _head(folder: Path, fold: int) -> Path:
    rng = np.random.default_rng(0)
    fh = FoldHead(fold, rng.normal(size=(1, 512)), np.array([50.0]), np.zeros(512), np.ones(512), {"fold": fold})
    config = {"format": HEAD_FORMAT, "target": "age", "units": "years", "kind": "regression", "feature_dim": 512,
              "folds": [{"fold": fold}]}
    return Head(config, [fh]).save(folder)


def test_fold_advice_fits_the_model_source(models, tmp_path):
    single = save_pretrained(_model(1), tmp_path / "single")
    assert fold_advice("anatcl-global", 0) == "pass fold=0"
    assert fold_advice(models, 0) == "pass fold=0"
    assert fold_advice(models / "fold1", 0) == f"use the model in {models / 'fold0'}"
    assert "holding one model, so fold= does not change it" in fold_advice(single, 0)

    pytest.importorskip("sklearn")
    _scans(tmp_path / "in", 1)
    head = _head(tmp_path / "head", 0)
    base = ["embed", tmp_path / "in", "--out", tmp_path / "f.parquet", "--head", head, *CPU]
    code, _, err = _run(*base, "--model", single)
    assert code == 2 and "the model is fold 1" in err and "--fold 0" not in err and "give the fold-0 model's own" in err
    code, _, err = _run(*base, "--model", models, "--fold", "1")
    assert code == 2 and "pass --fold 0" in err  # where --fold does pick another fold, it is the advice


def _options(command) -> list[str]:
    return [o for p in command.params if not getattr(p, "hidden", False) for o in (*p.opts, *getattr(p, "secondary_opts", []))
            if o.startswith("-")]


def test_help_is_readable_at_80_columns_for_every_command():
    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert result.exit_code == 0, (name, result.output)
        assert "…" not in result.output, (name, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80, name
        for opt in _options(command):
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", result.output), (name, opt)


def test_qc_and_explain_log_progress_lines_off_a_terminal(models, tmp_path):
    pytest.importorskip("matplotlib")
    _scans(tmp_path / "in", 2)
    env = {"ANATCL_PROGRESS_INTERVAL": "0"}
    code, _, err = _run("qc", tmp_path / "in", "--out", tmp_path / "qc", "--model", models / "fold0", env=env)
    assert code == 0, err
    assert "INFO: checked 2/2 inputs (100%)" in err and "\r" not in err
    code, _, err = _run("explain", tmp_path / "in", "--out", tmp_path / "ex", "--model", models / "fold0",
                        "--device", "cpu", env=env)
    assert code == 0, err
    assert "INFO: explained 2/2 inputs (100%)" in err and "\r" not in err


def test_the_explain_picture_has_a_colour_bar_with_the_unit(monkeypatch):
    pytest.importorskip("matplotlib")
    from anatcl_infer.qc import plots

    figures = []
    real = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig, *a: figures.append(fig) or real(fig, *a))
    rel = np.zeros(PREP3.grid_shape, np.float32)
    rel[30, 36, 30], rel[20, 30, 30] = 2.0, -1.0
    bg = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]).astype(np.float32)
    plots.render_relevance(rel, bg, config=PREP3, unit="years per voxel")
    [fig] = figures
    bar = fig.axes[-1]
    assert len(fig.axes) == 4 and bar.get_ylabel() == "relevance (years per voxel)"
    assert bar.get_ylim()[0] < 0 < bar.get_ylim()[1]


# -- item 9: a tidy house -----------------------------------------------------------------------------


def test_no_module_is_over_600_lines():
    package = Path(__file__).resolve().parents[1] / "anatcl_infer"
    long = {str(p.relative_to(package)): n for p in package.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}
