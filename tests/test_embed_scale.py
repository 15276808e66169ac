"""`anatcl embed` at scale: folder outputs read by every Parquet reader, shards checked, umask modes,
locks, honest resumes, signals, full or read-only disks, formats, repeated options, missing extras."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig
from anatcl_infer.downstream.features import read_features
from anatcl_infer.encoding.encoder import encode
from anatcl_infer.errors import ConfigError, InputError, MissingDependencyError, OutputError
from anatcl_infer.inputs.discovery import discover_inputs
from anatcl_infer.jobs.embed import output_layout, run_embed
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

from test_embed import PREP3, _bad_inputs, _write_scans


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def model(model_dir):
    from anatcl_infer.weights.loading import load_model

    return load_model(str(model_dir), device="cpu")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _run(model, inputs, out, **kw):
    records = discover_inputs([str(p) for p in inputs])
    return run_embed(records, [model], out, progress=False, num_workers=0, **kw)


def _cli(*args):
    return CliRunner().invoke(app, ["embed", *map(str, args), "--device", "cpu", "--workers", "0", "--quiet"])


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_sharded_run_with_a_failure_reads_back_with_every_reader(model, model_dir, tmp_path, umask022):
    """The SLURM recipe: shards into feats/, one input fails; the folder holds only parts, so pandas,
    polars, pyarrow and the package's own readers (read_features, fit-head, predict) read it."""
    import polars as pl

    paths = _write_scans(tmp_path / "in", 4)
    truncated, bad, flat = _bad_inputs(tmp_path / "in")  # keep one: a text file named .nii
    truncated.unlink()
    flat.unlink()
    feats = tmp_path / "feats"
    codes = [_cli(tmp_path / "in", "--out", f"{feats}/", "--shard", f"{i}/3", "--model", model_dir).exit_code for i in range(3)]
    assert sorted(codes) == [0, 0, 1]
    assert sorted(p.name for p in feats.iterdir()) == [f"part-{i:05d}-of-00003.parquet" for i in range(3)]
    errors = list((tmp_path / "feats.errors").iterdir())
    assert len(errors) == 1 and str(bad.resolve()) in errors[0].read_text()
    assert not (tmp_path / "feats.partial").exists()

    expected = sorted(str(p.resolve()) for p in paths)
    assert sorted(pd.read_parquet(feats)["path"]) == expected
    assert sorted(pl.read_parquet(f"{feats}/")["path"].to_list()) == expected
    assert sorted(pl.scan_parquet(f"{feats}/*.parquet").collect()["path"].to_list()) == expected
    assert sorted(ds.dataset(feats, format="parquet").to_table().column("path").to_pylist()) == expected
    df, meta = read_features(feats)
    assert sorted(df["path"]) == expected and df["subject"].tolist() == ["00", "01", "02", "03"]
    assert meta["shard"] == {"count": 3, "parts": 3} and meta["model"]["weights_sha256"]
    np.testing.assert_allclose(df.filter(like="feat_").to_numpy(), encode(model, expected, progress=False, num_workers=0), rtol=1e-5, atol=1e-6)

    # the package's CLI readers take the folder too
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"subject": ["00", "01", "02", "03"], "age": [60.0, 65.0, 70.0, 75.0]}).to_csv(labels, index=False)
    res = CliRunner().invoke(app, ["fit-head", str(feats), str(labels), "--target", "age", "--cv", "2", "--out", str(tmp_path / "head")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["predict", str(feats), "--head", str(tmp_path / "head"), "--out", str(tmp_path / "pred.csv")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 4

    # shared with the lab: the umask's modes, for parts, folders and the errors file
    assert _mode(feats) == 0o755 and _mode(tmp_path / "feats.errors") == 0o755
    assert {_mode(p) for p in feats.iterdir()} == {0o644} and _mode(errors[0]) == 0o644
    assert _mode(tmp_path / "head" / "head.json") == 0o644 and _mode(tmp_path / "pred.csv") == 0o644


def test_a_shard_whose_every_input_failed_is_named_at_read_time(model, tmp_path):
    """A shard that embedded nothing writes no part (no empty table to block the corrected rerun), only its
    errors file; reading the folder says that shard ran and failed, and where its errors are."""
    _write_scans(tmp_path / "in", 3)
    broken = sorted((tmp_path / "in").glob("*.nii.gz"))[1]  # shard 1/3's only input
    broken.write_bytes(b"not a NIfTI file")
    feats = tmp_path / "feats"
    written = [_run(model, [tmp_path / "in"], feats, shard=(i, 3)).written for i in range(3)]
    assert written == [True, False, True]
    assert sorted(p.name for p in feats.iterdir()) == ["part-00000-of-00003.parquet", "part-00002-of-00003.parquet"]
    with pytest.raises(InputError, match=r"shard 1/3 ran but embedded no input \(every input failed\): see .*part-00001-of-00003.errors.csv"):
        read_features(feats)


def test_missing_and_overlapping_shards_are_errors_at_read_time(model, tmp_path):
    _write_scans(tmp_path / "in", 5)
    feats = tmp_path / "feats"
    _run(model, [tmp_path / "in"], feats, shard=(0, 3))
    _run(model, [tmp_path / "in"], feats, shard=(2, 3))
    with pytest.raises(InputError, match=r"1 of 3 shards are missing .*1/3"):
        read_features(feats)
    df, _ = read_features(feats, allow_missing_shards=True)
    assert len(df) == 4  # blocks of 2, 1, 2: shards 0 and 2
    _run(model, [tmp_path / "in"], feats, shard=(1, 3))
    assert len(read_features(feats)[0]) == 5
    # a part of another sharding in the same folder overlaps the others
    _run(model, [tmp_path / "in"], feats, shard=(1, 2))
    with pytest.raises(InputError, match="different shard counts"):
        read_features(feats)
    (feats / "part-00001-of-00002.parquet").unlink()
    # a shard run on a different input list (a scan added between jobs) shifts the blocks
    (feats / "part-00001-of-00003.parquet").unlink()
    _write_scans(tmp_path / "in2", 6)
    _run(model, [tmp_path / "in2"], feats, shard=(1, 3))
    with pytest.raises(InputError, match="different input lists"):
        read_features(feats)


def test_empty_shard_writes_a_valid_empty_table_and_an_all_failed_run_writes_none(model, model_dir, tmp_path):
    _write_scans(tmp_path / "in", 2)
    summary = _run(model, [tmp_path / "in"], tmp_path / "feats", shard=(3, 4))  # bounds 0,0,1,2,2: shard 3 is empty
    part = tmp_path / "feats" / "part-00003-of-00004.parquet"
    table = pq.read_table(part)
    assert summary.ok and table.num_rows == 0 and "feat_511" in table.column_names
    assert not (tmp_path / "feats.partial").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_inputs(bad)
    res = _cli(bad, "--out", tmp_path / "all_bad.parquet", "--model", model_dir)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "all 3 inputs failed, so nothing was written" in res.output and "dim must be" not in res.output
    # issue 23: no empty table is left behind to block the corrected command (it used to be a 0-row table)
    assert not (tmp_path / "all_bad.parquet").exists()
    assert len((tmp_path / "all_bad.errors.csv").read_text().splitlines()) == 4
    assert not (tmp_path / "all_bad.parquet.partial").exists()
    assert _cli(bad, "--out", tmp_path / "all_bad.parquet", "--model", model_dir).exit_code == 1  # not blocked


def test_umask_modes_on_table_and_errors_file(model, tmp_path, umask022):
    _write_scans(tmp_path / "in", 1)
    _bad_inputs(tmp_path / "in")
    for out in (tmp_path / "feats.parquet", tmp_path / "feats.csv"):
        summary = _run(model, [tmp_path / "in"], out)
        assert _mode(out) == 0o644 and _mode(summary.errors_path) == 0o644
    assert _mode(tmp_path / "feats.csv.meta.json") == 0o644


def test_a_second_run_on_the_same_output_is_refused(model, tmp_path):
    _write_scans(tmp_path / "in", 2)
    out = tmp_path / "feats.parquet"
    lock = output_layout(out).lock_path
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242 on node17")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds it
    try:
        with pytest.raises(OutputError, match="another run is writing .*pid 4242 on node17"):
            _run(model, [tmp_path / "in"], out)
        assert not out.exists() and not out.with_name("feats.parquet.partial").exists()
    finally:
        os.close(fd)
    assert _run(model, [tmp_path / "in"], out).n_written == 2
    assert not lock.exists()


def test_resume_refuses_other_weights_behind_the_same_folder(model, tmp_path, monkeypatch):
    """A model folder re-exported with new weights (source_sha256 null) is another model."""
    from anatcl_infer.weights.loading import load_model

    _write_scans(tmp_path / "in", 3)
    torch.manual_seed(1)
    mdir = save_pretrained(AnatCL(ModelConfig(name="run", source="unit-test", fold=0, preprocess=PREP3)), tmp_path / "m")
    first = load_model(str(mdir), device="cpu")
    assert first.config.source_sha256 is None
    out = tmp_path / "feats.parquet"
    _run(first, [tmp_path / "in"], out)
    torch.manual_seed(2)
    save_pretrained(AnatCL(ModelConfig(name="run", source="unit-test", fold=0, preprocess=PREP3)), mdir)
    second = load_model(str(mdir), device="cpu")
    _write_scans(tmp_path / "in", 4)
    with pytest.raises(ConfigError, match="another model"):
        _run(second, [tmp_path / "in"], out, resume=True)


def test_resume_reembeds_changed_inputs_and_drops_removed_ones(model, tmp_path):
    import nibabel as nib

    paths = _write_scans(tmp_path / "in", 3)
    out = tmp_path / "feats.parquet"
    _run(model, [tmp_path / "in"], out)
    before = pd.read_parquet(out)
    # sub-01 is replaced by another scan (same name), sub-02 deleted, sub-00 only touched
    img = nib.load(paths[1])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0.5, img.affine), paths[1])
    paths[2].unlink()
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    summary = _run(model, [tmp_path / "in"], out, resume=True)
    assert summary.changed == [str(paths[1].resolve())] and summary.n_dropped == 1
    assert summary.n_written == 1 and summary.n_skipped == 1
    after = pd.read_parquet(out)
    assert after["subject"].tolist() == ["00", "01"]
    feats = [c for c in after.columns if c.startswith("feat_")]
    np.testing.assert_array_equal(after.loc[0, feats].to_numpy(float), before.loc[0, feats].to_numpy(float))
    fresh = encode(model, [str(paths[1])], progress=False, num_workers=0)[0]
    np.testing.assert_allclose(after.loc[1, feats].to_numpy(float), fresh, rtol=1e-5, atol=1e-6)
    assert after.loc[1, "input_size"] == paths[1].stat().st_size


def test_full_disk_is_one_line_and_keeps_finished_batches(model_dir, tmp_path, monkeypatch):
    import anatcl_infer.jobs.embed as embed_mod

    _write_scans(tmp_path / "in", 4)
    out = tmp_path / "feats.parquet"
    original = embed_mod._Parts.write
    calls = {"n": 0}

    def full_disk(self, table, meta):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / "part-0000002.parquet"))
        return original(self, table, meta)

    monkeypatch.setattr(embed_mod._Parts, "write", full_disk)
    args = [tmp_path / "in", "--out", out, "--model", model_dir, "--batch-size", "2"]
    res = _cli(*args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: cannot write")
    assert "disk is full" in line and "--resume" in line
    monkeypatch.setattr(embed_mod._Parts, "write", original)
    assert _cli(*args, "--resume").exit_code == 0
    assert len(pq.read_table(out)) == 4


def test_read_only_output_folder_is_one_line(model_dir, tmp_path):
    """A really read-only folder: a read-only bind mount when root (permission bits do not bind root),
    else mode 0555."""
    _write_scans(tmp_path / "in", 1)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot make a read-only bind mount here")
        mounted = True
    else:
        ro.chmod(0o555)
    try:
        res = _cli(tmp_path / "in", "--out", ro / "feats.parquet", "--model", model_dir)
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)
        ro.chmod(0o755)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.count("\n") == 1 and "cannot write" in res.output
    assert "read-only" in res.output or "permission denied" in res.output


