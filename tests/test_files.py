"""Atomic writes keep the umask's modes (a shared folder stays readable by the group)."""

from __future__ import annotations

import os
import stat

import pytest

from anatcl_infer._files import atomic_dir, atomic_path


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_gets_umask_mode(tmp_path, umask022):
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_file_left_untouched_on_error(tmp_path, umask022):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_modes_and_replace(tmp_path, umask022):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("o")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("f")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "sub" / "f").stat().st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_regular_file_sha256_refuses_what_would_block_or_never_end(tmp_path):
    import hashlib
    import signal

    from anatcl_infer._files import regular_file_sha256

    (tmp_path / "a.nii").write_bytes(b"abc")
    assert regular_file_sha256(tmp_path / "a.nii") == hashlib.sha256(b"abc").hexdigest()
    os.mkfifo(tmp_path / "fifo_mwp1.nii")
    (tmp_path / "zero_mwp1.nii").symlink_to("/dev/zero")
    signal.alarm(10)  # a blocking open or an endless read fails the test instead of hanging it
    try:
        for name in ("fifo_mwp1.nii", "zero_mwp1.nii"):
            with pytest.raises(OSError, match="not a regular file"):
                regular_file_sha256(tmp_path / name)
    finally:
        signal.alarm(0)
