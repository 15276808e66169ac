"""The jail: untrusted checkpoints are read in a separate, limited process; the caller lives on.

* the crafted files of issue 22 (a forged numpy dtype, a tuple nested a million deep as a dict
  key, an object array from a few hundred bytes, bytearray/frozenset bombs, 150 views of one
  storage, a FIFO, a link to /dev/zero) end as package errors, in a fresh caller whose peak RSS
  stays under 1 GB; the allowlist unpickler alone (the first layer) refuses them too;
* what happens in the child -- a crash, the deadline, the memory budget -- becomes one
  ``CheckpointError`` naming the file and what happened;
* the child gets no proxies or tokens, no inherited descriptors, no network, and (with Landlock)
  writes only in its job folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from anatcl_infer.config import ModelConfig
from anatcl_infer.errors import CheckpointError
from anatcl_infer.weights.jail import JAIL, convert_in_jail, parent
from author_checkpoints import random_state_dict, write_author_checkpoint
from crafted_checkpoints import CRAFTED, build_crafted

TESTS = Path(__file__).parent
RSS_LIMIT = 1 << 30

_CALLER = textwrap.dedent(
    """
    import json, resource, sys
    from anatcl_infer import load_model
    from anatcl_infer.errors import AnatCLError
    results = {}
    for label, path in json.loads(sys.argv[1]).items():
        try:
            load_model(path, device="cpu")
            results[label] = "loaded"
        except AnatCLError as exc:
            results[label] = type(exc).__name__ + ": " + str(exc)
    from checkpoint_mutations import peak_rss  # VmHWM: ru_maxrss would include pytest's own peak
    print(json.dumps({"results": results, "peak_rss": peak_rss()}))
    """
)

_FIRST_LAYER = textwrap.dedent(
    """
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from anatcl_infer.errors import CheckpointError
    from anatcl_infer.weights.unpickle import safe_load
    results = {}
    for label, path in json.loads(sys.argv[1]).items():
        try:
            safe_load(path)
            results[label] = "loaded"
        except CheckpointError as exc:
            results[label] = type(exc).__name__ + ": " + str(exc)
    from checkpoint_mutations import peak_rss  # VmHWM: ru_maxrss would include pytest's own peak
    print(json.dumps({"results": results, "peak_rss": peak_rss()}))
    """
)


def _run_caller(script: str, files: dict[str, Path], tmp_path: Path) -> dict:
    runner = tmp_path / "caller.py"
    runner.write_text(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(runner), json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]  # the caller lives on: no crash, no traceback
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    return build_crafted(tmp_path_factory.mktemp("crafted"))


@pytest.mark.slow
def test_crafted_files_end_as_package_errors_in_a_caller_that_lives_on(crafted, tmp_path):
    out = _run_caller(_CALLER, crafted, tmp_path)
    assert set(out["results"]) == set(CRAFTED)
    for label, outcome in out["results"].items():
        assert outcome.split(":", 1)[0] in ("CheckpointError", "UnsafeCheckpointError", "StateDictMismatchError"), (label, outcome)
        assert str(crafted[label]) in outcome, (label, outcome)  # the error names the file
    assert "named pipe" in out["results"]["fifo"] and "device" in out["results"]["dev_zero"]
    assert out["peak_rss"] < RSS_LIMIT, out["peak_rss"]


@pytest.mark.slow
def test_the_allowlist_alone_refuses_them_in_bounded_memory(crafted, tmp_path):
    out = _run_caller(_FIRST_LAYER, crafted, tmp_path)
    results = out["results"]
    assert results.pop("views_150") == "loaded"  # 150 views of one storage now cost one storage
    for label, outcome in results.items():
        assert outcome.startswith("CheckpointError"), (label, outcome)
    assert "not a plain numeric kind" in results["forged_dtype"] and "forged state" in results["forged_plain_dtype"]
    assert "200 levels" in results["deep_key_1m"] and "200 levels" in results["deep_key_100k"]
    assert "memory budget" in results["bytearray_x40"] and "memory budget" in results["frozenset_range"]
    assert out["peak_rss"] < 1.5 * (1 << 30), out["peak_rss"]  # the 1 GiB budget, plus torch


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("jail")
    yield write_author_checkpoint(root / "fold0.pth", random_state_dict(seed=3))
    shutil.rmtree(root, ignore_errors=True)


def _fake_child(monkeypatch, code: str) -> None:
    """Put a python snippet in the real child's place (it gets the job folder as argv[1])."""
    monkeypatch.setattr(parent, "_child_command", lambda job_dir: [sys.executable, "-c", code, str(job_dir)])


