"""A hostile corpus through `anatcl embed`, `anatcl qc` and `extract_features`, under a memory cap.

Each run happens in a subprocess whose private writable memory is capped at 2 GiB above what it
holds once torch is imported (``RLIMIT_DATA``, see ``memory_cap``; the DataLoader workers and
matplotlib fit in it, with the CPU wheel or the index's default CUDA build alike): no traceback,
no kill, no hang (a timeout), every good input written, every bad one named once with its reason,
and a non-zero exit status.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import save_pretrained

from hostile_corpus import GRID3_AFFINE, GRID3_SHAPE, build_corpus
from memory_cap import BUDGET, prelude

pytestmark = pytest.mark.slow

PREP3 = PreprocessConfig(
    grid_shape=GRID3_SHAPE, grid_affine=tuple(map(tuple, GRID3_AFFINE.tolist())), crop=((0, 61), (4, 68), (0, 61))
)
_LIMITED = prelude() + textwrap.dedent(
    """
    import runpy, sys
    sys.argv = ["anatcl", *sys.argv[1:]]
    runpy.run_module("anatcl_infer", run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="test-model", source="unit-test", fold=0, preprocess=PREP3))
    return save_pretrained(model, tmp_path_factory.mktemp("model") / "m")


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", ANATCL_OFFLINE="1")
    return subprocess.run(
        args, capture_output=True, timeout=timeout, env=env,  # a hang fails the test instead of blocking it
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", _LIMITED, *args])


def _text(res: subprocess.CompletedProcess) -> str:
    return res.stderr.decode("utf-8", "backslashreplace") + res.stdout.decode("utf-8", "backslashreplace")


def _mentions(line: str, name: str) -> bool:
    return re.search(rf"/{re.escape(name)}[ :]", line) is not None


def _named_once(text_lines: list[str], name: str) -> bool:
    return sum(_mentions(line, name) for line in text_lines) == 1


def test_memory_cap_leaves_room_for_torch(model_dir):
    script = prelude() + textwrap.dedent(
        f"""
        import nibabel, torch, anatcl_infer.cli.app
        from anatcl_infer import load_model
        model = load_model({str(model_dir)!r})
        with torch.no_grad():
            print("OUT", tuple(model(torch.zeros(2, 1, 61, 64, 61)).shape))
        """
    )
    res = _run([sys.executable, "-c", script])
    assert res.returncode == 0, _text(res)
    assert "OUT (2, 512)" in _text(res)


def test_memory_cap_bites():
    """The cap is real: an allocation over the budget fails cleanly in Python, nothing is killed."""
    script = prelude() + textwrap.dedent(
        f"""
        import torch
        ok = torch.empty({BUDGET // 2}, dtype=torch.uint8).fill_(1)  # half the budget: allowed
        for make in (lambda: bytearray({BUDGET}), lambda: torch.empty({BUDGET}, dtype=torch.uint8)):
            try:
                make()
            except (MemoryError, RuntimeError) as exc:
                print("REFUSED", type(exc).__name__)
        """
    )
    res = _run([sys.executable, "-c", script])
    assert res.returncode == 0, _text(res)
    assert _text(res).count("REFUSED") == 2, _text(res)


def test_corpus_is_large_and_varied(corpus):
    assert len(corpus.failing) + len(corpus.warned) + len(corpus.extra_specs) >= 30


def test_embed_survives_the_corpus(corpus, model_dir, tmp_path):
    out = tmp_path / "feats.parquet"
    res = _cli("embed", str(corpus.root), *corpus.extra_specs, "--model", str(model_dir), "--out", str(out),
               "--workers", "2", "--batch-size", "3", "--quiet")
    text = _text(res)
    assert res.returncode == 1, text
    assert "Traceback" not in text, text
    table = pq.read_table(out)
    written = [Path(p).name for p in table.column("path").to_pylist()]
    fourd = [name for name, n in corpus.volumes.items() for _ in range(n)]
    assert sorted(written) == sorted(corpus.good + corpus.warned + fourd)
    volumes = dict.fromkeys(written, None)
    for name, v in zip(written, table.column("volume").to_pylist()):
        volumes[name] = [*(volumes[name] or []), v]
    for name, n in corpus.volumes.items():  # one row per volume of a 4D file
        assert volumes[name] == list(range(n)), (name, volumes[name])
    feats = table.select([c for c in table.column_names if c.startswith("feat_")]).to_pandas().to_numpy()
    assert np.isfinite(feats).all()

    with open(tmp_path / "feats.errors.csv", newline="") as fh:
        errors = list(csv.DictReader(fh))
    assert len(errors) == len(corpus.failing) + len(corpus.extra_specs)
    by_name = {Path(e["path"]).name: e for e in errors}
    for name, fragment in corpus.failing.items():
        assert name in by_name, f"{name} not reported"
        assert fragment in by_name[name]["message"], (name, by_name[name]["message"])
    for spec, fragment in corpus.extra_specs.items():
        assert fragment in by_name[Path(spec).name]["message"]

    lines = text.splitlines()
    for name in [*corpus.failing, *(Path(s).name for s in corpus.extra_specs)]:
        assert _named_once(lines, name), (name, [ln for ln in lines if name in ln])
    warning_lines = [ln for ln in lines if ln.startswith("WARNING:")]
    for name in corpus.warned:
        assert _named_once(warning_lines, name), name
    for name in corpus.good:
        assert not any(_mentions(ln, name) for ln in lines), name
    n_inputs = len(corpus.good) + len(corpus.warned) + len(corpus.failing) + len(corpus.extra_specs) + len(fourd)
    assert f"{len(corpus.warned)} of {n_inputs} inputs look wrong for this model; see feats.parquet qc_warnings or run anatcl qc" in text
    kinds = dict(zip(written, table.column("qc_kind").to_pylist()))
    assert kinds["t1w_mwp1.nii.gz"] == "t1" and kinds["smoothed6_mwp1.nii.gz"] == "smoothed-gm"
    assert kinds["noise_mwp1.nii.gz"] == kinds["one-voxel_mwp1.nii.gz"] == kinds["scaled-1000_mwp1.nii.gz"] == "other"

    strict = _cli("embed", str(corpus.root), "--model", str(model_dir), "--out", str(tmp_path / "strict.parquet"),
                  "--workers", "0", "--strict", "--quiet")
    assert strict.returncode == 1 and "Traceback" not in _text(strict)
    strict_written = {Path(p).name for p in pq.read_table(tmp_path / "strict.parquet").column("path").to_pylist()}
    assert strict_written == set(corpus.good) | set(corpus.volumes)


def test_qc_survives_the_corpus(corpus, model_dir, tmp_path):
    pytest.importorskip("matplotlib")
    res = _cli("qc", str(corpus.root), *corpus.extra_specs, "--model", str(model_dir), "--out", str(tmp_path / "qc"), "--quiet")
    text = _text(res)
    assert res.returncode == 1, text
    assert "Traceback" not in text, text
    with open(tmp_path / "qc" / "qc_metrics.csv", newline="") as fh:
        listed = list(csv.DictReader(fh))
    rows = {Path(r["path"]).name: r for r in listed}
    for name, n in corpus.volumes.items():  # one row per volume of a 4D file, each named by its volume
        mine = [r for r in listed if Path(r["path"]).name == name]
        assert [r["volume"] for r in mine] == [str(i) for i in range(n)] and all(r["status"] == "ok" for r in mine), mine
    for name in corpus.good + corpus.warned:
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
    for name in corpus.failing:
        assert rows[name]["status"] == "failed", name
    lines = text.splitlines()
    for name in [*corpus.failing, *(Path(s).name for s in corpus.extra_specs)]:
        assert sum(_mentions(ln, name) and "failed" in ln for ln in lines) == 1, name


def test_extract_features_survives_the_corpus(corpus, model_dir):
    script = prelude() + textwrap.dedent(
        f"""
        import sys, warnings
        import os
        import numpy as np
        import anatcl_infer
        root = {str(corpus.root)!r}
        paths = sorted(os.path.join(root, n) for n in os.listdir(root) if n != "4d_mwp1.nii.gz")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            X = anatcl_infer.extract_features(paths, model={str(model_dir)!r}, on_error="warn", num_workers=2, progress=False)
            X4 = anatcl_infer.extract_features(os.path.join(root, "4d_mwp1.nii.gz"), model={str(model_dir)!r}, progress=False)
        print("FOURD", X4.shape[0], bool(np.isfinite(X4).all()))
        failures = [w for w in caught if issubclass(w.category, anatcl_infer.InputFailureWarning)]
        kinds = [w for w in caught if issubclass(w.category, anatcl_infer.InputWarning)]
        assert len(failures) == 1, failures
        print(str(failures[0].message))
        for w in kinds:
            print("KIND", str(w.message).split(":")[0])
        bad = ~np.isfinite(X).all(axis=1)
        print("ROWS", X.shape[0], len(paths), "NAN", int(bad.sum()))
        for p, b in zip(paths, bad):
            print("ROW", "nan" if b else "ok", os.path.basename(p).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        sys.exit(1 if bad.any() else 0)
        """
    )
    res = _run([sys.executable, "-c", script])
    text = _text(res)
    assert res.returncode == 1, text
    assert "Traceback" not in text, text
    lines = text.splitlines()
    rows = {ln.split(" ", 2)[2]: ln.split(" ", 2)[1] for ln in lines if ln.startswith("ROW ")}
    # a 4D file is one row per volume (issue 21): checked alone above, left out of the list here
    failing = dict(corpus.failing)
    assert "FOURD 3 True" in text
    n = len(corpus.good) + len(corpus.warned) + len(failing)
    assert f"ROWS {n} {n} NAN {len(failing)}" in text
    for name in failing:
        assert rows[name] == "nan", name
        assert sum(_mentions(ln, name) for ln in lines if ln.startswith("  input ")) == 1, name
    for name in corpus.good + corpus.warned:
        assert rows[name] == "ok", name
    kind_named = [ln for ln in lines if ln.startswith("KIND")]
    for name in corpus.warned:
        assert sum(ln.endswith("/" + name) for ln in kind_named) == 1, name
