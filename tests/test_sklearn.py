"""AnatCLEncoder: a stateless scikit-learn transformer; pickles without weights; embedding cache."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline

from anatcl_infer.errors import ConfigError, InputError
from anatcl_infer.downstream.transformer import AnatCLEncoder, file_sha256

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _synthetic():
    spec = importlib.util.spec_from_file_location("_anatcl_examples_synthetic", EXAMPLES / "_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """An untrained model on a 4 mm grid and four small anatomical maps."""
    syn = _synthetic()
    root = tmp_path_factory.mktemp("sk")
    model_dir = syn.make_demo_model(root / "model")
    rows = syn.make_cohort(root / "maps", 3, seed=1)
    return model_dir, [r["path"] for r in rows]


@pytest.fixture(scope="module")
def warm(demo, tmp_path_factory):
    """An embedding cache filled by a first transform, and that transform's output."""
    model_dir, paths = demo
    cache = tmp_path_factory.mktemp("warm") / "emb"
    enc = AnatCLEncoder(model=str(model_dir), device="cpu", cache=str(cache))
    assert enc.fit(paths) is enc
    assert not hasattr(enc, "_model")  # fit loads nothing
    return str(cache), enc.transform(paths)


@pytest.fixture(scope="module")
def warm_cache(warm):
    return warm[0]


@pytest.fixture(scope="module")
def reference(warm):
    return warm[1]


def test_transform_matches_the_encoder_and_fit_does_nothing(demo, reference):
    from anatcl_infer.weights.checkpoint import load_pretrained_dir

    model_dir, paths = demo
    X = load_pretrained_dir(model_dir).encode(paths, device="cpu", progress=False, num_workers=0)
    assert reference.shape == (3, 512) and reference.dtype == np.float32
    np.testing.assert_allclose(reference, X, rtol=1e-5, atol=1e-6)
    enc = AnatCLEncoder(model=str(model_dir), device="cpu")
    import nibabel as nib

    np.testing.assert_allclose(enc.transform([nib.load(paths[1])]), reference[1:2], rtol=1e-5, atol=1e-6)


def test_input_forms():
    items = AnatCLEncoder._items
    assert items("a.nii") == ["a.nii"]
    assert items(pd.Series(["a", "b"], index=[5, 7])) == ["a", "b"]
    assert items(pd.DataFrame({"path": ["a", "b"]})) == ["a", "b"]
    assert items(np.array(["a", "b"], dtype=object)) == ["a", "b"]
    assert items(np.array([["a"], ["b"]], dtype=object)) == ["a", "b"]  # a 2-D column, as ColumnTransformer passes


def test_pandas_output_and_feature_names(demo, reference, warm_cache):
    model_dir, paths = demo
    enc = AnatCLEncoder(model=model_dir, device="cpu", cache=warm_cache).set_output(transform="pandas")
    out = enc.fit_transform(pd.Series(paths, index=[10, 11, 12]))
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns[:2]) == ["feat_000", "feat_001"] and out.shape == (3, 512)
    assert list(enc.get_feature_names_out()) == list(out.columns)
    np.testing.assert_allclose(out.to_numpy(), reference, rtol=1e-5, atol=1e-6)


def test_pickle_and_clone_do_not_carry_weights(demo, reference, warm_cache):
    model_dir, paths = demo
    enc = AnatCLEncoder(model=str(model_dir), fold=0, batch_size=2, device="cpu", cache=warm_cache)
    enc._get_model()
    assert hasattr(enc, "_model")  # loaded lazily on first use
    blob = pickle.dumps(enc)
    assert len(blob) < 10_000  # the weights are ~134 MB; none of them travel
    restored = pickle.loads(blob)
    assert not hasattr(restored, "_model")
    assert restored.get_params() == enc.get_params()
    np.testing.assert_allclose(restored.transform(paths), reference, rtol=1e-5, atol=1e-6)
    twin = clone(enc)
    assert twin.get_params() == enc.get_params() and not hasattr(twin, "_model")


def test_cache_hit_does_not_call_the_model(demo, reference, warm_cache, monkeypatch):
    model_dir, paths = demo
    cache = Path(warm_cache)
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 3
    assert {e.stem for e in entries} == {file_sha256(p) for p in paths}

    import anatcl_infer.encoding.encoder
    import anatcl_infer.weights.loading

    def boom(*args, **kwargs):
        raise AssertionError("the model was used on a cache hit")

    monkeypatch.setattr(anatcl_infer.encoding.encoder, "encode", boom)
    monkeypatch.setattr(anatcl_infer.weights.loading, "load_model", boom)
    fresh = AnatCLEncoder(model=str(model_dir), device="cpu", cache=str(cache))
    hit = fresh.transform(paths[::-1])
    assert not hasattr(fresh, "_model")
    np.testing.assert_allclose(hit, reference[::-1], rtol=1e-5, atol=1e-6)


def test_cache_key_follows_content_and_model(demo, tmp_path, monkeypatch):
    syn = _synthetic()
    model_dir, paths = demo
    cache = tmp_path / "emb"
    import anatcl_infer.encoding.encoder

    calls = []
    monkeypatch.setattr(anatcl_infer.encoding.encoder, "encode",
                        lambda model, items, **kw: calls.append(len(items)) or np.ones((len(items), 512), np.float32))
    enc = AnatCLEncoder(model=str(model_dir), device="cpu", cache=str(cache))
    enc.transform(paths[:2])
    # the same content under another name is a hit
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(Path(paths[0]).read_bytes())
    enc.transform([str(copy), paths[1]])
    assert calls == [2] and len(list(cache.rglob("*.npy"))) == 2
    # other weights: another cache folder, computed again
    other = syn.make_demo_model(tmp_path / "other", seed=1)
    AnatCLEncoder(model=str(other), device="cpu", cache=str(cache)).transform(paths[:1])
    assert calls == [2, 1]
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def test_corrupt_cache_entry_is_recomputed(demo, reference, tmp_path):
    model_dir, paths = demo
    cache = tmp_path / "emb"
    enc = AnatCLEncoder(model=str(model_dir), device="cpu", cache=str(cache))
    enc.transform(paths[:1])
    entry = next(cache.rglob("*.npy"))
    np.save(entry, np.zeros(3, np.float32))
    np.testing.assert_allclose(AnatCLEncoder(model=str(model_dir), device="cpu", cache=str(cache)).transform(paths[:1]),
                               reference[:1], rtol=1e-5, atol=1e-6)
    assert np.load(entry).shape == (512,)


def test_in_a_pipeline(demo, warm_cache):
    model_dir, paths = demo
    pipe = make_pipeline(AnatCLEncoder(model=str(model_dir), device="cpu", cache=warm_cache), Ridge())
    pipe.fit(paths, [20.0, 40.0, 60.0])
    assert pipe.predict(paths[:2]).shape == (2,)
    assert clone(pipe).steps[0][1].get_params()["model"] == str(model_dir)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        AnatCLEncoder(batch_size=0).fit(["x"])
    with pytest.raises(ConfigError, match="model"):
        AnatCLEncoder(model=3.5).fit(["x"])
    with pytest.raises(InputError, match="numeric array"):
        AnatCLEncoder().transform(np.zeros((2, 10, 10, 10)))
    with pytest.raises(InputError, match="single column"):
        AnatCLEncoder().transform(pd.DataFrame({"a": ["x"], "b": ["y"]}))