def test_output_error_messages_name_the_cause():
    from anatcl_infer.jobs.embed import _output_error

    for code, words in ((errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")):
        msg = str(_output_error(OSError(code, os.strerror(code), "/x/feats.parquet"), Path("/x/feats.parquet")))
        assert words in msg and "/x/feats.parquet" in msg and "\n" not in msg


def test_out_suffix_sets_the_format_and_a_folder_means_parts(model, model_dir, tmp_path):
    _write_scans(tmp_path / "in", 2)
    res = _cli(tmp_path / "in", "--out", tmp_path / "feats.csv", "--model", model_dir)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "feats.csv").read_text().startswith('"path","volume","subject"')
    df, meta = read_features(tmp_path / "feats.csv")
    assert df["subject"].tolist() == ["00", "01"] and meta["model"]["name"] == "test-model"  # BIDS ids stay strings
    res = _cli(tmp_path / "in", "--out", tmp_path / "x.csv", "--format", "parquet", "--model", model_dir)
    assert res.exit_code == 2 and "--format is parquet" in res.output
    res = _cli(tmp_path / "in", "--out", tmp_path / "noext", "--model", model_dir)
    assert res.exit_code == 2 and "noext.parquet" in res.output
    res = _cli(tmp_path / "in", "--out", f"{tmp_path / 'dir'}/", "--model", model_dir)
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["part-00000-of-00001.parquet"]
    # a CSV resume keeps subject "01" a string (pyarrow would read it as the number 1)
    _write_scans(tmp_path / "in", 3)
    res = _cli(tmp_path / "in", "--out", tmp_path / "feats.csv", "--model", model_dir, "--resume")
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "feats.csv", dtype={"subject": str})["subject"].tolist() == ["00", "01", "02"]


