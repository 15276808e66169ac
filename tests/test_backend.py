"""The inference backends (encoding/backends.py, encoding/openvino_backend.py): fidelity of the OpenVINO
conversion, its verification and cache, which backend runs when, and what the feature table records.

No timings here: speed is measured by benchmarks/run.py.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from anatcl_infer.config import ModelConfig, PreprocessConfig
from anatcl_infer.encoding import backends, openvino_backend
from anatcl_infer.encoding.encoder import encode, iter_encoded
from anatcl_infer.errors import BackendWarning, ConfigError, MissingDependencyError
from anatcl_infer.model import devices
from anatcl_infer.model.network import AnatCL

from anatomy import mni_gm_on_grid
from reference_forward import reference_features

pytest.importorskip("openvino")

# The 3 mm version of the reference grid (as tests/test_embed.py): real anatomy, small forward passes.
GRID3_AFFINE = ((-3.0, 0, 0, 90.0), (0, 3.0, 0, -126.0), (0, 0, 3.0, -72.0), (0, 0, 0, 1))
PREP3 = PreprocessConfig(grid_shape=(61, 73, 61), grid_affine=GRID3_AFFINE, crop=((0, 61), (4, 68), (0, 61)))
CPU = torch.device("cpu")
NATIVE_BF16 = devices.native_bf16_cpu()


def _model(seed: int = 0) -> AnatCL:
    torch.manual_seed(seed)
    model = AnatCL(ModelConfig(name="t", source="unit-test", fold=0, preprocess=PREP3)).eval()
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
def volumes() -> list[np.ndarray]:
    """Four grey-matter maps on the 3 mm grid, each a little different."""
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    rng = np.random.default_rng(0)
    return [(gm * (1 + 0.05 * rng.standard_normal(gm.shape))).astype(np.float32) for _ in range(4)]


def _encode(model, vols, **kw):
    kw.setdefault("progress", False)
    return encode(model, vols, assume_reference_grid=True, device="cpu", **kw)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_auto_runs_openvino_on_cpu_and_fp32_matches_float64_reference(model, volumes):
    runner = backends.select_runner(model, device=CPU, precision="fp32")
    assert runner.name == "openvino"
    assert runner.record["ok"] and runner.record["cosine_min"] >= 0.99999
    feats = _encode(model, volumes)
    x = torch.from_numpy(np.stack([v[:, 4:68, :] for v in volumes]))[:, None]
    ref = reference_features(model.state_dict(), x).numpy()
    assert _rel(feats, ref) < 1e-5
    torch_feats = _encode(model, volumes, backend="torch")
    assert _rel(feats, torch_feats) < 1e-5


def test_rows_bit_identical_whatever_the_batching_and_loader(model, volumes):
    base = _encode(model, volumes, batch_size=1, num_workers=0)
    for kw in ({"batch_size": 3}, {"batch_size": 4, "num_workers": 1}, {"batch_size": 2, "num_workers": 0}):
        assert np.array_equal(_encode(model, volumes, **kw), base), kw
    assert np.array_equal(_encode(model, [volumes[2]])[0], base[2])


def test_batches_name_the_backend(model, volumes):
    batches = list(iter_encoded(model, volumes, batch_size=3, progress=False, assume_reference_grid=True, device="cpu"))
    assert [len(b.indices) for b in batches] == [3, 1]
    assert {b.backend["name"] for b in batches} == {"openvino"}
    assert batches[0].backend["version"] == openvino_backend.openvino_version()
    torch_batch = next(iter_encoded(model, volumes[:1], progress=False, assume_reference_grid=True, device="cpu", backend="torch"))
    assert torch_batch.backend == {"name": "torch", "version": torch.__version__}


def test_runner_is_kept_and_follows_new_weights(volumes):
    m = _model(1)
    first = backends.select_runner(m, device=CPU, precision="fp32")
    assert backends.select_runner(m, device=CPU, precision="fp32") is first
    before = _encode(m, volumes[:1])
    with torch.no_grad():
        m.encoder.layer2[0].bn1.weight.mul_(1.5)
    assert backends.select_runner(m, device=CPU, precision="fp32") is not first
    after = _encode(m, volumes[:1])
    assert _rel(after, _encode(m, volumes[:1], backend="torch")) < 1e-5
    assert not np.allclose(before, after)


def test_conversion_is_cached_by_weights_and_reused(_isolated_caches, monkeypatch, volumes):
    m = _model(2)
    feats = _encode(m, volumes[:2])
    digest = openvino_backend.weights_digest(m.encoder)
    folder = _isolated_caches / "anatcl" / "models" / "openvino" / digest
    record = json.loads((folder / "verified.json").read_text())
    assert record["ok"] and record["weights_sha256"] == digest and record["openvino"] == openvino_backend.openvino_version()
    assert (folder / "encoder.xml").is_file() and (folder / "encoder.bin").stat().st_size > 120_000_000  # float32 (33 M weights), not fp16
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    def no_conversion(*a, **k):
        raise AssertionError("the cached conversion must be reused")

    monkeypatch.setattr(openvino_backend, "build_graph", no_conversion)
    monkeypatch.setattr(openvino_backend, "verify", no_conversion)
    again = copy.deepcopy(m)  # same weights, a new model object: no runner kept on it
    assert again.__dict__.get("_backend_slot") is None or not again._backend_slot.entries
    assert np.array_equal(_encode(again, volumes[:2]), feats)


def test_a_graph_cached_by_another_converter_version_is_rebuilt(_isolated_caches, monkeypatch, volumes):
    """The cache is keyed by the weights; a graph an older build_graph wrote (another graph, other float32
    roundings) must not be reused, or a resumed table mixes two roundings of the same weights."""
    m = _model(4)
    feats = _encode(m, volumes[:1])
    folder = _isolated_caches / "anatcl" / "models" / "openvino" / openvino_backend.weights_digest(m.encoder)
    record = json.loads((folder / "verified.json").read_text())
    assert record["converter"] == openvino_backend.CONVERTER_VERSION
    del record["converter"]  # as the first version wrote it
    (folder / "verified.json").write_text(json.dumps(record))
    built = []
    real = openvino_backend.build_graph
    monkeypatch.setattr(openvino_backend, "build_graph", lambda enc: built.append(1) or real(enc))
    assert np.array_equal(_encode(copy.deepcopy(m), volumes[:1]), feats)
    assert built == [1]
    assert json.loads((folder / "verified.json").read_text())["converter"] == openvino_backend.CONVERTER_VERSION


def test_failed_verification_falls_back_to_torch_with_a_warning(monkeypatch, volumes):
    m = _model(3)
    monkeypatch.setattr(openvino_backend, "MIN_COSINE", 1.5)  # no conversion can pass
    with pytest.warns(BackendWarning, match="does not match the torch forward"):
        feats = _encode(m, volumes[:2])
    assert np.array_equal(feats, _encode(m, volumes[:2], backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)  # refused once per weights: not warned again
        batch = next(iter_encoded(m, volumes[:1], progress=False, assume_reference_grid=True, device="cpu"))
    assert batch.backend["name"] == "torch"


def test_structure_it_does_not_understand_is_refused(volumes):
    m = _model(4)
    m.encoder.maxpool = torch.nn.Identity()  # no longer the network the converter knows
    with pytest.warns(BackendWarning):
        runner = backends.select_runner(m, device=CPU, precision="fp32")
    assert runner.name == "torch"


def test_when_torch_runs(model, monkeypatch):
    assert backends.select_runner(model, device=CPU, precision="fp32", backend="torch").name == "torch"
    handle = model.encoder.layer3.register_forward_hook(lambda *a: None)
    try:  # hooks only run in the torch module
        assert backends.select_runner(model, device=CPU, precision="fp32").name == "torch"
        with pytest.raises(ConfigError, match="hooks"):
            backends.select_runner(model, device=CPU, precision="fp32", backend="openvino")
    finally:
        handle.remove()
    with pytest.raises(ConfigError, match="fp16"):
        backends.select_runner(model, device=CPU, precision="fp16", backend="openvino")
    assert backends.select_runner(model, device=CPU, precision="fp16").name == "torch"
    wrapped = torch.nn.Sequential(model)  # not the package's model: it is called as it is
    assert backends.select_runner(wrapped, device=CPU, precision="fp32").name == "torch"

    class Projections(AnatCL):  # a subclass whose output is not the encoder's features
        def forward(self, x, head=False):
            return super().forward(x, head=True)

    assert backends.select_runner(Projections(model.config).eval(), device=CPU, precision="fp32").name == "torch"
    with pytest.raises(ConfigError, match="backend must be"):
        backends.select_runner(model, device=CPU, precision="fp32", backend="onnx")
    monkeypatch.setattr(openvino_backend, "openvino_version", lambda: None)
    assert backends.select_runner(_model(5), device=CPU, precision="fp32").name == "torch"
    monkeypatch.setattr("anatcl_infer._optional._installed", lambda module: module != "openvino")
    with pytest.raises(MissingDependencyError, match=r"anatcl-infer\[openvino\]"):
        backends.select_runner(model, device=CPU, precision="fp32", backend="openvino")


def test_fold_stack_uses_one_runner_per_fold(model, volumes):
    other = _model(6)
    runner = backends.select_runner([model, other], device=CPU, precision="fp32")
    assert runner.name == "openvino"
    x = torch.from_numpy(volumes[0][:, 4:68, :])[None, None]
    with torch.inference_mode():
        both = runner(x)
        expected = torch.cat([backends.select_runner(m, device=CPU, precision="fp32")(x) for m in (model, other)], dim=1)
    assert torch.equal(both, expected)


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16")
def test_bf16_through_openvino_close_to_fp32(model, volumes):
    fp32 = _encode(model, volumes)
    bf16 = _encode(model, volumes, precision="bf16")
    assert backends.select_runner(model, device=CPU, precision="bf16").name == "openvino"
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(bf16).double(), torch.from_numpy(fp32).double())
    assert float(cos.min()) >= 0.9999
    assert 1e-6 < _rel(bf16, fp32) < 2e-2  # really computed in bf16, and close
    assert np.array_equal(_encode(model, volumes[::-1], precision="bf16", batch_size=3)[::-1], bf16)


def _write_scans(directory, n):
    import nibabel as nib

    directory.mkdir(parents=True, exist_ok=True)
    gm = np.ascontiguousarray(mni_gm_on_grid()[::2, ::2, ::2])
    for i in range(n):
        nib.save(nib.Nifti1Image((gm * (1 - 0.04 * i)).astype(np.float32), np.array(GRID3_AFFINE)), directory / f"sub-{i:02d}_mwp1.nii.gz")


def _meta(path):
    import pyarrow.parquet as pq

    from anatcl_infer.jobs.embed import METADATA_KEY

    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


def test_table_records_the_backend_and_resume_mixes_only_fp32(tmp_path, model):
    from anatcl_infer.inputs.discovery import discover_inputs
    from anatcl_infer.jobs.embed import run_embed

    _write_scans(tmp_path / "scans", 3)
    records = discover_inputs([str(tmp_path / "scans")])
    out = tmp_path / "f.parquet"

    def run(records, **kw):
        return run_embed(records, [model], out, progress=False, device="cpu", **kw)

    run(records[:2], backend="torch")
    assert _meta(out)["backend"] == {"name": "torch", "version": torch.__version__}
    summary = run(records, resume=True)  # fp32: OpenVINO may continue a torch table
    assert summary.n_skipped == 2 and summary.n_written == 1
    assert _meta(out)["backend"]["name"] == "openvino"
    if NATIVE_BF16:
        run(records[:2], backend="torch", precision="bf16", overwrite=True)
        with pytest.raises(ConfigError, match="backend"):
            run(records, resume=True, precision="bf16")  # bf16 of two backends: refused
        assert run(records, resume=True, precision="bf16", backend="torch").n_written == 1


def test_a_model_left_in_training_mode_still_runs_openvino(tmp_path):
    """A freshly built model is in training mode; run_embed chose the backend before eval() and the
    check against the training-mode forward (BatchNorm on batch statistics) refused the conversion."""
    from anatcl_infer.inputs.discovery import discover_inputs
    from anatcl_infer.jobs.embed import run_embed

    _write_scans(tmp_path / "scans", 1)
    model = _model(3).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendWarning)
        run_embed(discover_inputs([str(tmp_path / "scans")]), [model], tmp_path / "f.parquet", progress=False, device="cpu")
    assert _meta(tmp_path / "f.parquet")["backend"]["name"] == "openvino"
    graph = openvino_backend.build_graph(model.train().encoder)
    assert openvino_backend.verify(model.encoder, graph, PREP3.model_input_shape)["ok"]
    assert model.encoder.training  # verify() restores the mode it found


def test_cli_backend_option(tmp_path, model):
    from typer.testing import CliRunner

    from anatcl_infer.cli import app

    _write_scans(tmp_path / "scans", 2)
    mdir = model.save_pretrained(tmp_path / "m")
    out = tmp_path / "f.parquet"
    args = ["embed", str(tmp_path / "scans"), "--out", str(out), "--model", str(mdir), "--device", "cpu", "--quiet"]
    res = CliRunner().invoke(app, [*args, "--backend", "openvino"])
    assert res.exit_code == 0, res.output
    assert _meta(out)["backend"]["name"] == "openvino"
    res = CliRunner().invoke(app, [*args, "--backend", "tensorrt", "--overwrite"])
    assert res.exit_code == 2 and "--backend" in res.output


def test_prefetch_thread_keeps_order_and_stops_early():
    from anatcl_infer.encoding.prefetch import ThreadPrefetcher

    seen = []

    def produce(i):
        seen.append(i)
        return i * 10

    with ThreadPrefetcher(produce, 1000, depth=2) as it:
        got = [v for _, v in zip(range(5), it)]
    assert got == [0, 10, 20, 30, 40]
    assert len(seen) < 20  # stopped: not the whole range prepared ahead

    def boom(i):
        raise KeyError(i)

    with pytest.raises(KeyError), ThreadPrefetcher(boom, 3) as it:
        list(it)
