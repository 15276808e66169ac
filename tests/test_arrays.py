"""In-memory inputs keep their orientation: files, nibabel images, (array, affine), TorchIO, MONAI.

Real anatomy: examples/data/mwp1sub-mni03_T1w.nii.gz is left-right asymmetric, so a
mirrored input gives other features. An RAS-ordered copy of it (what TorchIO, MONAI and
nilearn hand over) must reach the model exactly as the file does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.encoding.encoder import encode
from anatcl_infer.errors import InputError
from anatcl_infer.inputs.preprocess import prepare, split_volumes
from anatcl_infer.model.network import AnatCL

pytestmark = pytest.mark.slow  # full-grid forward passes and the TorchIO/MONAI imports

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "mwp1sub-mni03_T1w.nii.gz"


@pytest.fixture(scope="module")
def ras():
    """The example map re-stored in RAS order (x left to right) with its matching affine."""
    img = nib.as_closest_canonical(nib.load(EXAMPLE))
    data = np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32))
    assert img.affine[0, 0] > 0 and nib.load(EXAMPLE).affine[0, 0] < 0  # really reordered
    return data, np.asarray(img.affine)


GRID3 = PreprocessConfig(
    grid_shape=(61, 73, 61), grid_affine=((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1)),
    crop=((0, 61), (4, 68), (0, 61)),
)


@pytest.fixture(scope="module")
def small_model():
    """A model on a 3 mm grid, for tests about rows rather than anatomy."""
    torch.manual_seed(1)
    return AnatCL(ModelConfig(name="rows-test", source="unit-test", fold=0, preprocess=GRID3)).eval()


@pytest.fixture(scope="module")
def ras3(ras):
    data, affine = ras
    return np.ascontiguousarray(data[1::2, ::2, ::2]), affine @ np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AnatCL(ModelConfig(name="orientation-test", source="unit-test", fold=0, preprocess=PreprocessConfig())).eval()


def test_the_example_is_asymmetric(ras):
    data, _ = ras
    assert np.abs(data - data[::-1]).max() > 0.5


def test_every_container_gives_bit_identical_features_to_the_file(ras, model):
    data, affine = ras
    items: list = [str(EXAMPLE), nib.load(EXAMPLE), nib.Nifti1Image(data, affine), (data, affine), (torch.from_numpy(data), affine)]
    tio = pytest.importorskip("torchio")
    items += [tio.ScalarImage(tensor=data[None].copy(), affine=affine), tio.ScalarImage(EXAMPLE), tio.Subject(t1=tio.ScalarImage(EXAMPLE))]
    monai_transforms = pytest.importorskip("monai.transforms")
    loaded = monai_transforms.LoadImage(image_only=True)(str(EXAMPLE))
    items += [loaded, monai_transforms.EnsureChannelFirst()(loaded)]
    arrays = [prepare(it, emit_warnings=False).array for it in items]
    for arr in arrays[1:]:
        np.testing.assert_array_equal(arr, arrays[0])
    # features: the file, the RAS (array, affine), the TorchIO image and the MONAI MetaTensor
    feats = encode(model, [items[0], items[3], items[5], items[8]], num_workers=0, progress=False)
    assert feats.shape == (4, 512)
    for row in feats[1:]:
        np.testing.assert_array_equal(row, feats[0])
    # on the caller's word, the same RAS array is taken as stored like the grid: mirrored, other features
    mirrored = encode(model, data, num_workers=0, progress=False, assume_reference_grid=True)
    assert np.abs(mirrored[0] - feats[0]).max() > 1e-4


def test_bare_array_needs_an_affine_or_the_callers_word(ras, model):
    data, _ = ras
    with pytest.raises(InputError, match=r"pass \(array, affine\).*assume_reference_grid=True"):
        prepare(data)
    with pytest.raises(InputError, match="assume_reference_grid"):
        encode(model, torch.from_numpy(data), num_workers=0, progress=False)
    with pytest.raises(InputError, match=r"pass \(array, affine\)"):
        prepare(np.ones((100, 100, 100), np.float32), assume_reference_grid=True)


def test_torchio_and_monai_are_not_imported_for_plain_inputs(tmp_path):
    import subprocess

    code = (
        "import sys, numpy as np, anatcl_infer\n"
        f"anatcl_infer.prepare({str(EXAMPLE)!r})\n"
        "assert 'torchio' not in sys.modules and 'monai' not in sys.modules, sorted(m for m in sys.modules if 'monai' in m or 'torchio' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_4d_stack_is_one_input_per_volume(ras3, small_model):
    data, affine = ras3
    model = small_model
    vols = [data, data * 0.9, data * 0.8]
    single = encode(model, [(v, affine) for v in vols], num_workers=0, progress=False)
    assert np.abs(single[0] - single[2]).max() > 0
    stacked = encode(model, (np.stack(vols, axis=-1), affine), num_workers=0, progress=False)
    np.testing.assert_array_equal(stacked, single)
    image4d = encode(model, nib.Nifti1Image(np.stack(vols, axis=-1), affine), num_workers=0, progress=False)
    np.testing.assert_array_equal(image4d, single)
    # a list mixing a 4D image and a single volume: rows follow the volumes, in order
    mixed = encode(model, [nib.Nifti1Image(np.stack(vols[:2], axis=-1), affine), (vols[2], affine)], num_workers=0, progress=False)
    np.testing.assert_array_equal(mixed, single)
    tio = pytest.importorskip("torchio")
    channels = encode(model, tio.ScalarImage(tensor=np.stack(vols), affine=affine), num_workers=0, progress=False)
    np.testing.assert_array_equal(channels, single)
    assert len(split_volumes(np.zeros((4, 121, 145, 121), np.float32))) == 4
    with pytest.raises(InputError, match="holds 3 volumes"):
        prepare((np.stack(vols, axis=-1), affine))


def test_nifti_without_orientation_only_on_the_reference_shape(tmp_path):
    data = np.asarray(nib.load(EXAMPLE).dataobj, dtype=np.float32)
    img = nib.Nifti1Image(data, None)  # qform_code = sform_code = 0
    assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 0
    path = tmp_path / "no-orientation.nii"
    nib.save(img, path)
    prepared = prepare(path, emit_warnings=False)
    np.testing.assert_array_equal(prepared.array, prepare(EXAMPLE, emit_warnings=False).array)
    assert any("no orientation" in w for w in prepared.warnings)
    nib.save(nib.Nifti1Image(data[:-1], None), tmp_path / "cut.nii")
    with pytest.raises(InputError, match="no orientation in its header"):
        prepare(tmp_path / "cut.nii")
