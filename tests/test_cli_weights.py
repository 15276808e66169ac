"""`anatcl models`, `download`, `convert` and `push`, through the real Typer app."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from anatcl_infer.weights import registry
from anatcl_infer.cli import app
from anatcl_infer.weights.loading import load_model, registry_model_dir
from author_checkpoints import random_state_dict, write_author_checkpoint
from servers import FileServer, HubServer

runner = CliRunner()


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """The CLI configures the package logger; undo it so later tests' caplog still sees records."""
    logger = logging.getLogger("anatcl_infer")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    return write_author_checkpoint(tmp_path_factory.mktemp("cli") / "resnet18-anatcl-l3_fold2.pth", random_state_dict(seed=5))


def _run(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _same_outputs(a, b) -> bool:
    torch.manual_seed(1)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        return torch.equal(a(x), b(x)) and torch.equal(a(x, head=True), b(x, head=True))


def test_convert_writes_layout_and_is_bit_identical(pth, tmp_path):
    out = tmp_path / "local-fold2"
    code, stdout, stderr = _run("convert", str(pth), str(out), "--source-url", "https://example.org/fold2.pth")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["name"], cfg["variant"], cfg["fold"], cfg["architecture"]) == ("anatcl-local", "local", 2, "resnet18")
    assert cfg["source"] == "https://example.org/fold2.pth"
    assert cfg["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert cfg["preprocess"]["crop"] == [[0, 121], [8, 136], [0, 121]] and cfg["preprocess"]["intensity"] == "none"
    card = (out / "README.md").read_text()
    assert "never average" in card and cfg["source_sha256"] in card
    assert _same_outputs(load_model(pth, device="cpu"), load_model(out, device="cpu"))
    assert "variant local, fold 2" in stdout


def test_convert_options_override_and_errors(pth, tmp_path):
    code, _, stderr = _run("convert", str(pth), str(tmp_path / "o"), "--variant", "global", "--fold", "4")
    assert code == 0, stderr
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["name"], cfg["variant"], cfg["fold"]) == ("anatcl-global", "global", 4)
    code, _, stderr = _run("convert", str(tmp_path / "missing.pth"), str(tmp_path / "x"))
    assert code == 1 and stderr.startswith("error: ") and "does not exist" in stderr and "Traceback" not in stderr
    code, _, stderr = _run("convert", str(pth), str(tmp_path / "y"), "--sha256", "0" * 64)
    assert code == 1 and "sha256" in stderr and not (tmp_path / "y").exists()


def test_convert_refuses_malicious_file(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    bad = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Evil()}, bad)
    code, _, stderr = _run("convert", str(bad), str(tmp_path / "out"))
    assert code == 1 and "refusing" in stderr and str(bad) in stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_models_lists_variants_and_cache(monkeypatch):
    code, stdout, _ = _run("models")
    assert code == 0
    assert stdout.count("anatcl-global") >= 5 and stdout.count("anatcl-local") >= 5
    assert "77f6d44d0317ffc7" in stdout and "resnet18-anatcl-l3/fold4.pth" in stdout
    code, stdout, _ = _run("models", "--json")
    rows = json.loads(stdout)
    assert len(rows) == 10 and not any(r["cached"] for r in rows)
    assert rows[0]["sources"][0]["sha256"].startswith("77f6d44d")
    monkeypatch.setenv("ANATCL_HUB_REPO", "lab/{name}-f{fold}")
    rows = json.loads(_run("models", "--json")[1])
    assert rows[6]["hub_mirror"] == "lab/anatcl-local-f1"