def test_repeated_option_is_an_error_not_the_last_one(model_dir, tmp_path):
    res = _cli(tmp_path, "--out", tmp_path / "f.parquet", "--model", model_dir, "--model", "anatcl-local")
    assert res.exit_code == 2 and "given 2 times" in res.output
    assert not (tmp_path / "f.parquet").exists()


def test_progress_lines_in_logs_off_a_terminal(model, tmp_path, monkeypatch, caplog):
    import logging

    import anatcl_infer.jobs.embed as embed_mod

    monkeypatch.setattr(embed_mod, "PROGRESS_EVERY_S", 0.0)
    _write_scans(tmp_path / "in", 3)
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        records = discover_inputs([str(tmp_path / "in")])
        run_embed(records, [model], tmp_path / "f.parquet", progress=True, num_workers=0, batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedded ")]
    assert [line.split(" inputs")[0] for line in lines] == ["embedded 1/3", "embedded 2/3", "embedded 3/3"]
    assert "inputs/s" in lines[0] and "ETA" in lines[0]


def test_missing_scikit_learn_is_a_missing_dependency_error():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "from anatcl_infer.errors import MissingDependencyError\n"
        "try:\n"
        "    from anatcl_infer.sklearn import AnatCLEncoder\n"
        "except MissingDependencyError as exc:\n"
        "    assert isinstance(exc, ImportError) and exc.extra == 'sklearn'; print(exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == 'sklearn is needed for this; install it with pip install "anatcl-infer[sklearn]"'
    assert issubclass(MissingDependencyError, ImportError)


@pytest.mark.parametrize("command", ["train", "embed-head"])
def test_missing_extras_in_the_cli_are_one_line(command, model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("sklearn", "pandas") else real(name, *a))
    if command == "train":
        manifest = tmp_path / "m.csv"
        manifest.write_text("path,age\n")
        res = CliRunner().invoke(app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "run")])
        extra = "train"
    else:
        _write_scans(tmp_path / "in", 1)
        res = _cli(tmp_path / "in", "--out", tmp_path / "f.parquet", "--model", model_dir, "--head", tmp_path / "head")
        extra = "sklearn"
        assert not (tmp_path / "f.parquet").exists()  # refused before any embedding
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert f'pip install "anatcl-infer[{extra}]"' in res.output and res.output.count("\n") == 1


