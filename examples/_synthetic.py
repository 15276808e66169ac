"""Small synthetic-but-anatomical data for the examples, so they run offline in seconds.

Each "subject" is the MNI152 grey-matter map shipped with the package, with
age-dependent grey-matter loss (global, stronger in the medial temporal lobes and
the precuneus), an optional disease pattern (extra hippocampal loss), an individual
grey-matter "reserve" (±5%, unrelated to age) and smooth
subject-specific noise. Maps are written on a coarse 4 mm MNI grid covering the
CAT12 box (46x55x46) so that an untrained demonstration model embeds them fast.

This is demonstration data: real use starts from CAT12/deepmriprep mwp1 maps at
1.5 mm and a published model (``--model anatcl-global``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from anatcl_infer.config import REFERENCE_AFFINE, ModelConfig, PreprocessConfig

#: A 4 mm grid over the same MNI box as the reference grid (x -90..90, y -126..90, z -72..108 mm).
COARSE_SHAPE = (46, 55, 46)
COARSE_AFFINE = np.array([[-4.0, 0, 0, 90.0], [0, 4.0, 0, -126.0], [0, 0, 4.0, -72.0], [0, 0, 0, 1.0]])


def coarse_config() -> PreprocessConfig:
    """Preprocessing onto the coarse demonstration grid (no crop)."""
    return PreprocessConfig(
        grid_shape=COARSE_SHAPE,
        grid_affine=COARSE_AFFINE,
        crop=tuple((0, n) for n in COARSE_SHAPE),
    )


def make_demo_model(directory: str | Path, seed: int = 0) -> Path:
    """Save an untrained AnatCL (random weights, coarse grid) as a model directory."""
    import torch

    from anatcl_infer.weights.checkpoint import save_pretrained
    from anatcl_infer.model.network import AnatCL

    torch.manual_seed(seed)
    model = AnatCL(ModelConfig(name="demo-untrained", variant="demo", fold=None, source="examples/_synthetic.py",
                               preprocess=coarse_config()))
    return save_pretrained(model, directory)


@functools.lru_cache(maxsize=1)
def _base() -> tuple[np.ndarray, np.ndarray]:
    """(GM template, MNI mm coordinates) on the coarse grid."""
    from anatcl_infer.inputs.conform import conform_to_grid
    from anatcl_infer.inputs.template import load_gm_template

    tpl = load_gm_template()
    gm, _ = conform_to_grid(np.asarray(tpl.gm), np.asarray(REFERENCE_AFFINE), COARSE_SHAPE, COARSE_AFFINE)
    idx = np.indices(COARSE_SHAPE, dtype=np.float64)
    world = np.einsum("ij,jxyz->ixyz", COARSE_AFFINE[:3, :3], idx) + COARSE_AFFINE[:3, 3, None, None, None]
    return np.clip(gm, 0, 1).astype(np.float32), world


def _bump(world: np.ndarray, centre: tuple[float, float, float], fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    return np.exp(-sum((world[i] - centre[i]) ** 2 for i in range(3)) / (2 * sigma**2))


def synthetic_gm(age: float, *, patient: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
    """One subject's grey-matter map on the coarse grid."""
    from scipy import ndimage

    rng = rng if rng is not None else np.random.default_rng(0)
    gm, world = _base()
    years = max(0.0, float(age) - 20.0)
    hippo = _bump(world, (-26, -18, -16), 24) + _bump(world, (26, -18, -16), 24)
    loss = 0.004 * years + 0.004 * years * hippo + 0.002 * years * _bump(world, (0, -56, 30), 30)
    if patient:
        loss = loss + 0.25 * hippo + 0.08 * _bump(world, (0, -56, 30), 30)
    noise = ndimage.gaussian_filter(rng.standard_normal(COARSE_SHAPE), 2.0)
    noise *= 0.06 / (noise.std() + 1e-8)
    reserve = 1.0 + rng.normal(0.0, 0.05)  # individual grey-matter volume, unrelated to age
    return (gm * np.clip(1.0 - loss, 0.2, 1.0) * reserve * (1.0 + noise)).clip(0, 1).astype(np.float32)


def write_map(path: str | Path, data: np.ndarray) -> Path:
    """Save a map on the coarse grid as float32 NIfTI."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), COARSE_AFFINE)
    img.set_data_dtype(np.float32)
    nib.save(img, str(path))
    return path


def make_cohort(
    directory: str | Path,
    n: int,
    *,
    seed: int = 0,
    patients: bool = False,
    bids: bool = False,
) -> list[dict[str, object]]:
    """Write ``n`` subjects' maps and return their rows (subject, path, age, sex, group).

    With ``bids=True`` the maps go to ``derivatives/cat12/sub-XX/anat/mwp1sub-XX_T1w.nii.gz``
    under a BIDS root with ``dataset_description.json`` and ``participants.tsv``.
    """
    rng = np.random.default_rng(seed)
    root = Path(directory)
    rows: list[dict[str, object]] = []
    for i in range(n):
        sub = f"{i + 1:03d}"
        patient = bool(patients and i % 2 == 1)
        age = float(np.round(rng.uniform(55, 85) if patients else rng.uniform(20, 85), 1))
        if bids:
            path = root / "derivatives" / "cat12" / f"sub-{sub}" / "anat" / f"mwp1sub-{sub}_T1w.nii.gz"
        else:
            path = root / f"mwp1sub-{sub}_T1w.nii.gz"
        write_map(path, synthetic_gm(age, patient=patient, rng=rng))
        rows.append({"subject": sub, "path": str(path.resolve()), "age": age,
                     "sex": str(rng.choice(["F", "M"])), "group": "patient" if patient else "control"})
    if bids:
        import json

        (root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic demo", "BIDSVersion": "1.8.0"}))
        lines = ["participant_id\tage\tsex\tgroup"] + [f"sub-{r['subject']}\t{r['age']}\t{r['sex']}\t{r['group']}" for r in rows]
        (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return rows
