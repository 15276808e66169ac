"""load_model from every source: local files, directories, URLs, the registry and the Hub."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import huggingface_hub.constants  # noqa: F401  (before any test sets HF_HUB_OFFLINE: it is read once, when this loads)
import pytest
import torch

import anatcl_infer
from anatcl_infer.weights import registry
from anatcl_infer.config import ModelConfig
from anatcl_infer.weights.download import cache_dir
from anatcl_infer.errors import (
    CheckpointError,
    ConfigError,
    DownloadError,
    IntegrityError,
    OfflineError,
    StateDictMismatchError,
    UnknownModelError,
)
from anatcl_infer.weights.loading import load_model, registry_model_dir
from author_checkpoints import random_state_dict, write_author_checkpoint
from reference_forward import reference_features, reference_projection
from servers import FileServer, HubServer

SMALL = (1, 1, 40, 48, 40)


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(seed=3)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, state):
    root = tmp_path_factory.mktemp("ckpts")
    write_author_checkpoint(root / "fold0.pth", state)
    write_author_checkpoint(root / "dp_fold0.pth", state, module_prefix=True)
    return root


@pytest.fixture(scope="module")
def pth_bytes(ckpt_dir):
    return (ckpt_dir / "fold0.pth").read_bytes()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.rand(SMALL) * 0.8


@pytest.fixture(scope="module")
def expected(state, x):
    feats = reference_features(state, x)
    return feats, reference_projection(state, feats)


def _outputs(model, x):
    with torch.no_grad():
        return model(x), model(x, head=True)


def _assert_matches_reference(model, x, expected):
    feats, proj = _outputs(model, x)
    ref_feats, ref_proj = expected
    assert feats.shape == (1, 512) and proj.shape == (1, 128)
    torch.testing.assert_close(feats.double(), ref_feats, rtol=1e-5, atol=1e-5 * float(ref_feats.abs().max()))
    torch.testing.assert_close(proj.double(), ref_proj, rtol=1e-5, atol=1e-6)


def test_authors_pth_matches_independent_forward(ckpt_dir, x, expected):
    model = load_model(ckpt_dir / "fold0.pth", device="cpu")
    assert not model.training and model.device == torch.device("cpu")
    _assert_matches_reference(model, x, expected)
    cfg = model.config
    assert cfg.fold == 0 and cfg.architecture == "resnet18"
    assert cfg.source_sha256 == hashlib.sha256((ckpt_dir / "fold0.pth").read_bytes()).hexdigest()
    assert cfg.preprocess.model_input_shape == (121, 128, 121)


def test_module_prefixed_checkpoint_gives_identical_outputs(ckpt_dir, x):
    a = _outputs(load_model(ckpt_dir / "fold0.pth", device="cpu"), x)
    b = _outputs(load_model(ckpt_dir / "dp_fold0.pth", device="cpu"), x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_lazy_public_entry_point():
    assert anatcl_infer.load_model is load_model
    assert anatcl_infer.list_models() == ["anatcl-global", "anatcl-local"]


@pytest.mark.parametrize(
    ("edit", "field", "needle"),
    [
        ("drop", "missing", "encoder.layer3.1.bn2.running_var"),
        ("extra", "unexpected", "encoder.fc.weight"),
        ("reshape", "mismatched", "head.2.weight"),
    ],
)
def test_mismatched_keys_are_listed(tmp_path, state, edit, field, needle):
    sd = dict(state)
    if edit == "drop":
        del sd[needle]
    elif edit == "extra":
        sd[needle] = torch.zeros(3)
    else:
        sd[needle] = torch.zeros(64, 512)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd, "epoch": 1}, path)
    with pytest.raises(StateDictMismatchError) as info:
        load_model(path, device="cpu")
    assert any(needle in k for k in getattr(info.value, field))
    assert needle in str(info.value) and str(path) in str(info.value)


def test_author_file_with_a_missing_key(tmp_path, state):
    path = write_author_checkpoint(tmp_path / "fold0.pth", state, drop_key="encoder.conv1.weight")
    with pytest.raises(StateDictMismatchError, match="encoder.conv1.weight") as info:
        load_model(path, device="cpu")
    assert info.value.missing == ["encoder.conv1.weight"]


def test_no_state_dict_in_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"epoch": 3, "notes": "hi"}, path)
    with pytest.raises(CheckpointError, match="no state dict found.*'epoch'"):
        load_model(path, device="cpu")


def test_sha256_of_local_file_is_checked(ckpt_dir):
    with pytest.raises(IntegrityError) as info:
        load_model(ckpt_dir / "fold0.pth", sha256="0" * 64, device="cpu")
    assert info.value.expected == "0" * 64
    assert (ckpt_dir / "fold0.pth").exists()  # the user's own file is never deleted


@pytest.mark.slow
def test_converted_directory_is_bit_identical(ckpt_dir, tmp_path, x):
    original = load_model(ckpt_dir / "fold0.pth", device="cpu")
    original.save_pretrained(tmp_path / "model")
    reloaded = load_model(tmp_path / "model", device="cpu")
    assert reloaded.config == original.config
    assert all(torch.equal(u, v) for u, v in zip(_outputs(original, x), _outputs(reloaded, x)))
    sha = hashlib.sha256((tmp_path / "model" / "model.safetensors").read_bytes()).hexdigest()
    load_model(tmp_path / "model", sha256=sha, device="cpu")
    with pytest.raises(IntegrityError):
        load_model(tmp_path / "model", sha256="f" * 64, device="cpu")


def test_bare_safetensors_gets_default_config_with_warning(ckpt_dir, tmp_path, x, caplog):
    original = load_model(ckpt_dir / "fold0.pth", device="cpu")
    original.save_pretrained(tmp_path / "m")
    bare = tmp_path / "weights.safetensors"
    (tmp_path / "m" / "model.safetensors").rename(bare)
    with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
        model = load_model(bare, device="cpu")
    assert "no config.json" in caplog.text
    assert model.config.preprocess == ModelConfig().preprocess
    assert all(torch.equal(u, v) for u, v in zip(_outputs(original, x), _outputs(model, x)))
    # a config.json beside it is read instead
    ModelConfig(variant="local", fold=3, name="anatcl-local").save(tmp_path)
    assert load_model(bare, device="cpu").config.fold == 3


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(UnknownModelError) as info:
        load_model("anatcl-medium")
    for name in ("anatcl-global", "anatcl-local", "g3", "l3"):
        assert name in str(info.value)
    with pytest.raises(UnknownModelError, match="valid folds are 0, 1, 2, 3, 4"):
        load_model("anatcl-global", fold=7)
    with pytest.raises(CheckpointError, match="without config.json"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="revision"):
        load_model("anatcl-global", revision="v1")


# ----------------------------------------------------------------------------- registry over HTTP


@pytest.fixture
def file_server(pth_bytes):
    with FileServer({"/v1/g3/fold0.pth": pth_bytes}) as srv:
        yield srv


def _route_registry(monkeypatch, srv, *, primary_sha=None, fallback_sha=None):
    manifest = copy.deepcopy(registry.load_manifest())
    sources = manifest["models"]["anatcl-global"]["folds"]["0"]["sources"]
    sources[0].update(url=srv.url("/v2/global/fold0/weights.pth"), sha256=primary_sha)
    sources[1].update(url=srv.url("/v1/g3/fold0.pth"), sha256=fallback_sha)
    monkeypatch.setattr(registry, "load_manifest", lambda: manifest)
    return sources


@pytest.mark.slow
def test_registry_falls_back_converts_once_and_removes_pth(monkeypatch, file_server, pth_bytes, x, expected, caplog):
    sources = _route_registry(monkeypatch, file_server, fallback_sha=hashlib.sha256(pth_bytes).hexdigest())
    # the primary answers 200 with a web page instead of the file, as a moved GitLab link does
    file_server.files["/v2/global/fold0/weights.pth"] = b"<!DOCTYPE html><html>Sign in</html>"
    with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
        model = load_model("global", fold=0, device="cpu")  # alias
    assert "not a torch checkpoint" in caplog.text  # the bad primary was reported
    _assert_matches_reference(model, x, expected)
    cfg = model.config
    assert (cfg.name, cfg.variant, cfg.fold) == ("anatcl-global", "global", 0)
    assert cfg.source == sources[1]["url"] and cfg.source_sha256 == hashlib.sha256(pth_bytes).hexdigest()
    target = registry_model_dir("anatcl-global", 0)
    # the model, its integrity record, and the stamp of its last check
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "integrity-checked.json", "integrity.json", "model.safetensors"]
    assert json.loads((target / "config.json").read_text())["source"] == sources[1]["url"]
    assert not list((cache_dir() / "downloads").iterdir())  # the .pth is gone
    gets = file_server.gets("/v1/g3/fold0.pth")
    again = load_model("anatcl-global", device="cpu")
    assert file_server.gets("/v1/g3/fold0.pth") == gets == 1  # converted once, read from the cache
    assert all(torch.equal(u, v) for u, v in zip(_outputs(model, x), _outputs(again, x)))


def test_registry_sha_mismatch_keeps_nothing(monkeypatch, file_server):
    _route_registry(monkeypatch, file_server, fallback_sha="0" * 64)
    with pytest.raises(IntegrityError, match="deleted"):
        load_model("anatcl-global", device="cpu")
    assert not registry_model_dir("anatcl-global", 0).exists()
    assert not any((cache_dir() / "downloads").iterdir())


def test_registry_all_sources_dead(monkeypatch, file_server):
    _route_registry(monkeypatch, file_server)
    file_server.files.clear()
    with pytest.raises(DownloadError) as info:
        load_model("anatcl-global", device="cpu")
    assert str(info.value).count("HTTP 404") == 2 and "anatcl convert" in str(info.value)


def test_offline_fails_at_once_without_network(monkeypatch, file_server):
    _route_registry(monkeypatch, file_server)
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        load_model("anatcl-global", device="cpu")
    assert "anatcl download anatcl-global --fold 0" in str(info.value)
    assert file_server.requests == []
    assert isinstance(info.value, FileNotFoundError)


def test_offline_reads_what_is_cached(monkeypatch, file_server, x, expected):
    _route_registry(monkeypatch, file_server)
    load_model("anatcl-global", device="cpu")
    n = len(file_server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _assert_matches_reference(load_model("anatcl-global", device="cpu"), x, expected)
    assert len(file_server.requests) == n


@pytest.mark.slow
def test_url_source_with_sha(file_server, pth_bytes, x, expected):
    url = file_server.url("/v1/g3/fold0.pth")
    with pytest.raises(IntegrityError):
        load_model(url, sha256="1" * 64, device="cpu")
    model = load_model(url, sha256=hashlib.sha256(pth_bytes).hexdigest(), device="cpu")
    _assert_matches_reference(model, x, expected)
    assert (model.config.name, model.config.fold) == ("anatcl-global", 0)  # guessed from the URL
    load_model(url, device="cpu")
    assert file_server.gets("/v1/g3/fold0.pth") == 2  # one failed + one good download, then cached
    with pytest.raises(IntegrityError, match="converted from"):
        load_model(url, sha256="2" * 64, device="cpu")


# ----------------------------------------------------------------------------- Hugging Face Hub


@pytest.fixture(scope="module")
def converted_files(ckpt_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "anatcl-global-fold0"
    load_model(ckpt_dir / "fold0.pth", device="cpu").save_pretrained(out)
    return {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def test_hub_address_with_revision(hub, converted_files, x, expected):
    commit = hub.add_repo("lab/anatcl-global-fold0", converted_files)
    hub.add_repo("lab/anatcl-global-fold0", {"config.json": converted_files["config.json"]}, revision="broken")
    model = load_model("hf://lab/anatcl-global-fold0", device="cpu")
    _assert_matches_reference(model, x, expected)
    assert model.config.fold == 0
    assert load_model(f"hf://lab/anatcl-global-fold0@{commit}", device="cpu").config == model.config
    with pytest.raises(DownloadError, match="has no model.safetensors"):
        load_model("hf://lab/anatcl-global-fold0@broken", device="cpu")
    with pytest.raises(DownloadError, match="revision not found"):
        load_model("hf://lab/anatcl-global-fold0", revision="nope", device="cpu")
    with pytest.raises(DownloadError, match="repository not found"):
        load_model("hf://lab/missing", device="cpu")
    with pytest.raises(ConfigError):
        load_model("hf://just-a-name", device="cpu")


def test_hub_offline_uses_hub_cache_only(hub, converted_files, monkeypatch):
    commit = hub.add_repo("lab/m", converted_files)
    with pytest.raises(OfflineError):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        load_model(f"hf://lab/m@{commit}", device="cpu")
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    load_model(f"hf://lab/m@{commit}", device="cpu")
    n = len(hub.requests)
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    load_model(f"hf://lab/m@{commit}", device="cpu")
    assert len(hub.requests) == n


def test_registry_hub_mirror_first(hub, converted_files, monkeypatch, file_server, x, expected):
    _route_registry(monkeypatch, file_server)
    hub.add_repo("mirror/anatcl-global-fold0", converted_files)
    monkeypatch.setenv("ANATCL_HUB_REPO", "mirror/{name}-fold{fold}")
    _assert_matches_reference(load_model("anatcl-global", fold=0, device="cpu"), x, expected)
    assert file_server.requests == [] and hub.file_gets() == 2
    assert not registry_model_dir("anatcl-global", 0).exists()  # Hub files stay in the Hub cache


def test_registry_hub_mirror_missing_falls_back(hub, monkeypatch, file_server, x, expected, caplog):
    _route_registry(monkeypatch, file_server)
    monkeypatch.setenv("ANATCL_HUB_REPO", "mirror/{name}-fold{fold}")
    with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
        model = load_model("anatcl-global", fold=0, device="cpu")
    assert "Hub mirror mirror/anatcl-global-fold0 failed" in caplog.text
    _assert_matches_reference(model, x, expected)
    assert file_server.gets("/v1/g3/fold0.pth") == 1


def test_local_copy_of_a_published_file_gets_its_registry_identity(monkeypatch, ckpt_dir, pth_bytes):
    manifest = copy.deepcopy(registry.load_manifest())
    source = manifest["models"]["anatcl-local"]["folds"]["3"]["sources"][1]
    source["sha256"] = hashlib.sha256(pth_bytes).hexdigest()
    monkeypatch.setattr(registry, "load_manifest", lambda: manifest)
    cfg = load_model(ckpt_dir / "fold0.pth", device="cpu").config  # the name says fold 0, the content fold 3
    assert (cfg.name, cfg.variant, cfg.fold, cfg.source) == ("anatcl-local", "local", 3, source["url"])


def test_guess_identity_uses_only_the_file_and_its_folder():
    from anatcl_infer.weights.convert import guess_identity

    assert guess_identity("/usr/local/ckpts/resnet18-anatcl-g3/fold3.pth") == ("anatcl-global", "global", 3)
    assert guess_identity("https://h/x_subsetTrue_local_lambd1.0_fold4_splits5_trial0/weights.pth") == ("anatcl-local", "local", 4)
    assert guess_identity("/srv/weights.pth") == ("anatcl", "unknown", None)


@pytest.mark.parametrize("damage, needle", [
    (lambda s: s["encoder.conv1.weight"].view(-1).__setitem__(5, float("nan")), "non-finite"),
    (lambda s: s["encoder.layer1.0.bn1.running_var"].__setitem__(0, -1.0), "negative BatchNorm"),
    (lambda s: s.__setitem__("head.0.weight", s["head.0.weight"] > 0), "bool"),
])
def test_weights_that_would_give_nan_features_are_refused(tmp_path, state, damage, needle):
    bad = {k: v.clone() for k, v in state.items()}
    damage(bad)
    write_author_checkpoint(tmp_path / "bad.pth", bad)
    with pytest.raises(CheckpointError, match=needle):
        load_model(tmp_path / "bad.pth", device="cpu")
    from safetensors.torch import save_file

    (tmp_path / "dir").mkdir()
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "dir" / "model.safetensors"))
    ModelConfig().save(tmp_path / "dir")
    with pytest.raises(CheckpointError, match=needle):
        load_model(tmp_path / "dir", device="cpu")


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(preprocess=None), "preprocess must be a JSON object"),
    (lambda c: c.update(preprocess=[1, 2]), "preprocess must be a JSON object"),
    (lambda c: c.update(projection_dim=-5), "projection_dim"),
    (lambda c: c["preprocess"].update(grid_shape="abc"), "grid_shape"),
    (lambda c: c["preprocess"].update(grid_shape=[10**4] * 3), "grid_shape"),
    (lambda c: c["preprocess"].update(pad_to=[10**4] * 3), "pad_to"),
    (lambda c: c.update(name="../../etc"), "path separators"),
    (lambda c: c.update(fold="0"), "fold must be an integer"),
])
def test_hostile_config_json_is_a_config_error(ckpt_dir, tmp_path, edit, needle):
    out = tmp_path / "m"
    load_model(ckpt_dir / "fold0.pth", device="cpu").save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=needle):
        load_model(out, device="cpu")


def test_safetensors_shapes_are_checked_before_reading(tmp_path, state):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    wrong = {k: v.contiguous() for k, v in state.items()}
    wrong["head.0.weight"] = torch.zeros(4, 4)
    save_file(wrong, str(tmp_path / "m" / "model.safetensors"))
    ModelConfig().save(tmp_path / "m")
    import safetensors.torch as st

    calls = []
    real = st.load_file
    st.load_file = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        with pytest.raises(StateDictMismatchError, match="head.0.weight"):
            load_model(tmp_path / "m", device="cpu")
    finally:
        st.load_file = real
    assert calls == []  # refused from the header alone


def test_fold_must_be_an_integer_and_never_silently_ignored(ckpt_dir):
    for bad in ("0", 1.5, True):
        with pytest.raises(ConfigError, match="fold must be an integer"):
            load_model("anatcl-global", fold=bad, device="cpu")
    with pytest.warns(UserWarning, match="fold=3 was not used"):
        model = load_model(ckpt_dir / "fold0.pth", fold=3, device="cpu")
    assert model.config.fold == 0  # the file's own fold, as the warning says


def test_unhashed_fallback_is_cached_apart_from_the_verified_name(monkeypatch, file_server, pth_bytes, caplog):
    import os
    import stat

    # the hashed primary is gone (404); the fallback has no known hash
    _route_registry(monkeypatch, file_server, primary_sha="1" * 64)
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
            model = load_model("anatcl-global", device="cpu")
    finally:
        os.umask(old)
    assert "not hash-verified" in caplog.text
    verified = registry_model_dir("anatcl-global", 0)
    unverified = registry_model_dir("anatcl-global", 0, verified=False)
    assert not verified.exists() and unverified.name == "fold0-unverified"
    assert json.loads((unverified / "config.json").read_text())["source_sha256"] == hashlib.sha256(pth_bytes).hexdigest()
    assert model.config.source_sha256 == hashlib.sha256(pth_bytes).hexdigest()
    # shareable: the folder and files follow the umask, not mkdtemp's owner-only mode
    assert stat.S_IMODE(unverified.stat().st_mode) == 0o755
    assert stat.S_IMODE((unverified / "model.safetensors").stat().st_mode) == 0o644
    # used again without the network, with the same warning; never promoted to the verified name
    n = len(file_server.requests)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anatcl_infer"):
        load_model("anatcl-global", device="cpu")
    assert len(file_server.requests) == n and "not hash-verified" in caplog.text
    assert not verified.exists()
