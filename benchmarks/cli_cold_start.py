"""Time to the error: how long a newcomer's mistake costs on a cold start (issue 23; goal < 2 s).

Each case runs ``python -m anatcl_infer ...`` as a fresh process (nothing imported yet) with an
argument mistake, and measures the wall time until it exits with its error. Every such mistake
is checked before the model is loaded, so no case may get as far as loading: the cache is empty
and ``ANATCL_OFFLINE=1``, so a command that tried to load the published weights would end with
an offline error instead of the expected message (the script says so and exits 1).

References measured in the same run: the bare interpreter (``python -c pass``) and ``import torch``
(what any model load costs at least, before reading weights).

    python benchmarks/cli_cold_start.py              # 5 repetitions per case
    python benchmarks/cli_cold_start.py --repeat 9 --json out.json

This is a benchmark, not a test: the suite asserts the ordering (the loader is never called for
bad arguments, tests/test_first_hour.py), not the time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
GOAL_S = 2.0


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(name, arguments after ``anatcl``, text the error must contain)."""
    existing = tmp / "existing.parquet"
    existing.write_bytes(b"earlier results")
    ds = tmp / "ds"
    maps = ds / "derivatives" / "cat12" / "sub-01" / "mri"
    maps.mkdir(parents=True)
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    shutil.copy(next(EXAMPLES.glob("mwp1*.nii.gz")), maps / "mwp1sub-01_T1w.nii.gz")
    out = str(tmp / "feats.parquet")
    return [
        ("embed: mistyped input folder", ["embed", str(tmp / "cohrt"), "--out", out], "no input exists"),
        ("embed: output already exists", ["embed", str(EXAMPLES), "--out", str(existing)], "already exists"),
        ("embed: --precision fp8", ["embed", str(EXAMPLES), "--out", out, "--precision", "fp8"], "must be fp32, bf16 or fp16"),
        ("embed: --fold all on one model file", ["embed", str(EXAMPLES), "--out", out, "--model", str(existing), "--fold", "all"],
         "--fold all needs"),
        ("bids: unknown participant label", ["bids", str(ds), str(tmp / "deriv"), "participant", "--participant-label", "99"],
         "no maps for participant(s) sub-99"),
        ("bids: not a BIDS root", ["bids", str(EXAMPLES), str(tmp / "deriv"), "participant"], "no dataset_description.json"),
    ]


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per case (best and median are shown)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="anatcl-cold-") as name:
        tmp = Path(name)
        env = {**os.environ, "ANATCL_OFFLINE": "1", "ANATCL_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        runs: dict[str, list[float]] = {}
        references = {"python -c pass": [sys.executable, "-c", "pass"],
                      "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
        cases = _cases(tmp)
        bad = []
        for _ in range(max(1, args.repeat)):  # interleaved, so that load changes hit every case alike
            for label, cmd in references.items():
                runs.setdefault(label, []).append(_time(cmd, env)[0])
            for label, cli, expected in cases:
                seconds, proc = _time([sys.executable, "-m", "anatcl_infer", *cli], env)
                runs.setdefault(label, []).append(seconds)
                if proc.returncode == 0 or expected not in proc.stderr:
                    bad.append(f"{label}: exit {proc.returncode}, stderr: {proc.stderr.strip()[-300:]}")

    print(f"Cold start to the error, {args.repeat} repetitions each; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"| {'case':<40} | best (s) | median (s) | goal < {GOAL_S:g} s |")
    print(f"|{'-' * 42}|----------|------------|------------|")
    for label, times in runs.items():
        met = "-" if label in references else ("yes" if min(times) < GOAL_S else "no")
        print(f"| {label:<40} | {min(times):8.2f} | {statistics.median(times):10.2f} | {met:<10} |")
    if args.json:
        args.json.write_text(json.dumps({"goal_s": GOAL_S, "seconds": runs, "load_average": os.getloadavg()[0]}, indent=2) + "\n")
    if bad:
        print("\nWrong outcome (the command did not end with the expected error):\n  " + "\n  ".join(dict.fromkeys(bad)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
