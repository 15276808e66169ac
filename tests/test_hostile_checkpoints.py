"""A corpus of hostile checkpoints: nothing runs, and memory stays bounded.

* Code-execution payloads: each one, if anything called it, would create a marker file; every
  one must be refused with an ``UnsafeCheckpointError`` naming the file and the callable, and
  the marker must never appear.
* Memory bombs: each is loaded in a subprocess under an address-space limit of 3 GiB
  (``RLIMIT_AS``; torch imports and builds the network well under it). Each must end in a clean
  ``CheckpointError``/``ConfigError`` in that process, not a ``MemoryError`` or a kill.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from memory_cap import prelude

from anatcl_infer.errors import CheckpointError, UnsafeCheckpointError
from anatcl_infer.weights.unpickle import safe_load

AS_LIMIT = 3 << 30


# --------------------------------------------------------------------------- writers

class _Call:
    """Pickles as ``func(*args)``: what a malicious checkpoint asks the unpickler to do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Ref:
    """Pickles as a reference to ``module.name`` without importing anything at write time."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class _RefPickler(pickle.Pickler):
    """Writes ``_Ref`` as GLOBAL opcodes, storages as torch's persistent ids."""

    def __init__(self, file, protocol=2, **kwargs):
        super().__init__(file, protocol=2)

    def reducer_override(self, obj):
        if isinstance(obj, _RefCall):
            return obj.reduce()
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageId):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


class _RefCall:
    """``module.name(*args)`` for a global that may not exist here (a pickle can name anything)."""

    def __init__(self, module, name, *args):
        self.module, self.name, self.args = module, name, args

    def reduce(self):
        # a module that exists only while writing (never a real one: nothing here is clobbered)
        assert self.module not in sys.modules or getattr(sys.modules[self.module], "_fake", False)
        module = sys.modules.setdefault(self.module, type(sys)(self.module))
        module._fake = True
        fake = type(self.name, (), {"__module__": self.module, "__qualname__": self.name})
        setattr(module, self.name, fake)
        return fake, self.args


class _StorageId:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    _RefPickler(buf).dump(obj)
    return buf.getvalue()


def _zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, stored bytes, method, declared size, crc) per member."""
    out = bytearray()
    central = bytearray()
    for name, payload, method, usize, crc in members:
        offset = len(out)
        raw = name.encode()
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload), usize, len(raw), 0) + raw + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload), usize, len(raw), 0, 0, 0, 0, 0, offset) + raw
    cd_offset = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd_offset, 0)
    path.write_bytes(bytes(out))
    return path


def _stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)


def _zeros_deflated(prefix: bytes, n_zero_chunks: int, suffix: bytes, chunk: int = 16 << 20) -> tuple[bytes, int]:
    """A raw deflate stream of ``prefix + zeros + suffix``, built from one compressed block repeated."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    block = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = block.compress(bytes(chunk)) + block.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = tail.compress(suffix) + tail.flush(zlib.Z_FINISH)
    return start + zeros * n_zero_chunks + end, len(prefix) + n_zero_chunks * chunk + len(suffix)


def _torch_zip(path: Path, obj, storages: dict[str, bytes]) -> Path:
    members = [_stored("archive/data.pkl", _pickled(obj)), _stored("archive/byteorder", b"little")]
    members += [_stored(f"archive/data/{k}", v) for k, v in storages.items()]
    return _zip(path, members)


# --------------------------------------------------------------------------- code execution

