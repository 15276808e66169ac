"""`explain`: gradient x input through the encoder lands where the head looks, on the reference grid."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest
import torch
from anatomy import REF_AFFINE, mni_gm_on_grid
from torch import nn

from anatcl_infer.config import REFERENCE_AFFINE, REFERENCE_SHAPE, ModelConfig, PreprocessConfig
from anatcl_infer.downstream.heads import HEAD_FORMAT, FoldHead, Head
from anatcl_infer.errors import ConfigError, HeadError
from anatcl_infer.inputs.preprocess import prepare
from anatcl_infer.inputs.template import to_model_space
from anatcl_infer.model.network import AnatCL
from anatcl_infer.qc.explain import explain, principal_target, to_grid

PADDED = PreprocessConfig(pad_to=(128, 128, 128))


def _region() -> np.ndarray:
    """A 45 mm box in the left medial temporal lobe: MNI x -45..-0, y -39..6, z -33..12 (grid voxels 60:90, 58:88, 26:56)."""
    mask = np.zeros(REFERENCE_SHAPE, dtype=bool)
    mask[60:90, 58:88, 26:56] = True
    corner = REF_AFFINE @ [89, 58, 26, 1]
    assert np.allclose(corner[:3], [-43.5, -39, -33])  # x is stored right-to-left
    return mask


class RegionEncoder(nn.Module):
    """Features 0-255 see only the region (linear in it), 256-511 see the whole input (linear too)."""

    def __init__(self, region_model_space: np.ndarray) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("mask", torch.from_numpy(region_model_space.astype(np.float32))[None, None])
        self.local = nn.Parameter(torch.randn(256, 8, generator=g))
        self.glob = nn.Parameter(torch.randn(256, 64, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = nn.functional.adaptive_avg_pool3d(x * self.mask, 2).flatten(1) @ self.local.T
        glob = nn.functional.adaptive_avg_pool3d(x, 4).flatten(1) @ self.glob.T
        return torch.cat([100 * local, glob], dim=1)


def _model(config: PreprocessConfig) -> AnatCL:
    model = AnatCL(ModelConfig(name="region-toy", source="unit-test", fold=0, preprocess=config))
    model.encoder = RegionEncoder(to_model_space(_region(), config))
    return model.eval()


def _head(tmp_path, used: slice, name: str) -> str:
    rng = np.random.default_rng(1)
    coef = np.zeros((1, 512))
    coef[0, used] = rng.normal(size=coef[0, used].shape)
    fold = FoldHead(0, coef, np.array([40.0]), rng.normal(size=512), rng.uniform(0.5, 2.0, size=512), {"fold": 0})
    config = {"format": HEAD_FORMAT, "target": "age", "kind": "regression", "feature_dim": 512, "folds": [{"fold": 0}]}
    return str(Head(config, [fold]).save(tmp_path / name))


def _inputs() -> list[tuple[np.ndarray, np.ndarray]]:
    gm = mni_gm_on_grid()
    return [(gm, REF_AFFINE), (np.roll(gm, 3, axis=0) * 0.9, REF_AFFINE)]


def _top_share_inside(relevance: np.ndarray, region: np.ndarray) -> float:
    mag = np.abs(relevance)
    values = mag[mag > 0]
    top = mag >= np.quantile(values, 0.99)
    return float((top & region).sum() / top.sum())


@pytest.mark.parametrize("config", [PreprocessConfig(), PADDED], ids=["published", "padded"])
def test_relevance_of_a_head_concentrates_in_the_region_it_reads(tmp_path, config):
    model = _model(config)
    region = _region()
    local_head = _head(tmp_path, slice(0, 256), "local")
    maps = explain(_inputs(), model, head=local_head, device="cpu")
    assert all(m.ok for m in maps)
    for m, (vol, _) in zip(maps, _inputs()):
        assert m.relevance.shape == REFERENCE_SHAPE
        assert _top_share_inside(m.relevance, region) > 0.9
        # the score is the head's prediction on the encoder's features
        x = torch.from_numpy(prepare((vol, REF_AFFINE), config).array[None])
        with torch.no_grad():
            feats = model(x).numpy()
        expected = Head.load(local_head).folds[0].decision(feats)[0, 0]
        assert m.score == pytest.approx(expected, rel=1e-4)
        # completeness: the encoder and head are linear without offsets, so the map sums to score - offset
        fh = Head.load(local_head).folds[0]
        offset = fh.intercept[0] - float((fh.coef[0] / fh.scaler_scale) @ fh.scaler_mean)
        assert m.relevance.sum(dtype=np.float64) == pytest.approx(m.score - offset, rel=1e-3)
        assert m.peak_mm is not None and -45 <= m.peak_mm[0] <= 0 and -39 <= m.peak_mm[1] <= 6

    # control: a head reading only the whole-brain features spreads its relevance over the brain
    maps = explain(_inputs()[:1], model, head=_head(tmp_path, slice(256, 512), "global"), device="cpu")
    assert _top_share_inside(maps[0].relevance, region) < 0.5


def test_written_maps_are_on_the_reference_grid_with_zeros_outside_the_crop(tmp_path):
    pytest.importorskip("matplotlib")
    model = _model(PreprocessConfig())
    out = tmp_path / "explain"
    maps = explain(_inputs(), model, head=_head(tmp_path, slice(0, 512), "all"), out_dir=out, device="cpu")
    for m in maps:
        img = nib.load(m.nifti)
        assert img.shape == REFERENCE_SHAPE and np.allclose(img.affine, np.asarray(REFERENCE_AFFINE))
        assert int(img.header["sform_code"]) == 4  # MNI
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32 and np.any(data[:, 8:136])
        assert not data[:, :8].any() and not data[:, 136:].any()  # outside the model's field of view
        assert m.relevance is None  # written, not kept in memory
        png = m.png.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1050, 420)
    rows = (out / "explain.csv").read_text().splitlines()
    assert rows[0].startswith("path,status,stage,error,output,score,peak_x_mm") and len(rows) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_without_a_head_the_first_principal_direction_is_explained():
    model = _model(PreprocessConfig())
    maps = explain(_inputs(), model, device="cpu")
    assert [m.output for m in maps] == ["first principal direction of the features"] * 2
    assert maps[0].score == pytest.approx(-maps[1].score, rel=1e-4)  # two inputs: symmetric about their mean
    with pytest.raises(ConfigError, match="at least 2 inputs"):
        explain(_inputs()[:1], model, device="cpu")


def test_principal_direction_and_grid_helpers():
    t = principal_target(np.array([[1.0, 0.0], [3.0, 0.1], [5.0, 0.0]]))
    assert t.weights[0, 0] > 0.99 and t.bias[0] == pytest.approx(-3.0, abs=0.01)
    cfg = PADDED
    vol = np.arange(np.prod(cfg.grid_shape), dtype=np.float32).reshape(cfg.grid_shape)
    back = to_grid(to_model_space(vol, cfg), cfg)
    assert np.array_equal(back[:, 8:136], vol[:, 8:136]) and not back[:, :8].any()


def test_head_for_another_fold_or_weights_is_refused(tmp_path):
    model = _model(PreprocessConfig())
    head = Head.load(_head(tmp_path, slice(0, 256), "h"))
    head.folds[0].info["model_sha256"] = "ab" * 32
    model.config = ModelConfig(name="region-toy", fold=0, source_sha256="cd" * 32)
    with pytest.raises(HeadError, match="sha256"):
        explain(_inputs(), model, head=head, device="cpu")
    model.config = ModelConfig(name="region-toy", fold=3)
    with pytest.raises(HeadError, match="fold=0"):  # a Python error names the Python argument (issue 23)
        explain(_inputs(), model, head=head, device="cpu")


def test_a_bad_input_is_reported_and_the_others_explained(tmp_path):
    model = _model(PreprocessConfig())
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    maps = explain([_inputs()[0], str(bad), _inputs()[1]], model, device="cpu")
    assert [m.ok for m in maps] == [True, False, True]
    assert maps[1].stage == "read" and maps[1].error
