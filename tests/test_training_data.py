"""Training data: manifest and OpenBHB readers, descriptors, and the same preprocessing as inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_toys import TINY, make_subjects, tiny_gm

from anatcl_infer.errors import ConfigError, InputError
from anatcl_infer.inputs.preprocess import prepare
from anatcl_infer.training.data import (
    N_REGIONS,
    VolumeDataset,
    fit_descriptor_range,
    normalize_descriptors,
    read_manifest,
    read_openbhb,
    roi_to_descriptors,
    split_subjects,
)


def test_roi_channels_are_ct_gmv_sa():
    roi = np.arange(7 * 68, dtype=np.float32).reshape(7, 68)
    desc = roi_to_descriptors(roi)
    assert desc.shape == (68, 3)
    np.testing.assert_array_equal(desc[:, 0], roi[2])  # thickness
    np.testing.assert_array_equal(desc[:, 1], roi[1])  # grey-matter volume
    np.testing.assert_array_equal(desc[:, 2], roi[0])  # surface area
    np.testing.assert_array_equal(roi_to_descriptors(roi.T), desc)
    np.testing.assert_array_equal(roi_to_descriptors(roi[None]), desc)
    with pytest.raises(InputError, match=r"\(7, 68\)"):
        roi_to_descriptors(np.zeros((7, 148)))


def test_descriptor_range_is_per_region_and_measure_and_clips():
    x = np.random.default_rng(0).random((10, 68, 3)).astype(np.float32)
    x[:, 5, 1] *= 1000
    lo, hi = fit_descriptor_range(x)
    out = normalize_descriptors(x, lo, hi)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[:, 5, 1].max(), 1.0)
    np.testing.assert_allclose(out.min(axis=0), 0.0)
    np.testing.assert_allclose(out.max(axis=0), 1.0)
    beyond = normalize_descriptors(x[:1] * 10, lo, hi)
    assert beyond.max() <= 1.0
    const = normalize_descriptors(np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)))
    np.testing.assert_array_equal(const, 0.5)


def test_manifest_reader_and_dataset(tmp_path):
    manifest = make_subjects(tmp_path / "d", n=6, val=2, sites=2)
    subjects = read_manifest(manifest)
    assert len(subjects) == 6 and subjects[0].path.startswith(str(tmp_path))
    assert subjects[0].descriptors.shape == (N_REGIONS, 3) and subjects[0].site in ("site0", "site1")
    train, val = split_subjects(subjects)
    assert (len(train), len(val)) == (4, 2)
    ds = VolumeDataset(train, TINY)
    item = ds[1]
    assert item["image"].shape == (1, *TINY.model_input_shape) and item["image"].dtype == torch.float32
    assert item["age"].item() == pytest.approx(train[1].age, abs=1e-4)
    assert 0.0 <= item["descriptors"].min() and item["descriptors"].max() <= 1.0 and item["has_descriptors"]
    # exactly what inference gets from the same array
    expected = prepare(np.load(train[1].path), TINY, assume_reference_grid=True).array
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    vds = ds.with_subjects(val)
    assert vds.descriptor_range is ds.descriptor_range and vds.sites == ds.sites


def test_manifest_descriptor_columns_and_nifti(tmp_path):
    import nibabel as nib

    vol = tiny_gm()
    nib.save(nib.Nifti1Image(vol, np.array(TINY.grid_affine)), tmp_path / "a.nii.gz")
    np.save(tmp_path / "b.npy", vol[None])
    cols = [f"{m}_{k}" for m in ("ct", "gmv", "sa") for k in range(68)]
    rows = [",".join(["path", "age", *cols])]
    for name, age in (("a.nii.gz", 30), ("b.npy", 40)):
        vals = [str(2.5)] * 68 + [str(900.0)] * 68 + [str(1500.0 + age)] * 68
        rows.append(",".join([name, str(age), *vals]))
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    subjects = read_manifest(tmp_path / "m.csv")
    assert subjects[0].descriptors[0].tolist() == [2.5, 900.0, 1530.0]
    ds = VolumeDataset(subjects, TINY)
    np.testing.assert_allclose(ds[0]["image"].numpy(), ds[1]["image"].numpy(), atol=1e-6)
    assert ds[0]["site"].item() == -1


def test_manifest_errors(tmp_path):
    (tmp_path / "m.csv").write_text("file,age\nx.npy,3\n")
    with pytest.raises(ConfigError, match="'path' and 'age'"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("path,age\nx.npy,old\n")
    with pytest.raises(ConfigError, match="numeric age"):
        read_manifest(tmp_path / "n.csv")
    (tmp_path / "o.csv").write_text("path,age\nmissing.npy,3\nmissing2.npy,4\n")
    ds = VolumeDataset(read_manifest(tmp_path / "o.csv"), TINY)
    with pytest.raises(InputError) as info:
        ds[0]
    assert "missing.npy" in str(info.value)


def test_openbhb_layout(tmp_path):
    root = tmp_path / "openbhb"
    vol = tiny_gm()[None]
    rows = ["participant_id\tage\tsex\tsite\tsplit"]
    for k, (sid, split) in enumerate([("1001", "train"), ("1002", "train"), ("1003", "val"), ("1004", "external_test")]):
        folder = root / ("train" if split == "train" else "val")
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"sub-{sid}_preproc-cat12vbm_desc-gm_T1w.npy", vol * (1 + k / 10))
        roi = np.full((7, 68), k + 1.0, dtype=np.float32)
        roi[2] = 2.0 + k / 10
        np.save(folder / f"sub-{sid}_preproc-freesurfer_desc-desikan_ROI.npy", roi)
        rows.append(f"sub-{sid}\t{20 + k}\tM\tsite{k % 2}\t{split}")
    rows.append("sub-9999\t50\tF\tsite0\ttrain")  # no image: skipped
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    subjects = read_openbhb(root)
    assert [s.subject for s in subjects] == ["1001", "1002", "1003", "1004"]
    assert subjects[2].descriptors[0, 0] == pytest.approx(2.2)
    train, val = split_subjects(subjects)
    assert [s.subject for s in train] == ["1001", "1002"] and [s.subject for s in val] == ["1003"]
    item = VolumeDataset(train, TINY)[1]
    assert item["image"].shape == (1, *TINY.model_input_shape)
    with pytest.raises(ConfigError, match="participants.tsv"):
        read_openbhb(tmp_path / "empty_dir_that_is_missing")
