"""The long checkpoint fuzz run: ``--n`` mutants of real checkpoints, each must load or end in a package error.

The mutants come from ``tests/checkpoint_mutations.py`` (byte flips in the pickle stream, the zip
directory and the legacy stream; deep nesting, huge declared sizes, duplicated members, swapped
globals, truncation). All of them go through the allowlist unpickler and the state-dict extraction
in a worker process under an address-space limit, restarted if it dies; every case that kills
the worker or lets a non-package exception escape is then read through the jail too, as are
``--jail-sample`` random cases (a fresh interpreter each: a few seconds apiece).

Run: ``python benchmarks/checkpoint_fuzz.py --n 10000`` (JSON to ``benchmarks/results/``). The
calling process never parses a mutant itself; its own peak RSS is reported with the worker's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from checkpoint_mutations import peak_rss, run_fuzz, write_cases  # noqa: E402

from anatcl_infer.errors import AnatCLError  # noqa: E402

_PACKAGE = {"loaded", "loaded (CheckpointError)", "CheckpointError", "UnsafeCheckpointError"}


def _through_jail(paths: list[str]) -> dict[str, str]:
    from anatcl_infer.weights.jail import read_in_jail

    out = {}
    warnings.simplefilter("ignore")  # EMA choices of the mutated seeds
    for path in paths:
        try:
            read_in_jail(path)
            out[path] = "loaded"
        except AnatCLError as exc:
            out[path] = f"{type(exc).__name__}: {str(exc)[:200]}"
        except Exception as exc:  # noqa: BLE001  (a finding: reported, never hidden)
            out[path] = f"ESCAPED {type(exc).__name__}: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of mutants")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--jail-sample", type=int, default=20, help="random cases also read through the jail")
    parser.add_argument("--timeout", type=float, default=6 * 3600.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="anatcl-fuzz-") as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicated zip members
            cases = write_cases(work / "cases", args.n, seed=args.seed)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        result = run_fuzz([p for _s, _k, p in cases], work, timeout=args.timeout, env=env)
        outcomes: dict[str, str] = result["outcomes"]  # type: ignore[assignment]
        findings = sorted(p for p, o in outcomes.items() if o not in _PACKAGE)
        sample = random.Random(args.seed).sample([str(p) for _s, _k, p in cases], min(args.jail_sample, len(cases)))
        jail = _through_jail(sorted(set(findings) | set(sample)))
        by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for _seed, kind, path in cases:
            by_kind[kind][outcomes.get(str(path), "NOT RUN")] += 1
        for path in findings:  # keep them for a bug report
            (args.out / "fuzz-findings").mkdir(parents=True, exist_ok=True)
            Path(path).replace(args.out / "fuzz-findings" / Path(path).name)
    counts = collections.Counter(outcomes.values())
    summary = {
        "benchmark": "checkpoint_fuzz",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "cases": args.n,
        "seed": args.seed,
        "outcomes": dict(counts),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "worker_deaths": result["deaths"],
        "findings": {p: outcomes[p] for p in findings},
        "through_jail": {"cases": len(jail), "outcomes": dict(collections.Counter(o.split(":")[0] for o in jail.values())),
                         "not_package_errors": {p: o for p, o in jail.items() if o.startswith("ESCAPED")}},
        "worker_peak_rss_bytes": result["peak_rss"],
        "caller_peak_rss_bytes": peak_rss(),
        "seconds": round(time.monotonic() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"checkpoint-fuzz-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("cases", "outcomes", "worker_deaths", "through_jail", "worker_peak_rss_bytes",
                                              "caller_peak_rss_bytes", "seconds")}, indent=2))
    print(f"wrote {path}")
    if findings or summary["through_jail"]["not_package_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