def test_a_crash_in_the_child_is_one_checkpoint_error(ckpt, monkeypatch):
    _fake_child(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(CheckpointError, match=r"killed by SIGSEGV.*this process is unaffected") as info:
        convert_in_jail(ckpt, ModelConfig())
    assert str(ckpt) in str(info.value) and info.value.path == str(ckpt)


def test_the_deadline_stops_the_child(ckpt, monkeypatch, tmp_path):
    marker = tmp_path / "still-running"
    _fake_child(monkeypatch, f"import time; time.sleep(30); open({str(marker)!r}, 'w').close()")
    monkeypatch.setattr(JAIL, "seconds", 1.0)
    monkeypatch.setattr(JAIL, "bytes_per_second", 1e12)
    with pytest.raises(CheckpointError, match=r"took longer than 1 s"):
        convert_in_jail(ckpt, ModelConfig())
    import time

    time.sleep(0.5)
    assert not marker.exists()


def test_a_child_without_a_report_is_an_error(ckpt, monkeypatch):
    _fake_child(monkeypatch, "import sys; sys.exit(3)")
    with pytest.raises(CheckpointError, match=r"exit status 3"):
        convert_in_jail(ckpt, ModelConfig())


@pytest.mark.slow
def test_the_memory_budget_is_enforced_in_the_child(ckpt, monkeypatch):
    # the real child, with a budget far below what converting a 134 MB checkpoint needs
    monkeypatch.setattr(JAIL, "memory_bytes", -2 * ckpt.stat().st_size + (48 << 20))
    with pytest.raises(CheckpointError, match=r"memory budget") as info:
        convert_in_jail(ckpt, ModelConfig())
    assert str(ckpt) in str(info.value)


_SPY = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path
    from anatcl_infer.weights.jail.child import _leave_network, _restrict_filesystem
    seen = {"env": sorted(os.environ), "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
            "network": _leave_network(), "stdin": os.read(0, 10).decode(),
            "filesystem": _restrict_filesystem(Path(sys.argv[1]))}
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=5).close()
        seen["connect"] = "connected"
    except OSError as exc:
        seen["connect"] = type(exc).__name__
    try:
        Path(OUTSIDE).write_text("escaped")
        seen["write"] = "written"
    except OSError as exc:
        seen["write"] = type(exc).__name__
    Path(sys.argv[1], "report.json").write_text(json.dumps({"ok": False, "error": {"type": "CheckpointError", "message": json.dumps(seen)}}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespaces and /proc are Linux's")
def test_the_child_gets_no_secrets_no_descriptors_no_network_and_writes_only_its_folder(ckpt, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("PYTHONPATH", str(TESTS.parent))  # -I ignores it; sys.path comes from the job
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    leaked = os.open(ckpt, os.O_RDONLY)
    os.set_inheritable(leaked, True)
    outside = ckpt.parent / "escaped.txt"
    code = _SPY.replace("PORT", str(server.getsockname()[1])).replace("OUTSIDE", repr(str(outside)))
    monkeypatch.setattr(parent, "_child_command", lambda job_dir: [sys.executable, "-I", "-c",
                        parent._BOOT.replace("from anatcl_infer.weights.jail.child import main; sys.exit(main(sys.argv[1]))",
                                             "exec(" + repr(code) + ")"), str(job_dir)])
    try:
        with pytest.raises(CheckpointError) as info:
            convert_in_jail(ckpt, ModelConfig())
    finally:
        os.close(leaked)
        server.close()
    seen = json.loads(str(info.value))
    assert not {"HTTPS_PROXY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "PYTHONPATH", "HOME"} & set(seen["env"])
    assert seen["fds"][:3] == [0, 1, 2] and leaked not in seen["fds"] and len(seen["fds"]) <= 4  # + the listdir one
    assert seen["stdin"] == ""
    if seen["network"].startswith("isolated") or "no TCP" in seen["filesystem"]:
        assert seen["connect"] != "connected"
    else:  # namespaces and Landlock unavailable here: the jail says so instead of pretending
        assert "not isolated" in seen["network"]
    if seen["filesystem"].startswith("writes only"):
        assert seen["write"] == "PermissionError" and not outside.exists()
    else:
        assert seen["filesystem"].startswith("not restricted")


def test_the_real_child_reports_its_isolation_and_limits(ckpt, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="anatcl_infer"):
        model = convert_in_jail(ckpt, ModelConfig())
    assert isinstance(model, torch.nn.Module)
    line = next(r.getMessage() for r in caplog.records if "read in a separate process" in r.getMessage())
    assert "address_space" in line and "cpu_seconds" in line
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        assert "network: isolated" in line
    assert "dropped training-time objects of models.estimators.AgeEstimator" in caplog.text  # relayed from the child


def test_local_checkpoints_are_converted_once(ckpt, tmp_path, monkeypatch):
    from anatcl_infer import load_model

    first = load_model(ckpt, device="cpu")
    calls = []
    monkeypatch.setattr("anatcl_infer.weights.jail.parent._run", lambda *a, **k: calls.append(a) or (1, 0.0))
    again = load_model(ckpt, device="cpu")  # from the cache: no child started
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
