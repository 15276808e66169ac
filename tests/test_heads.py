"""Heads: fitting on features with known truth, bias correction, fold ensembles, save/load, mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from anatcl_infer.errors import HeadError
from anatcl_infer.downstream.features import feature_names
from anatcl_infer.downstream.heads import ALPHAS, Head, fit_bias_correction, fit_head, join_labels

SHA0, SHA1 = "a" * 64, "b" * 64


def _table(X: np.ndarray, *, fold: int | None = 0, model: str = "m", prefix: str = "/d/s") -> pd.DataFrame:
    df = pd.DataFrame(X.astype(np.float32), columns=feature_names(X.shape[1]))
    df.insert(0, "path", [f"{prefix}{i:03d}.nii.gz" for i in range(len(X))])
    df.insert(1, "subject", [f"{i:03d}" for i in range(len(X))])
    df.insert(2, "model", model)
    df.insert(3, "fold", pd.array([fold] * len(X), dtype="Int64"))
    return df


def _meta(folds=(0,), shas=(SHA0,)) -> dict:
    sha = list(shas) if len(folds) > 1 else shas[0]
    return {"model": {"name": "m", "source": "src", "source_sha256": sha, "architecture": "resnet18",
                      "variant": "global", "folds": list(folds)}, "preprocess": {}}


def _attenuated(n: int = 400, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """feat_000 = age + noise with var(noise) = var(age): the best linear predictor has slope 0.5."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    X = rng.normal(size=(n, dim))
    X[:, 0] = age + rng.normal(0, np.sqrt(np.var(age)), n)
    return X, age


def _labels(age: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"subject": [f"sub-{i:03d}" for i in range(len(age))], "age": age})


def test_bias_correction_recovers_a_known_line():
    rng = np.random.default_rng(1)
    age = rng.uniform(20, 80, 500)
    pred = 0.7 * age + 12 + rng.normal(0, 1, 500)
    bias = fit_bias_correction(age, pred)
    assert bias["slope"] == pytest.approx(0.7, abs=0.02)
    assert bias["intercept"] == pytest.approx(12, abs=1.0)


def test_age_head_bias_is_fitted_on_out_of_fold_predictions_with_known_shrinkage():
    X, age = _attenuated()
    head = fit_head(_table(X), _labels(age), "age", metadata=_meta(), units="years")
    info = head.config["folds"][0]
    bias = info["bias_correction"]
    # Regression dilution: slope var(age)/(var(age)+var(noise)) = 0.5, intercept (1-0.5)*mean(age).
    assert bias["slope"] == pytest.approx(0.5, abs=0.08)
    assert bias["intercept"] == pytest.approx(0.5 * age.mean(), abs=5.0)

    # Recompute the out-of-fold predictions independently: the stored line is theirs.
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), Ridge(alpha=info["alpha"]))
    oof = cross_val_predict(pipe, X.astype(np.float32), age, cv=KFold(5, shuffle=True, random_state=0))
    slope, intercept = np.polyfit(age, oof, 1)
    assert bias["slope"] == pytest.approx(slope, rel=1e-6)
    assert bias["intercept"] == pytest.approx(intercept, rel=1e-6)
    assert info["cv_metrics"]["mae"] == pytest.approx(np.mean(np.abs(oof - age)), rel=1e-6)
    # In-sample predictions show a smaller bias (steeper line): not what is stored.
    in_slope = np.polyfit(age, pipe.fit(X.astype(np.float32), age).predict(X.astype(np.float32)), 1)[0]
    assert in_slope > bias["slope"] + 0.01

    # Corrected gaps on new subjects from the same population are free of the age trend.
    Xn, age_n = _attenuated(n=600, seed=7)
    pred = head.predict(_table(Xn, prefix="/new/s"), _labels(age_n))
    raw_r = np.corrcoef(age_n, pred["brain_age_gap"])[0, 1]
    cor_r = np.corrcoef(age_n, pred["brain_age_gap_corrected"])[0, 1]
    assert raw_r < -0.4
    assert abs(cor_r) < abs(raw_r) / 2
    np.testing.assert_allclose(pred["age_pred_corrected"], (pred["age_pred"] - bias["intercept"]) / bias["slope"])
    np.testing.assert_allclose(pred["brain_age_gap"], pred["age_pred"] - age_n)