def test_train_refuses_an_existing_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,age\n")
    base = ["train", "--manifest", str(manifest), "--out", str(run)]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2 and "--resume" in res.output and "--overwrite" in res.output
    assert (run / "train_config.json").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    res = CliRunner().invoke(app, ["train", "--manifest", str(manifest), "--out", str(tmp_path / "notes"), "--overwrite"])
    assert res.exit_code == 2 and "not a training run" in res.output and (tmp_path / "notes" / "a.txt").exists()
    res = CliRunner().invoke(app, [*base, "--overwrite"])  # starts over: the old run is gone (the empty manifest then fails)
    assert not (run / "train_config.json").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_sigterm_midway_then_resume_gives_the_identical_table(model_dir, tmp_path):
    """What SLURM does at the time limit: SIGTERM; the run says how to resume, keeps its batches,
    and the resumed table equals an uninterrupted one."""
    _write_scans(tmp_path / "in", 6)
    cmd = [sys.executable, "-m", "anatcl_infer", "embed", str(tmp_path / "in"), "--model", str(model_dir),
           "--device", "cpu", "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ANATCL_PROGRESS_INTERVAL": "0"}
    subprocess.run([*cmd, "--quiet", "--out", str(tmp_path / "full.parquet")], check=True, env=env)
    out = tmp_path / "term.parquet"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "term.parquet.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "SIGTERM" in err and "--resume" in err and str(partial) in err
    assert not out.exists() and len(list(partial.glob("part-*.parquet"))) >= 2
    assert "embedded " in err and "ETA" in err  # progress lines in the log (stderr is a pipe)
    subprocess.run([*cmd, "--quiet", "--out", str(out), "--resume"], check=True, env=env)
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "full.parquet"))
