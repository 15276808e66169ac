"""Linear heads on frozen AnatCL features: fitting, brain-age bias correction, intervals, saving, predicting.

The fitting is scikit-learn's: ``make_pipeline(StandardScaler(), Ridge | LogisticRegression)``,
the strength chosen by ``GridSearchCV`` over 10^[-2..2] (the OpenBHB protocol), the
out-of-fold predictions from ``cross_validate(return_estimator=True, return_indices=True)``,
classification probabilities calibrated by ``CalibratedClassifierCV(method="sigmoid")``.
Sessions of one subject always share a CV fold, and the splits follow ``seed``.
On top of it: one head per model fold (the ensemble is the mean of the fold *predictions*), a
brain-age bias correction and split-conformal intervals fitted on out-of-fold predictions, and a
pickle-free file format.

Where each part lives (each module imports only modules listed before it; none imports this package):

* :mod:`.estimators`: the scikit-learn pipelines, strength grid, scoring and CV splitters (shared with the probe);
* :mod:`.metrics`: CV metrics (regression, classification, Brier score);
* :mod:`.labels`: joining labels to feature rows; digests of the training subjects;
* :mod:`.rows`: which fold and input each feature row is; a fold's model provenance;
* :mod:`.brain_age`: the brain-age bias correction (fit, apply, gap columns);
* :mod:`.intervals`: split-conformal prediction intervals;
* :mod:`.fold_head`: :class:`FoldHead`, one fold's linear model and probability calibration;
* :mod:`.persistence`: ``head.safetensors`` + ``head.json`` (:data:`HEAD_FORMAT`), save and load;
* :mod:`.head`: :class:`Head`, checks against features and prediction;
* :mod:`.oof`: out-of-fold predictions and their summaries (metrics, bias, conformal, ensemble);
* :mod:`.fitting`: :func:`fit_head`.

Every name is importable from here, as from the single module this package replaced.
"""

from __future__ import annotations

from .brain_age import fit_bias_correction
from .estimators import ALPHAS
from .fitting import fit_head
from .fold_head import FoldHead
from .head import Head
from .labels import join_labels
from .persistence import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME

# The other names of the single module this package replaced, importable from here as before.
from .brain_age import _AGE_NAMES, _apply_bias  # noqa: F401
from .estimators import _grid_param, _pipeline, _scoring, _splitter, single_threaded  # noqa: F401
from .fitting import _fit_fold, _infer_kind, _mean_of_models  # noqa: F401
from .intervals import CONFORMAL_LEVELS, _conformal, _halfwidth  # noqa: F401
from .labels import _has, _id_hashes, _norm_id, _norm_path  # noqa: F401
from .metrics import _brier, _classification_metrics, _regression_metrics  # noqa: F401
from .oof import _ensemble_summary, _oof, _oof_frame, _regression_summary  # noqa: F401
from .persistence import HEAD_FORMAT, _to_native  # noqa: F401
from .rows import _ID_COLUMNS, _fold_mask, _fold_values, _input_keys, _meta_for_fold, _rows_per_input  # noqa: F401

__all__ = [
    "ALPHAS",
    "HEAD_CONFIG_NAME",
    "HEAD_WEIGHTS_NAME",
    "FoldHead",
    "Head",
    "fit_bias_correction",
    "fit_head",
    "join_labels",
]
