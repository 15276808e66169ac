"""The untrained model, asked for by name: offline, deterministic per seed, labelled ``untrained`` everywhere."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import anatcl_infer
from anatcl_infer.cli import app
from anatcl_infer.config import ModelConfig
from anatcl_infer.errors import ConfigError
from anatcl_infer.jobs.embed import weights_sha256
from anatcl_infer.model.network import AnatCL

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_untrained_is_deterministic_per_seed_and_leaves_the_global_rng(monkeypatch):
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = anatcl_infer.load_model("untrained", seed=0, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # the draw does not disturb the caller's RNG
    b = anatcl_infer.load_model("Untrained", device="cpu")  # seed 0 is the default; any case
    c = anatcl_infer.load_model("untrained", seed=1, device="cpu")
    assert _same_weights(a, b) and not _same_weights(a, c)
    assert not a.training
    cfg = a.config
    assert (cfg.name, cfg.variant, cfg.fold, cfg.source, cfg.source_sha256) == ("untrained", "untrained", None, "untrained:seed=0", None)
    assert c.config.source == "untrained:seed=1"
    assert cfg.preprocess == ModelConfig().preprocess  # the published spec: every command works as with the real weights


def test_untrained_loads_nothing_and_says_so(monkeypatch, caplog, _isolated_caches):
    monkeypatch.setenv("ANATCL_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="anatcl_infer"):
        anatcl_infer.load_model("untrained", device="cpu")
    assert "untrained model (random weights, seed 0)" in caplog.text
    assert "loaded untrained (variant untrained, fold None) from untrained:seed=0" in caplog.text
    assert not (_isolated_caches / "anatcl").exists()  # no cache, no download


def test_untrained_arguments_are_checked():
    with pytest.raises(ConfigError, match="seed"):
        anatcl_infer.load_model("untrained", seed=-1)
    with pytest.raises(ConfigError, match="seed"):
        anatcl_infer.load_model("untrained", seed=1.5)
    with pytest.raises(ConfigError, match="only to load_model\\('untrained'\\)"):
        anatcl_infer.load_model("anatcl-global", seed=0)
    with pytest.raises(ConfigError, match="untrained"):
        anatcl_infer.load_model("untrained", sha256="0" * 64)
    with pytest.warns(UserWarning, match="fold=2 was not used"):
        anatcl_infer.load_model("untrained", fold=2, device="cpu")


def test_a_local_folder_named_untrained_is_still_a_path(tmp_path, monkeypatch):
    model = AnatCL(ModelConfig(name="mine", source="unit-test", fold=None))
    model.save_pretrained(tmp_path / "untrained")
    monkeypatch.chdir(tmp_path)
    assert anatcl_infer.load_model("untrained", device="cpu").config.name == "mine"


def test_random_weights_never_carry_a_published_label():
    # the documented AnatCL(ModelConfig(source="untrained")) was labelled anatcl-global fold 0
    model = AnatCL(ModelConfig(source="untrained"))
    assert (model.config.name, model.config.variant, model.config.fold) == ("untrained", "untrained", None)
    for name, variant in (("anatcl-local", "local"), ("global", "global")):
        cfg = ModelConfig(source="untrained:seed=3", name=name, variant=variant, fold=2)
        assert (cfg.name, cfg.variant, cfg.fold) == ("untrained", "untrained", None)
    # a name of one's own is kept; other sources keep their labels
    assert ModelConfig(source="untrained", name="demo", variant="demo", fold=None).name == "demo"
    assert ModelConfig(source="https://example.org/fold0.pth").name == "anatcl-global"
    # read back from a config.json too
    assert ModelConfig.from_dict({"source": "untrained", "name": "anatcl-global"}).name == "untrained"


def test_save_pretrained_and_convert_keep_the_label(tmp_path):
    model = anatcl_infer.load_model("untrained", seed=4, device="cpu")
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["name"], saved["variant"], saved["fold"], saved["source"]) == ("untrained", "untrained", None, "untrained:seed=4")
    assert _same_weights(anatcl_infer.load_model(tmp_path / "saved", device="cpu"), model)

    result = CliRunner().invoke(app, ["convert", "untrained", str(tmp_path / "converted"), "--variant", "global"])
    assert result.exit_code == 0, result.output
    converted = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert (converted["name"], converted["variant"], converted["fold"]) == ("untrained", "untrained", None)
    assert "untrained" in result.stdout and "anatcl-global" not in result.stdout
    assert "untrained" in (tmp_path / "converted" / "README.md").read_text()


@pytest.mark.slow
def test_cli_embed_with_the_untrained_model_works_offline(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ANATCL_OFFLINE="1", ANATCL_CACHE=str(cache), TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "feats.parquet"
    res = subprocess.run([sys.executable, "-m", "anatcl_infer", "embed", str(EXAMPLES), "--model", "untrained", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "untrained model (random weights, seed 0)" in res.stderr and "embedding 3 inputs with untrained" in res.stderr
    assert "anatcl-global" not in res.stderr
    table = pq.read_table(out)
    assert table.num_rows == 3 and set(table.column("model").to_pylist()) == {"untrained"}
    meta = json.loads(table.schema.metadata[b"anatcl_infer"])["model"]
    assert (meta["name"], meta["variant"], meta["source"], meta["source_sha256"]) == ("untrained", "untrained", "untrained:seed=0", None)
    # the same weights as load_model("untrained", seed=0) in this process: deterministic across processes
    assert meta["weights_sha256"] == weights_sha256(anatcl_infer.load_model("untrained", seed=0, device="cpu"))
    # nothing downloaded, no weights cached: at most the OpenVINO conversion of the random weights
    cached = {p.name for p in (cache / "models").iterdir()} if (cache / "models").exists() else set()
    assert cached <= {"openvino"}, cached


def test_qc_page_names_the_untrained_model(tmp_path):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(app, ["qc", str(EXAMPLES / "mwp1sub-mni01_T1w.nii.gz"), "--model", "untrained", "--out", str(tmp_path / "qc"), "--quiet"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "qc" / "index.html").read_text()
    assert "untrained" in page and "anatcl-global" not in page


def test_models_lists_the_untrained_model():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "--model untrained" in result.stdout
