"""anatcl-infer benchmark harness: ratios against references measured in the same run.

Prints Markdown tables, writes a JSON record to ``benchmarks/results/`` and, with
``--write-readme``, replaces the README's performance section between its markers.

    python benchmarks/run.py --write-readme  # everything (CPU: ~6 min on 2 quiet cores)
    python benchmarks/run.py --only forward fidelity peak  # some sections
    python benchmarks/run.py --quick         # fewer repetitions
    python benchmarks/run.py --readme-from benchmarks/results/bench-X.json  # table from a record

Sections (issues 7, 15 and 24); every timing is the best of N interleaved repetitions in one process:
  forward   per precision (fp32; bf16/fp16 where native), all engines on the same weights and input:
            the package (backend auto: OpenVINO when installed; and backend torch, the fused plan), the
            eager module, a plain functional forward, and the peers (OpenVINO default-configured, ONNX
            Runtime, on an ONNX export; benchmarks/peers.py). The package's s/volume per precision is the
            one forward timing every other section uses.
  peak      the machine's peak per precision, measured the way the network computes: a large
            matrix product and a large 3D convolution (oneDNN, channels-last) at the thread count
            used; the forward's GFLOP/s (torch's FLOP counter: 60.0 GFLOP/volume) as a fraction of it
  pipeline  end to end in one process: `encode(files)` marginal s/volume vs each peer's pipeline
            (nibabel read + crop + forward), and the fixed cost of an `encode` on 4 files
  fidelity  per reduced precision vs float32 on real anatomy (a simulated cohort of modulated MNI
            grey-matter maps): cosine per row, cosine of subject differences, max relative difference,
            the change of a cross-validated linear-probe age MAE, for the package, torch autocast and
            the OpenVINO peer; and the package's float32 vs a float64 forward
  embed     `anatcl embed` marginal s/volume ((t(2N) - t(N)) / N) vs the forward of the same
            precision, for on-grid .nii.gz maps and for 1 mm inputs that need resampling
  rss       peak RSS of `anatcl embed` for N and 4N inputs
  cold      cold start: `anatcl embed` on one file, wall time, vs the forward
  gpu       CUDA only: batch x precision x channels-last-3d x cudnn.benchmark, model-only, and
            `anatcl embed` end to end on >= 256 volumes

Peers need the benchmark extra: pip install "anatcl-infer[bench]" (a missing peer is skipped).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from anatcl_infer.encoding.allocator import yield_idle_threads  # noqa: E402

# Before torch loads: the same OpenMP wait policy as `anatcl embed`, so in-process forwards
# and CLI runs are measured alike (benchmarks/NOTES.md, attempt 12).
yield_idle_threads()
import torch  # noqa: E402

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


def _precisions() -> list[str]:
    """Precisions this machine runs natively on CPU (fp32 always)."""
    from anatcl_infer.model.devices import native_bf16_cpu, native_fp16_cpu

    return ["fp32"] + (["bf16"] if native_bf16_cpu() else []) + (["fp16"] if native_fp16_cpu() else [])


_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ctx(precision: str):
    from contextlib import nullcontext

    return nullcontext() if precision == "fp32" else torch.autocast("cpu", dtype=_DTYPE[precision])


def _interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Best of ``repeat`` for each function, run in turns so that drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up (builds the fused plans, faults in the allocator)
        f()
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _runner(model: AnatCL, precision: str, backend: str = "auto"):
    """The package's forward as encode runs it: the backend's runner (auto: OpenVINO when installed)."""
    from anatcl_infer.encoding.backends import select_runner

    return select_runner(model, device=torch.device("cpu"), precision=precision, backend=backend)


def bench_forward(repeat: int, precisions: list[str], tmp: Path) -> dict:
    """s/volume of every engine on the same weights and input, interleaved in one process, best of ``repeat``:
    the package (backend auto, and backend torch), the eager module, a plain functional forward, and the
    peers (OpenVINO default-configured and ONNX Runtime on an ONNX export). The package's time per precision
    is *the* forward timing of this run: the peak, pipeline and embed sections use it."""
    from peers import export_onnx, onnxruntime_peer, openvino_peer
    from plain_forward import plain_forward

    model = _model()
    eager = _model()
    eager.encoder.fused = False  # the module as it ran before issue 15: eager, contiguous
    x = _volume()
    xn = x.numpy()
    sd = model.state_dict()
    onnx_path = export_onnx(model, tmp / "peer.onnx", SHAPE[2:])
    runners = {p: _runner(model, p) for p in precisions if p in ("fp32", "bf16")}
    peers: dict[str, dict] = {}
    fns = {"eager_fp32": lambda: eager(x), "plain_fp32": lambda: plain_forward(sd, x)}
    for p in precisions:
        fns[f"torch_{p}"] = (lambda p=p: _torch_forward(model, x, p))
        if p in runners:
            fns[f"ours_{p}"] = (lambda r=runners[p]: r(x))
            ov_peer = openvino_peer(onnx_path, p)
            if ov_peer is not None:
                fns[f"openvino_{p}"] = (lambda f=ov_peer[0]: f(xn))
                peers.setdefault(p, {})["openvino"] = ov_peer[1]
    ort_peer = onnxruntime_peer(onnx_path)
    if ort_peer is not None:
        fns["onnxruntime_fp32"] = lambda: ort_peer[0](xn)
        peers.setdefault("fp32", {})["onnxruntime"] = ort_peer[1]
    with torch.inference_mode():
        best = _interleaved(fns, repeat)
        ref = eager(x)
        ours = runners["fp32"](x) if "fp32" in runners else model(x)
    res = {"eager_s": best["eager_fp32"], "plain_s": best["plain_fp32"],
           "fp32_max_rel_diff_vs_eager": float(((ours - ref).abs().max() / ref.abs().max()).item()),
           "precisions": {}}
    for p in precisions:
        ours_s = best.get(f"ours_{p}", best[f"torch_{p}"])
        entry = {"s_per_volume": ours_s, "backend": runners[p].name if p in runners else "torch",
                 "backend_version": runners[p].version if p in runners else torch.__version__,
                 "torch_s": best[f"torch_{p}"], "speedup_vs_eager_fp32": best["eager_fp32"] / ours_s, "peers": {}}
        for name, desc in peers.get(p, {}).items():
            entry["peers"][name] = {**desc, "s_per_volume": best[f"{name}_{p}"]}
        if entry["peers"]:
            fastest = min(entry["peers"].values(), key=lambda d: d["s_per_volume"])
            entry["best_peer"] = fastest["engine"]
            entry["ratio_vs_best_peer"] = ours_s / fastest["s_per_volume"]
        res["precisions"][p] = entry
    return res


def _torch_forward(model: AnatCL, x: torch.Tensor, precision: str) -> torch.Tensor:
    with _ctx(precision):
        return model(x)


def _conv_fn(dtype: torch.dtype):
    """A large 3D convolution run the way the fused plan runs it (oneDNN, channels-last, pre-packed);
    returns (function, FLOPs per call)."""
    from anatcl_infer.model.fused import fused_available

    c, n = 128, (31, 32, 31)  # layer1/2-sized: 128 -> 128 channels, 3x3x3, on a 31x32x31 grid
    x = torch.randn(1, c, *n).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c, c, 3, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    if fused_available():
        b = torch.zeros(c, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, list(x.shape))
        fn = lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, "none", [], "")  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.conv3d(x, w, padding=1)  # noqa: E731
    return fn, 2.0 * c * c * 27 * n[0] * n[1] * n[2]


def _matmul_fn(dtype: torch.dtype, size: int = 4096):
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return (lambda: a @ b), 2.0 * size**3


def bench_peak(precisions: list[str], repeat: int, forward: dict) -> dict:
    """The machine's peak per precision (best of a large matmul and a large 3D conv, interleaved) and the
    forward's share of it, from the forward section's timing (one forward timing per precision)."""
    flops = _flops()
    out = {"gflop_per_volume": flops["torch_flop_counter"] / 1e9, "flop_count": flops,
           "threads": torch.get_num_threads(), "precisions": {}}
    for p in precisions:
        (mm, mm_flops), (conv, conv_flops) = _matmul_fn(_DTYPE[p]), _conv_fn(_DTYPE[p])
        with torch.inference_mode():
            best = _interleaved({"matmul": mm, "conv": conv}, repeat)
        rates = {"matmul": mm_flops / best["matmul"], "conv": conv_flops / best["conv"]}
        peak = max(rates.values())
        fwd_s = forward["precisions"][p]["s_per_volume"]
        achieved = flops["torch_flop_counter"] / fwd_s
        out["precisions"][p] = {"matmul_gflops": rates["matmul"] / 1e9, "conv3d_gflops": rates["conv"] / 1e9,
                                "peak_gflops": peak / 1e9, "forward_s": fwd_s, "forward_gflops": achieved / 1e9,
                                "fraction_of_peak": achieved / peak, "floor_s": flops["torch_flop_counter"] / peak}
    return out


def _cohort(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 121, 128, 121) simulated modulated grey-matter maps and their ages.

    The MNI152 grey-matter map with age-dependent loss (global plus a smooth regional pattern),
    an individual reserve unrelated to age, and smooth subject-specific noise (compare
    examples/_synthetic.py, which does the same on a coarse grid).
    """
    from scipy import ndimage
    from anatomy import mni_gm_on_grid

    gm = mni_gm_on_grid()[:, 8:136, :].astype(np.float32)
    rng = np.random.default_rng(seed)
    regional = ndimage.zoom(rng.standard_normal((8, 8, 8)), [a / 8 for a in gm.shape], order=1)
    regional = (regional - regional.min()) / (regional.max() - regional.min())
    ages = rng.uniform(20, 80, n)
    maps = np.empty((n, 1, *gm.shape), np.float32)
    for i, age in enumerate(ages):
        years = age - 20
        loss = 0.003 * years * (0.5 + regional)
        noise = ndimage.zoom(rng.standard_normal((12, 12, 12)), [a / 12 for a in gm.shape], order=1)
        maps[i, 0] = gm * np.clip(1 - loss, 0, None) * (1 + 0.05 * rng.standard_normal()) * (1 + 0.04 * noise)
    return maps, ages


