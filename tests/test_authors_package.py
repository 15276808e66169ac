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
import shutil
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

    # what other training code writes (issue 22): classes of the training script itself, typing
    # names, omegaconf configs, numpy generators, functools.partial, Lightning's layout, EMA weights
    import dataclasses, functools, typing

    class RunMode(enum.Enum):  # defined in __main__, as in any `python train.py`
        TRAIN = "train"

    @dataclasses.dataclass
    class RunConfig:
        lr: float = 1e-4
        mode: RunMode = RunMode.TRAIN
        warmup: typing.Optional[int] = None

    main_opts = argparse.Namespace(mode=RunMode.TRAIN, cfg=RunConfig(), annotations={"x": typing.Any, "y": typing.List[int]})
    torch.save({"model": state, "opts": main_opts, "epoch": 49}, out / "main_classes.pth")
    torch.save({"model": state, "rng": np.random.default_rng(0), "seed_sequence": np.random.SeedSequence(7),
                "legacy_rng": np.random.RandomState(0), "torch_rng": torch.get_rng_state(),
                "make_optimizer": functools.partial(torch.optim.Adam, lr=1e-4, betas=(0.9, 0.99)),
                "activation": functools.partial(torch.nn.functional.gelu, approximate="tanh")}, out / "rng_partial.pth")
    try:
        from omegaconf import OmegaConf

        hparams = OmegaConf.create({"model": {"name": "resnet18", "lr": 1e-4, "layers": [2, 2, 2, 2]}, "seed": 0})
    except ImportError:  # the test extra installs omegaconf; without it the typing names still ride along
        hparams = {"model": {"name": "resnet18"}, "types": typing.Dict[str, typing.Any]}
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    lightning_state = {f"model.{k}": v for k, v in state.items()}
    lightning_state["criterion.class_weights"] = torch.ones(3)  # a loss module's buffer, beside the network
    torch.save({
        "epoch": 49, "global_step": 4900, "pytorch-lightning_version": "2.4.0",
        "state_dict": lightning_state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 4900},
                               "epoch_loop.batch_progress": {"total": {"ready": 4900, "completed": 4900}, "is_last_batch": True}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
            "monitor": "val/loss", "best_model_score": torch.tensor(0.25), "best_model_path": "/ckpt/best.ckpt",
            "best_k_models": {"/ckpt/best.ckpt": torch.tensor(0.25)}, "dirpath": "/ckpt"},
            "EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}": {"wait_count": 2, "stopped_epoch": 0,
                                                                  "best_score": torch.tensor(0.25), "patience": 10}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs", "hyper_parameters": {"cfg": hparams, "lr": 1e-4},
    }, out / "lightning.pth")

    # EMA weights: the model's scaled (running variances stay positive); their reference numbers
    ema_state = {k: (v * 1.01 if v.is_floating_point() else v.clone()) for k, v in state.items()}
    ema_net = anatcl.AnatCL(pretrained=False, use_head=True).eval()
    ema_net.backbone.load_state_dict(ema_state)
    with torch.no_grad():
        ema_net.backbone.use_head = False
        ema_feats = ema_net(x)
        ema_net.backbone.use_head = True
        ema_proj = ema_net(x)
    torch.save({"features": ema_feats, "projection": ema_proj}, out / "reference_ema.pt")
    torch.save({k: v.clone() for k, v in ema_state.items()}, out / "reference_ema_state.pt")
    torch.save({"model": state, "model_ema": ema_state, "epoch": 49, "opts": opts}, out / "ema_both.pth")
    torch.save({"state_dict": state, "state_dict_ema": ema_state, "epoch": 49}, out / "ema_timm.pth")
    torch.save({"state_dict_ema": ema_state, "epoch": 49}, out / "ema_only.pth")
    '''
)

SHAPES = ["training_dict", "module_prefix", "legacy", "whole_model", "whole_wrapper_in_dict", "main_classes", "rng_partial", "lightning"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    script = root / "write.py"
    script.write_text(_WRITER)
    subprocess.run([sys.executable, str(script), str(root)], check=True, cwd=root, timeout=600)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # ~2 GB of checkpoints


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
    if shape == "lightning":
        assert "under the prefix 'model.'" in caplog.text and "left out 1 tensors" in caplog.text


def _same_as(model, reference, state_file) -> None:
    theirs = torch.load(state_file, weights_only=True)
    ours = model.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    model.encoder.fused = False
    x = torch.load(state_file.parent / "reference.pt", weights_only=True)["x"]
    with torch.no_grad():
        assert torch.equal(model(x), reference["features"]) and torch.equal(model(x, head=True), reference["projection"])


@pytest.mark.slow
def test_ema_weights_warn_and_can_be_chosen(zoo):
    from anatcl_infer.errors import CheckpointWarning

    plain = torch.load(zoo / "reference.pt", weights_only=True)
    ema = torch.load(zoo / "reference_ema.pt", weights_only=True)
    for shape in ("ema_both", "ema_timm"):
        with pytest.warns(CheckpointWarning, match="EMA weights .*using the model weights.*weights='ema'"):
            model = load_model(zoo / f"{shape}.pth", device="cpu")
        _same_as(model, plain, zoo / "reference_state.pt")
        model = load_model(zoo / f"{shape}.pth", device="cpu", weights="ema")  # timm's use_ema
        _same_as(model, ema, zoo / "reference_ema_state.pt")
    with pytest.warns(CheckpointWarning, match="EMA weights only"):
        model = load_model(zoo / "ema_only.pth", device="cpu")
    _same_as(model, ema, zoo / "reference_ema_state.pt")


@pytest.mark.slow
def test_convert_weights_ema_on_the_command_line(zoo, tmp_path):
    from typer.testing import CliRunner

    from anatcl_infer.cli import app

    result = CliRunner().invoke(app, ["convert", str(zoo / "ema_both.pth"), str(tmp_path / "out"), "--weights", "ema", "-q"])
    assert result.exit_code == 0, result.stderr
    _same_as(load_model(tmp_path / "out", device="cpu"), torch.load(zoo / "reference_ema.pt", weights_only=True),
             zoo / "reference_ema_state.pt")
    result = CliRunner().invoke(app, ["convert", str(zoo / "ema_both.pth"), str(tmp_path / "bad"), "--weights", "shadow"])
    assert result.exit_code == 1 and "weights must be 'model' or 'ema'" in result.stderr
