"""Which weights a checkpoint's layout gives: model or EMA, wrapper prefixes, and the hint when nothing matches.

The numbers against the authors' package are in test_authors_package.py; here the choices
themselves, on small state dicts, and their messages.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from anatcl_infer import load_model
from anatcl_infer.errors import CheckpointError, CheckpointWarning, ConfigError, StateDictMismatchError
from anatcl_infer.weights.convert import extract_state_dict
from anatcl_infer.weights.selection import choose_weights, match_prefix
from author_checkpoints import random_state_dict

W = {"w": torch.zeros(2)}
E = {"w": torch.ones(2)}


def test_model_weights_by_default_with_a_warning_when_ema_is_there_too():
    with pytest.warns(CheckpointWarning, match=r"model weights \('model'\) and EMA weights \('model_ema'\).*weights='ema'"):
        state, key = choose_weights({"model": W, "model_ema": E})
    assert key == "model" and state is W
    state, key = choose_weights({"model": W, "model_ema": E}, weights="ema")
    assert key == "model_ema" and state is E


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema", "ema"])
def test_ema_only_loads_them_and_says_so(ema_key):
    with pytest.warns(CheckpointWarning, match="EMA weights only"):
        state, key = choose_weights({ema_key: E, "epoch": 3})
    assert key == ema_key and state is E


def test_ema_asked_for_but_absent_falls_back_like_timm():
    with pytest.warns(CheckpointWarning, match="holds no EMA weights.*using the model weights"):
        state, _ = choose_weights({"state_dict": W}, weights="ema")
    assert state is W
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_weights({"state_dict": W})[1] == "state_dict"  # nothing to say
        assert choose_weights(W)[1] == ""  # a flat state dict


def test_bad_choices_and_missing_state_dicts():
    with pytest.raises(ConfigError, match="'model' or 'ema'"):
        choose_weights({"model": W}, weights="shadow")
    with pytest.raises(CheckpointError, match="no state dict found.*'epoch'"):
        choose_weights({"epoch": 3, "notes": "x"})
    with pytest.raises(ConfigError, match="weights='ema' applies to original checkpoints"):
        load_model("anatcl-global", weights="ema")


def test_wrapper_prefixes_are_stripped_only_when_they_make_the_keys_match():
    expected = {"encoder.conv1.weight", "head.0.bias"}
    lightning = {"model.encoder.conv1.weight": torch.ones(1), "model.head.0.bias": torch.ones(1), "criterion.w": torch.ones(1)}
    state, hint = match_prefix(lightning, expected)
    assert set(state) == expected and hint is None
    nested = {f"net.module.model.{k}": torch.ones(1) for k in expected}  # up to three wrappers deep
    assert set(match_prefix(nested, expected)[0]) == expected
    own = {k: torch.ones(1) for k in expected}  # the network's own keys start with encoder.: left alone
    assert set(match_prefix(own, expected)[0]) == expected
    wrapped = {f"encoder.{k}": torch.ones(1) for k in expected}  # an `encoder` attribute holding the network
    assert set(match_prefix(wrapped, expected)[0]) == expected
    # the authors' wrapper, without knowing the network
    assert set(extract_state_dict({"model": {f"backbone.{k}": torch.ones(1) for k in expected}})) == expected


def test_a_prefix_that_does_not_make_the_keys_match_gives_a_hint(tmp_path):
    state = {f"model.{k}": v for k, v in random_state_dict(seed=2).items()}
    del state["model.head.2.bias"]
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 1e-3}}, path)
    with pytest.raises(StateDictMismatchError, match=r"Hint: 123 of the 123 keys start with 'model\.'") as info:
        load_model(path, device="cpu")
    assert str(path) in str(info.value) and len(info.value.unexpected) == 123
