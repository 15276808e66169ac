"""The allowlist unpickler: authors' checkpoints load, code-running pickles are refused."""

from __future__ import annotations

import argparse
import builtins
import collections
import importlib.util
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from anatcl_infer.errors import AnatCLError, CheckpointError, UnsafeCheckpointError
from anatcl_infer.weights.unpickle import safe_load
from author_checkpoints import random_state_dict, write_author_checkpoint


@pytest.fixture(scope="module")
def state():
    return random_state_dict(seed=1)


@pytest.fixture(scope="module")
def author_ckpt(tmp_path_factory, state):
    return write_author_checkpoint(tmp_path_factory.mktemp("ckpt") / "weights.pth", state)


def test_author_checkpoint_loads_without_its_training_code(author_ckpt, state):
    assert "models" not in sys.modules
    ckpt = safe_load(author_ckpt)
    assert "models" not in sys.modules  # the unknown class was never imported
    assert set(ckpt) == {"model", "opts", "optimizer", "epoch", "run_id", "estimators"}  # "estimator" dropped
    assert ckpt["estimators"] == [{"mae": 2.55}]  # placeholder dropped from the list, the rest kept
    assert isinstance(ckpt["opts"], argparse.Namespace) and ckpt["opts"].lambd == 1.0
    assert ckpt["epoch"] == 49 and ckpt["run_id"] == "2x7kq9vd"
    assert isinstance(ckpt["model"], collections.OrderedDict) or isinstance(ckpt["model"], dict)
    assert list(ckpt["model"]) == list(state)
    for key, value in state.items():
        assert ckpt["model"][key].dtype == value.dtype
        assert torch.equal(ckpt["model"][key], value), key
    adam = ckpt["optimizer"]
    assert adam["param_groups"][0]["lr"] == 1e-4
    assert set(adam["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_plain_unpickle_would_fail_on_the_same_file(author_ckpt):
    # The situation the safe loader exists for: torch refuses it, a plain unpickle cannot import it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(author_ckpt, weights_only=True)
    with zipfile.ZipFile(author_ckpt) as zf:
        assert b"models.estimators" in zf.read("weights/data.pkl")
    assert importlib.util.find_spec("models") is None  # so a plain unpickle would fail to import it


def test_tensor_kinds_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    obj = {
        "f16": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(10),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(6, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": base.transpose(0, 2),  # non-contiguous view
        "slice": base[1, 1:],  # view with a storage offset
        "shared_a": base,
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "np_f": np.float32(1.25),
        "np_i": np.int64(7),
        "np_arr": np.arange(6.0).reshape(2, 3),
        "size": torch.Size([1, 2, 3]),
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "bytes": b"\x00\xff",
        "complex": 1 + 2j,
        "slice_obj": slice(1, 5, 2),
        "nested": [(1, 2.0, None, "x")],
        "ns": argparse.Namespace(a=1),
    }
    path = tmp_path / "kinds.pt"
    torch.save(obj, path)
    out = safe_load(path)
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(out[key], torch.Tensor) and out[key].dtype == value.dtype, key
            assert out[key].shape == value.shape and torch.equal(out[key], value.detach()), key
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(out[key], value)
        else:
            assert out[key] == value and type(out[key]) is type(value), key
    # views share their storage, as with torch.load (issue 22: copying each view multiplied memory)
    reference = torch.load(path, weights_only=False)  # our own file
    for loaded in (out, reference):
        loaded["shared_a"][0, 0, 0] = -1
        assert loaded["slice"][0, 0] == 16 and loaded["transposed"][0, 0, 0] == -1


class _RunsCommand:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    ("func", "args", "global_name"),
    [
        (os.system, ("touch {marker}",), "system"),
        (builtins.eval, ("open({marker!r}, 'w').close()",), "builtins.eval"),
        (builtins.exec, ("open({marker!r}, 'w').close()",), "builtins.exec"),
        (subprocess.Popen, (["touch", "{marker}"],), "subprocess.Popen"),
        (builtins.getattr, (collections.OrderedDict(), "clear"), "builtins.getattr"),
        (torch.load, ("{marker}",), "torch.serialization.load"),
    ],
)
def test_code_running_pickles_are_refused_and_nothing_runs(tmp_path, func, args, global_name):
    marker = tmp_path / "pwned"
    args = tuple(a.format(marker=str(marker)) if isinstance(a, str) else
                 [x.format(marker=str(marker)) for x in a] if isinstance(a, list) else a for a in args)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCommand(func, *args)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load(path)
    assert not marker.exists()
    err = info.value
    assert str(path) in str(err) and err.path == str(path)
    assert global_name in err.global_name and global_name.rsplit(".", 1)[-1] in str(err)
    assert isinstance(err, CheckpointError) and isinstance(err, AnatCLError)


def test_hidden_in_unknown_class_state_is_still_refused(tmp_path):
    # A malicious reduce nested inside the state of a placeholder class is still resolved -- and refused.
    from author_checkpoints import fake_training_module

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with fake_training_module() as AgeEstimator:
        est = AgeEstimator()
        est.hook = _RunsCommand(os.system, f"touch {marker}")
        torch.save({"estimator": est}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        safe_load(path)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, I am not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        safe_load(text)
    other_zip = tmp_path / "other.pth"
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(CheckpointError, match="no single data.pkl"):
        safe_load(other_zip)
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_load(tmp_path / "missing.pth")


def test_truncated_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="download it again"):
        safe_load(path)


def test_legacy_format_is_read(tmp_path, state):
    # torch < 1.6 wrote a stream of pickles followed by the raw storages; it loads like the zip format
    path = tmp_path / "old.pth"
    opts = argparse.Namespace(lr=1e-4, crop=(121, 128, 121))
    view = torch.arange(12.0).reshape(3, 4)[:, 1:3]  # a view into a shared storage
    torch.save({"model": state, "opts": opts, "view": view, "half": torch.ones(3, dtype=torch.float16)},
               path, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(path) is False
    out = safe_load(path)
    assert out["model"].keys() == state.keys() and all(torch.equal(out["model"][k], v) for k, v in state.items())
    assert torch.equal(out["view"], view) and out["half"].dtype == torch.float16
    assert vars(out["opts"]) == vars(opts)
    # cut short inside the storages: a clean error, not a short tensor
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.pth"):
        safe_load(tmp_path / "cut.pth")


def test_big_endian_archive_is_byteswapped(tmp_path):
    # Rewrite a little-endian archive as a big-endian machine would have written it.
    value = torch.arange(6, dtype=torch.float32) * 1.5
    src = tmp_path / "le.pt"
    torch.save({"w": value}, src)
    dst = tmp_path / "be.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            zout.writestr(info, data)
    assert torch.equal(safe_load(dst)["w"], value)


def test_loaded_object_has_no_placeholder_left(author_ckpt):
    ckpt = safe_load(author_ckpt)
    stack = [ckpt]
    while stack:
        obj = stack.pop()
        assert "placeholder" not in type(obj).__module__
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, argparse.Namespace):
            stack.extend(vars(obj).values())


def test_python2_module_names_are_mapped_before_the_allowlist(tmp_path):
    # Protocol-2 pickles name subprocess.Popen "commands.Popen"; it must not pass as an unknown class.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"payload": _RunsCommand(subprocess.Popen, ["touch", str(marker)])}, path)
    assert b"commands" in zipfile.ZipFile(path).read("evil/data.pkl")
    with pytest.raises(UnsafeCheckpointError, match="subprocess.Popen"):
        safe_load(path)
    assert not marker.exists()


def test_whole_pickled_model_of_unknown_class_is_explained(tmp_path):
    from author_checkpoints import fake_training_module

    path = tmp_path / "whole.pth"
    with fake_training_module() as AgeEstimator:
        torch.save(AgeEstimator(), path)
    with pytest.raises(CheckpointError, match="whole pickled models.estimators.AgeEstimator.*state_dict"):
        safe_load(path)


def _zip_with_pickle(path, pkl: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
    return path


def test_build_cannot_modify_allowed_classes_or_loader_functions(tmp_path):
    # GLOBAL argparse.Namespace; BUILD (None, {'injected': 1}) -> setattr on whatever the global resolved to
    pkl = b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00injectedK\x01s\x86b."
    with pytest.raises(CheckpointError, match="modify a class"):
        safe_load(_zip_with_pickle(tmp_path / "a.pth", pkl))
    assert not hasattr(argparse.Namespace, "injected")
    # the same against a loader function: refused, nothing changed for the next load
    pkl = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    with pytest.raises(CheckpointError):
        safe_load(_zip_with_pickle(tmp_path / "b.pth", pkl))
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    assert torch.equal(safe_load(path)["w"], torch.arange(3.0))


def test_no_allowed_global_can_be_changed_by_a_file(tmp_path):
    # BUILD with a dict state and with a slot state on every global a file may name: refused or
    # without effect; a genuine file loads the same afterwards.
    from anatcl_infer.weights import unpickle

    genuine = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "opts": argparse.Namespace(a=1)}, genuine)
    before = safe_load(genuine)
    names = list(unpickle._ALLOWED) + [("argparse", "Namespace"), ("models.estimators", "AgeEstimator")]
    for module, name in names:
        for build in (b"}X\x08\x00\x00\x00injectedK\x01sb", b"N}X\x08\x00\x00\x00injectedK\x01s\x86b"):
            pkl = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + build + b"."
            path = _zip_with_pickle(tmp_path / "x.pth", pkl)
            try:
                safe_load(path)
            except CheckpointError:
                pass
            target = unpickle._ALLOWED.get((module, name))
            assert not hasattr(target, "injected"), (module, name)
    assert not hasattr(argparse.Namespace, "injected")
    after = safe_load(genuine)
    assert torch.equal(after["w"], before["w"]) and vars(after["opts"]) == {"a": 1}
