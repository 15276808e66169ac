"""SIGTERM/SIGINT to the whole process group (what SLURM sends at a time limit, what Ctrl-C sends)
while DataLoader workers run: the workers stop quietly, stderr holds only the interruption line with
the resume hint, and the table after ``--resume`` is bit-identical to an uninterrupted run's.

A real ``anatcl embed`` process in its own session, killed with ``os.killpg``. Loading each input
is slowed down (0.15 s, inside the workers) so that the signal arrives mid-run on any machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

from anatomy import mni_gm_on_grid

GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))
N_SCANS = 16

#: ``anatcl`` with each input's preparation slowed down (patched before the workers fork, so they inherit it)
SLOW_ANATCL = """
import sys, time
import anatcl_infer.inputs.preprocess as preprocess
_prepare = preprocess.prepare
def slow(*args, **kwargs):
    time.sleep(0.15)
    return _prepare(*args, **kwargs)
preprocess.prepare = slow
from anatcl_infer.cli import main
main()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """(model dir, input folder, table of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("signals")
    _CACHE[:] = [root / "cache"]
    torch.manual_seed(0)
    model_dir = save_pretrained(AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3)), root / "m")
    scans = root / "in"
    scans.mkdir()
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2]).astype(np.float32)
    for i in range(N_SCANS):
        nib.save(nib.Nifti1Image(gm * (1.0 - 0.01 * i), np.array(GRID3_AFFINE)), scans / f"sub-{i:02d}_mwp1.nii.gz")
    full = root / "full.parquet"
    subprocess.run([sys.executable, "-m", "anatcl_infer", *_args(model_dir, scans, full)], check=True, env=_env())
    yield model_dir, scans, full
    shutil.rmtree(root / "cache", ignore_errors=True)  # a converted graph of 133 MB


def _args(model_dir: Path, scans: Path, out: Path) -> list[str]:
    # the default backend: OpenVINO where installed (as in the test extra), whose graph every process
    # reads from the same cache entry (a stale entry of an older converter once made a resumed table
    # differ from the uninterrupted one by ~1e-7)
    return ["embed", str(scans), "--model", str(model_dir), "--device", "cpu", "--batch-size", "2", "--workers", "2",
            "-q", "--out", str(out)]


_CACHE: list[Path] = []  # the module's own model cache (the module-scoped fixture runs before conftest's per-test one)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "ANATCL_CACHE": str(_CACHE[0])}


def _group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the group (the run and its loader workers) has ended within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_stops_workers_quietly_and_resume_is_bit_identical(setup, tmp_path, signum):
    model_dir, scans, full = setup
    out = tmp_path / "feats.parquet"
    partial = tmp_path / "feats.parquet.partial"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ANATCL, *_args(model_dir, scans, out)], env=_env(),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(partial.glob("part-*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.killpg(proc.pid, signum)  # the whole group, workers included, as SLURM does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # nothing else: no "Exception ignored", no "DataLoader worker (pid N) is killed"
    assert lines[0].startswith(f"error: interrupted by {signal.Signals(signum).name}")
    assert str(partial) in lines[0] and "--resume" in lines[0]
    assert _group_gone(proc.pid, 30), "loader workers outlived the run"
    assert not out.exists() and list(partial.glob("part-*.parquet"))

    subprocess.run([sys.executable, "-m", "anatcl_infer", *_args(model_dir, scans, out), "--resume"], check=True, env=_env())
    resumed, uninterrupted = pq.read_table(out), pq.read_table(full)
    assert resumed.num_rows == N_SCANS
    assert resumed.equals(uninterrupted, check_metadata=True)
    try:
        import openvino  # noqa: F401
    except ImportError:
        return
    import json

    assert json.loads(resumed.schema.metadata[b"anatcl_infer"])["backend"]["name"] == "openvino"
