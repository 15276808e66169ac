"""The fused CPU forward (model/fused.py) and precision choice: fidelity on real anatomy, bit-identical
rows whatever the batching, fallbacks to the eager module, bf16/fp16 refused where not native."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from anatcl_infer.config import ModelConfig
from anatcl_infer.encoding.encoder import encode, resolve_precision
from anatcl_infer.errors import ConfigError
from anatcl_infer.model import devices, fused
from anatcl_infer.model.network import AnatCL

from anatomy import mni_gm_on_grid
from reference_forward import reference_features

NATIVE_BF16 = devices.native_bf16_cpu()


def _model() -> AnatCL:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="t", source="unit-test", fold=0)).eval()
    with torch.no_grad():  # BatchNorm statistics of a trained network, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model() -> AnatCL:
    return _model()


@pytest.fixture(scope="module")
def volumes() -> np.ndarray:
    """Three real grey-matter maps on the model's input grid (121, 128, 121), slightly modulated."""
    gm = mni_gm_on_grid()[:, 8:136, :]
    rng = np.random.default_rng(0)
    return np.stack([gm * (1 + 0.05 * rng.standard_normal(gm.shape)) for _ in range(3)]).astype(np.float32)


@pytest.fixture(scope="module")
def fp32_features(model, volumes) -> np.ndarray:
    return encode(model, list(volumes), device="cpu", num_workers=0, progress=False, assume_reference_grid=True)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow
def test_fused_float32_matches_float64_reference(model, volumes):
    x = torch.from_numpy(volumes[:1])[:, None]
    with torch.inference_mode():
        assert fused.eligible(model.encoder, x) == fused.fused_available()
        ours = model(x)
    ref = reference_features(model.state_dict(), x)
    assert _rel(ours, ref) < 1e-5
    if fused.fused_available():
        assert model.encoder._fused_slot.plan is not None  # the fast path really ran
        with torch.enable_grad():  # eager module, same function
            eager = model(x).detach()
        assert _rel(eager, ref) < 1e-5


@pytest.mark.slow
def test_float32_rows_bit_identical_across_batch_sizes_and_order(model, volumes, fp32_features):
    for bs in (2, 3):
        assert np.array_equal(encode(model, list(volumes), batch_size=bs, device="cpu", num_workers=0, progress=False, assume_reference_grid=True), fp32_features)
    one = encode(model, [volumes[2]], device="cpu", num_workers=0, progress=False, assume_reference_grid=True)  # alone, as after a resume
    assert np.array_equal(one[0], fp32_features[2])


def test_plan_follows_new_weights():
    m = _model()
    x = torch.rand(1, 1, 40, 48, 40)
    with torch.no_grad():
        before = m(x)
        sd = {k: (v * 1.01 if k.endswith("bn1.weight") else v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
        after = m(x)
        with torch.enable_grad():
            eager = m(x).detach()
    assert not torch.equal(before, after)
    assert _rel(after, eager) < 1e-5


def test_model_copies_and_pickles_after_a_fused_forward():
    import copy
    import io
    import pickle

    m = _model()
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        y = m(x)
        assert torch.equal(copy.deepcopy(m)(x), y)
        buf = io.BytesIO()
        torch.save(m, buf)  # the pre-packed weights have no storage: the plan must not be saved
        assert torch.equal(pickle.loads(pickle.dumps(m))(x), y)


def test_hooks_and_gradients_use_the_eager_module():
    m = _model()
    x = torch.rand(1, 1, 24, 24, 24)
    seen = []
    handle = m.encoder.layer3.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(x)
    handle.remove()
    assert seen, "a hook on a submodule must run (the fused plan would skip it)"
    y = m(x.requires_grad_())
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    m.train()
    assert not fused.eligible(m.encoder, x.detach())


def test_other_input_sizes_and_batches(model):
    x = torch.rand(2, 1, 40, 48, 40)
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == (2, 512)
    assert _rel(ours, reference_features(model.state_dict(), x)) < 1e-5


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_on_real_anatomy_close_to_fp32(model, volumes, fp32_features):
    feats = encode(model, list(volumes), device="cpu", num_workers=0, progress=False, assume_reference_grid=True, precision="bf16")
    assert feats.dtype == np.float32
    cos = F.cosine_similarity(torch.from_numpy(feats).double(), torch.from_numpy(fp32_features).double())
    assert float(cos.min()) >= 0.9999
    assert 1e-6 < _rel(feats, fp32_features) < 2e-2  # really computed in bf16, and close
    again = encode(model, list(volumes[::-1]), batch_size=2, device="cpu", num_workers=0, progress=False, assume_reference_grid=True, precision="bf16")
    assert np.array_equal(again[::-1], feats)  # bf16 rows too depend only on their volume


def test_bf16_refused_where_emulated(model, monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f", "avx2"})
    with pytest.raises(ConfigError, match="native bfloat16"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(ConfigError, match="native bfloat16"):
        encode(model, [np.zeros((121, 128, 121), np.float32)], device="cpu", num_workers=0, progress=False, assume_reference_grid=True, precision="bf16")
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert resolve_precision("bfloat16", "cpu") == "bf16"


def test_precision_names_and_amp_alias(monkeypatch):
    assert resolve_precision("FP32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        resolve_precision("int8", "cpu")
    monkeypatch.setattr(devices, "native_fp16_cpu", lambda: False)
    with pytest.raises(ConfigError, match="FP16"):
        resolve_precision("fp16", "cpu")
    with pytest.warns(DeprecationWarning, match="precision"):
        assert resolve_precision("fp32", "cpu", amp=True) == "fp32"  # amp never changed CPU results


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_embed_records_precision_and_refuses_mixed_resume(tmp_path):
    import nibabel as nib
    from typer.testing import CliRunner

    from anatcl_infer.cli import app
    from anatcl_infer.config import REFERENCE_AFFINE
    from anatcl_infer.jobs.embed import METADATA_KEY

    mdir = _model().save_pretrained(tmp_path / "m")
    scans = tmp_path / "scans"
    scans.mkdir()
    gm = mni_gm_on_grid()
    for i in range(2):
        nib.save(nib.Nifti1Image((gm * (1 + 0.1 * i)).astype(np.float32), np.array(REFERENCE_AFFINE)), scans / f"sub-{i}_mwp1.nii.gz")
    out = tmp_path / "f.parquet"
    runner = CliRunner()
    args = ["embed", str(scans), "--out", str(out), "--model", str(mdir), "--device", "cpu", "--quiet", "--workers", "0"]
    res = runner.invoke(app, [*args, "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    meta = json.loads(pq.read_schema(out).metadata[METADATA_KEY])
    assert meta["precision"] == "bf16"
    res = runner.invoke(app, [*args, "--resume"])  # fp32 on top of a bf16 table: refused
    assert res.exit_code == 2 and "precision" in res.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        res = runner.invoke(app, [*args, "--overwrite", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    assert json.loads(pq.read_schema(out).metadata[METADATA_KEY])["precision"] == "fp32"


def test_bottleneck_architecture_fused_matches_eager():
    from anatcl_infer.model.network import build_encoder

    torch.manual_seed(1)
    enc = build_encoder("resnet50").eval()
    x = torch.rand(1, 1, 24, 28, 24)
    with torch.no_grad():
        fast = enc(x)
        assert enc._fused_slot.plan is not None or not fused.fused_available()
        enc.fused = False
        eager = enc(x)
    assert fast.shape == eager.shape == (1, 2048)
    assert _rel(fast, eager) < 1e-5