def _payloads(marker: Path, tmp: Path) -> dict[str, object]:
    import builtins
    import importlib

    import joblib
    import runpy
    import shutil
    import socket
    import subprocess as sp

    script = tmp / "touch.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    inner = pickle.dumps(_Call(os.system, f"touch {marker}"))
    evil = tmp / "inner.pth"
    evil.write_bytes(inner)
    return {
        "os.system": _Call(os.system, f"touch {marker}"),
        "subprocess.Popen": _Call(sp.Popen, ["touch", str(marker)]),
        "subprocess.run": _Call(sp.run, ["touch", str(marker)]),
        "builtins.eval": _Call(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Call(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.getattr": _Call(builtins.getattr, _Call(importlib.import_module, "os"), "system"),
        "builtins.__import__": _Call(builtins.__import__, "os"),
        "builtins.open": _Call(builtins.open, str(marker), "w"),
        "importlib.import_module": _Call(importlib.import_module, "os"),
        "runpy.run_path": _Call(runpy.run_path, str(script)),
        "pickle.loads": _Call(pickle.loads, inner),
        "torch.load": _Call(torch.load, str(evil)),
        "torch.storage._load_from_bytes": _Call(torch.storage._load_from_bytes, inner),
        "numpy.load": _Call(np.load, str(evil), None, True),
        "shutil.copyfile": _Call(shutil.copyfile, str(script), str(marker)),
        "socket.socket": _Call(socket.socket),
        "joblib.load": _Call(joblib.load, str(evil)),
        "dill.loads": _RefCall("dill", "loads", inner),
        "os.popen": _Call(os.popen, f"touch {marker}"),
        "mylab_utils.run": _RefCall("mylab_utils", "run", f"touch {marker}"),
        "torch.hub.load": _Call(torch.hub.load, "x/y", "z"),
    }


@pytest.fixture
def _fake_modules():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "_fake", False):
            del sys.modules[name]


def test_code_execution_payloads_are_refused_and_nothing_runs(tmp_path, _fake_modules):
    marker = tmp_path / "PWNED"
    payloads = _payloads(marker, tmp_path)
    assert len(payloads) >= 20
    from author_checkpoints import fake_training_module

    for label, payload in payloads.items():
        for shape in ("top", "nested"):
            path = tmp_path / f"{label}-{shape}.pth"
            if shape == "top":
                obj = {"model": {"w": torch.zeros(2)}, "x": payload}
            else:  # inside the state of an object of an unknown (training-time) class
                with fake_training_module() as AgeEstimator:
                    est = AgeEstimator()
                    est.hook = {"cb": [payload]}
                    obj = {"model": {"w": torch.zeros(2)}, "estimator": est}
                    _write(path, obj)
            if shape == "top":
                _write(path, obj)
            with pytest.raises(UnsafeCheckpointError) as info:
                safe_load(path)
            name = label.rsplit(".", 1)[-1]
            assert str(path) in str(info.value) and name in str(info.value), (label, str(info.value))
            assert info.value.global_name and name in info.value.global_name
            assert not marker.exists(), label


def _write(path, obj):
    # written through torch's container: data.pkl beside the (empty) storages
    torch.save(obj, path, pickle_module=_PickleModule)


class _PickleModule:
    """``torch.save(pickle_module=...)`` shim using the reference-writing pickler."""

    Pickler = _RefPickler
    Unpickler = pickle.Unpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def test_build_on_allowed_namespace_cannot_change_the_next_load(tmp_path):
    # GLOBAL argparse.Namespace; BUILD (None, {'injected': 1}) on the class itself
    pkl = b"\x80\x02cargparse\nNamespace\nN}X\x08\x00\x00\x00injectedK\x01s\x86b."
    path = _zip(tmp_path / "a.pth", [_stored("a/data.pkl", pkl)])
    with pytest.raises(CheckpointError, match="modify a class"):
        safe_load(path)
    import argparse

    assert not hasattr(argparse.Namespace, "injected")
    genuine = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(2)}, "opts": argparse.Namespace(lr=0.1)}, genuine)
    out = safe_load(genuine)
    assert vars(out["opts"]) == {"lr": 0.1}


# --------------------------------------------------------------------------- memory bombs

