"""The shipped manifest: names, aliases, folds, URLs, hashes, cards and the Hub-mirror setting."""

from __future__ import annotations

import pytest

from anatcl_infer.weights import registry
from anatcl_infer.errors import ConfigError, UnknownModelError

V2 = "https://gitlab.di.unito.it/barbano/anatcl-pretrained/-/raw/main/0_obhn64_resnet18_amp_yaware_adam_tf_none_lr0.0001_step_step10_rate0.9_wd5e-05_bsz32_trainall_False_temp0.1_views2_kernel_rbf_sigma2.0_alpha1.0_anat_desikan_normTrue_subsetTrue_{d}_lambd1.0_fold{k}_splits5_trial0/weights.pth"
V1 = "https://gitlab.di.unito.it/barbano/anatcl-pretrained/-/raw/main/resnet18-anatcl-{o}/fold{k}.pth"


@pytest.mark.parametrize(("alias", "name", "desc", "old"), [
    ("anatcl-global", "anatcl-global", "global", "g3"), ("G3", "anatcl-global", "global", "g3"),
    ("local", "anatcl-local", "local", "l3"), ("l3", "anatcl-local", "local", "l3"),
])
def test_every_fold_resolves_to_both_generations(alias, name, desc, old):
    for k in range(5):
        r = registry.resolve(alias, k)
        assert (r.name, r.variant, r.fold, r.architecture, r.hub_repo) == (name, desc, k, "resnet18", None)
        assert [s.url for s in r.sources] == [V2.format(d=desc, k=k), V1.format(o=old, k=k)]
        assert [s.release for s in r.sources] == ["v0.0.2", "v0.0.1"]
        assert all(s.size is None for s in r.sources)


def test_only_the_published_hash_is_recorded():
    hashes = {(n, k, s.release): s.sha256 for n in registry.list_models() for k in range(5) for s in registry.resolve(n, k).sources}
    known = {key: h for key, h in hashes.items() if h}
    assert known == {("anatcl-global", 0, "v0.0.2"): "77f6d44d0317ffc704ffc751db7eab349a8109e2cd596ab06070f1aec7a55d64"}
    found = registry.find_by_sha256(known[("anatcl-global", 0, "v0.0.2")].upper())
    assert found is not None and found[0].name == "anatcl-global" and found[1].release == "v0.0.2"
    assert registry.find_by_sha256("0" * 64) is None


def test_unknown_names_and_folds():
    with pytest.raises(UnknownModelError) as info:
        registry.resolve("resnet18")
    assert "anatcl-global" in str(info.value) and info.value.name == "resnet18"
    assert isinstance(info.value, KeyError)
    for bad in (5, -1, True, "0"):
        with pytest.raises(UnknownModelError, match="valid folds"):
            registry.resolve("anatcl-local", bad)


def test_cards_ship_with_the_package():
    for name in registry.list_models():
        card = registry.model_card(name)
        _, front, body = card.split("---\n", 2)
        assert body.lstrip().startswith(f"# {name}")
        for key in ("library_name: anatcl-infer", "pipeline_tag: feature-extraction", "license: mit",
                    "datasets:", "tags:"):
            assert key in front, (name, key)
        for needle in ("OpenBHB", "mwp1", "121×128×121", "never average", "2408.07079", "MIT"):
            assert needle in card, (name, needle)


def test_hub_mirror_template(monkeypatch):
    monkeypatch.setenv("ANATCL_HUB_REPO", "hf://lab/{variant}-f{fold}")
    assert registry.resolve("l3", 2).hub_repo == "lab/local-f2"
    monkeypatch.setenv("ANATCL_HUB_REPO", "lab/one-repo")
    assert registry.resolve("g3", 4).hub_repo == "lab/one-repo"
    monkeypatch.setenv("ANATCL_HUB_REPO", "lab/{nme}")
    with pytest.raises(ConfigError, match="ANATCL_HUB_REPO"):
        registry.resolve("g3", 0)
