"""How the raw-T1 routes write their files, checked without the [prep] extra (its tools are faked).

The routes' real runs need deepbet/deepmriprep (skipped where they are not installed); what the
package itself does around them (atomic outputs with umask modes, nothing left behind on failure,
the sidecar's record of the source) is checked here on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from anatomy import REF_AFFINE, save_nifti

from anatcl_infer.inputs import raw_t1 as prep


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def fake_deepbet(tmp_path, monkeypatch):
    """A deepbet stand-in whose extractor halves the image (or fails half-way when told to)."""
    weights = tmp_path / "deepbet-weights"
    weights.mkdir()
    for name in ("model.pt", "bbox_model.pt"):
        (weights / name).write_bytes(b"weights")
    monkeypatch.setattr(prep, "_deepbet_weights", lambda: [weights / "model.pt", weights / "bbox_model.pt"])
    calls: list[str] = []

    class BrainExtraction:
        fail = False

        def __init__(self, **kwargs):
            pass

        def run(self, src, brain_path):
            calls.append(brain_path)
            if self.fail:
                with open(brain_path, "wb") as fh:
                    fh.write(b"half a file")
                raise RuntimeError("out of memory")
            img = nib.load(src)
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0.5, img.affine), brain_path)

    module = types.ModuleType("deepbet")
    module.BrainExtraction = BrainExtraction
    monkeypatch.setitem(sys.modules, "deepbet", module)
    return BrainExtraction, calls


def test_skull_strip_output_appears_whole_with_umask_mode(tmp_path, fake_deepbet, umask_022):
    extractor, calls = fake_deepbet
    src = save_nifti(tmp_path / "t1.nii.gz", np.ones((10, 12, 14), dtype=np.float32), REF_AFFINE)
    out = prep.skull_strip(src, tmp_path / "out" / "sub-01_brain.nii.gz")
    assert calls[0].endswith(".nii.gz") and calls[0] != str(out)  # the tool wrote a temporary .nii.gz beside it
    assert sorted(os.listdir(out.parent)) == ["sub-01_brain.nii.gz"]
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), 0.5)

    extractor.fail = True
    with pytest.raises(RuntimeError, match="out of memory"):
        prep.skull_strip(src, tmp_path / "out" / "sub-02_brain.nii.gz")
    assert sorted(os.listdir(out.parent)) == ["sub-01_brain.nii.gz"]  # no half-written file, no temporary


def test_installing_models_leaves_nothing_half_copied(tmp_path, monkeypatch, umask_022):
    target = tmp_path / "site" / "models"
    monkeypatch.setattr(prep, "_deepmriprep_models_dir", lambda: target)
    monkeypatch.setattr(prep, "_deepmriprep_model_files", lambda: ["a.pt", "b.pt"])
    source = tmp_path / "usb"
    source.mkdir()
    (source / "a.pt").write_bytes(b"A")
    (source / "b.pt").write_bytes(b"B")
    real_copy = prep.shutil.copyfile

    def copy_failing_on_b(src, dst):
        if os.path.basename(src) == "b.pt":
            with open(dst, "wb") as fh:
                fh.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(prep.shutil, "copyfile", copy_failing_on_b)
    with pytest.raises(OSError, match="No space left"):
        prep.install_deepmriprep_models(source)
    assert sorted(os.listdir(target)) == ["a.pt"]  # the failed copy left no temporary file
    assert prep.missing_deepmriprep_models() == ["b.pt"]

    monkeypatch.setattr(prep.shutil, "copyfile", real_copy)
    assert prep.install_deepmriprep_models(source) == target
    assert sorted(os.listdir(target)) == ["a.pt", "b.pt"] and (target / "b.pt").read_bytes() == b"B"
    assert stat.S_IMODE(os.stat(target / "b.pt").st_mode) == 0o644


def test_t1_to_mni_sidecar_records_the_source_hash(tmp_path, monkeypatch):
    src = save_nifti(tmp_path / "sub-01_T1w.nii.gz", np.ones((10, 12, 14), dtype=np.float32), REF_AFFINE)

    def fake_register(image, out):
        return prep._save_nifti(np.zeros((121, 145, 121)), np.asarray(REF_AFFINE), out), {"seed": 1234}

    monkeypatch.setattr(prep, "register_to_mni", fake_register)
    out = prep.t1_to_mni(src, tmp_path / "derivatives", strip=False)
    assert out.name == "sub-01_T1w_space-MNI152aff_T1w.nii.gz"
    side = json.loads((out.parent / "sub-01_T1w_space-MNI152aff_T1w.json").read_text())
    assert side["source_sha256"] == hashlib.sha256(Path(src).read_bytes()).hexdigest()
    assert side["output"] == out.name and side["steps"][0]["seed"] == 1234
    assert sorted(os.listdir(out.parent)) == sorted([out.name, "sub-01_T1w_space-MNI152aff_T1w.json"])


def test_the_registration_template_is_read_while_its_file_exists():
    """The packaged template is read inside importlib.resources' as_file block (a zipped install
    extracts it to a temporary file that is gone afterwards); it is the 3 mm MNI T1 on disk."""
    seen = {}

    class FakeSitk:
        sitkFloat32 = "float32"

        @staticmethod
        def ReadImage(path, pixel):
            seen["exists"], seen["pixel"] = Path(path).is_file(), pixel
            return nib.load(path).shape

    shape = prep._read_template(FakeSitk)
    assert seen == {"exists": True, "pixel": "float32"}
    assert len(shape) == 3 and min(shape) > 40