def _bombs(root: Path) -> dict[str, Path]:
    """Each file asks for several GiB while holding at most a few MB."""
    files: dict[str, Path] = {}
    one = torch.zeros(1)
    # a 16 MB zip member that inflates to 3.5 GiB (a real deflate stream)
    stream, usize = _zeros_deflated(b"", 224, b"")
    tensor = _Tensor(_StorageId("0", usize // 4), 0, (usize // 4,), (1,))
    files["inflating_storage"] = _zip(root / "inflate.pth", [
        _stored("archive/data.pkl", _pickled({"w": tensor})), ("archive/data/0", stream, zipfile.ZIP_DEFLATED, usize, 0)])
    # a data.pkl that inflates to a 3 GiB bytes object
    stream, usize = _zeros_deflated(b"\x80\x04\x8e" + struct.pack("<Q", 3 << 30), 192, b".")
    files["inflating_pickle"] = _zip(root / "pkl.pth", [("archive/data.pkl", stream, zipfile.ZIP_DEFLATED, usize, 0)])
    # a pickle declaring a 3 GiB bytes object it does not hold
    files["declared_bytes8"] = _zip(root / "bytes8.pth", [_stored("archive/data.pkl", b"\x80\x04\x8e" + struct.pack("<Q", 3 << 30) + bytes(64) + b".")])
    # a frame of 4 GiB
    files["declared_frame"] = _zip(root / "frame.pth", [_stored("archive/data.pkl", b"\x80\x04\x95" + struct.pack("<Q", 4 << 30) + b"N.")])
    # the memo grown to 2**31 slots
    files["memo_index"] = _zip(root / "memo.pth", [_stored("archive/data.pkl", b"\x80\x02Nr" + struct.pack("<I", 1 << 31) + b".")])
    # bytearray(8 GiB) and bytes(8 GiB) through allowed globals
    files["bytearray_8g"] = _zip(root / "bytearray.pth", [_stored("archive/data.pkl", b"\x80\x02c__builtin__\nbytearray\n\x8a\x05\x00\x00\x00\x00\x02\x85R.")])
    files["bytes_8g"] = _zip(root / "bytes.pth", [_stored("archive/data.pkl", b"\x80\x02c__builtin__\nbytes\n\x8a\x05\x00\x00\x00\x00\x02\x85R.")])
    # a stride-0 view that a copy turns into 8 GiB; an overlapping one (16 GiB)
    files["stride0"] = _torch_zip(root / "stride0.pth", {"w": _Tensor(_StorageId("0", 1), 0, (1 << 31,), (0,))}, {"0": one.numpy().tobytes()})
    files["overlap"] = _torch_zip(root / "overlap.pth", {"w": _Tensor(_StorageId("0", 4), 0, (1 << 16, 1 << 16), (1, 1))}, {"0": bytes(16)})
    # a storage declared at 2**31 elements backed by 4 bytes
    files["storage_numel"] = _torch_zip(root / "numel.pth", {"w": _Tensor(_StorageId("0", 1 << 31), 0, (1 << 31,), (1,))}, {"0": bytes(4)})
    # numpy array of 2**31 float64 through _reconstruct
    pkl = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x05\x00\x00\x00\x80\x00\x85"
           b"C\x01b\x87R.")
    files["numpy_shape"] = _zip(root / "np.pth", [_stored("archive/data.pkl", pkl)])
    # legacy format: a storage declared at 2**33 elements (torch allocates it before reading)
    legacy = io.BytesIO()
    for head in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, legacy, protocol=2)
    _RefPickler(legacy).dump({"w": _Tensor(_StorageId("0", 1 << 33), 0, (1 << 33,), (1,))})
    pickle.dump(["0"], legacy, protocol=2)
    legacy.write(struct.pack("<q", 1 << 33) + bytes(64))
    (root / "legacy.pth").write_bytes(legacy.getvalue())
    files["legacy_storage"] = root / "legacy.pth"
    # 100,000 nested lists; 6 million small objects
    files["deep"] = _zip(root / "deep.pth", [_stored("archive/data.pkl", b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".")])
    files["many_objects"] = _zip(root / "many.pth", [_stored("archive/data.pkl", b"\x80\x02]" + b"(" + b"N" * 6_000_000 + b"e.")])
    # config.json asking for a 10^4-voxel grid / pad
    for label, pre in (("config_grid", {"grid_shape": [10000, 10000, 10000], "crop": [[0, 10], [0, 10], [0, 10]]}),
                       ("config_pad", {"pad_to": [10000, 10000, 10000]})):
        d = root / label
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"preprocess": pre}))
        (d / "model.safetensors").write_bytes(b"")
        files[label] = d
    return files


_RUNNER = textwrap.dedent(
    """
    import json, sys
    from anatcl_infer import load_model
    from anatcl_infer.errors import CheckpointError, ConfigError
    from anatcl_infer.weights.unpickle import safe_load
    results = {{}}
    for label, path in json.loads(sys.argv[1]).items():
        try:
            (load_model if label.startswith("config") else safe_load)(path)
            results[label] = "loaded"
        except (CheckpointError, ConfigError) as exc:
            results[label] = type(exc).__name__ + ": " + str(exc)
        except MemoryError:
            results[label] = "MemoryError"
    print(json.dumps(results))
    """
)


@pytest.mark.slow
def test_memory_bombs_end_in_clean_errors_under_an_address_space_limit(tmp_path):
    files = _bombs(tmp_path)
    assert len(files) >= 15
    script = tmp_path / "run.py"
    script.write_text(prelude() + _RUNNER.format())  # data cap relative to the process's own baseline
    proc = subprocess.run([sys.executable, str(script), json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # not killed, no traceback
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(files)
    for label, outcome in results.items():
        expected = "ConfigError" if label.startswith("config") else "CheckpointError"
        assert outcome.startswith(expected), (label, outcome)
        assert "Traceback" not in outcome


def test_self_referencing_pickle_is_a_clean_error(tmp_path):
    loop: list = []
    loop.append(loop)
    path = tmp_path / "loop.pth"
    torch.save({"model": loop, "d": {"self": loop}}, path)
    out = safe_load(path)
    assert out["model"][0] is out["model"]
    from anatcl_infer import load_model

    with pytest.raises(CheckpointError, match="no state dict"):
        load_model(path, device="cpu")