def _compare(f: torch.Tensor, r: torch.Tensor) -> dict:
    """Rows of ``f`` vs the float32 rows ``r``: cosine, cosine of the subject differences, max rel. diff."""
    cos = torch.nn.functional.cosine_similarity(f, r)
    # Subject differences: each row minus its engine's cohort mean. The rows share a large common
    # component, so the plain cosine can be ~1 while what separates subjects changes.
    ccos = torch.nn.functional.cosine_similarity(f - f.mean(0), r - r.mean(0))
    rel = (f - r).abs().max(dim=1).values / r.abs().max(dim=1).values
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "centred_cosine_min": float(ccos.min()),
            "centred_cosine_mean": float(ccos.mean()), "max_rel_diff": float(rel.max())}


def bench_fidelity(precisions: list[str], n: int, onnx_path: Path | None = None, n_float64: int = 3) -> dict:
    """Each reduced precision vs float32 on a simulated cohort (cosine, subject differences, linear-probe age
    MAE), for the package (backend auto), torch autocast and the OpenVINO peer default-configured; and the
    package's float32 against a float64 reference forward on ``n_float64`` subjects."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from reference_forward import reference_features

    model = _model()
    maps, ages = _cohort(n)
    engines: dict[str, object] = {"fp32": _runner(model, "fp32"), "torch_fp32": lambda x: _torch_forward(model, x, "fp32")}
    for p in precisions:
        if p == "fp32":
            continue
        engines[p] = _runner(model, p) if p == "bf16" else (lambda x, p=p: _torch_forward(model, x, p))
        engines[f"torch_{p}"] = lambda x, p=p: _torch_forward(model, x, p)
        if p == "bf16" and onnx_path is not None:
            from peers import openvino_peer

            peer = openvino_peer(onnx_path, "bf16")
            if peer is not None:
                engines["openvino_peer_bf16"] = lambda x, f=peer[0]: torch.from_numpy(np.asarray(f(x.numpy())))
    feats = {}
    with torch.inference_mode():
        for name, fn in engines.items():
            feats[name] = torch.cat([fn(torch.from_numpy(maps[i:i + 1])).float() for i in range(n)]).double()
        sd = model.state_dict()
        ref64 = torch.cat([reference_features(sd, torch.from_numpy(maps[i:i + 1])) for i in range(min(n_float64, n))])

    def mae(f: torch.Tensor) -> float:
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        pred = cross_val_predict(probe, f.numpy(), ages, cv=KFold(5, shuffle=True, random_state=0))
        return float(np.mean(np.abs(pred - ages)))

    def rel64(f: torch.Tensor) -> float:
        f = f[: len(ref64)]
        return float(((f - ref64).abs().max(dim=1).values / ref64.abs().max(dim=1).values).max())

    base = mae(feats["fp32"])
    out = {"n_subjects": n, "fp32_probe_mae_years": base, "fp32_backend": engines["fp32"].name,
           "fp32_max_rel_diff_vs_float64": rel64(feats["fp32"]), "torch_fp32_max_rel_diff_vs_float64": rel64(feats["torch_fp32"]),
           "n_float64": len(ref64), "fp32_target_rel_diff": 1e-5, "precisions": {}}
    for p in precisions:
        if p == "fp32":
            continue
        r = feats["fp32"]
        m = mae(feats[p])
        entry = {**_compare(feats[p], r), "probe_mae_years": m, "probe_mae_change_years": m - base, "target_cosine": 0.9999,
                 "backend": getattr(engines[p], "name", "torch"), "others": {}}
        for other in (f"torch_{p}", f"openvino_peer_{p}"):
            if other in feats:
                mo = mae(feats[other])
                entry["others"][other] = {**_compare(feats[other], r), "probe_mae_years": mo, "probe_mae_change_years": mo - base}
        out["precisions"][p] = entry
    return out


def bench_pipeline(tmp: Path, forward: dict, precisions: list[str], n: int, repeat: int, onnx_path: Path | None) -> dict:
    """End to end in one process, interleaved, best of ``repeat``: the package's ``encode(files)`` and each
    peer's pipeline (nibabel read + crop + forward) on N and 2N on-grid .nii.gz maps. Marginal s/volume =
    (t(2N) - t(N)) / N; the fixed cost of an ``encode`` on N files = t(N) - N x the forward section's time."""
    import warnings as _warnings

    from anatcl_infer.encoding.encoder import encode
    from peers import onnxruntime_peer, openvino_peer, peer_pipeline

    d1, d2 = tmp / "pipe-n", tmp / "pipe-2n"
    _write_inputs(d1, n, "grid")
    _write_inputs(d2, 2 * n, "grid")
    files = {"n": sorted(d1.glob("*.nii.gz")), "2n": sorted(d2.glob("*.nii.gz"))}
    model = _model()
    from anatcl_infer.inputs.preprocess import prepare

    prepared = [torch.from_numpy(prepare(f, emit_warnings=False).array)[None] for f in files["n"]]
    fns, peers = {}, {}
    for p in precisions:
        if p not in ("fp32", "bf16"):
            continue
        for k, fl in files.items():
            fns[f"ours_{p}_{k}"] = (lambda fl=fl, p=p: encode(model, fl, precision=p, progress=False))
        runner = _runner(model, p)
        # the same N forwards on prepared volumes, in the same interleaving: the fixed cost against
        # them is robust to load that changes between sections (a busy machine)
        fns[f"ours_{p}_forwards"] = (lambda r=runner: [r(x) for x in prepared])
        if onnx_path is not None:
            peer = openvino_peer(onnx_path, p)
            if peer is not None:
                run = peer_pipeline(peer[0])
                peers[f"openvino_{p}"] = peer[1]
                for k, fl in files.items():
                    fns[f"openvino_{p}_{k}"] = (lambda fl=fl, run=run: run(fl))
    if onnx_path is not None and "fp32" in precisions:
        peer = onnxruntime_peer(onnx_path)
        if peer is not None:
            run = peer_pipeline(peer[0])
            peers["onnxruntime_fp32"] = peer[1]
            for k, fl in files.items():
                fns[f"onnxruntime_fp32_{k}"] = (lambda fl=fl, run=run: run(fl))
    with _warnings.catch_warnings(), torch.inference_mode():
        _warnings.simplefilter("ignore")
        best = _interleaved(fns, repeat)
    out: dict = {"n": n, "repeat": repeat, "precisions": {}}
    for p in precisions:
        if f"ours_{p}_n" not in best:
            continue
        fwd = forward["precisions"][p]["s_per_volume"]
        ours = (best[f"ours_{p}_2n"] - best[f"ours_{p}_n"]) / n
        entry = {"encode_marginal_s": ours, "encode_t_n_s": best[f"ours_{p}_n"], "encode_t_2n_s": best[f"ours_{p}_2n"],
                 "forward_s": fwd, "fixed_cost_s": best[f"ours_{p}_n"] - n * fwd, "target_fixed_cost_s": 0.5,
                 "fixed_cost_vs_interleaved_forwards_s": best[f"ours_{p}_n"] - best[f"ours_{p}_forwards"], "peers": {}}
        for name, desc in peers.items():
            if name.endswith(p):
                marginal = (best[f"{name}_2n"] - best[f"{name}_n"]) / n
                entry["peers"][name.rsplit("_", 1)[0]] = {**desc, "marginal_s": marginal, "t_n_s": best[f"{name}_n"]}
        if entry["peers"]:
            fastest = min(entry["peers"].values(), key=lambda d: d["marginal_s"])
            entry["best_peer"] = fastest["engine"]
            entry["ratio_vs_best_peer"] = ours / fastest["marginal_s"]
        out["precisions"][p] = entry
    return out


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


