"""Equality with the authors' own code (``pip install anatcl==0.0.3``, test-only dependency).

A subprocess builds ``anatcl.AnatCL(pretrained=False)``, gives it random weights and random
BatchNorm statistics, computes its features and projections, and saves it in every shape the
authors' training code could have published: a dict with ``model``/``opts``/``optimizer``/
``scaler``/``epoch`` and a *fitted* ``models.estimators.AgeEstimator`` (a scikit-learn
GridSearchCV, whose ``cv_results_`` hold masked arrays and whose scorer references ``r2_score``)
of a module that exists only while saving; a whole-model pickle of classes whose module is
deleted; the authors' wrapper pickled whole; a ``module.`` prefix; the legacy (pre-1.6) format.
Each file must load, run nothing, and give exactly the authors' numbers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from anatcl_infer import load_model

pytest.importorskip("anatcl", reason="the authors' package (test extra: anatcl==0.0.3)")
pytest.importorskip("sklearn")

_WRITER = textwrap.dedent(
    '''
    import argparse, datetime, enum, pathlib, sys, types
    import numpy as np
    import torch
    import anatcl
    from anatcl.models import resnet3d

    out = pathlib.Path(sys.argv[1])
    torch.manual_seed(0)
    net = anatcl.AnatCL(pretrained=False, use_head=True).eval()
    with torch.no_grad():
        for key, value in net.backbone.state_dict().items():
            if key.endswith("num_batches_tracked"):
                value.fill_(77)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif key.endswith("running_mean"):
                value.normal_(0.0, 0.2)
            elif ".bn" in key or "downsample.1" in key or key == "encoder.bn1.weight" or key.endswith("bias"):
                value.uniform_(0.5, 1.5) if key.endswith("weight") else value.normal_(0.0, 0.1)
            # conv and linear weights keep their (seeded) random initialisation
    x = torch.randn(2, 1, 24, 28, 24, generator=torch.Generator().manual_seed(1))

    # the training package: exists while saving, deleted afterwards (as on the authors' side)
    models = types.ModuleType("models")
    estimators = types.ModuleType("models.estimators")
    models.estimators = estimators
    sys.modules["models"], sys.modules["models.estimators"] = models, estimators
    from sklearn.base import BaseEstimator
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    class AgeEstimator(BaseEstimator):
        def __init__(self):
            self.estimator = GridSearchCV(Ridge(), {"alpha": 10.0 ** np.arange(-2, 3)}, scoring="r2")

        def fit(self, X, y):
            self.estimator.fit(X, y)
            return self

    class Mode(enum.Enum):
        TRAIN = "train"

    for cls in (AgeEstimator, Mode):
        cls.__module__ = "models.estimators"
        setattr(estimators, cls.__name__, cls)
    rng = np.random.default_rng(0)
    age = AgeEstimator().fit(rng.normal(size=(30, 512)), rng.normal(size=30))
    opts = argparse.Namespace(data_dir=pathlib.Path("/data/openbhb"), started=datetime.datetime(2024, 3, 1, 12),
                              mode=Mode.TRAIN, crop=(121, 128, 121), lr=np.float32(1e-4), model="resnet18")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    net(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():  # the reference: the authors' model as saved below
        net.backbone.use_head = False
        feats = net(x)
        net.backbone.use_head = True
        proj = net(x)
    assert not torch.equal(feats[0], feats[1])
    torch.save({"x": x, "features": feats, "projection": proj}, out / "reference.pt")
    scaler = torch.amp.GradScaler("cpu")
    state = net.backbone.state_dict()
    torch.save({k: v.clone() for k, v in state.items()}, out / "reference_state.pt")
    torch.save({"model": state, "opts": opts, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": 49, "estimator": age}, out / "training_dict.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "opts": opts, "epoch": 49}, out / "module_prefix.pth")
    torch.save({"model": state, "opts": opts}, out / "legacy.pth", _use_new_zipfile_serialization=False)

    # whole-model pickles of classes whose module is then gone
    gone = types.ModuleType("authors_models")
    sys.modules["authors_models"] = gone
    for cls in (resnet3d.SupConResNet, resnet3d.ResNet, resnet3d.BasicBlock, anatcl.AnatCL):
        cls.__module__ = "authors_models"
        setattr(gone, cls.__name__, cls)
    torch.save(net.backbone, out / "whole_model.pth")
    torch.save({"model": net, "estimator": age, "epoch": 49}, out / "whole_wrapper_in_dict.pth")
    '''
)

SHAPES = ["training_dict", "module_prefix", "legacy", "whole_model", "whole_wrapper_in_dict"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    script = root / "write.py"
    script.write_text(_WRITER)
    subprocess.run([sys.executable, str(script), str(root)], check=True, cwd=root, timeout=600)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_gives_the_authors_numbers_exactly(zoo, shape, caplog):
    reference = torch.load(zoo / "reference.pt", weights_only=True)
    assert "models" not in sys.modules and "authors_models" not in sys.modules
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        model = load_model(zoo / f"{shape}.pth", device="cpu")
    assert "models" not in sys.modules and "authors_models" not in sys.modules  # nothing was imported
    # the weights are theirs, bit for bit, and the plain forward gives exactly their numbers
    theirs = torch.load(zoo / "reference_state.pt", weights_only=True)
    ours = model.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    model.encoder.fused = False
    with torch.no_grad():
        feats = model(reference["x"])
        proj = model(reference["x"], head=True)
    assert torch.equal(feats, reference["features"])
    assert torch.equal(proj, reference["projection"])
    # the default CPU path (BatchNorm folded into the convolutions, model/fused.py) within float32 rounding
    model.encoder.fused = True
    with torch.no_grad():
        fused = model(reference["x"])
    torch.testing.assert_close(fused, reference["features"], rtol=1e-5, atol=1e-6)
    if shape in ("training_dict", "whole_wrapper_in_dict"):
        # one line says what was dropped: the fitted estimator and what rides inside it
        dropped = [r.getMessage() for r in caplog.records if "dropped training-time objects" in r.getMessage()]
        assert len(dropped) == 1
        for name in ("models.estimators.AgeEstimator", "GridSearchCV", "numpy.ma", "r2_score"):
            assert name in dropped[0], name
    if shape.startswith("whole"):
        assert "recovered the state dict of pickled modules" in caplog.text
