"""anatcl-infer benchmark harness: ratios against references measured in the same run.

Prints a Markdown table and writes a JSON record to ``benchmarks/results/``.

    python benchmarks/run.py                 # everything (CPU: ~3-5 min on 2 cores)
    python benchmarks/run.py --only forward  # one section
    python benchmarks/run.py --quick         # fewer repetitions

Sections (issue 7):
  forward   model forward s/volume vs a plain functional forward of the same weights
  embed     `anatcl embed` marginal s/volume ((t(2N) - t(N)) / N) vs the forward,
            for on-grid .nii.gz maps and for 1 mm inputs that need resampling
  rss       peak RSS of `anatcl embed` for N and 4N inputs
  cold      cold start: `anatcl embed` on one file, wall time, vs the forward
  floor     compute floor = FLOPs / measured float32 matrix-product rate
  gpu       throughput by batch size, autocast, channels-last-3d, cudnn.benchmark (CUDA only)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/anatomy.py: real anatomy from nilearn's MNI152 maps
sys.path.insert(0, str(ROOT / "benchmarks"))

from anatcl_infer.weights.checkpoint import save_pretrained  # noqa: E402
from anatcl_infer.config import REFERENCE_AFFINE, ModelConfig  # noqa: E402
from anatcl_infer.model.network import AnatCL  # noqa: E402

SHAPE = (1, 1, 121, 128, 121)


def _timeit(fn, repeat: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _model() -> AnatCL:
    torch.manual_seed(0)
    model = AnatCL(ModelConfig(name="bench", source="random-weights", fold=0)).eval()
    # Realistic BatchNorm statistics so activations stay in a normal range.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(0.5, 1.5)
            m.running_mean.normal_(0, 0.1)
    return model


def _volume(seed: int = 0) -> torch.Tensor:
    from anatomy import mni_gm_on_grid  # tests/anatomy.py: real anatomy from nilearn

    gm = mni_gm_on_grid()
    rng = np.random.default_rng(seed)
    vol = gm * (1 + 0.05 * rng.standard_normal(gm.shape).astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(vol[:, 8:136, :]))[None, None].float()


def bench_forward(repeat: int) -> dict:
    from plain_forward import plain_forward as reference_forward

    model = _model()
    x = _volume()
    sd = model.state_dict()
    with torch.inference_mode():
        ours = model(x)
        ref = reference_forward(sd, x)
        max_rel = float(((ours - ref).abs().max() / ref.abs().max()).item())
        t_model, t_ref = [], []
        for _ in range(repeat):  # interleave so drift hits both equally
            t_model += _timeit(lambda: model(x), 1, warmup=0 if t_model else 1)
            t_ref += _timeit(lambda: reference_forward(sd, x), 1, warmup=0 if t_ref else 1)
    fm, fr = statistics.median(t_model), statistics.median(t_ref)
    return {"model_s": fm, "reference_s": fr, "ratio": fm / fr, "max_rel_diff": max_rel, "target": 1.02}


def _write_inputs(directory: Path, n: int, kind: str) -> None:
    import nibabel as nib
    from anatomy import mni_gm_on_grid

    directory.mkdir(parents=True, exist_ok=True)
    gm = mni_gm_on_grid()
    if kind == "grid":
        for i in range(n):
            img = nib.Nifti1Image((gm * (1 + 0.01 * i)).astype(np.float32), np.array(REFERENCE_AFFINE))
            nib.save(img, directory / f"sub-{i:04d}_mwp1.nii.gz")
    else:  # 1 mm RAS inputs: must be resampled
        from nilearn.datasets import load_mni152_gm_template

        tpl = load_mni152_gm_template(resolution=1)
        data = np.asarray(tpl.get_fdata(), dtype=np.float32)
        for i in range(n):
            img = nib.Nifti1Image(data * (1 + 0.01 * i), tpl.affine)
            img.set_data_dtype(np.float32)
            nib.save(img, directory / f"sub-{i:04d}_mwp1.nii.gz")


def _run_embed(model_dir: Path, inputs: Path, out: Path, extra: list[str] | None = None) -> tuple[float, int]:
    """Run `anatcl embed` in a fresh process; return (wall seconds, peak RSS in MiB of the tree)."""
    cmd = [sys.executable, "-m", "anatcl_infer", "embed", str(inputs), "--out", str(out),
           "--model", str(model_dir), "--device", "cpu", "--quiet", "--overwrite", *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"anatcl embed failed: {err}")
    return wall, int(usage.ru_maxrss / 1024)


def bench_embed(tmp: Path, model_dir: Path, forward_s: float, n: int, repeat: int) -> dict:
    res = {}
    for kind, target in (("grid", 1.10), ("1mm", 1.25)):
        d1, d2 = tmp / f"{kind}-n", tmp / f"{kind}-2n"
        _write_inputs(d1, n, kind)
        _write_inputs(d2, 2 * n, kind)
        t1s, t2s = [], []
        for _ in range(repeat):  # interleaved, so drift hits both sizes alike; min = least disturbed
            t1s.append(_run_embed(model_dir, d1, tmp / "o1.parquet")[0])
            t2s.append(_run_embed(model_dir, d2, tmp / "o2.parquet")[0])
        t1, t2 = min(t1s), min(t2s)
        marginal = (t2 - t1) / n
        res[kind] = {"n": n, "t_n_s": t1, "t_2n_s": t2, "marginal_s_per_vol": marginal,
                     "ratio_vs_forward": marginal / forward_s, "target": target}
    return res


def bench_rss(tmp: Path, model_dir: Path, n: int) -> dict:
    d1, d4 = tmp / "rss-n", tmp / "rss-4n"
    _write_inputs(d1, n, "grid")
    _write_inputs(d4, 4 * n, "grid")
    _, r1 = _run_embed(model_dir, d1, tmp / "r1.parquet")
    _, r4 = _run_embed(model_dir, d4, tmp / "r4.parquet")
    return {"n": n, "rss_n_mib": r1, "rss_4n_mib": r4, "ratio": r4 / r1, "target": 1.10}


def bench_cold(tmp: Path, model_dir: Path, forward_s: float) -> dict:
    d = tmp / "cold"
    _write_inputs(d, 1, "grid")
    wall = min(_run_embed(model_dir, d, tmp / "c.parquet")[0] for _ in range(2))
    return {"wall_s": wall, "forward_s": forward_s, "overhead_s": wall - forward_s, "target_overhead_s": 4.0}


def _flops(model: AnatCL) -> float:
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, torch.nn.Conv3d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
            macs += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, torch.nn.Linear):
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    with torch.inference_mode():
        model(torch.zeros(SHAPE))
    for h in handles:
        h.remove()
    return 2.0 * macs


def bench_floor(forward_s: float) -> dict:
    flops = _flops(_model())
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = statistics.median(_timeit(lambda: a @ b, 5))
    rate = 2 * 2048**3 / t
    floor = flops / rate
    return {"gflop_per_volume": flops / 1e9, "matmul_gflops": rate / 1e9, "floor_s": floor,
            "forward_s": forward_s, "forward_over_floor": forward_s / floor}


def bench_gpu() -> dict:
    if not torch.cuda.is_available():
        return {"available": False}
    dev = torch.device("cuda")
    model = _model().to(dev)
    out: dict = {"available": True, "name": torch.cuda.get_device_name(0), "rows": []}
    x1 = _volume().to(dev)
    with torch.inference_mode():
        ref = model(x1).float()
    for cl in (False, True):
        m = model.to(memory_format=torch.channels_last_3d) if cl else model.to(memory_format=torch.contiguous_format)
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            for dtype in (None, torch.bfloat16, torch.float16):
                for bs in (1, 4, 8, 16, 32):
                    x = x1.repeat(bs, 1, 1, 1, 1)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last_3d)

                    def step():
                        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                            y = m(x)
                        torch.cuda.synchronize()
                        return y

                    y = step()
                    t = statistics.median(_timeit(step, 5))
                    diff = float(((y[:1].float() - ref).abs().max() / ref.abs().max()).item())
                    out["rows"].append({"channels_last": cl, "cudnn_benchmark": bench_mode,
                                        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
                                        "batch": bs, "vol_per_s": bs / t, "max_rel_diff_vs_fp32": diff})
    return out


def _table(rec: dict) -> str:
    lines = ["| measure | value | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
    f = rec.get("forward")
    if f:
        lines.append(f"| forward s/volume (batch 1) | {f['model_s']:.3f} | functional {f['reference_s']:.3f} | {f['ratio']:.3f} | <= 1.02 | {'yes' if f['ratio'] <= 1.02 else 'NO'} |")
    for kind, e in (rec.get("embed") or {}).items():
        label = "on-grid .nii.gz" if kind == "grid" else "1 mm, resampled"
        lines.append(f"| `anatcl embed` marginal s/volume, {label} | {e['marginal_s_per_vol']:.3f} | forward {f['model_s']:.3f} | {e['ratio_vs_forward']:.3f} | <= {e['target']:.2f} | {'yes' if e['ratio_vs_forward'] <= e['target'] else 'NO'} |")
    r = rec.get("rss")
    if r:
        lines.append(f"| peak RSS, {4 * r['n']} vs {r['n']} inputs (MiB) | {r['rss_4n_mib']} | {r['rss_n_mib']} | {r['ratio']:.3f} | <= 1.10 | {'yes' if r['ratio'] <= 1.10 else 'NO'} |")
    c = rec.get("cold")
    if c:
        lines.append(f"| cold start, one file (s) | {c['wall_s']:.2f} | forward {c['forward_s']:.2f} | +{c['overhead_s']:.2f} s | <= +4 s | {'yes' if c['overhead_s'] <= 4 else 'NO'} |")
    fl = rec.get("floor")
    if fl:
        lines.append(f"| compute floor (s/volume) | {fl['floor_s']:.3f} | {fl['gflop_per_volume']:.1f} GFLOP at {fl['matmul_gflops']:.0f} GFLOP/s | forward/floor {fl['forward_over_floor']:.2f} | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="sections to run")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and inputs")
    parser.add_argument("--n", type=int, default=None, help="inputs N for the embed and RSS sections")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    sections = set(args.only or ["forward", "embed", "rss", "cold", "floor", "gpu"])
    repeat = 2 if args.quick else 5
    n = args.n or (4 if args.quick else 8)

    rec: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    # The CLI tunes the allocator (anatcl_infer.allocator); give the reference forward the same
    # advantage so the ratios compare like with like.
    from anatcl_infer.encoding.allocator import retain_freed_memory

    rec["allocator_tuned"] = retain_freed_memory()
    forward = bench_forward(repeat)
    rec["forward"] = forward
    print(f"forward: {forward}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = save_pretrained(_model(), tmp / "model")
        if "embed" in sections:
            rec["embed"] = bench_embed(tmp, model_dir, forward["model_s"], n, 1 if args.quick else 3)
            print(f"embed: {rec['embed']}", file=sys.stderr)
        if "rss" in sections:
            rec["rss"] = bench_rss(tmp, model_dir, n)
            print(f"rss: {rec['rss']}", file=sys.stderr)
        if "cold" in sections:
            rec["cold"] = bench_cold(tmp, model_dir, forward["model_s"])
            print(f"cold: {rec['cold']}", file=sys.stderr)
    if "floor" in sections:
        rec["floor"] = bench_floor(forward["model_s"])
    if "gpu" in sections:
        rec["gpu"] = bench_gpu()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"## Benchmark ({rec['machine']['processor']}, {rec['machine']['cpus']} CPUs, torch {rec['machine']['torch']}, {rec['date']})\n")
    print(_table(rec))
    if rec.get("gpu", {}).get("available"):
        print("\n| channels-last | cudnn.benchmark | dtype | batch | vol/s | max rel diff vs fp32 |\n|---|---|---|---|---|---|")
        for r in rec["gpu"]["rows"]:
            print(f"| {r['channels_last']} | {r['cudnn_benchmark']} | {r['dtype']} | {r['batch']} | {r['vol_per_s']:.1f} | {r['max_rel_diff_vs_fp32']:.2e} |")
    print(f"\nJSON record: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
