"""Hugging Face conventions on the model: from_pretrained / save_pretrained / push_to_hub and hf-hub: names.

Everything networked runs against the loopback Hub of ``servers.py`` with the real ``HfApi``.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anatcl_infer.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig
from anatcl_infer.errors import ConfigError, OfflineError, StateDictMismatchError
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.loading import load_model

from servers import HubServer


def _model(seed: int, fold: int = 1) -> AnatCL:
    torch.manual_seed(seed)
    return AnatCL(ModelConfig(name="hub-test", variant="global", fold=fold, source="unit-test")).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.rand(1, 1, 20, 20, 20)


def _out(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        features = model(x)
        return features, model.forward_head(features)


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    """Bit-identical outputs (features and projections)."""
    (fa, pa), (fb, pb) = _out(a, x), _out(b, x)
    return torch.equal(fa, fb) and torch.equal(pa, pb)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Identical tensors under identical names (cheaper than a forward pass; implies identical outputs)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def test_the_api_is_the_mixins():
    from huggingface_hub import PyTorchModelHubMixin

    for name in ("from_pretrained", "save_pretrained", "push_to_hub"):
        ours = inspect.signature(getattr(AnatCL, name)).parameters
        theirs = inspect.signature(getattr(PyTorchModelHubMixin, name)).parameters
        assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()], name


def test_save_pretrained_writes_the_package_layout_and_loads_back_strictly(tmp_path, x, monkeypatch):
    model = _model(0)
    out = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert ModelConfig.load(out) == model.config
    # loading never goes through torch.load (the unsafe pickle path)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    back = AnatCL.from_pretrained(out, device="cpu")
    assert isinstance(back, AnatCL) and not back.training and _same(model, back, x)
    assert _same_weights(model, load_model(out, device="cpu"))
    # strict keys: an extra tensor is refused, and strict=False cannot be asked for
    state = load_file(out / WEIGHTS_NAME)
    state["encoder.extra"] = torch.zeros(1)
    save_file(state, str(out / WEIGHTS_NAME))
    with pytest.raises(StateDictMismatchError, match="encoder.extra"):
        AnatCL.from_pretrained(out)
    with pytest.raises(ConfigError, match="strict=False"):
        AnatCL.from_pretrained(out, strict=False)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        AnatCL.from_pretrained(out, local_files_only=True)
    with pytest.raises(TypeError, match="valid ones"):
        AnatCL.from_pretrained(out, hidden_size=3)
    with pytest.raises(ConfigError, match="model.config"):
        model.save_pretrained(tmp_path / "n", config={"architecture": "resnet50"})


@pytest.mark.slow
def test_push_then_from_pretrained_round_trip_with_revision_pinning(hub, tmp_path, x):
    first, second = _model(0), _model(1, fold=2)
    saved = first.save_pretrained(tmp_path / "first")
    url = first.push_to_hub("lab/anatcl-hub", private=True, token="hf_tok")
    main1 = hub.refs["lab/anatcl-hub"]["main"]
    assert url.endswith(main1)
    create = next(body for path, body, _ in hub.posts if path == "/api/repos/create")
    assert create["visibility"] == "private"
    assert all(auth == "Bearer hf_tok" for _, _, auth in hub.posts)
    files = hub.repos["lab/anatcl-hub"][main1]
    assert sorted(files) == sorted([CONFIG_NAME, "README.md", WEIGHTS_NAME])
    assert files[WEIGHTS_NAME] == (saved / WEIGHTS_NAME).read_bytes()  # the same layout, byte for byte
    assert json.loads(files[CONFIG_NAME]) == json.loads((saved / CONFIG_NAME).read_text())

    loaded = AnatCL.from_pretrained("lab/anatcl-hub")
    assert loaded.config == first.config and _same(first, loaded, x)
    assert _same_weights(first, load_model("hf-hub:lab/anatcl-hub", device="cpu"))

    # a branch (pushed through save_pretrained's push_to_hub=True), then a new main: revisions pin what is loaded
    second.save_pretrained(tmp_path / "anatcl-hub", push_to_hub=True, repo_id="lab/anatcl-hub", branch="v2")
    assert hub.refs["lab/anatcl-hub"]["main"] == main1
    from_branch = AnatCL.from_pretrained("lab/anatcl-hub", revision="v2")
    assert from_branch.config.fold == 2 and _same_weights(second, from_branch)
    assert _same_weights(second, AnatCL.from_pretrained("hf-hub:lab/anatcl-hub@v2"))
    hub.add_repo("lab/anatcl-hub", hub.repos["lab/anatcl-hub"][hub.refs["lab/anatcl-hub"]["v2"]])  # main moves on
    assert _same_weights(second, AnatCL.from_pretrained("lab/anatcl-hub"))
    assert _same_weights(first, AnatCL.from_pretrained("lab/anatcl-hub", revision=main1))
    assert _same_weights(first, load_model(f"hf-hub:lab/anatcl-hub@{main1}", device="cpu"))


def test_push_offline_fails_at_once_with_one_line(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as info:
        _model(0).push_to_hub("lab/anatcl-hub")
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "lab/anatcl-hub" in message
    assert hub.requests == []


def test_hf_hub_names_are_an_alias_of_hf(hub, tmp_path, x):
    saved = _model(3).save_pretrained(tmp_path / "m")
    commit = hub.add_repo("org/name", {n: (saved / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)})
    a = load_model(f"hf-hub:org/name@{commit}", device="cpu")
    b = load_model("hf://org/name", revision=commit, device="cpu")
    assert a.config == b.config and _same_weights(a, b)
