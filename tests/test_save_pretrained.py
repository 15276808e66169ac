"""The model-directory writer: atomic, umask-honouring, and kind to what else is in the folder."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from anatcl_infer.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig, PreprocessConfig
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.checkpoint import load_pretrained_dir, save_pretrained

SMALL = PreprocessConfig(grid_shape=(16, 16, 16), crop=((0, 16), (0, 16), (0, 16)))


def _model(seed: int) -> AnatCL:
    torch.manual_seed(seed)
    return AnatCL(ModelConfig(name="t", source="unit-test", fold=0, preprocess=SMALL))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_directory_is_complete_and_shareable(tmp_path, umask_022):
    out = save_pretrained(_model(0), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left beside it
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644


def test_existing_directory_keeps_other_files_and_gets_the_new_weights(tmp_path, umask_022):
    out = save_pretrained(_model(0), tmp_path / "m")
    (out / "README.md").write_text("my card\n")
    second = _model(1)
    save_pretrained(second, out)
    assert (out / "README.md").read_text() == "my card\n"
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, "README.md", WEIGHTS_NAME])  # no temporary files
    assert _same_weights(load_pretrained_dir(out), second)
    assert stat.S_IMODE((out / WEIGHTS_NAME).stat().st_mode) == 0o644


def test_a_crash_while_writing_leaves_the_old_model_or_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    first = _model(0)
    out = save_pretrained(first, tmp_path / "m")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_model(1), out)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_model(1), tmp_path / "new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert _same_weights(load_pretrained_dir(out), first)


def test_config_save_is_atomic_and_shareable(tmp_path, umask_022, monkeypatch):
    cfg = ModelConfig(name="t", fold=1)
    path = cfg.save(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert ModelConfig.load(tmp_path) == cfg
    before = path.read_text()

    real = type(path).write_text

    def half_then_boom(self, text, *args, **kwargs):  # the disk fills up in the middle of the file
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", half_then_boom)
    with pytest.raises(OSError, match="disk full"):
        ModelConfig(name="other").save(tmp_path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME]
