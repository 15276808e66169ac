"""linear_probe: the paper's linear-probing protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anatcl_infer.errors import ConfigError, HeadError
from anatcl_infer.downstream.features import feature_names
from anatcl_infer.downstream.probe import ProbeResult, linear_probe


def test_regression_probe_scores_a_linear_target():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 20))
    y = 3 * X[:, 0] - 2 * X[:, 1] + 50 + rng.normal(0, 0.5, 100)
    res = linear_probe(X, y)
    assert isinstance(res, ProbeResult) and res.task == "regression"
    assert len(res.metrics["mae"]) == 5 and len(res.metrics["r2"]) == 5
    assert res.mean("r2") > 0.9
    assert res.mean("mae") < 1.0
    assert res.mean("mae") == pytest.approx(np.mean(res.metrics["mae"]))
    # out-of-fold predictions, in input order
    assert np.mean(np.abs(res.predictions - y)) == pytest.approx(res.mean("mae"), rel=0.1)
    assert "mae" in str(res) and "±" in str(res)


def test_noise_target_scores_near_chance():
    rng = np.random.default_rng(1)
    res = linear_probe(rng.normal(size=(80, 10)), rng.normal(size=80))
    assert res.mean("r2") < 0.1


def test_classification_probe_reports_balanced_accuracy_and_auc():
    rng = np.random.default_rng(2)
    y = np.array(["CN"] * 45 + ["AD"] * 15)
    X = rng.normal(size=(60, 10)) + (y == "AD")[:, None] * 1.2
    res = linear_probe(X, y)
    assert res.task == "classification"
    assert set(res.metrics) == {"balanced_accuracy", "roc_auc"}
    assert res.mean("balanced_accuracy") > 0.8 and res.mean("roc_auc") > 0.9
    assert set(res.predictions) <= {"CN", "AD"}


def test_classification_on_shuffled_labels_is_near_chance():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 40)
    res = linear_probe(rng.normal(size=(80, 10)), y, task="classification")
    assert 0.25 < res.mean("balanced_accuracy") < 0.75


def test_features_dataframe_and_groups():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 8))
    y = X[:, 0] * 5
    df = pd.DataFrame(X, columns=feature_names(8)).assign(path="x", subject=[f"{i // 2}" for i in range(60)])
    res = linear_probe(df, pd.Series(y), groups=df["subject"], cv=3)
    assert res.cv == 3 and len(res.metrics["mae"]) == 3 and res.mean("r2") > 0.9


def test_auto_task_inference():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 4))
    assert linear_probe(X, rng.integers(0, 2, 40)).task == "classification"
    assert linear_probe(X, rng.uniform(0, 1, 40)).task == "regression"


def test_probe_errors():
    two_folds = pd.DataFrame(np.zeros((4, 2)), columns=feature_names(2)).assign(fold=[0, 0, 1, 1])
    with pytest.raises(ConfigError, match="one fold at a time"):
        linear_probe(two_folds, np.arange(4.0))
    X = np.zeros((8, 3))
    with pytest.raises(HeadError, match="too few"):
        linear_probe(X, np.arange(8.0))
    with pytest.raises(HeadError, match="single class"):
        linear_probe(X, ["a"] * 8, task="classification")
    with pytest.raises(ConfigError, match="rows"):
        linear_probe(X, np.arange(7.0))
    with pytest.raises(ConfigError, match="task"):
        linear_probe(X, np.arange(8.0), task="ranking")


def test_classification_with_a_class_as_small_as_the_fold_count_still_runs():
    """A class with exactly cv members leaves one per training fold: no inner search, no crash."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(23, 6))
    y = np.array(["a"] * 20 + ["b"] * 3)
    X[y == "b", 0] += 4.0
    result = linear_probe(X, y, task="classification", cv=3)
    assert len(result.metrics["balanced_accuracy"]) == 3


def _twins(n_subjects: int = 60, dim: int = 300, seed: int = 0):
    """Two near-identical sessions per subject, a target that is pure noise per subject."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_subjects, dim))
    X = np.repeat(base, 2, axis=0) + rng.normal(0, 0.05, (2 * n_subjects, dim))
    y = np.repeat(rng.normal(50, 10, n_subjects), 2)
    return X, y, np.repeat(np.arange(n_subjects), 2)


def test_groups_reach_the_inner_alpha_search(monkeypatch):
    """No split, outer or inner (alpha search), puts one subject's sessions on both sides."""
    from sklearn.model_selection import _split

    seen = []
    original = _split.BaseCrossValidator.split

    def spy(self, X, y=None, groups=None):
        for train, test in original(self, X, y, groups):
            subj = np.asarray(X)[:, 0]  # the first feature is the subject id
            seen.append((len(X), set(subj[train]) & set(subj[test])))
            yield train, test

    monkeypatch.setattr(_split.BaseCrossValidator, "split", spy)
    X, y, g = _twins(dim=20)
    X[:, 0] = g
    linear_probe(X, y, groups=g, cv=5)
    sizes = {n for n, _ in seen}
    assert len(y) in sizes and len(sizes) > 1  # outer and inner splits were both seen
    assert all(not shared for _, shared in seen)  # the hand-written probe's inner KFold split subjects


def test_grouped_outer_split_follows_the_seed():
    X, y, g = _twins(dim=20)
    a = linear_probe(X, y, groups=g, seed=1).predictions
    b = linear_probe(X, y, groups=g, seed=2).predictions
    np.testing.assert_array_equal(a, linear_probe(X, y, groups=g, seed=1).predictions)
    assert np.abs(a - b).max() > 1e-3  # the hand-written probe ignored seed with groups (GroupKFold unshuffled)
    # and a subject's sessions are never split across outer folds: both are predicted by the same model
    res = linear_probe(X, y, groups=g, cv=5, seed=3)
    assert res.n == len(y)
