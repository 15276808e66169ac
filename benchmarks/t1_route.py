"""The raw-T1 route of T1 models (issue 25): s/volume of strip + register + resample, and its quality.

    PYTHONPATH=. python benchmarks/t1_route.py             # 4 heads at 1 mm, ~6 min on 2 cores
    PYTHONPATH=. python benchmarks/t1_route.py --n 2 --step 2 --no-encode   # a quick look

Inputs: whole heads with skull, scalp, eyes and neck built around nilearn's MNI152 brain
(tests/synthetic_head.py) at ``--step`` mm (1 mm: 197x233x189, the size of a typical
native T1), each moved by a different rigid motion (4-10 degrees, up to 14 mm). Sections:

  alone     one process, every core (torch and ITK use their default threads): per volume,
            deepbet skull-stripping, SimpleITK affine registration + resampling onto the 1.5 mm
            reference grid, and the whole :func:`prepare_t1` (read + decide + strip + register);
            with the quality figures: deepbet's mask Dice against nilearn's brain mask, the
            registration's NCC to the template and its placement error (RMS mm over the brain)
  workers   ``--workers`` processes, each with one torch and one ITK thread, each running
            :func:`prepare_t1` on its share: wall time / N
  encode    ``encode(model, paths, from_t1=...)`` with one loader worker (the CPU default), a
            randomly initialised T1 model on the reference grid: wall time / N, and the
            forward alone, to show how much of the route the loader hides

Writes a JSON record to ``benchmarks/results/t1-route-<stamp>.json`` and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # anatomy.py, synthetic_head.py: real anatomy from nilearn

from anatcl_infer.config import ModelConfig, PreprocessConfig  # noqa: E402

SPEC = PreprocessConfig(input_kind="t1", intensity="robust")


def _motion(i: int) -> np.ndarray:
    """A different rigid motion per subject: 4-10 degrees about an oblique axis, shifts up to 14 mm."""
    rng = np.random.default_rng(100 + i)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    th = np.deg2rad(4.0 + 2.0 * (i % 4))
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)
    out[:3, 3] = rng.uniform(-14.0, 14.0, 3)
    return out


def _placement_rms(matrix: np.ndarray, moved: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> float:
    ijk = np.argwhere(mask)[::20].T
    pts = np.vstack([affine[:3, :3] @ ijk + affine[:3, 3:4], np.ones(ijk.shape[1])])
    return float(np.sqrt((((matrix @ pts) - (moved @ pts))[:3] ** 2).sum(axis=0).mean()))


def _make_inputs(n: int, step: int, folder: Path) -> list[tuple[str, np.ndarray]]:
    import nibabel as nib
    from synthetic_head import mni_head

    head, _, affine = mni_head(step)
    out = []
    for i in range(n):
        motion = _motion(i)
        path = folder / f"sub-{i:02d}_T1w.nii.gz"
        img = nib.Nifti1Image((head * 1000.0).astype(np.float32), motion @ affine)
        nib.save(img, str(path))
        out.append((str(path), motion))
    return out


def _alone(inputs: list[tuple[str, np.ndarray]], step: int) -> dict:
    from synthetic_head import mni_head

    from anatcl_infer.inputs import t1_route
    from anatcl_infer.inputs.io import load_volume
    from anatcl_infer.inputs.registration import register_volume

    _, brain_mask, affine = mni_head(step)
    t1_route._extractor("cpu")  # load deepbet's networks once, as a worker does
    rows = []
    for path, motion in inputs:
        t0 = time.perf_counter()
        data, aff = load_volume(path)
        t1 = time.perf_counter()
        brain, mask, _ = t1_route._strip(data, aff, "cpu", path)
        t2 = time.perf_counter()
        reg = register_volume(brain, aff, grid_shape=SPEC.grid_shape, grid_affine=SPEC.grid_affine)
        t3 = time.perf_counter()
        t1_route.prepare_t1(path, spec=SPEC)  # the whole entry point, in memory
        t4 = time.perf_counter()
        dice = 2.0 * np.count_nonzero(mask & brain_mask) / (np.count_nonzero(mask) + np.count_nonzero(brain_mask))
        rows.append({
            "read_s": t1 - t0, "strip_s": t2 - t1, "register_resample_s": t3 - t2, "prepare_t1_s": t4 - t3,
            "dice": dice, "ncc": reg.ncc, "placement_rms_mm": _placement_rms(reg.matrix_ras, motion, brain_mask, affine),
        })
        print(f"  {Path(path).name}: read {t1 - t0:.2f} s, strip {t2 - t1:.1f} s, register+resample {t3 - t2:.1f} s, "
              f"prepare_t1 {t4 - t3:.1f} s; Dice {dice:.3f}, NCC {reg.ncc:.3f}, RMS {rows[-1]['placement_rms_mm']:.2f} mm", flush=True)
    return {"rows": rows, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _one(path: str) -> float:
    from anatcl_infer.inputs.t1_route import prepare_t1

    t0 = time.perf_counter()
    prepare_t1(path, spec=SPEC, threads=1)
    return time.perf_counter() - t0


def _workers(inputs: list[tuple[str, np.ndarray]], workers: int) -> dict:
    paths = [p for p, _ in inputs]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fresh processes: no OpenMP state forked from this one
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, mp_context=ctx) as pool:
        list(pool.map(_one, paths[:workers]))  # warm: imports and deepbet's networks in each worker
        t0 = time.perf_counter()
        each = list(pool.map(_one, paths))
        wall = time.perf_counter() - t0
    return {"workers": workers, "wall_s": wall, "s_per_volume": wall / len(paths), "per_input_s": each}


def _encode(inputs: list[tuple[str, np.ndarray]]) -> dict:
    import torch

    from anatcl_infer.inputs.t1_route import T1Route
    from anatcl_infer.model.network import AnatCL

    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="t1-bench", source="benchmark", fold=0, preprocess=SPEC)).eval()
    x = torch.zeros((1, 1, *SPEC.model_input_shape))
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(3):
            model(x)
        forward = (time.perf_counter() - t0) / 3
    paths = [p for p, _ in inputs]
    t0 = time.perf_counter()
    feats = model.encode(paths, from_t1=T1Route(), num_workers=1, progress=False, batch_size=1)
    wall = time.perf_counter() - t0
    assert np.isfinite(feats).all()
    return {"forward_s": forward, "wall_s": wall, "s_per_volume": wall / len(paths), "num_workers": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4, help="volumes (default 4)")
    parser.add_argument("--step", type=int, default=1, help="voxel size of the inputs in mm (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the workers section (default 2)")
    parser.add_argument("--no-encode", action="store_true", help="skip the encode section")
    args = parser.parse_args()
    import SimpleITK as sitk
    import torch

    record: dict = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "simpleitk": sitk.Version.VersionString(), "load_before": os.getloadavg()},
        "n": args.n, "step_mm": args.step,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        inputs = _make_inputs(args.n, args.step, Path(tmp))
        print(f"{args.n} heads at {args.step} mm built in {time.perf_counter() - t0:.1f} s", flush=True)
        print("alone (one process, default threads):", flush=True)
        record["alone"] = _alone(inputs, args.step)
        print(f"{args.workers} workers (1 thread each):", flush=True)
        record["workers"] = _workers(inputs, args.workers)
        print(f"  {record['workers']['s_per_volume']:.1f} s/volume", flush=True)
        if not args.no_encode:
            print("encode(from_t1=..., num_workers=1):", flush=True)
            record["encode"] = _encode(inputs)
            print(f"  {record['encode']['s_per_volume']:.1f} s/volume (forward alone {record['encode']['forward_s']:.2f} s)", flush=True)
    record["machine"]["load_after"] = os.getloadavg()
    a = record["alone"]
    print("\n| section | s/volume | notes |\n|---|---|---|")
    print(f"| alone: deepbet skull-strip | {a['strip_s']:.1f} | Dice vs nilearn mask {min(r['dice'] for r in a['rows']):.3f}-{max(r['dice'] for r in a['rows']):.3f} |")
    print(f"| alone: affine registration + resampling | {a['register_resample_s']:.1f} | NCC {min(r['ncc'] for r in a['rows']):.3f}-{max(r['ncc'] for r in a['rows']):.3f}, "
          f"placement RMS <= {max(r['placement_rms_mm'] for r in a['rows']):.2f} mm |")
    print(f"| alone: prepare_t1 (read, decide, strip, register, resample) | {a['prepare_t1_s']:.1f} | read {a['read_s']:.2f} s |")
    w = record["workers"]
    print(f"| {w['workers']} workers x 1 thread: prepare_t1 | {w['s_per_volume']:.1f} | wall {w['wall_s']:.0f} s for {args.n} |")
    if "encode" in record:
        e = record["encode"]
        print(f"| encode(from_t1), 1 loader worker | {e['s_per_volume']:.1f} | forward alone {e['forward_s']:.2f} s |")
    print(f"\nload average before {record['machine']['load_before']}, after {record['machine']['load_after']}")
    out = ROOT / "benchmarks" / "results" / f"t1-route-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
