"""Checkpoint load time: the safe loader against ``torch.load(weights_only=True)``, in the same run.

Writes a 134 MB AnatCL ResNet-18 checkpoint twice: as the authors' training file (a dict with
``model``/``opts``/``optimizer``/``epoch`` and an instance of a class that no longer exists,
which ``torch.load(weights_only=True)`` refuses) and as a plain state dict (which it reads).
Times, best of ``--repeat``:

* ``ours_training_file``: :func:`anatcl_infer.weights.unpickle.safe_load` of the training file;
* ``ours_plain``: the same loader on the plain state dict;
* ``torch_weights_only_plain``: ``torch.load(weights_only=True)`` on the plain state dict (the reference);
* ``child_start``: a fresh ``python -I`` importing torch and safetensors: the floor of the jail;
* ``jail_convert``: :func:`anatcl_infer.weights.jail.convert_in_jail` of the training file -- the
  child reads it, checks it strictly and writes safetensors, the caller reads those back (best of
  ``--jail-repeat``): what a ``.pth`` costs the first time;
* ``load_model_first``: :func:`anatcl_infer.load_model` of the training file with an empty cache
  (jail, then the converted form cached);
* ``load_model``: the same call again: read from the cache (strict key check, integrity checks,
  network built on the meta device).

Ratios are ours / reference, so a loaded machine slows both sides alike. Run:
``python benchmarks/checkpoint_load.py`` (JSON to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

from anatcl_infer import load_model
from anatcl_infer.config import ModelConfig
from anatcl_infer.model.network import AnatCL
from anatcl_infer.weights.jail import convert_in_jail
from anatcl_infer.weights.unpickle import safe_load


def _write(root: Path) -> tuple[Path, Path, int]:
    torch.manual_seed(0)
    state = AnatCL().state_dict()
    plain = root / "plain.pth"
    torch.save(state, plain)
    module = types.ModuleType("models_gone")

    class AgeEstimator:  # a training-time object of a package the reader does not have
        def __init__(self) -> None:
            self.alpha = 1.0

    AgeEstimator.__module__ = "models_gone"
    AgeEstimator.__qualname__ = "AgeEstimator"
    module.AgeEstimator = AgeEstimator
    sys.modules["models_gone"] = module
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(4))])
    training = root / "fold0.pth"
    try:
        torch.save({"model": state, "opts": argparse.Namespace(lr=1e-4), "optimizer": opt.state_dict(),
                    "epoch": 49, "estimator": AgeEstimator()}, training)
    finally:
        del sys.modules["models_gone"]
    return training, plain, training.stat().st_size


def _best(fn, repeat: int) -> float:
    fn()  # warm the page cache and the allocator
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--jail-repeat", type=int, default=3, help="repeats of the (seconds-long) jailed reads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        training, plain, size = _write(Path(tmp))
        os.environ["ANATCL_CACHE"] = str(Path(tmp) / "cache")

        def first_load() -> None:
            shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)
            load_model(training, device="cpu")

        child = [sys.executable, "-I", "-c", "import torch, safetensors.torch"]
        timings = {
            "torch_weights_only_plain": _best(lambda: torch.load(plain, weights_only=True, map_location="cpu"), args.repeat),
            "ours_plain": _best(lambda: safe_load(plain), args.repeat),
            "ours_training_file": _best(lambda: safe_load(training), args.repeat),
            "child_start": _best(lambda: subprocess.run(child, check=True), args.jail_repeat),
            "jail_convert": _best(lambda: convert_in_jail(training, ModelConfig()), args.jail_repeat),
            "load_model_first": _best(first_load, args.jail_repeat),
            "load_model": _best(lambda: load_model(training, device="cpu"), args.repeat),
        }
    ref = timings["torch_weights_only_plain"]
    result = {
        "benchmark": "checkpoint_load",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "checkpoint_bytes": size,
        "repeat": args.repeat,
        "seconds": timings,
        "ratio_to_torch_weights_only": {k: v / ref for k, v in timings.items()},
        "note": "best of --repeat (--jail-repeat for child_start, jail_convert, load_model_first); ratios measured in the "
                "same run (shared machines slow both sides)",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"checkpoint-load-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in timings.items():
        print(f"{key:<26} {value * 1000:8.1f} ms   x{value / ref:5.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
