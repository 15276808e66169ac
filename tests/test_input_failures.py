"""Failure and warning paths of the encoder: on_error, warnings in the main process, worker failures, non-finite rows."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import anatcl_infer
from anatcl_infer.config import ModelConfig
from anatcl_infer.encoding.encoder import encode, extract_features, iter_encoded
from anatcl_infer.errors import ConfigError, InputError, InputFailureWarning, InputKindWarning, InputWarning
from anatcl_infer.model.network import AnatCL

from anatomy import mni_t1_on_grid
from hostile_corpus import GRID3_AFFINE, gm3
from test_hostile import PREP3

pytestmark = pytest.mark.slow  # several small embedding runs, one with loader processes


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AnatCL(ModelConfig(name="failures-test", source="unit-test", fold=0, preprocess=PREP3)).eval()


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name, data in (("good", gm3()), ("good2", gm3() * 0.9), ("t1", np.ascontiguousarray(mni_t1_on_grid()[::2, ::2, ::2]))):
        out[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), GRID3_AFFINE), out[name])
    out["corrupt"] = tmp_path / "corrupt.nii.gz"
    raw = bytearray(out["good"].read_bytes())
    raw[-8] ^= 0xFF  # CRC: isal raises IsalError, which is not an OSError
    out["corrupt"].write_bytes(bytes(raw))
    out["text"] = tmp_path / "text.nii.gz"
    out["text"].write_bytes(gzip.compress(b"not an image" * 100))
    return out


def test_on_error_warn_gives_nan_rows_aligned_and_one_warning_naming_each(model, files):
    items = [str(files["good"]), str(files["corrupt"]), str(files["good2"]), str(files["text"])]
    with pytest.warns(InputFailureWarning) as record:
        X = extract_features(items, model=model, on_error="warn", num_workers=0, progress=False)
    assert X.shape == (4, 512)
    assert np.isfinite(X[[0, 2]]).all() and np.isnan(X[[1, 3]]).all()
    np.testing.assert_array_equal(X[[0, 2]], encode(model, [items[0], items[2]], num_workers=0, progress=False))
    failures = [w for w in record if w.category is InputFailureWarning]
    assert len(failures) == 1
    text = str(failures[0].message)
    assert "2 of 4 inputs" in text and text.count(str(files["corrupt"])) == 1 and text.count(str(files["text"])) == 1
    assert "corrupt gzip" in text and "not a NIfTI file" in text
    with pytest.raises(InputError, match="on_error='warn'") as info:
        encode(model, items, num_workers=0, progress=False)
    assert info.value.path == str(files["corrupt"])
    with pytest.raises(ConfigError, match="on_error"):
        encode(model, items, on_error="skip", progress=False)


def test_kind_warnings_reach_the_caller_from_worker_processes_once_per_input(model, files):
    items = [str(files["good"]), str(files["t1"]), str(files["good2"])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anatcl_infer.extract_features(items, model=model, num_workers=2, progress=False)
    kind = [w for w in caught if issubclass(w.category, InputWarning)]
    assert len(kind) == 1 and kind[0].category is InputKindWarning
    assert str(kind[0].message).startswith(str(files["t1"]) + ": this looks like a T1-weighted image")
    assert issubclass(InputKindWarning, UserWarning) and issubclass(InputKindWarning, anatcl_infer.AnatCLWarning)
    # filterable like any warning; strict turns it into a failure of that input
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputKindWarning)
        with pytest.raises(InputError, match="T1-weighted"):
            encode(model, items, strict=True, num_workers=0, progress=False)


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("a library error holding a lock")
        self.lock = __import__("threading").Lock()


def test_any_exception_in_a_worker_comes_back_as_a_failure(model, files, monkeypatch):
    import anatcl_infer.inputs.preprocess as pre

    real = pre.prepare

    def flaky(item, *args, **kwargs):
        if str(item).endswith("good2.nii.gz"):
            raise _Unpicklable()
        return real(item, *args, **kwargs)

    monkeypatch.setattr(pre, "prepare", flaky)  # forked workers inherit the patch
    items = [str(files["good"]), str(files["good2"]), str(files["good"])]
    batches = list(iter_encoded(model, items, batch_size=1, num_workers=2, progress=False))
    failures = [f for b in batches for f in b.failures]
    assert [(f.index, f.stage) for f in failures] == [(1, "read")]
    assert "_Unpicklable: a library error holding a lock" in failures[0].message
    assert sorted(i for b in batches for i in b.indices) == [0, 2]


def test_a_non_finite_feature_row_is_a_failure_not_a_row(model, files):
    class Overflowing(torch.nn.Module):
        """Outputs NaN for inputs much brighter than the good ones."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        @property
        def device(self):
            return self.inner.device

        def forward(self, x):
            out = self.inner(x)
            return torch.where(x.flatten(1).amax(1, keepdim=True) > 10, torch.full_like(out, float("inf")), out)

    hot = gm3()
    hot[30, 40, 30] = 1e6
    items = [str(files["good"]), (hot, GRID3_AFFINE)]
    batches = list(iter_encoded(Overflowing(model), items, batch_size=2, num_workers=0, progress=False))
    assert [i for b in batches for i in b.indices] == [0]
    [failure] = [f for b in batches for f in b.failures]
    assert failure.index == 1 and failure.stage == "encode" and "non-finite" in failure.message
    with pytest.warns(InputFailureWarning):
        X = encode(Overflowing(model), items, num_workers=0, progress=False, on_error="warn")
    assert np.isfinite(X[0]).all() and np.isnan(X[1]).all()


def test_warnings_point_at_the_callers_line(tmp_path):
    """A warning names the user's own call, not a line inside the package."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent('''
        import warnings, numpy as np, nibabel as nib
        import anatcl_infer
        from anatcl_infer.model.network import AnatCL
        ref = np.array([[-1.5, 0, 0, 90], [0, 1.5, 0, -126], [0, 0, 1.5, -72], [0, 0, 0, 1]])
        rng = np.random.default_rng(0)
        noise = (rng.random((121, 145, 121)) * 100).astype(np.float32)
        model = AnatCL().eval()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.encode([(noise, ref), "missing_mwp1.nii.gz"], device="cpu", num_workers=0, progress=False, on_error="warn")  # LINE
        line = [i for i, l in enumerate(open(__file__).read().splitlines(), 1) if l.rstrip().endswith("# LINE")][0]
        mine = [w for w in seen if issubclass(w.category, anatcl_infer.AnatCLWarning)]
        assert len(mine) == 2, [str(w.message)[:80] for w in mine]
        for w in mine:
            assert w.filename == __file__ and w.lineno == line, (w.category.__name__, w.filename, w.lineno)
        print("ok")
    '''))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