def test_regression_head_is_the_mean_of_the_cv_models():
    X, age = _attenuated(n=120, dim=32, seed=3)
    X = X.astype(np.float32)
    head = fit_head(_table(X), _labels(age), "age")
    alpha = head.config["folds"][0]["alpha"]
    assert alpha in ALPHAS
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xn, _ = _attenuated(n=50, dim=32, seed=9)
    Xn = Xn.astype(np.float32)
    preds = [make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(X[tr], age[tr]).predict(Xn)
             for tr, _ in KFold(5, shuffle=True, random_state=0).split(X)]
    np.testing.assert_allclose(head.predict(_table(Xn))["age_pred"], np.mean(preds, axis=0), rtol=1e-5, atol=1e-4)


def test_bias_correction_does_not_over_correct_new_subjects():
    """Small training sets shrink CV models more than a refit: the stored head must match its correction."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=512)

    def cohort(n):
        age = rng.uniform(20, 85, n)
        return np.outer(age - 50, w) / 30 + rng.normal(size=(n, 512)) * 3, age

    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    r_head, r_refit = [], []
    for _ in range(6):
        X, age = cohort(56)
        head = fit_head(_table(X), _labels(age), "age")
        Xn, age_n = cohort(800)
        pred = head.predict(_table(Xn, prefix="/new/s"), _labels(age_n))
        r_head.append(np.corrcoef(age_n, pred["brain_age_gap_corrected"])[0, 1])
        # what a refit on all training subjects with the same correction would give
        info = head.config["folds"][0]
        refit = make_pipeline(StandardScaler(), Ridge(alpha=info["alpha"])).fit(X.astype(np.float32), age)
        b = info["bias_correction"]
        gap = (refit.predict(Xn.astype(np.float32)) - b["intercept"]) / b["slope"] - age_n
        r_refit.append(np.corrcoef(age_n, gap)[0, 1])
    assert abs(np.mean(r_head)) < 0.15, r_head
    assert np.mean(r_refit) > np.mean(r_head) + 0.1, (r_refit, r_head)


def test_fold_heads_and_ensemble_is_mean_of_fold_predictions(tmp_path):
    X, age = _attenuated(n=150, seed=2)
    rng = np.random.default_rng(5)
    X1 = X @ np.linalg.qr(rng.normal(size=(16, 16)))[0]  # fold 1 lives in a rotated space
    df = pd.concat([_table(X, fold=0), _table(X1, fold=1)], ignore_index=True)
    head = fit_head(df, _labels(age), "age", metadata=_meta((0, 1), (SHA0, SHA1)))
    assert sorted(head.folds) == [0, 1]
    assert [f["model_sha256"] for f in head.config["folds"]] == [SHA0, SHA1]
    assert "bias_correction" in head.config["ensemble"]
    head.save(tmp_path / "h")
    loaded = Head.load(tmp_path / "h")
    pred = loaded.predict(df, _labels(age), metadata=_meta((0, 1), (SHA0, SHA1)))
    assert len(pred) == 150 and list(pred["path"]) == list(df["path"][:150])
    np.testing.assert_allclose(pred["age_pred"], (pred["age_pred_fold0"] + pred["age_pred_fold1"]) / 2)
    ens = head.config["ensemble"]["bias_correction"]
    np.testing.assert_allclose(pred["brain_age_gap_corrected"], (pred["age_pred"] - ens["intercept"]) / ens["slope"] - age)
    # Each fold's head applied to its own space: fold 1 predicts like fold 0 on rotated features.
    assert np.corrcoef(pred["age_pred_fold0"], pred["age_pred_fold1"])[0, 1] > 0.9
    # Rows aligned with the input table, the same values on both fold rows of an input.
    frame = loaded.predict_frame(df)
    assert list(frame.index) == list(df.index)
    np.testing.assert_allclose(frame["age_pred"].to_numpy()[:150], frame["age_pred"].to_numpy()[150:])
    assert "brain_age_gap" not in frame  # no chronological age given


def test_save_load_roundtrip_and_head_json(tmp_path):
    X, age = _attenuated(n=80, seed=4)
    df = _table(X)
    head = fit_head(df, _labels(age), "age", metadata=_meta(), units="years")
    head.save(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "head.json").read_text())
    assert cfg["target"] == "age" and cfg["kind"] == "regression" and cfg["units"] == "years"
    assert cfg["brain_age"] is True and cfg["n_train"] == 80 and cfg["join_key"] == "subject"
    assert cfg["folds"][0]["model_sha256"] == SHA0 and cfg["folds"][0]["model_name"] == "m"
    assert set(cfg["folds"][0]["cv_metrics"]) >= {"mae", "r2"}
    assert set(cfg["folds"][0]["bias_correction"]) == {"slope", "intercept"}
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "h" / "head.safetensors"))
    assert set(tensors) == {"fold0.coef", "fold0.intercept", "fold0.scaler_mean", "fold0.scaler_scale"}
    assert tensors["fold0.coef"].shape == (1, 16)
    loaded = Head.load(tmp_path / "h")
    pd.testing.assert_frame_equal(loaded.predict(df, metadata=_meta()), head.predict(df, metadata=_meta()))


def test_gap_columns_from_an_age_column_in_the_features():
    X, age = _attenuated(n=60, seed=6)
    head = fit_head(_table(X), _labels(age), "age")
    df = _table(X)
    assert "brain_age_gap" not in head.predict(df)
    df["age"] = age
    pred = head.predict(df)
    np.testing.assert_allclose(pred["brain_age_gap"], pred["age_pred"] - age)


def test_head_refuses_features_of_another_model_or_fold(tmp_path):
    X, age = _attenuated(n=60)
    head = fit_head(_table(X), _labels(age), "age", metadata=_meta())
    with pytest.raises(HeadError, match="model"):
        head.predict(_table(X, model="other-model"))
    with pytest.raises(HeadError, match="sha256"):
        head.predict(_table(X), metadata=_meta(shas=(SHA1,)))
    with pytest.raises(HeadError, match="fold 3"):
        head.predict(_table(X, fold=3))
    with pytest.raises(HeadError, match="16-d"):
        head.predict(_table(X[:, :8]))
    head.predict(_table(X), metadata=_meta())  # the right ones pass


def test_join_on_path_when_both_have_it():
    X, age = _attenuated(n=40)
    df = _table(X)
    labels = pd.DataFrame({"path": df["path"][::-1].to_numpy(), "age": age[::-1]})
    joined, key = join_labels(df, labels, columns=["age"])
    assert key == "path"
    np.testing.assert_allclose(joined["age"], age)


def test_fit_errors_say_what_is_wrong():
    X, age = _attenuated(n=60)
    df = _table(X)
    with pytest.raises(HeadError, match="no join key"):
        fit_head(df, pd.DataFrame({"id": range(60), "age": age}), "age")
    with pytest.raises(HeadError, match="no feature row matches"):
        fit_head(df, pd.DataFrame({"subject": [f"x{i}" for i in range(60)], "age": age}), "age")
    with pytest.raises(HeadError, match="'score' is not in the labels"):
        fit_head(df, _labels(age), "score")
    with pytest.raises(HeadError, match="too few"):
        fit_head(df.iloc[:6], _labels(age), "age")
    with pytest.raises(HeadError, match="single class"):
        fit_head(df, _labels(age).assign(dx="AD"), "dx")
    with pytest.raises(HeadError, match="not unique"):
        fit_head(df, pd.concat([_labels(age), _labels(age)]), "age")


def test_binary_classification_head_matches_logistic_regression():
    rng = np.random.default_rng(0)
    n = 120
    y = np.where(rng.random(n) < 0.4, "AD", "CN")
    X = rng.normal(size=(n, 16)) + (y == "AD")[:, None] * 0.8
    labels = pd.DataFrame({"subject": [f"{i:03d}" for i in range(n)], "dx": y})
    head = fit_head(_table(X), labels, "dx")
    assert head.kind == "classification" and head.classes == ["AD", "CN"]
    metrics = head.config["folds"][0]["cv_metrics"]
    assert metrics["balanced_accuracy"] > 0.75 and metrics["roc_auc"] > 0.85
    assert "bias_correction" not in head.config["folds"][0]
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    C = head.config["folds"][0]["C"]
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))
    ref.fit(X.astype(np.float32), y)
    pred = head.predict(_table(X))
    fh = head.folds[0]
    Xf = X.astype(np.float32)
    np.testing.assert_allclose(fh.proba(fh.decision(Xf), calibrated=False)[:, 1], ref.predict_proba(Xf)[:, 1], atol=1e-4)
    assert list(pred["dx_pred"]) == list(ref.predict(Xf))  # the label is the balanced classifier's
    # The probabilities are CalibratedClassifierCV's (sigmoid on out-of-fold decisions, same CV splits).
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold

    cal = CalibratedClassifierCV(ref, method="sigmoid", cv=StratifiedKFold(5, shuffle=True, random_state=0), ensemble=False)
    cal.fit(Xf, (y == "CN").astype(int))
    np.testing.assert_allclose(pred["dx_proba_CN"], cal.predict_proba(Xf)[:, 1], atol=1e-4)
    assert head.config["folds"][0]["calibration"]["oof_brier_calibrated"] <= head.config["folds"][0]["calibration"]["oof_brier_uncalibrated"]


def test_multiclass_head_probabilities_sum_to_one():
    rng = np.random.default_rng(1)
    n = 90
    site = np.repeat(["A", "B", "C"], 30)
    X = rng.normal(size=(n, 8)) + (site == "B")[:, None] * 1.5 - (site == "C")[:, None] * 1.5
    labels = pd.DataFrame({"subject": [f"{i:03d}" for i in range(n)], "site": site})
    head = fit_head(_table(X), labels, "site")
    pred = head.predict(_table(X))
    probs = pred[["site_proba_A", "site_proba_B", "site_proba_C"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert (pred["site_pred"] == site).mean() > 0.8
    assert "roc_auc_ovr" in head.config["folds"][0]["cv_metrics"]


def test_repeated_subjects_stay_in_one_cv_fold():
    X, age = _attenuated(n=60)
    df = _table(np.concatenate([X, X + 0.01]))
    df["subject"] = [f"{i % 60:03d}" for i in range(120)]
    head = fit_head(df, _labels(age), "age")
    assert head.config["cv"]["grouped_by_subject"] is True
    assert head.config["folds"][0]["n_subjects"] == 60 and head.config["folds"][0]["n_train"] == 120


def test_load_rejects_a_broken_head(tmp_path):
    with pytest.raises(HeadError, match="not a head directory"):
        Head.load(tmp_path)
    X, age = _attenuated(n=60)
    fit_head(_table(X), _labels(age), "age").save(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "head.json").read_text())
    cfg["folds"][0]["fold"] = 2
    (tmp_path / "h" / "head.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadError, match="lacks tensor"):
        Head.load(tmp_path / "h")


def test_feature_table_helpers():
    from anatcl_infer.errors import InputError
    from anatcl_infer.downstream.features import feature_columns, feature_matrix

    assert feature_names(2) == ["feat_000", "feat_001"]
    assert feature_names(2048)[-1] == "feat_2047" and feature_names(2048)[0] == "feat_0000"
    df = pd.DataFrame({"path": ["a"], "feat_001": [2.0], "feat_000": [1.0], "qc_x": [0.5]})
    assert feature_columns(df) == ["feat_000", "feat_001"]
    np.testing.assert_array_equal(feature_matrix(df), [[1.0, 2.0]])
    with pytest.raises(InputError, match="not contiguous"):
        feature_columns(df.drop(columns="feat_000"))
    with pytest.raises(InputError, match="no feature columns"):
        feature_columns(df[["path"]])
    with pytest.raises(InputError, match="non-finite"):
        feature_matrix(df.assign(feat_001=np.nan))


def test_modules_import_cheaply():
    import subprocess
    import sys

    code = ("import sys, anatcl_infer.downstream.heads, anatcl_infer.downstream.probe, anatcl_infer.downstream.features; "
            "print(sorted(m for m in ('pandas', 'sklearn', 'torch', 'pyarrow', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_join_falls_back_to_subject_and_resolves_relative_paths(tmp_path, monkeypatch):
    X, age = _attenuated(n=20)
    df = _table(X)
    other_paths = pd.DataFrame({"path": [f"/elsewhere/{i}.nii" for i in range(20)],
                                "subject": [f"sub-{i:03d}" for i in range(20)], "age": age})
    joined, key = join_labels(df, other_paths, columns=["age"])
    assert key == "subject"
    np.testing.assert_allclose(joined["age"], age)
    monkeypatch.chdir(tmp_path)
    relative = pd.DataFrame({"path": [f"s{i:03d}.nii.gz" for i in range(20)], "age": age})
    joined, key = join_labels(_table(X, prefix=f"{tmp_path}/s"), relative, columns=["age"])
    assert key == "path"
    np.testing.assert_allclose(joined["age"], age)


# --------------------------------------------------------------------------- intervals, calibration, OOF (#14, #16)


def _linear_cohort(n: int, rng: np.random.Generator, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """512-d features linear in age plus noise."""
    age = rng.uniform(20, 85, n)
    return np.outer(age - 50, w) / 40 + rng.normal(size=(n, 512)), age


def test_prediction_intervals_cover_the_nominal_level_on_held_out_subjects():
    rng = np.random.default_rng(42)
    w = rng.normal(size=512)
    X, age = _linear_cohort(400, rng, w)
    Xn, age_n = _linear_cohort(400, rng, w)
    head = fit_head(_table(X), _labels(age), "age")
    pred = head.predict(Xn)  # a plain (N, 512) array
    assert len(pred) == 400 and "path" not in pred
    inside = (pred["age_pred_lo"] <= age_n) & (age_n <= pred["age_pred_hi"])
    assert abs(inside.mean() - 0.90) <= 0.03, inside.mean()
    inside_c = (pred["age_pred_corrected_lo"] <= age_n) & (age_n <= pred["age_pred_corrected_hi"])
    assert abs(inside_c.mean() - 0.90) <= 0.03, inside_c.mean()
    np.testing.assert_allclose(pred["age_pred_hi"] + pred["age_pred_lo"], 2 * pred["age_pred"])
    # another coverage: wider and still honest; no interval on request
    wide = head.predict(Xn, coverage=0.98)
    assert ((wide["age_pred_hi"] - wide["age_pred_lo"]) > (pred["age_pred_hi"] - pred["age_pred_lo"])).all()
    assert ((wide["age_pred_lo"] <= age_n) & (age_n <= wide["age_pred_hi"])).mean() >= 0.95
    assert "age_pred_lo" not in head.predict(Xn, coverage=None)
    with pytest.raises(Exception, match="coverage"):
        head.predict(Xn, coverage=1.5)
    # the array route gives what the table route gives
    np.testing.assert_allclose(pred["age_pred"], head.predict(_table(Xn, prefix="/n/s"))["age_pred"], rtol=1e-12)
    conf = head.config["folds"][0]["conformal"]
    assert conf["n"] == 400 and len(conf["levels"]) == len(conf["abs_residual_quantiles"])


def test_several_folds_give_the_spread_and_an_ensemble_interval():
    X, age = _attenuated(n=150, seed=2)
    rot = np.linalg.qr(np.random.default_rng(5).normal(size=(16, 16)))[0]
    df = pd.concat([_table(X, fold=0), _table(X @ rot + np.random.default_rng(6).normal(0, 0.5, X.shape), fold=1)],
                   ignore_index=True)
    head = fit_head(df, _labels(age), "age")
    pred = head.predict(df)
    spread = np.std(pred[["age_pred_fold0", "age_pred_fold1"]].to_numpy(), axis=1, ddof=1)
    np.testing.assert_allclose(pred["age_pred_fold_sd"], spread)
    assert "conformal" in head.config["ensemble"]
    half = (pred["age_pred_hi"] - pred["age_pred"]).to_numpy()
    assert np.allclose(half, half[0]) and half[0] > 0
    with pytest.raises(HeadError, match="fold=..."):
        head.predict(X)  # an array of a two-fold head needs the fold
    np.testing.assert_allclose(head.predict(X, fold=0)["age_pred"], pred["age_pred_fold0"])


def test_classification_probabilities_are_calibrated():
    """Balanced class weights push probabilities towards 50/50; the stored ones match the prevalence."""
    rng = np.random.default_rng(3)

    def cohort(n):
        y = np.where(rng.random(n) < 0.2, "AD", "CN")
        return rng.normal(size=(n, 16)) + (y == "AD")[:, None] * 0.35, y

    X, y = cohort(400)
    head = fit_head(_table(X), pd.DataFrame({"subject": [f"{i:03d}" for i in range(400)], "dx": y}), "dx")
    Xn, yn = cohort(3000)
    pred = head.predict(Xn)
    fh = head.folds[0]
    raw = fh.proba(fh.decision(Xn.astype(np.float32)), calibrated=False)[:, 0]
    cal = pred["dx_proba_AD"].to_numpy()
    truth = (yn == "AD").astype(float)
    assert abs(cal.mean() - truth.mean()) < 0.03 and raw.mean() - truth.mean() > 0.15
    assert np.mean((cal - truth) ** 2) < np.mean((raw - truth) ** 2)
    for lo, hi in ((0.0, 0.2), (0.2, 0.5)):  # reliability: observed frequency follows the stated probability
        sel = (cal >= lo) & (cal < hi)
        assert sel.sum() > 100 and abs(truth[sel].mean() - cal[sel].mean()) < 0.05
    np.testing.assert_allclose(pred[["dx_proba_AD", "dx_proba_CN"]].sum(axis=1), 1.0)


def test_out_of_fold_predictions_of_the_training_subjects():
    X, age = _attenuated(n=200, seed=8)
    head = fit_head(_table(X), _labels(age), "age")
    oof = head.oof_
    assert list(oof["subject"]) == [f"{i:03d}" for i in range(200)]
    np.testing.assert_allclose(oof["age"], age)
    # they are the cross-validation models' predictions on the subjects each left out
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    alpha = head.config["folds"][0]["alpha"]
    ref = cross_val_predict(make_pipeline(StandardScaler(), Ridge(alpha=alpha)), X.astype(np.float32), age,
                            cv=KFold(5, shuffle=True, random_state=0))
    np.testing.assert_allclose(oof["age_pred"], ref, rtol=1e-6)
    assert abs(np.corrcoef(oof["brain_age_gap_corrected"], age)[0, 1]) < 0.1
    assert np.corrcoef(oof["brain_age_gap"], age)[0, 1] < -0.3
    in_sample = head.predict(_table(X))["age_pred"]
    assert np.mean(np.abs(in_sample - age)) < np.mean(np.abs(oof["age_pred"] - age)) - 0.1


def test_predict_warns_on_the_subjects_the_head_was_fitted_on(caplog):
    X, age = _attenuated(n=60, seed=9)
    head = fit_head(_table(X), _labels(age), "age")
    assert len(head.config["training_ids"]["sha256_16"]) == 60 and "000" not in json.dumps(head.config["training_ids"])
    with caplog.at_level("WARNING", logger="anatcl_infer"):
        head.predict(_table(X[:10]))
    assert "10 of 10 subjects" in caplog.text and "--oof-out" in caplog.text
    caplog.clear()
    new = _table(X[:10])
    new["subject"] = [f"new{i}" for i in range(10)]
    with caplog.at_level("WARNING", logger="anatcl_infer"):
        head.predict(new)
    assert "fitted on" not in caplog.text


def test_labels_join_on_subject_and_session():
    X, _ = _attenuated(n=40)
    df = _table(X)
    df["subject"] = [f"{i // 2:03d}" for i in range(40)]
    df["session"] = ["1" if i % 2 == 0 else "2" for i in range(40)]
    labels = pd.DataFrame({"subject": [f"sub-{i // 2:03d}" for i in range(40)][::-1],
                           "session": ["ses-1" if i % 2 == 0 else "ses-2" for i in range(40)][::-1],
                           "age": np.arange(40.0)[::-1]})
    joined, key = join_labels(df, labels, columns=["age"])
    assert key == "subject+session"
    np.testing.assert_allclose(joined["age"], np.arange(40.0))
    with pytest.raises(HeadError, match="session"):  # per-session labels without sessions in the features
        join_labels(df.drop(columns="session"), labels, columns=["age"])


def test_model_identity_is_the_sha256_names_only_a_fallback():
    X, age = _attenuated(n=60)
    meta_file = {"model": {"name": "fold0", "source": "/w/fold0.pth", "source_sha256": SHA0, "folds": [0]}}
    head = fit_head(_table(X, model="fold0"), _labels(age), "age", metadata=meta_file)
    by_name = {"model": {"name": "anatcl-global", "source": "https://x/fold0.pth", "source_sha256": SHA0, "folds": [0]}}
    head.predict(_table(X, model="anatcl-global"), metadata=by_name)  # identical weights, another name: accepted
    head.check_model(by_name, feature_dim=16)
    with pytest.raises(HeadError, match="sha256"):
        head.check_model({"model": {"name": "fold0", "source_sha256": SHA1, "folds": [0]}})
    with pytest.raises(HeadError, match="anatcl-local"):  # no sha256 on one side: the names decide
        head.check_model({"model": {"name": "anatcl-local", "source_sha256": None, "folds": [0]}})
    with pytest.raises(HeadError, match="fold 1"):
        head.check_model({"model": {"name": "fold0", "source_sha256": [SHA0, SHA1], "folds": [0, 1]}})
    with pytest.raises(HeadError, match="512-d"):
        head.check_model(by_name, feature_dim=512)


def test_head_files_get_the_umask_modes(tmp_path):
    import os
    import stat

    X, age = _attenuated(n=40)
    old = os.umask(0o022)
    try:
        fit_head(_table(X), _labels(age), "age").save(tmp_path / "h")
    finally:
        os.umask(old)
    for name in ("head.json", "head.safetensors"):
        assert stat.S_IMODE((tmp_path / "h" / name).stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o755
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["head.json", "head.safetensors"]


@pytest.mark.parametrize("written, warns", [("0.1.0rc1", False), ("0.1.0+lab", False), (7, False), ("99.0", True)])
def test_head_written_by_another_version_warns_only_when_newer(tmp_path, caplog, written, warns):
    X, age = _attenuated(n=60, seed=8)
    fit_head(_table(X), _labels(age), "age", metadata=_meta()).save(tmp_path / "h")
    cfg_path = tmp_path / "h" / "head.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["package_version"] = written  # a pre-release, a local build, a hand-edited number, a newer release
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="anatcl_infer"):
        Head.load(tmp_path / "h")
    assert ("newer than the installed" in caplog.text) is warns


def test_a_csv_feature_table_in_a_folder_named_like_tsv_is_read_as_csv(tmp_path):
    from anatcl_infer.downstream.features import read_features

    X, _ = _attenuated(n=5, dim=4, seed=9)
    folder = tmp_path / "study.tsv.d"
    folder.mkdir()
    _table(X).to_csv(folder / "feats.csv", index=False)
    df, _ = read_features(folder / "feats.csv")
    np.testing.assert_allclose(df[feature_names(4)].to_numpy(), X.astype(np.float32), rtol=1e-6)
