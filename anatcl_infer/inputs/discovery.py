"""Finding the images to embed: files, folders, globs, lists of paths and BIDS datasets.

:func:`discover_inputs` turns what a user types after ``anatcl embed`` into a sorted,
de-duplicated list of :class:`InputRecord` with absolute paths and the BIDS entities
(subject, session, run, acquisition) parsed from file and folder names.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .io import NIFTI_SUFFIXES, _printable

__all__ = ["InputRecord", "discover_inputs", "parse_entities", "is_nifti_name", "skip_reason", "LIST_SUFFIXES"]

logger = logging.getLogger(__name__)

#: Suffixes of text files holding one path per line.
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".lst")

_ENTITY_KEYS = {"subject": "sub", "session": "ses", "run": "run", "acquisition": "acq"}
# An entity anywhere in a file name, so CAT12 prefixes ("mwp1sub-01", "wmsub-01") are understood.
_ENTITY_RE = {key: re.compile(rf"{tag}-([A-Za-z0-9]+)") for key, tag in _ENTITY_KEYS.items()}
_FOLDER_RE = {key: re.compile(rf"^{tag}-([A-Za-z0-9]+)$") for key, tag in _ENTITY_KEYS.items() if key in ("subject", "session")}
_GLOB_CHARS = re.compile(r"[*?\[]")
_GM_NAME = re.compile(r"mwp1|desc-gm", re.IGNORECASE)
_SMOOTHED_PREFIX = re.compile(r"^s\d*mwp1", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class InputRecord:
    """One input image and the BIDS entities found in its name or folders.

    Attributes:
        path: absolute path of the image.
        subject: ``sub-`` label without the prefix (``"01"``), or ``None``.
        session: ``ses-`` label, or ``None``.
        run: ``run-`` label, or ``None``.
        acquisition: ``acq-`` label, or ``None``.

    Example:
        >>> InputRecord("/data/sub-01_T1w.nii.gz", subject="01").subject
        '01'
    """

    path: str
    subject: str | None = None
    session: str | None = None
    run: str | None = None
    acquisition: str | None = None


def is_nifti_name(name: str) -> bool:
    """Whether a file name ends in ``.nii`` or ``.nii.gz`` (any case) and is not hidden.

    Example:
        >>> is_nifti_name("mwp1sub-01.nii"), is_nifti_name("._mwp1sub-01.nii")
        (True, False)
    """
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(NIFTI_SUFFIXES)


def parse_entities(path: str | os.PathLike[str]) -> dict[str, str | None]:
    """BIDS entities from a file name, then from its parent folders (``sub-*``, ``ses-*``).

    CAT12-style names with a prefix (``mwp1sub-01_ses-1_T1w.nii``) are understood.

    Example:
        >>> parse_entities("/bids/derivatives/cat12/sub-02/mri/mwp1sub-02_ses-1_run-2_T1w.nii")
        {'subject': '02', 'session': '1', 'run': '2', 'acquisition': None}
    """
    p = Path(path)
    name = p.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    found: dict[str, str | None] = {}
    for key, pattern in _ENTITY_RE.items():
        match = pattern.search(name)
        found[key] = match.group(1) if match else None
    for key, pattern in _FOLDER_RE.items():
        if found[key] is not None:
            continue
        for parent in p.parents:
            match = pattern.match(parent.name)
            if match:
                found[key] = match.group(1)
                break
    return found


def _record(path: str) -> InputRecord:
    """An :class:`InputRecord` for one absolute path."""
    return InputRecord(path=path, **parse_entities(path))


def _walk_nifti(root: Path, problems: list[tuple[str, str, str]] | None = None) -> list[str]:
    """Every visible ``.nii``/``.nii.gz`` file under ``root``, recursively (hidden folders skipped).

    A folder that cannot be listed is added to ``problems`` (and logged), not skipped silently.
    """
    found = []
    seen: set[str] = set()

    def unlistable(exc: OSError) -> None:
        where = _printable(os.fsdecode(exc.filename) if exc.filename else str(root))
        message = f"folder cannot be listed ({exc.strerror or exc}); its images were not searched — check its permissions"
        logger.warning("%s: %s", where, message)
        if problems is not None:
            problems.append((where, "discover", message))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unlistable):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symbolic link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_nifti_name(f))
        # a folder named like an image (x.nii.gz) is listed too: reading reports it, nothing vanishes
        found.extend(os.path.join(dirpath, d) for d in dirnames if is_nifti_name(d))
    return found


#: Why a file in a folder of CAT12/deepmriprep output is not taken for a grey-matter map, by its name (first match).
_SKIP_REASONS = (
    (re.compile(r"^s\d*mwp1", re.IGNORECASE), "a smoothed grey-matter map (s*mwp1); the model expects the unsmoothed mwp1 map"),
    (re.compile(r"^[mwr]*p2|desc-wm", re.IGNORECASE), "a white-matter map"),
    (re.compile(r"^[mwr]*p3|desc-csf", re.IGNORECASE), "a CSF map"),
    (re.compile(r"^[wr]*p1", re.IGNORECASE), "a grey-matter map that is not both modulated and normalised (the model expects mwp1)"),
    (re.compile(r"^[mwr]*p0", re.IGNORECASE), "a tissue label map (p0)"),
    (re.compile(r"t1w", re.IGNORECASE), "a T1 image"),
)
#: How many skipped files one log line names.
_SHOWN = 5


def skip_reason(name: str) -> str:
    """Why a folder scan for grey-matter maps skips a NIfTI file of this name.

    Example:
        >>> skip_reason("s6mwp1sub-01_T1w.nii"), skip_reason("wmsub-01_T1w.nii")
        ('a smoothed grey-matter map (s*mwp1); the model expects the unsmoothed mwp1 map', 'a T1 image')
    """
    base = os.path.basename(name)
    for pattern, reason in _SKIP_REASONS:
        if pattern.search(base):
            return reason
    return "not named like a grey-matter map (mwp1*, *desc-gm*)"


def _skipped_text(where: str, paths: Sequence[str]) -> str:
    """Up to five skipped files (relative to ``where``), each with why, and how to include them: for one log line."""
    root = Path(where)

    def shown(p: str) -> str:
        try:
            return os.path.relpath(p, root) if Path(p).is_relative_to(root) else p
        except ValueError:
            return p

    ordered = sorted(paths)
    names = "; ".join(f"{_printable(shown(p))} ({skip_reason(p)})" for p in ordered[:_SHOWN])
    more = f"; and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return (f"skipping {len(paths)} NIfTI file{'' if len(paths) == 1 else 's'} that are not unsmoothed grey-matter "
            f"maps by name (mwp1*, *desc-gm*): {names}{more}; to embed them anyway, give them explicitly "
            "(as files, or listed in a .txt file of paths)")


def _gm_only(
    paths: list[str], where: str, *, folder_scan: bool = True, skipped: list[tuple[str, str]] | None = None,
) -> list[str]:
    """Keep the unsmoothed grey-matter maps (``mwp1``/``desc-gm``) when there are any; name the others.

    A folder scan says in one WARNING line (INFO for a dataset search, or when the caller
    collects ``skipped`` to report them itself) which files it skipped and why.
    """
    gm = [p for p in paths if _GM_NAME.search(os.path.basename(p))]
    unsmoothed = [p for p in gm if not _SMOOTHED_PREFIX.match(os.path.basename(p))]
    chosen = unsmoothed or gm
    kept = set(chosen)
    left = [p for p in paths if p not in kept] if chosen else []
    if skipped is not None and folder_scan:
        skipped.extend((p, skip_reason(p)) for p in sorted(left))
    if gm and not unsmoothed:
        logger.warning(
            "%s holds only smoothed grey-matter maps (e.g. s6mwp1); the model expects unsmoothed CAT12 mwp1 maps — "
            "embedding them anyway, but give the mwp1 files CAT12 wrote before smoothing%s",
            where, f"; {_skipped_text(where, left)}" if left else "",
        )
    elif left:
        level = logging.WARNING if folder_scan and skipped is None else logging.INFO
        logger.log(level, "%s: %s", _printable(where), _skipped_text(where, left))
    return chosen or paths


def _bids(root: Path, input_kind: str, searched: list[str], problems: list[tuple[str, str, str]] | None = None) -> list[str]:
    """Images of a BIDS dataset for a model taking ``input_kind``."""
    if input_kind == "t1":
        patterns = ["sub-*/anat/*_T1w.nii", "sub-*/anat/*_T1w.nii.gz", "sub-*/ses-*/anat/*_T1w.nii", "sub-*/ses-*/anat/*_T1w.nii.gz"]
        searched.extend(str(root / pat) for pat in patterns[1::2])
        return sorted({os.fspath(p) for pat in patterns for p in root.glob(pat) if is_nifti_name(p.name)})
    derivatives = root / "derivatives"
    searched.append(f"{derivatives}/**/*mwp1*.nii[.gz] and *desc-gm*.nii[.gz]")
    candidates = [p for p in _walk_nifti(derivatives, problems) if _GM_NAME.search(os.path.basename(p))] if derivatives.is_dir() else []
    if not candidates:
        searched.append(f"{root}/**/*mwp1*.nii[.gz] and *desc-gm*.nii[.gz]")
        candidates = [p for p in _walk_nifti(root, problems) if _GM_NAME.search(os.path.basename(p))]
    # a dataset search, not a folder scan: the raw images and other tissue maps are expected to stay out
    return _gm_only(candidates, str(root), folder_scan=False) if candidates else []


def _read_list(list_file: Path) -> list[str]:
    """Paths listed in a text file (one per line, ``#`` comments, relative to the file)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the list of inputs ({exc}); give a UTF-8 text file with one path per line", path=str(list_file), stage="discover") from None
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entry_path = Path(os.path.expanduser(entry))
        if not entry_path.is_absolute():
            entry_path = list_file.parent / entry_path
        paths.append(os.fspath(entry_path))
    return paths


def _expand(
    spec: str, input_kind: str, searched: list[str], *, from_list: bool, problems: list[tuple[str, str, str]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> list[str]:
    """All image paths one spec stands for."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if (path / "dataset_description.json").is_file():
            logger.info("%s is a BIDS dataset; looking for %s inputs", path, input_kind)
            return _bids(path, input_kind, searched, problems)
        searched.append(f"{path}/**/*.nii[.gz]")
        found = _walk_nifti(path, problems)
        return _gm_only(found, str(path), skipped=skipped) if input_kind == "gm" else found
    if path.is_file():
        if path.suffix.lower() in LIST_SUFFIXES:
            if from_list:
                raise InputError("lists of inputs cannot include other lists; list the image files", path=str(path), stage="discover")
            searched.append(f"paths listed in {path}")
            out: list[str] = []
            for entry in _read_list(path):
                if Path(entry).exists() or _GLOB_CHARS.search(entry):
                    out.extend(_expand(entry, input_kind, searched, from_list=True, problems=problems))
                else:
                    logger.warning("%s lists %s, which does not exist; it will be reported as a failed input", path, entry)
                    out.append(entry)
            return out
        searched.append(str(path))
        return [os.fspath(path)]
    if _GLOB_CHARS.search(spec):
        searched.append(f"glob {spec}")
        out = []
        for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
            m = Path(match)
            if m.is_dir():
                out.extend(_expand(match, input_kind, searched, from_list=from_list, problems=problems, skipped=skipped))
            elif is_nifti_name(m.name):
                out.append(match)
        return out
    if from_list or problems is not None or os.path.lexists(path):
        # a missing explicit file (or a broken link, a FIFO...) is one failed input, reported when read
        return [spec]
    raise InputError("does not exist; check the path (quote glob patterns so the shell leaves them to anatcl)", path=spec, stage="discover")


def discover_inputs(
    specs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[str | os.PathLike[str]],
    *,
    input_kind: str = "gm",
    problems: list[tuple[str, str, str]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> list[InputRecord]:
    """Expand files, folders, glob patterns, lists of paths and BIDS datasets into inputs.

    * a file: taken as it is (``.txt``/``.lst`` files are lists of paths, one per line,
      ``#`` starts a comment line, relative paths are relative to the list file; listed
      paths that do not exist are kept, so that reading reports them as failed inputs);
    * a folder: every ``.nii``/``.nii.gz`` below it (hidden files and folders skipped);
      for grey-matter models, when the folder holds CAT12/deepmriprep output, only the
      unsmoothed grey-matter maps (``mwp1*``, ``*desc-gm*``) are kept, and one WARNING line
      names (up to five of) the NIfTI files skipped and why (:func:`skip_reason`);
    * a glob pattern (``data/**/mwp1*.nii``): the matching NIfTI files and folders;
    * a BIDS dataset root (it has ``dataset_description.json``): for ``t1`` models
      ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``; for ``gm`` models the CAT12/deepmriprep maps
      under ``derivatives/`` (``*mwp1*``, ``*desc-gm*``), else anywhere in the dataset.

    Args:
        specs: one spec or several.
        input_kind: the model's input kind, ``"gm"`` or ``"t1"``.
        problems: when a list is given, what cannot be searched is appended to it as
            ``(spec or folder, "discover", message)`` instead of raising: an explicit spec
            that yields no image, a folder that cannot be listed. A missing explicit file is
            then kept as an input (so reading reports it as one failed input, and the
            others still run). Without a list, a folder that cannot be listed is logged and
            a missing explicit path raises.
        skipped: when a list is given, the NIfTI files a folder scan skipped are appended to it
            as ``(path, reason)`` and the caller reports them (the log line is then INFO, not WARNING).

    Returns:
        Records sorted by path, without duplicates, with absolute paths.

    Raises:
        InputError: (``stage="discover"``) a spec does not exist, or nothing was found —
            the message lists what was searched.

    Example:
        >>> records = discover_inputs(["examples/data"])
        >>> [r.subject for r in records]
        ['mni01', 'mni02', 'mni03']
    """
    if input_kind not in ("gm", "t1"):
        raise InputError(f"input_kind must be 'gm' or 't1', got {input_kind!r}", stage="discover")
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    spec_list = [os.fspath(s) for s in specs]
    if not spec_list:
        raise InputError("no inputs given; pass image files, folders, glob patterns, a .txt list or a BIDS dataset", stage="discover")
    searched: list[str] = []
    paths: dict[str, None] = {}
    for spec in spec_list:
        found_here = _expand(spec, input_kind, searched, from_list=False, problems=problems, skipped=skipped)
        if not found_here and problems is not None:
            message = (
                "yields no input image (no .nii/.nii.gz file"
                + (", no CAT12/deepmriprep mwp1 map" if input_kind == "gm" else "")
                + " found there); check the path"
            )
            logger.warning("%s: %s", _printable(spec), message)
            problems.append((_printable(spec), "discover", message))
        for found in found_here:
            paths.setdefault(os.path.abspath(found), None)
    if not paths:
        what = "; ".join(dict.fromkeys(searched))
        raise InputError(
            f"no input images found (searched: {what}); inputs are .nii/.nii.gz files"
            + (" — for grey-matter models, CAT12/deepmriprep mwp1 maps" if input_kind == "gm" else ""),
            stage="discover",
        )
    return [_record(p) for p in sorted(paths)]