def test_download_then_models_shows_cached(monkeypatch, pth):
    body = pth.read_bytes()
    with FileServer({"/g/fold0.pth": body, "/g/fold1.pth": body}) as srv:
        manifest = copy.deepcopy(registry.load_manifest())
        for fold in ("0", "1", "2"):
            sources = manifest["models"]["anatcl-global"]["folds"][fold]["sources"]
            sources[0].update(url=srv.url(f"/g/fold{fold}.pth"), sha256=None)
            sources[1].update(url=srv.url(f"/old/fold{fold}.pth"))
        monkeypatch.setattr(registry, "load_manifest", lambda: manifest)
        code, stdout, stderr = _run("download", "g3", "--fold", "0")
        assert code == 0, stderr
        # the manifest knows no hash for these sources: cached apart, and `models` says so
        unverified = registry_model_dir("anatcl-global", 0, verified=False)
        assert stdout.strip().endswith(str(unverified)) and not registry_model_dir("anatcl-global", 0).exists()
        rows = json.loads(_run("models", "--json")[1])
        assert [r["fold"] for r in rows if r["cached"]] == [0]
        assert rows[0]["hash_verified"] is False and rows[0]["path"] == str(unverified)
        assert "cached (not hash-verified)" in _run("models")[1]
        code, stdout, stderr = _run("download", "anatcl-global", "--fold", "2")
        assert code == 1 and "error: anatcl-global fold 2" in stderr and "HTTP 404" in stderr
        monkeypatch.setenv("ANATCL_OFFLINE", "1")
        n = len(srv.requests)
        code, _, stderr = _run("download", "anatcl-global", "--fold", "1")
        assert code == 1 and "offline" in stderr and len(srv.requests) == n
    code, _, stderr = _run("download", "anatcl-huge")
    assert code == 2 and "valid names" in stderr
    code, _, stderr = _run("download", "anatcl-global", "--fold", "x")
    assert code == 2


class _RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records calls and publishes to a loopback Hub."""

    calls: list[tuple[str, dict]] = []
    hub: HubServer | None = None

    def __init__(self, endpoint=None, token=None):
        self.calls.append(("init", {"endpoint": endpoint, "token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, revision=None, allow_patterns=(), **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, "revision": revision, **kwargs}))
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.name in allow_patterns}
        commit = self.hub.add_repo(repo_id, files, revision=revision or "main")

        class Info:
            commit_url = f"{self.hub.endpoint}/{repo_id}/commit/{commit}"

        return Info()


def test_push_then_load_from_the_hub(pth, tmp_path, monkeypatch):
    import huggingface_hub

    out = tmp_path / "m"
    assert _run("convert", str(pth), str(out))[0] == 0
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        _RecordingHfApi.calls = []
        _RecordingHfApi.hub = hub
        monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHfApi)
        code, stdout, stderr = _run("push", str(out), "lab/anatcl-local-fold2", "--private", "--branch", "v1", "--token", "tok")
        assert code == 0, stderr
        names = [c[0] for c in _RecordingHfApi.calls]
        assert names == ["init", "create_repo", "create_branch", "upload_folder"]
        assert _RecordingHfApi.calls[0][1] == {"endpoint": hub.endpoint, "token": "tok"}
        assert _RecordingHfApi.calls[1][1]["private"] is True
        assert _RecordingHfApi.calls[2][1]["branch"] == "v1"
        assert "hf://lab/anatcl-local-fold2" in stdout
        pushed = load_model("hf://lab/anatcl-local-fold2@v1", device="cpu")
        assert _same_outputs(pushed, load_model(out, device="cpu"))
        assert pushed.config.fold == 2
    code, _, stderr = _run("push", str(tmp_path), "lab/x")
    assert code == 1 and "anatcl convert" in stderr and "Traceback" not in stderr


def test_download_all_offline_is_one_summary(monkeypatch):
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    code, stdout, stderr = _run("download", "all", "--fold", "all")
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) <= 3, stderr
    assert "10 of 10" in stderr and "anatcl-global folds 0, 1, 2, 3, 4" in stderr
    assert "anatcl download all --fold all" in stderr
    code, _, stderr = _run("download", "l3", "--fold", "3")
    assert code == 1 and "anatcl download anatcl-local --fold 3" in stderr


def test_push_without_network_is_one_line(pth, tmp_path, monkeypatch):
    import socket

    out = tmp_path / "m"
    assert _run("convert", str(pth), str(out))[0] == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    code, _, stderr = _run("push", str(out), "lab/x")
    assert code == 1 and "Traceback" not in stderr and "cannot reach the Hub" in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    code, _, stderr = _run("push", str(out), "lab/x")
    assert code == 1 and "offline mode is on" in stderr and "Traceback" not in stderr


def test_convert_records_fold_of_a_local_file_without_warning(pth, tmp_path, recwarn):
    out = tmp_path / "m3"
    code, stdout, stderr = _run("convert", str(pth), str(out), "--fold", "3")
    assert code == 0, stderr
    assert json.loads((out / "config.json").read_text())["fold"] == 3
    assert not [w for w in recwarn if "was not used" in str(w.message)]