#: Runs its arguments and reports their peak RSS. The benchmark process itself holds several GB (models of
#: every engine); a child spawned straight from it inherits that as its ru_maxrss (Linux keeps the
#: pre-exec image's high-water mark), which inflated the RSS rows before issue 24. A small wrapper
#: process in between makes the figure the CLI's own.
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "sys.stderr.write('\\nMAXRSS_KIB %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def _run_embed(model_dir: Path, inputs: Path, out: Path, extra: list[str] | None = None, device: str = "cpu") -> tuple[float, int]:
    """Run `anatcl embed` in a fresh process; return (wall seconds, its peak RSS in MiB)."""
    cmd = [sys.executable, "-c", _RSS_WRAPPER, sys.executable, "-m", "anatcl_infer", "embed", str(inputs), "--out", str(out),
           "--model", str(model_dir), "--device", device, "--quiet", "--overwrite", *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t0
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"anatcl embed failed: {err}")
    kib = [int(line.split()[1]) for line in err.splitlines() if line.startswith("MAXRSS_KIB ")]
    return wall, kib[-1] // 1024 if kib else -1


def bench_embed(tmp: Path, model_dir: Path, forward_s: float, n: int, repeat: int, precision: str = "fp32") -> dict:
    res = {}
    for kind, target in (("grid", 1.05), ("1mm", 1.20)):
        d1, d2 = tmp / f"{kind}-n", tmp / f"{kind}-2n"
        if not d1.exists():
            _write_inputs(d1, n, kind)
            _write_inputs(d2, 2 * n, kind)
        extra = ["--precision", precision]
        t1s, t2s = [], []
        for _ in range(repeat):  # interleaved, so drift hits both sizes alike; min = least disturbed
            t1s.append(_run_embed(model_dir, d1, tmp / "o1.parquet", extra)[0])
            t2s.append(_run_embed(model_dir, d2, tmp / "o2.parquet", extra)[0])
        t1, t2 = min(t1s), min(t2s)
        marginal = (t2 - t1) / n
        res[kind] = {"n": n, "precision": precision, "t_n_s": t1, "t_2n_s": t2, "marginal_s_per_vol": marginal,
                     "forward_s": forward_s, "ratio_vs_forward": marginal / forward_s, "target": target}
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


