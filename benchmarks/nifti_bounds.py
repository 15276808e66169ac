"""Bounded cost per input (issue 21): peak RSS and time of a fresh process that loads a model and reads one hostile file.

Cases, each in its own fresh process (an untrained ``AnatCL(ModelConfig())`` on the CPU loaded
first, then ``prepare(path)`` of the file, the whole read-check-conform path):

* ``baseline``: the example mwp1 map as a plain float32 ``.nii.gz``;
* ``tail``: the same file followed by a 2 GiB sparse tail (zeros);
* ``offset``: the map with ``vox_offset = 2**30`` (1 GiB of zero padding, gzip-compressed);
* ``offset-plain``: the same as a sparse uncompressed ``.nii``;
* ``members``: 300,000 empty gzip members before the data.

Targets: peak RSS < 1.2 GB for ``tail`` and ``offset``; ``members`` < 10 s. Prints one line per
case and exits 1 if a target is missed.

    PYTHONPATH=. python benchmarks/nifti_bounds.py
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data" / "mwp1sub-mni01_T1w.nii.gz"

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from anatcl_infer.config import ModelConfig
    from anatcl_infer.errors import InputError
    from anatcl_infer.model.network import AnatCL
    from anatcl_infer.inputs.preprocess import prepare
    model = AnatCL(ModelConfig()).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        prepare(sys.argv[1], model.config.preprocess, emit_warnings=False)
        outcome = "read"
    except InputError as exc:
        outcome = f"refused:{exc.reason or exc.stage}: {exc}"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "model_kib": before, "outcome": outcome}))
    """
)


def _header(data: np.ndarray, affine: np.ndarray, vox_offset: int) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.update_header()
    hdr = img.header
    hdr.set_data_offset(vox_offset)
    return hdr.binaryblock + b"\0" * 4


def build(folder: Path) -> dict[str, Path]:
    """Write the cases into ``folder``."""
    img = nib.load(EXAMPLE)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    body = data.tobytes(order="F")
    plain = _header(data, img.affine, 352) + body
    files = {}
    files["baseline"] = folder / "baseline.nii.gz"
    files["baseline"].write_bytes(gzip.compress(plain, compresslevel=1))
    files["tail"] = folder / "tail.nii.gz"
    files["tail"].write_bytes(files["baseline"].read_bytes())
    with open(files["tail"], "r+b") as fh:
        fh.truncate(files["tail"].stat().st_size + (2 << 30))  # 2 GiB sparse tail
    files["offset"] = folder / "offset.nii.gz"
    with open(files["offset"], "wb") as fh:
        c = zlib.compressobj(1, zlib.DEFLATED, 31)
        fh.write(c.compress(_header(data, img.affine, 1 << 30)))
        zeros = b"\0" * (1 << 24)
        left = (1 << 30) - 352
        while left:
            n = min(left, len(zeros))
            fh.write(c.compress(zeros[:n]))
            left -= n
        fh.write(c.compress(body) + c.flush())
    files["offset-plain"] = folder / "offset.nii"
    with open(files["offset-plain"], "wb") as fh:
        fh.write(_header(data, img.affine, 1 << 30))
        fh.seek(1 << 30)
        fh.write(body)
    files["members"] = folder / "members.nii.gz"
    files["members"].write_bytes(gzip.compress(b"", mtime=0) * 300_000 + gzip.compress(plain, compresslevel=1))
    return files


def main() -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ok = True
    results = {}
    with tempfile.TemporaryDirectory(prefix="nifti-bounds-") as tmp:
        files = build(Path(tmp))
        for case, path in files.items():
            out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, timeout=600)
            if out.returncode:
                print(f"{case}: child failed\n{out.stderr[-2000:]}")
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[case] = r
            peak_mb = r["peak_kib"] * 1024 / 1e6
            model_mb = r["model_kib"] * 1024 / 1e6
            size = path.stat().st_size
            line = (f"{case:13s} file {size / 2**30:6.2f} GiB ({path.suffix})  read {r['seconds']:6.2f} s  peak RSS "
                    f"{peak_mb:6.0f} MB (after the model: {model_mb:.0f} MB)  {r['outcome'][:70]}")
            if case in ("tail", "offset", "offset-plain") and peak_mb >= 1200:
                ok, line = False, line + "  <- over 1.2 GB"
            if case == "members" and r["seconds"] >= 10:
                ok, line = False, line + "  <- over 10 s"
            print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
