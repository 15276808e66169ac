"""Input discovery: files, folders, globs, path lists, BIDS datasets and entity parsing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anatcl_infer.inputs.discovery import InputRecord, discover_inputs, is_nifti_name, parse_entities
from anatcl_infer.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _touch(root: Path, *relpaths: str) -> list[str]:
    out = []
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0")
        out.append(str(path))
    return out


def _paths(records: list[InputRecord]) -> list[str]:
    return [r.path for r in records]


def _bids_root(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.8.0"}))
    return root


def test_single_file_gives_an_absolute_path(tmp_path, monkeypatch):
    (path,) = _touch(tmp_path, "sub-01_T1w.nii.gz")
    monkeypatch.chdir(tmp_path)
    records = discover_inputs("sub-01_T1w.nii.gz")
    assert records == [InputRecord(path=path, subject="01")]
    assert os.path.isabs(records[0].path)


def test_directory_is_searched_recursively_and_sorted(tmp_path):
    paths = _touch(tmp_path, "b/scan2.nii", "a/deeper/scan1.nii.gz", "c.NII.GZ", "notes.txt", "a/image.mgz", ".hidden/x.nii", "a/._scan1.nii.gz")
    records = discover_inputs([tmp_path], input_kind="t1")
    assert _paths(records) == sorted([paths[0], paths[1], paths[2]])


def test_symlink_loop_does_not_hang(tmp_path):
    (path,) = _touch(tmp_path, "a/mwp1sub-01.nii")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert _paths(discover_inputs(tmp_path)) == [path]


def test_cat12_output_folder_keeps_the_unsmoothed_gm_maps(tmp_path):
    _touch(
        tmp_path,
        "mri/mwp1sub-01_T1w.nii",
        "mri/mwp2sub-01_T1w.nii",
        "mri/p0sub-01_T1w.nii",
        "mri/wmsub-01_T1w.nii",
        "mri/s6mwp1sub-01_T1w.nii",
        "sub-02/mri/mwp1sub-02_T1w.nii",
    )
    records = discover_inputs(tmp_path)
    assert [Path(p).name for p in _paths(records)] == ["mwp1sub-01_T1w.nii", "mwp1sub-02_T1w.nii"]
    assert [r.subject for r in records] == ["01", "02"]
    # the same folder for a T1 model: every NIfTI file
    assert len(discover_inputs(tmp_path, input_kind="t1")) == 6


def test_only_smoothed_maps_are_still_found_and_said_out_loud(tmp_path, caplog):
    _touch(tmp_path, "s6mwp1sub-01.nii", "p0sub-01.nii")
    with caplog.at_level("WARNING", logger="anatcl_infer"):
        assert [Path(p).name for p in _paths(discover_inputs(tmp_path))] == ["s6mwp1sub-01.nii"]
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "only smoothed grey-matter maps" in record.getMessage() and str(tmp_path) in record.getMessage()


def test_what_cannot_be_searched_is_reported_not_skipped(tmp_path, monkeypatch):
    good = _touch(tmp_path, "scans/mwp1sub-01.nii", "scans/locked/mwp1sub-02.nii")
    (tmp_path / "empty").mkdir()
    (tmp_path / "scans" / "mwp1sub-03.nii.gz").mkdir()  # a folder named like an image: listed, so reading reports it
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.fspath(path).endswith("locked"):  # shutil.rmtree passes descriptors
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root can list any folder: simulate an unreadable one
    problems: list[tuple[str, str, str]] = []
    records = discover_inputs(
        [str(tmp_path / "scans"), str(tmp_path / "empty"), str(tmp_path / "missing.nii.gz")], problems=problems
    )
    assert _paths(records) == sorted([good[0], str(tmp_path / "missing.nii.gz"), str(tmp_path / "scans" / "mwp1sub-03.nii.gz")])
    assert [(Path(p).name, stage) for p, stage, _ in problems] == [("locked", "discover"), ("empty", "discover")]
    assert "cannot be listed (Permission denied)" in problems[0][2]
    assert "yields no input image" in problems[1][2]
    # without a problems list, a missing explicit path still raises (the Python API's contract)
    with pytest.raises(InputError, match="does not exist"):
        discover_inputs([str(tmp_path / "missing.nii.gz")])


def test_glob_pattern(tmp_path):
    paths = _touch(tmp_path, "x/mwp1a.nii", "y/z/mwp1b.nii.gz", "y/z/other.nii")
    records = discover_inputs(str(tmp_path / "**" / "mwp1*.nii*"))
    assert _paths(records) == sorted(paths[:2])


def test_glob_without_match_lists_what_was_searched(tmp_path):
    with pytest.raises(InputError) as info:
        discover_inputs(str(tmp_path / "*.nii"))
    assert info.value.stage == "discover"
    assert "no input images found" in str(info.value) and "glob" in str(info.value)


def test_list_file(tmp_path):
    a, b = _touch(tmp_path, "data/sub-01/mwp1sub-01.nii", "elsewhere/sub-02_ses-2_T1w.nii.gz")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "inputs.txt").write_text(
        "# one path per line\n\n../data/sub-01/mwp1sub-01.nii\n" + f"  {b}  \n" + "../data/sub-01/mwp1sub-01.nii\n" + "missing/sub-03.nii\n"
    )
    records = discover_inputs(lists / "inputs.txt")
    missing = str(lists / "missing" / "sub-03.nii")
    assert _paths(records) == sorted([a, b, missing])
    by_path = {r.path: r for r in records}
    assert by_path[b].session == "2" and by_path[missing].subject == "03"


def test_list_file_cannot_include_lists(tmp_path):
    (tmp_path / "inner.lst").write_text("x.nii\n")
    (tmp_path / "outer.txt").write_text("inner.lst\n")
    with pytest.raises(InputError, match="cannot include other lists"):
        discover_inputs(tmp_path / "outer.txt")


def test_bids_t1(tmp_path):
    root = _bids_root(tmp_path / "ds")
    paths = _touch(
        root,
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_acq-mprage_run-2_T1w.nii",
        "sub-02/ses-1/anat/sub-02_ses-1_T2w.nii.gz",
        "sub-02/ses-1/func/sub-02_ses-1_task-rest_bold.nii.gz",
        "derivatives/cat12/sub-01/mri/mwp1sub-01_T1w.nii",
    )
    records = discover_inputs(root, input_kind="t1")
    assert records == [
        InputRecord(path=paths[0], subject="01"),
        InputRecord(path=paths[1], subject="02", session="1", run="2", acquisition="mprage"),
    ]


def test_bids_gm_uses_derivatives(tmp_path):
    root = _bids_root(tmp_path / "ds")
    paths = _touch(
        root,
        "sub-01/anat/sub-01_T1w.nii.gz",
        "derivatives/cat12/sub-01/mri/mwp1sub-01_T1w.nii",
        "derivatives/cat12/sub-01/mri/p0sub-01_T1w.nii",
        "derivatives/cat12/sub-02/ses-b/mri/mwp1sub-02_ses-b_run-1_T1w.nii",
        "derivatives/openbhb/sub-03/sub-03_preproc-cat12vbm_desc-gm_T1w.nii.gz",
    )
    records = discover_inputs(root)
    assert _paths(records) == sorted([paths[1], paths[3], paths[4]])
    assert [(r.subject, r.session, r.run) for r in records] == [("01", None, None), ("02", "b", "1"), ("03", None, None)]


def test_bids_gm_without_derivatives_folder(tmp_path):
    root = _bids_root(tmp_path / "ds")
    paths = _touch(root, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/cat12/mwp1sub-01_T1w.nii")
    assert _paths(discover_inputs(root)) == [paths[1]]


def test_bids_gm_with_nothing_says_where_it_looked(tmp_path):
    root = _bids_root(tmp_path / "ds")
    _touch(root, "sub-01/anat/sub-01_T1w.nii.gz")
    with pytest.raises(InputError) as info:
        discover_inputs(root)
    message = str(info.value)
    assert "derivatives" in message and "mwp1" in message


def test_duplicates_are_removed(tmp_path):
    (path,) = _touch(tmp_path, "d/mwp1sub-01.nii")
    records = discover_inputs([path, tmp_path / "d", str(tmp_path / "d" / "*.nii"), tmp_path / "d" / ".." / "d" / "mwp1sub-01.nii"])
    assert _paths(records) == [path]


def test_missing_spec_raises(tmp_path):
    with pytest.raises(InputError, match="does not exist") as info:
        discover_inputs([tmp_path / "nope.nii.gz"])
    assert info.value.stage == "discover" and info.value.path == str(tmp_path / "nope.nii.gz")


def test_empty_folder_raises_with_the_search(tmp_path):
    with pytest.raises(InputError) as info:
        discover_inputs(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_invalid_arguments():
    with pytest.raises(InputError, match="input_kind"):
        discover_inputs("x", input_kind="flair")
    with pytest.raises(InputError, match="no inputs given"):
        discover_inputs([])


def test_example_data():
    records = discover_inputs(EXAMPLES)
    assert [r.subject for r in records] == ["mni01", "mni02", "mni03"]
    assert all(r.path.endswith("_T1w.nii.gz") for r in records)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/d/sub-01/ses-pre/anat/sub-01_ses-pre_acq-fast_run-3_T1w.nii.gz", ("01", "pre", "3", "fast")),
        ("/d/cat12/mri/mwp1sub-07_ses-2_T1w.nii", ("07", "2", None, None)),
        ("/d/sub-11/ses-1/mri/mwp1T1.nii", ("11", "1", None, None)),
        ("/d/scan.nii", (None, None, None, None)),
    ],
)
def test_parse_entities(path, expected):
    found = parse_entities(path)
    assert (found["subject"], found["session"], found["run"], found["acquisition"]) == expected


def test_is_nifti_name():
    assert is_nifti_name("a.nii") and is_nifti_name("A.NII.GZ")
    assert not is_nifti_name("a.nii.bak") and not is_nifti_name(".a.nii") and not is_nifti_name("a.mgz")