def _flops() -> dict:
    """FLOPs of one volume: torch's FLOP counter on the eager module, and a count from the conv/linear shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model()
    model.encoder.fused = False
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, torch.nn.Conv3d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
            macs += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, torch.nn.Linear):
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(SHAPE))
    for h in handles:
        h.remove()
    return {"torch_flop_counter": float(counter.get_total_flops()), "from_shapes": 2.0 * macs}


def bench_gpu(tmp: Path | None = None, model_dir: Path | None = None, n_embed: int = 256) -> dict:
    """CUDA sweep: batch x precision x channels-last-3d x cudnn.benchmark (model only), then
    `anatcl embed` end to end on ``n_embed`` on-grid volumes per precision."""
    if not torch.cuda.is_available():
        return {"available": False}
    dev = torch.device("cuda")
    model = _model().to(dev)
    out: dict = {"available": True, "name": torch.cuda.get_device_name(0), "rows": [], "embed": []}
    x1 = _volume().to(dev)
    with torch.inference_mode():
        ref = model(x1).float()
    precisions = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    for cl in (False, True):
        m = model.to(memory_format=torch.channels_last_3d) if cl else model.to(memory_format=torch.contiguous_format)
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            for p in precisions:
                for bs in (1, 4, 8, 16, 32):
                    x = x1.repeat(bs, 1, 1, 1, 1)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last_3d)

                    def step():
                        with torch.inference_mode(), torch.autocast("cuda", dtype=_DTYPE[p], enabled=p != "fp32"):
                            y = m(x)
                        torch.cuda.synchronize()
                        return y

                    try:
                        y = step()
                        t = statistics.median(_timeit(step, 5))
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        continue
                    diff = float(((y[:1].float() - ref).abs().max() / ref.abs().max()).item())
                    cos = float(torch.nn.functional.cosine_similarity(y[:1].float(), ref).min())
                    out["rows"].append({"channels_last": cl, "cudnn_benchmark": bench_mode, "precision": p,
                                        "batch": bs, "vol_per_s": bs / t, "max_rel_diff_vs_fp32": diff,
                                        "cosine_vs_fp32": cos})
    torch.backends.cudnn.benchmark = False
    model.to(memory_format=torch.contiguous_format)
    if tmp is not None and model_dir is not None and n_embed:
        d = tmp / "gpu-embed"
        _write_inputs(d, n_embed, "grid")
        for p in precisions:
            wall, rss = _run_embed(model_dir, d, tmp / "g.parquet", ["--precision", p, "--batch-size", "32"], device="cuda")
            out["embed"].append({"precision": p, "n": n_embed, "wall_s": wall, "vol_per_s": n_embed / wall, "rss_mib": rss})
    return out


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


def _peer_name(d: dict) -> str:
    return f"{d['engine']} {d['version']}"


def _table(rec: dict) -> str:
    """The README's performance table (Markdown) from a JSON record."""
    lines = ["| measure | value | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
    f = rec.get("forward")
    if f:
        for p, r in f["precisions"].items():
            label = f"forward s/volume, {p}: this package (backend {r.get('backend', 'torch')})"
            if r.get("peers"):
                best = min(r["peers"].values(), key=lambda d: d["s_per_volume"])
                lines.append(f"| {label} | {r['s_per_volume']:.3f} | fastest peer: {_peer_name(best)} {best['s_per_volume']:.3f} "
                             f"| {r['ratio_vs_best_peer']:.2f} | <= 1.00 | {_met(r['ratio_vs_best_peer'] <= 1.0)} |")
                for d in sorted(r["peers"].values(), key=lambda d: d["s_per_volume"]):
                    cfg = d["config"] if isinstance(d["config"], str) else ", ".join(f"{k}={v}" for k, v in d["config"].items())
                    lines.append(f"| forward s/volume, {p}: peer {_peer_name(d)} (ONNX export, {cfg}) | {d['s_per_volume']:.3f} "
                                 f"| this package {r['s_per_volume']:.3f} | {d['s_per_volume'] / r['s_per_volume']:.2f} | - | - |")
            else:
                lines.append(f"| {label} | {r['s_per_volume']:.3f} | - | - | - | - |")
            if r.get("backend", "torch") != "torch":
                lines.append(f"| forward s/volume, {p}: this package, backend torch (fused oneDNN plan) | {r['torch_s']:.3f} "
                             f"| this package {r['s_per_volume']:.3f} | {r['torch_s'] / r['s_per_volume']:.2f} | - | - |")
        lines.append(f"| forward s/volume, fp32: the eager torch module (before issue 15) | {f['eager_s']:.3f} "
                     f"| this package {f['precisions']['fp32']['s_per_volume']:.3f} | {f['eager_s'] / f['precisions']['fp32']['s_per_volume']:.2f} | - | - |")
    pl = rec.get("pipeline")
    if pl:
        for p, r in pl["precisions"].items():
            if r.get("peers"):
                best = min(r["peers"].values(), key=lambda d: d["marginal_s"])
                lines.append(f"| `encode(files)` marginal s/volume, {p}, on-grid .nii.gz | {r['encode_marginal_s']:.3f} "
                             f"| fastest peer pipeline: {_peer_name(best)} + nibabel read + crop {best['marginal_s']:.3f} "
                             f"| {r['ratio_vs_best_peer']:.2f} | <= 1.00 | {_met(r['ratio_vs_best_peer'] <= 1.0)} |")
                for d in sorted(r["peers"].values(), key=lambda d: d["marginal_s"]):
                    lines.append(f"| peer pipeline s/volume, {p}: nibabel read + crop + {_peer_name(d)} | {d['marginal_s']:.3f} "
                                 f"| `encode` {r['encode_marginal_s']:.3f} | {d['marginal_s'] / r['encode_marginal_s']:.2f} | - | - |")
            else:
                lines.append(f"| `encode(files)` marginal s/volume, {p}, on-grid .nii.gz | {r['encode_marginal_s']:.3f} | - | - | - | - |")
            lines.append(f"| fixed cost of an `encode` on {pl['n']} files, {p} (s) | {r['fixed_cost_s']:+.2f} "
                         f"| {pl['n']} forwards {pl['n'] * r['forward_s']:.2f} | - | <= +{r['target_fixed_cost_s']:.1f} | {_met(r['fixed_cost_s'] <= r['target_fixed_cost_s'])} |")
    pk = rec.get("peak")
    if pk:
        for p, r in pk["precisions"].items():
            lines.append(f"| forward {p} vs machine peak ({pk['threads']} threads, {pk['gflop_per_volume']:.1f} GFLOP/volume) | {r['forward_gflops']:.0f} GFLOP/s "
                         f"| peak {r['peak_gflops']:.0f} GFLOP/s (matmul {r['matmul_gflops']:.0f}, conv3d {r['conv3d_gflops']:.0f}) "
                         f"| {100 * r['fraction_of_peak']:.0f} % of peak | - | - |")
    fid = rec.get("fidelity")
    if fid:
        if "fp32_max_rel_diff_vs_float64" in fid:
            v = fid["fp32_max_rel_diff_vs_float64"]
            lines.append(f"| fp32 (backend {fid.get('fp32_backend', 'torch')}) vs a float64 forward, {fid['n_float64']} subjects: max rel. diff. "
                         f"| {v:.1e} | float64 | - | <= 1e-05 | {_met(v <= fid['fp32_target_rel_diff'])} |")
        for p, r in fid["precisions"].items():
            lines.append(f"| {p} (backend {r.get('backend', 'torch')}) vs fp32, {fid['n_subjects']} simulated subjects: min cosine (max rel. diff.) "
                         f"| {r['cosine_min']:.7f} ({r['max_rel_diff']:.1e}) | fp32 | - | >= {r['target_cosine']} | {_met(r['cosine_min'] >= r['target_cosine'])} |")
            others = r.get("others", {})
            peer = others.get(f"openvino_peer_{p}")
            ref_txt = f"OpenVINO peer {peer['centred_cosine_min']:.4f} / {peer['centred_cosine_mean']:.4f}" if peer else "fp32"
            ok = "-" if not peer else _met(r["centred_cosine_mean"] >= peer["centred_cosine_mean"] - 1e-6)
            lines.append(f"| {p} vs fp32: cosine of subject differences (row minus cohort mean), min / mean "
                         f"| {r['centred_cosine_min']:.4f} / {r['centred_cosine_mean']:.4f} | {ref_txt} | - | {'>= peer' if peer else '-'} | {ok} |")
            tb = others.get(f"torch_{p}")
            if tb and r.get("backend") != "torch":
                lines.append(f"| {p} vs fp32, backend torch (autocast): subject-difference cosine min / mean "
                             f"| {tb['centred_cosine_min']:.4f} / {tb['centred_cosine_mean']:.4f} | - | - | - | - |")
            lines.append(f"| {p} vs fp32: linear-probe age MAE (5-fold CV) | {r['probe_mae_years']:.2f} y | fp32 {fid['fp32_probe_mae_years']:.2f} y "
                         f"| {r['probe_mae_change_years']:+.2f} y | - | - |")
    for p, emb in (rec.get("embed") or {}).items():
        for kind, e in emb.items():
            label = "on-grid .nii.gz" if kind == "grid" else "1 mm, resampled"
            lines.append(f"| `anatcl embed` marginal s/volume, {p}, {label} | {e['marginal_s_per_vol']:.3f} | forward {p} {e['forward_s']:.3f} "
                         f"| {e['ratio_vs_forward']:.3f} | <= {e['target']:.2f} | {_met(e['ratio_vs_forward'] <= e['target'])} |")
    r = rec.get("rss")
    if r:
        lines.append(f"| peak RSS, {4 * r['n']} vs {r['n']} inputs (MiB) | {r['rss_4n_mib']} | {r['rss_n_mib']} | {r['ratio']:.3f} | <= 1.10 | {_met(r['ratio'] <= 1.10)} |")
    c = rec.get("cold")
    if c:
        lines.append(f"| cold start, one file (s) | {c['wall_s']:.2f} | forward {c['forward_s']:.2f} | +{c['overhead_s']:.2f} s | <= +4 s | {_met(c['overhead_s'] <= 4)} |")
    return "\n".join(lines)


def _gpu_table(gpu: dict) -> str:
    lines = [f"GPU: {gpu['name']}", "", "| channels-last | cudnn.benchmark | precision | batch | vol/s | max rel. diff. vs fp32 | cosine vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in gpu["rows"]:
        lines.append(f"| {r['channels_last']} | {r['cudnn_benchmark']} | {r['precision']} | {r['batch']} | {r['vol_per_s']:.1f} | {r['max_rel_diff_vs_fp32']:.2e} | {r['cosine_vs_fp32']:.6f} |")
    for e in gpu.get("embed", []):
        lines.append(f"\n`anatcl embed` on {e['n']} volumes, {e['precision']}, batch 32: {e['wall_s']:.1f} s ({e['vol_per_s']:.1f} vol/s), peak RSS {e['rss_mib']} MiB")
    return "\n".join(lines)


README_START = "<!-- benchmark-table:start (generated by benchmarks/run.py --write-readme) -->"
README_END = "<!-- benchmark-table:end -->"


def _readme_block(rec: dict, record_path: str) -> str:
    m = rec["machine"]
    head = (f"Measured by `python benchmarks/run.py --write-readme` on {m['cpus']} cores of {m.get('cpu_model', m['processor'])} "
            f"({m['processor']}, native bf16: {m.get('native_bf16')}), torch {m['torch']}, Python {m['python']}, "
            f"{m['threads']} threads, {rec['date']}; timings are the best of interleaved repetitions in one process, "
            f"every row a ratio against a reference measured in the same run (record: `{record_path}`).")
    gpu = rec.get("gpu") or {}
    if gpu.get("available"):
        tail = "\n\n" + _gpu_table(gpu)
    else:
        tail = ("\n\nGPU: **not measured.** No GPU was available to this run, so there are no GPU numbers; "
                "`python benchmarks/run.py` runs the GPU sweep whenever CUDA is available.")
    return f"{README_START}\n{head}\n\n{_table(rec)}{tail}\n{README_END}"


def write_readme(rec: dict, record_path: str, readme: Path = ROOT / "README.md") -> None:
    """Replace the block between the README's benchmark markers (atomically)."""
    text = readme.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme} has no benchmark markers ({README_START!r} ... {README_END!r})")
    new = text[:i] + _readme_block(rec, record_path) + text[j + len(README_END):]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="sections to run")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and inputs")
    parser.add_argument("--n", type=int, default=None, help="inputs N for the embed and RSS sections (default 16)")
    parser.add_argument("--subjects", type=int, default=40, help="simulated subjects for the fidelity section")
    parser.add_argument("--n-pipeline", type=int, default=4, help="files N of the pipeline section (N and 2N; the fixed cost is of N)")
    parser.add_argument("--precisions", nargs="*", default=None, help="default: fp32 plus what the CPU runs natively")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--write-readme", action="store_true", help="replace the README's performance table")
    parser.add_argument("--readme-from", type=Path, default=None, help="only regenerate the README table from a JSON record")
    args = parser.parse_args()
    if args.readme_from:
        rec = json.loads(args.readme_from.read_text())
        src = args.readme_from.resolve()
        write_readme(rec, str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src))
        print(_table(rec))
        return
    sections = set(args.only or ["forward", "peak", "pipeline", "fidelity", "embed", "rss", "cold", "gpu"])
    repeat = 3 if args.quick else 7
    n = args.n or (4 if args.quick else 16)
    precisions = args.precisions or _precisions()
    from anatcl_infer.model.devices import native_bf16_cpu

    rec: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_model": _cpu_model(), "native_bf16": native_bf16_cpu(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    t_start = time.perf_counter()
    # The CLI tunes the allocator (anatcl_infer.allocator); give the in-process forwards the same
    # setting so the ratios compare like with like.
    from anatcl_infer.encoding.allocator import retain_freed_memory

    rec["allocator_tuned"] = retain_freed_memory()
    rec["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # One model cache for the run: the OpenVINO conversion made in this process is reused by the
        # `anatcl embed` runs below (as it would be on a user's machine), and nothing is left behind.
        os.environ["ANATCL_CACHE"] = str(tmp / "cache")
        forward = bench_forward(repeat, precisions, tmp)
        rec["forward"] = forward
        onnx_path = tmp / "peer.onnx"
        print(f"forward: {forward}", file=sys.stderr)
        if "peak" in sections:
            rec["peak"] = bench_peak(precisions, max(3, repeat // 2), forward)
            print(f"peak: {rec['peak']}", file=sys.stderr)
        if "pipeline" in sections:
            rec["pipeline"] = bench_pipeline(tmp, forward, precisions, args.n_pipeline, max(3, repeat - 2), onnx_path)
            print(f"pipeline: {rec['pipeline']}", file=sys.stderr)
        if "fidelity" in sections and len(precisions) > 1:
            rec["fidelity"] = bench_fidelity(precisions, 20 if args.quick else args.subjects, onnx_path)
            print(f"fidelity: {rec['fidelity']}", file=sys.stderr)
        model_dir = save_pretrained(_model(), tmp / "model")
        if "embed" in sections:
            rec["embed"] = {}
            for p in precisions:
                rec["embed"][p] = bench_embed(tmp, model_dir, forward["precisions"][p]["s_per_volume"], n,
                                              1 if args.quick else 3, p)
                print(f"embed {p}: {rec['embed'][p]}", file=sys.stderr)
        if "rss" in sections:
            rec["rss"] = bench_rss(tmp, model_dir, n)
            print(f"rss: {rec['rss']}", file=sys.stderr)
        if "cold" in sections:
            rec["cold"] = bench_cold(tmp, model_dir, forward["precisions"]["fp32"]["s_per_volume"])
            print(f"cold: {rec['cold']}", file=sys.stderr)
        if "gpu" in sections:
            rec["gpu"] = bench_gpu(tmp, model_dir)
    rec["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    print(f"## Benchmark ({rec['machine']['cpu_model']}, {rec['machine']['cpus']} CPUs, torch {rec['machine']['torch']}, {rec['date']})\n")
    print(_table(rec))
    if rec.get("gpu", {}).get("available"):
        print("\n" + _gpu_table(rec["gpu"]))
    print(f"\nJSON record: {rel} ({rec['wall_s']:.0f} s)")
    if args.write_readme:
        write_readme(rec, rel)
        print("README.md performance table regenerated")


if __name__ == "__main__":
    main()
