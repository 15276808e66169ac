"""The differential job of issue 21: N seeded header/framing variants, each read by the package and by nibabel.

Every variant (``tests/nifti_variants.py``: format, datatype, byte order, dims and 4D, scaling,
``vox_offset``, qform/sform codes and matrices, pixdim, magic, extensions, gzip framing) must be
either read bit for bit as ``nibabel.load(path).get_fdata(dtype=float32)`` with nibabel's affine,
through the same ``prepare()`` conform path, or refused with a named reason. Anything else is a
mismatch. Prints the counts (read-equal / refused by reason / mismatches) and exits 1 on any mismatch.

    PYTHONPATH=. python benchmarks/nifti_differential.py --n 10000 --tmp /dev/shm   # ~25 min on 2 cores
    PYTHONPATH=. python benchmarks/nifti_differential.py --n 500 --seed 3 --workers 1
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _run(args: tuple[int, int, str]) -> tuple[str, dict]:
    from nifti_variants import judge, make_variant

    seed, index, root = args
    folder = Path(root) / str(index)
    folder.mkdir()
    try:
        variant = make_variant(np.random.default_rng([seed, index]), folder, index)
        outcome, details = judge(variant)
    except Exception as exc:  # the generator itself must not stop the job
        outcome, details = f"MISMATCH:harness:{type(exc).__name__}", {"message": str(exc)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    details["index"] = index
    return outcome, json.loads(json.dumps(details, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="how many variants (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator (variant i uses [seed, i])")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts and mismatches here")
    parser.add_argument("--tmp", type=Path, default=None, help="where the variants are written (default: the system's; /dev/shm is faster)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    mismatches = []
    with tempfile.TemporaryDirectory(prefix="nifti-diff-", dir=args.tmp) as root:
        jobs = [(args.seed, i, root) for i in range(args.n)]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.workers) if args.workers > 1 else _Serial() as pool:
            for k, (outcome, details) in enumerate(pool.imap_unordered(_run, jobs, chunksize=8), 1):
                counts[outcome] += 1
                if outcome.startswith("MISMATCH"):
                    mismatches.append({"outcome": outcome, **details})
                if k % 1000 == 0:
                    print(f"... {k}/{args.n} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    equal = counts["equal"]
    refused = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("refused:")}
    print(f"{args.n} variants (seed {args.seed}) in {seconds:.0f} s")
    print(f"read-equal to nibabel: {equal}")
    print(f"refused with a reason: {sum(refused.values())}")
    for reason, n in sorted(refused.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6d}  {reason}")
    print(f"mismatches: {len(mismatches)}")
    for m in mismatches[:10]:
        print("  ", m)
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "seed": args.seed, "seconds": seconds, "equal": equal,
                                         "refused": refused, "mismatches": mismatches}, indent=1))
    return 1 if mismatches else 0


class _Serial:
    """A one-process stand-in for ``multiprocessing.Pool``."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap_unordered(self, fn, jobs, chunksize=1):  # noqa: ANN001, ANN201
        return map(fn, jobs)


if __name__ == "__main__":
    raise SystemExit(main())
