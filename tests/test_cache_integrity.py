"""A checked cache: a cached registry model is verified against what was written at conversion, at every load.

The cache is filled the way users fill it (``load_model`` / ``anatcl download`` from a loopback
server standing in for the registry's URLs), then tampered with as people do by accident: foreign
weights put in ``$ANATCL_CACHE/models/anatcl-global/fold0/``, a copy over the file that keeps its
times, a flipped byte, a folder converted from another file moved under the verified name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig
from anatcl_infer.errors import IntegrityError, OfflineError
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights import integrity, registry
from anatcl_infer.weights.loading import cache_check, fetch_registry_model, load_model, registry_model_dir
from author_checkpoints import random_state_dict, write_author_checkpoint
from servers import FileServer

pytestmark = pytest.mark.slow
REPAIR = "anatcl download anatcl-global --fold 0 --force"


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture(scope="module")
def pth_bytes(tmp_path_factory):
    return write_author_checkpoint(tmp_path_factory.mktemp("ckpt") / "fold0.pth", random_state_dict(seed=7)).read_bytes()


@pytest.fixture
def server(monkeypatch, pth_bytes):
    """The registry's anatcl-global fold 0 served from loopback; the primary's SHA-256 is known, the fallback's not."""
    with FileServer({"/v2/fold0.pth": pth_bytes, "/v1/fold0.pth": pth_bytes}) as srv:
        manifest = copy.deepcopy(registry.load_manifest())
        sources = manifest["models"]["anatcl-global"]["folds"]["0"]["sources"]
        sources[0].update(url=srv.url("/v2/fold0.pth"), sha256=hashlib.sha256(pth_bytes).hexdigest(), size=len(pth_bytes))
        sources[1].update(url=srv.url("/v1/fold0.pth"), sha256=None, size=None)
        monkeypatch.setattr(registry, "load_manifest", lambda: manifest)
        yield srv


@pytest.fixture
def cached(server):
    """The verified folder, as load_model writes it."""
    load_model("anatcl-global", device="cpu")
    folder = registry_model_dir("anatcl-global", 0)
    assert (folder / integrity.RECORD_NAME).is_file()
    return folder


def _foreign(tmp_path, seed=11):
    """A model folder written elsewhere: other weights, the same architecture and file sizes."""
    torch.manual_seed(seed)
    return AnatCL(ModelConfig(name="anatcl-global", fold=0)).save_pretrained(tmp_path / f"foreign{seed}")


def _refused(folder, needle):
    with pytest.raises(IntegrityError) as info:
        load_model("anatcl-global", device="cpu")
    message = str(info.value)
    assert str(folder) in message and REPAIR in message and needle in message, message
    assert info.value.path == str(folder)
    return message


def _cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_the_record_is_written_at_conversion_and_checked_cheaply(cached, monkeypatch, pth_bytes):
    record = json.loads((cached / integrity.RECORD_NAME).read_text())
    weights = (cached / "model.safetensors").read_bytes()
    assert record["source_sha256"] == hashlib.sha256(pth_bytes).hexdigest()
    assert record["files"]["model.safetensors"] == {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    hashed = []
    real = integrity.regular_file_sha256
    monkeypatch.setattr(integrity, "regular_file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    load_model("anatcl-global", device="cpu")
    assert hashed == ["config.json"]  # the weights' stat is unchanged since the last check: not hashed again
    os.utime(cached / "model.safetensors")  # a stat change (same content): hashed once, then cheap again
    load_model("anatcl-global", device="cpu")
    load_model("anatcl-global", device="cpu")
    assert hashed.count("model.safetensors") == 1
    assert cache_check("anatcl-global", 0)[0] == "verified"


def test_foreign_weights_in_the_verified_folder_are_refused(cached, tmp_path):
    foreign = _foreign(tmp_path)
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(foreign / name, cached / name)  # cp -p: the copy keeps the foreign file's times
    _refused(cached, "model.safetensors has sha256")


def test_a_foreign_folder_without_a_record_is_refused(cached, tmp_path):
    shutil.rmtree(cached)
    shutil.copytree(_foreign(tmp_path), cached)  # what "copy a model into the cache" looks like
    _refused(cached, "integrity.json")
    state, folder, problem = cache_check("anatcl-global", 0)
    assert (state, folder) == ("failed", cached) and "integrity.json" in problem


def test_a_flipped_byte_with_its_times_restored_is_refused(cached):
    path = cached / "model.safetensors"
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size - 5)
        byte = fh.read(1)
        fh.seek(st.st_size - 5)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, inode and mtime: the ctime tells
    _refused(cached, "model.safetensors has sha256")


def test_an_edited_config_is_refused(cached):
    cfg = json.loads((cached / "config.json").read_text())
    cfg["preprocess"]["crop"][1] = [0, 128]
    (cached / "config.json").write_text(json.dumps(cfg))
    _refused(cached, "config.json")


def test_a_folder_converted_from_another_file_is_refused_under_the_verified_name(cached, server, tmp_path):
    # a consistent folder with its own record, converted from a file the registry does not know
    other = write_author_checkpoint(tmp_path / "other.pth", random_state_dict(seed=8)).read_bytes()
    server.files["/v1/fold0.pth"] = other
    server.files.pop("/v2/fold0.pth")
    shutil.rmtree(cached)
    unverified = fetch_registry_model("anatcl-global", 0)
    assert unverified == registry_model_dir("anatcl-global", 0, verified=False)
    assert cache_check("anatcl-global", 0)[0] == "unverified"
    os.replace(unverified, cached)
    _refused(cached, f"converted from a file with sha256 {hashlib.sha256(other).hexdigest()}")


def test_models_shows_it_and_download_force_repairs_it(cached, server, tmp_path, monkeypatch):
    code, stdout, _ = _cli("models")
    assert code == 0 and "cached, verified" in stdout.splitlines()[1]
    shutil.copy2(_foreign(tmp_path) / "model.safetensors", cached / "model.safetensors")
    rows = json.loads(_cli("models", "--json")[1])
    assert (rows[0]["cached"], rows[0]["hash_verified"], rows[0]["integrity"]) == (True, False, "failed")
    assert "model.safetensors has sha256" in rows[0]["problem"]
    code, stdout, _ = _cli("models")
    assert "CACHED COPY FAILS ITS CHECK" in stdout and REPAIR in stdout and "cached, verified" not in stdout
    # a plain download does not hide it; --force replaces the copy
    code, _, stderr = _cli("download", "anatcl-global", "--fold", "0")
    assert code == 1 and REPAIR in stderr
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    with pytest.raises(OfflineError, match="--force"):
        fetch_registry_model("anatcl-global", 0, force=True)
    monkeypatch.delenv("ANATCL_OFFLINE")
    gets = server.gets("/v2/fold0.pth")
    code, stdout, stderr = _cli("download", "anatcl-global", "--fold", "0", "--force")
    assert code == 0, stderr
    assert server.gets("/v2/fold0.pth") == gets + 1
    assert cache_check("anatcl-global", 0)[0] == "verified"
    load_model("anatcl-global", device="cpu")
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no staging or old folder left


def test_force_replaces_a_failing_copy_even_when_only_an_unhashed_source_answers(cached, server, tmp_path):
    shutil.copy2(_foreign(tmp_path) / "model.safetensors", cached / "model.safetensors")
    server.files.pop("/v2/fold0.pth")  # the hashed source is gone; the unhashed fallback answers
    path = fetch_registry_model("anatcl-global", 0, force=True)
    assert path == registry_model_dir("anatcl-global", 0, verified=False)
    assert not cached.exists()  # the failing copy is not left to shadow the new one
    assert cache_check("anatcl-global", 0)[0] == "unverified"
    assert load_model("anatcl-global", device="cpu").config.source == server.url("/v1/fold0.pth")
