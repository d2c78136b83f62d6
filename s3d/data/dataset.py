"""Finding the cases of a dataset (nnU-Net raw layout or a plain folder of images) and checking them.

nnU-Net raw layout (nnU-Net v2 documentation, "dataset format"):
`dataset.json` with `channel_names`, `labels` and `file_ending`; images in `imagesTr/CASE_XXXX<ending>`
(XXXX = channel number), labels in `labelsTr/CASE<ending>`; `imagesTs/` holds unlabeled test images.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from s3d.data.io import IMAGE_SUFFIXES, Geometry, _label_values, _load, count_nonfinite, same_grid
from s3d.errors import S3DError

# CASE_XXXX: nnU-Net's channel suffix is exactly four digits
_CHANNEL_RE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")


@dataclass
class Case:
    case_id: str
    images: list[Path]
    label: Path | None = None


@dataclass
class Dataset:
    root: Path
    cases: list[Case]
    channel_names: dict[int, str]
    labels: dict[str, int]
    file_ending: str
    kind: str
    split: str = "Tr"  # which imagesXX/ folder the cases came from ("nnunet" datasets only)


def _split_ending(name: str, endings: Iterable[str] = IMAGE_SUFFIXES) -> tuple[str, str] | None:
    lower = name.lower()
    for e in sorted(endings, key=len, reverse=True):
        if lower.endswith(e.lower()) and len(name) > len(e):
            return name[: -len(e)], name[-len(e):]
    return None


def _image_files(folder: Path, endings: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    endings = tuple(endings)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and _split_ending(p.name, endings) is not None)


def _need_folder(folder: Path) -> None:
    if not folder.exists():
        raise S3DError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise S3DError(f"{folder}: is a file, expected a folder")


def find_images(folder: str | Path, num_channels: int | None = None) -> list[Case]:
    """Cases of a folder of images (prediction input), sorted by case id.

    Files are grouped nnU-Net style (CASE_0000, CASE_0001, ... are the channels of CASE) when every
    file ends in _XXXX and every case has a _0000 file; otherwise each file is one single-channel case
    named after the file. A case whose channel files are not numbered 0..C-1, or whose channel count
    differs from `num_channels`, raises S3DError naming it.
    """
    folder = Path(folder)
    _need_folder(folder)
    files = _image_files(folder)
    if not files:
        return []
    parsed = []
    for p in files:
        stem, ending = _split_ending(p.name)
        parsed.append((p, stem, ending, _CHANNEL_RE.fullmatch(stem)))
    groups: dict[str, dict[int, list[Path]]] = {}
    grouped = all(m is not None for *_, m in parsed)
    if grouped:
        for p, _, _, m in parsed:
            groups.setdefault(m["case"], {}).setdefault(int(m["channel"]), []).append(p)
        grouped = all(0 in chans for chans in groups.values())
    if not grouped:
        cases, seen = [], {}
        for p, stem, _, _ in parsed:
            if stem in seen:
                raise S3DError(f"{p}: same case name as {seen[stem].name}; keep one file per case")
            seen[stem] = p
            cases.append(Case(case_id=stem, images=[p], label=None))
        if num_channels is not None and num_channels != 1:
            raise S3DError(f"{folder}: files are not named CASE_0000{parsed[0][2]}, CASE_0001... but the model "
                           f"needs {num_channels} channels per case")
        return cases
    cases, problems = [], []
    for case_id in sorted(groups):
        chans = groups[case_id]
        dup = [ps for ps in chans.values() if len(ps) > 1]
        if dup:
            problems.append(f"case {case_id} has two files for one channel ({dup[0][0].name}, {dup[0][1].name})")
            continue
        idx = sorted(chans)
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            problems.append(f"case {case_id} lacks channel file(s) " + ", ".join(f"_{c:04d}" for c in missing))
            continue
        if num_channels is not None and len(idx) != num_channels:
            problems.append(f"case {case_id} has {len(idx)} channel file(s), the model needs {num_channels}")
            continue
        cases.append(Case(case_id=case_id, images=[chans[c][0] for c in idx], label=None))
    if problems:
        more = f" (and {len(problems) - 1} more case(s))" if len(problems) > 1 else ""
        raise S3DError(f"{folder}: {problems[0]}{more}")
    return cases


def _read_dataset_json(path: Path) -> tuple[dict[int, str], dict[str, int], str]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise S3DError(f"{path}: cannot read dataset.json ({' '.join(str(e).split())})") from e
    if not isinstance(d, dict):
        raise S3DError(f"{path}: dataset.json must hold a JSON object")
    # "modality" is the nnU-Net v1 / Medical Segmentation Decathlon name of channel_names
    raw_channels = d.get("channel_names", d.get("modality"))
    if not isinstance(raw_channels, dict) or not raw_channels:
        raise S3DError(f"{path}: dataset.json needs \"channel_names\", e.g. {{\"0\": \"CT\"}}")
    try:
        channel_names = {int(k): str(v) for k, v in raw_channels.items()}
    except ValueError as e:
        raise S3DError(f"{path}: channel_names keys must be channel numbers (\"0\", \"1\", ...)") from e
    if sorted(channel_names) != list(range(len(channel_names))):
        raise S3DError(f"{path}: channel_names must be numbered 0..{len(channel_names) - 1}, got "
                       f"{sorted(channel_names)}")
    raw_labels = d.get("labels")
    if not isinstance(raw_labels, dict) or not raw_labels:
        raise S3DError(f"{path}: dataset.json needs \"labels\", e.g. {{\"background\": 0, \"tumor\": 1}}")
    if all(isinstance(v, str) for v in raw_labels.values()) and all(str(k).isdigit() for k in raw_labels):
        # nnU-Net v1 / Decathlon layout: {"0": "background", "1": "anterior"}
        raw_labels = {v: int(k) for k, v in raw_labels.items()}
    labels: dict[str, int] = {}
    for name, value in raw_labels.items():
        if isinstance(value, (list, tuple)):
            raise S3DError(f"{path}: label \"{name}\" is a region {value}; s3d supports one integer value per "
                           "label, not nnU-Net region-based training")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise S3DError(f"{path}: label \"{name}\" has value {value!r}; label values must be integers")
        labels[str(name)] = int(value)
    values = sorted(set(labels.values()))
    if values != list(range(len(values))):
        # nnU-Net's rule too (verify_dataset_integrity); a gap also sizes the network's output and every
        # one-hot map by the largest value, so {"tumor": 60000} would allocate 60001 channels per voxel
        raise S3DError(f"{path}: label values must be consecutive 0, 1, 2, ... (nnU-Net's rule), got "
                       f"{', '.join(str(v) for v in values[:10])}{', ...' if len(values) > 10 else ''}")
    ending = d.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise S3DError(f"{path}: file_ending must be a string such as \".nii.gz\", got {ending!r}")
    return channel_names, labels, ending


def find_dataset(root: str | Path, split: str = "Tr") -> Dataset:
    """The cases of `root`: an nnU-Net raw dataset (with dataset.json) or a plain folder of images.

    Cases of an nnU-Net dataset list the expected channel files even when one is missing (so that
    `validate` can report it); `label` is the label file when it exists, else None.
    """
    root = Path(root)
    _need_folder(root)
    if split not in ("Tr", "Ts"):
        raise S3DError(f"split must be \"Tr\" or \"Ts\", got {split!r}")
    ds_json = root / "dataset.json"
    if not ds_json.exists():
        if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
            raise S3DError(f"{ds_json}: not found; an nnU-Net dataset (imagesTr/) needs its dataset.json")
        cases = find_images(root)
        if not cases:
            raise S3DError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        counts = {len(c.images) for c in cases}
        if len(counts) > 1:
            odd = next(c for c in cases if len(c.images) != len(cases[0].images))
            raise S3DError(f"{root}: case {odd.case_id} has {len(odd.images)} channel files but case "
                           f"{cases[0].case_id} has {len(cases[0].images)}")
        n = counts.pop()
        channel_names = {0: "image"} if n == 1 else {c: f"channel{c}" for c in range(n)}
        ending = _split_ending(cases[0].images[0].name)[1]
        return Dataset(root=root, cases=cases, channel_names=channel_names, labels={}, file_ending=ending,
                       kind="folder", split=split)

    channel_names, labels, ending = _read_dataset_json(ds_json)
    images_dir = root / f"images{split}"
    if not images_dir.is_dir():
        raise S3DError(f"{images_dir}: folder not found (nnU-Net datasets keep their images in images{split}/)")
    case_ids = set()
    for p in _image_files(images_dir, (ending,)):
        m = _CHANNEL_RE.fullmatch(_split_ending(p.name, (ending,))[0])
        if m is not None and int(m["channel"]) in channel_names:
            case_ids.add(m["case"])
    if not case_ids:
        raise S3DError(f"{images_dir}: no images named CASE_0000{ending} found")
    labels_dir = root / f"labels{split}"
    cases = []
    for cid in sorted(case_ids):
        label = labels_dir / f"{cid}{ending}"
        cases.append(Case(case_id=cid, images=[images_dir / f"{cid}_{c:04d}{ending}" for c in sorted(channel_names)],
                          label=label if label.is_file() else None))
    return Dataset(root=root, cases=cases, channel_names=channel_names, labels=labels, file_ending=ending,
                   kind="nnunet", split=split)


def _layout_problems(ds: Dataset) -> list[str]:
    """Files of an nnU-Net dataset that belong to no case, and cases without a label file."""
    problems: list[str] = []
    images_dir = ds.root / f"images{ds.split}"
    labels_dir = ds.root / f"labels{ds.split}"
    known = {c.case_id for c in ds.cases}
    if images_dir.is_dir():
        for p in _image_files(images_dir):
            split = _split_ending(p.name, (ds.file_ending,))
            if split is None:
                problems.append(f"{p}: file ending differs from dataset.json file_ending {ds.file_ending}")
                continue
            m = _CHANNEL_RE.fullmatch(split[0])
            if m is None:
                problems.append(f"{p}: name does not end in a channel number _XXXX{ds.file_ending}")
            elif int(m["channel"]) not in ds.channel_names:
                problems.append(f"{p}: channel {int(m['channel'])} is not in dataset.json channel_names "
                                f"{sorted(ds.channel_names)}")
    if labels_dir.is_dir():
        for p in _image_files(labels_dir):
            split = _split_ending(p.name, (ds.file_ending,))
            if split is None:
                problems.append(f"{p}: file ending differs from dataset.json file_ending {ds.file_ending}")
            elif split[0] not in known:
                problems.append(f"{p}: label without image (no {split[0]}_0000{ds.file_ending} in {images_dir.name}/)")
        for c in ds.cases:
            if c.label is None:
                expected = labels_dir / f"{c.case_id}{ds.file_ending}"
                problems.append(f"{c.images[0]}: image without label (expected {expected})")
    return problems


def _present_values(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(values.min()), int(values.max())
    if np.issubdtype(values.dtype, np.integer) and lo >= 0 and hi < 1 << 16:
        # counting is linear in the voxels, np.unique sorts them
        return np.flatnonzero(np.bincount(values.ravel().astype(np.intp, copy=False), minlength=hi + 1))
    return np.unique(values).astype(np.int64)


def _check_case(case: Case, allowed: frozenset[int] | None) -> list[str]:
    """Every problem of one case, one line each naming its file (worker: top level so spawn can pickle it)."""
    problems: list[str] = []
    grid: tuple[Path, Geometry] | None = None
    for p in case.images:
        p = Path(p)
        if not p.exists():
            problems.append(f"{p}: missing channel file of case {case.case_id}")
            continue
        try:
            raw = _load(p)
        except S3DError as e:
            problems.append(str(e))
            continue
        if np.issubdtype(raw.data.dtype, np.floating) or not np.isfinite([raw.slope, raw.inter]).all():
            bad = count_nonfinite(raw.data)
            if bad:
                problems.append(f"{p}: {bad} NaN/inf voxel(s)")
        if grid is None:
            grid = (p, raw.geometry)
        else:
            diff = same_grid(raw.geometry, grid[1])
            if diff is not None:
                problems.append(f"{p}: not on the grid of channel file {grid[0].name}: {diff}")
        del raw
    if case.label is None:
        return problems
    label = Path(case.label)
    if not label.exists():
        return [*problems, f"{label}: label file not found"]
    try:
        raw = _load(label)
    except S3DError as e:
        return [*problems, str(e)]
    if grid is not None:
        diff = same_grid(raw.geometry, grid[1])
        if diff is not None:
            problems.append(f"{label}: not on the grid of image {grid[0].name}: {diff}")
    try:
        values = _label_values(label, raw)
    except S3DError as e:
        return [*problems, str(e)]
    if allowed is not None:
        extra = sorted(set(_present_values(values).tolist()) - allowed)
        if extra:
            shown = ", ".join(str(v) for v in extra[:10]) + (", ..." if len(extra) > 10 else "")
            problems.append(f"{label}: label value(s) {shown} not in dataset.json labels {sorted(allowed)}")
    return problems


def _check_case_args(args: tuple[Case, frozenset[int] | None]) -> list[str]:
    return _check_case(*args)


def validate(ds: Dataset, jobs: int = 1) -> list[str]:
    """Every problem of `ds`, one line each naming the file; [] when the dataset is fine.

    Checks the layout (stray files, labels without images, images without labels) and each case:
    missing or unreadable channel files, non-3-D images, NaN/inf voxels, non-finite geometry, channels
    or label not on one grid (shape, spacing, direction, origin), non-integer label values and values
    not listed in dataset.json. `jobs` > 1 reads the cases in that many processes.
    """
    problems: list[str] = []
    if not ds.cases:
        problems.append(f"{ds.root}: no cases found")
    if ds.kind == "nnunet":
        problems += _layout_problems(ds)
    allowed = frozenset(int(v) for v in ds.labels.values()) if ds.labels else None
    work = [(c, allowed) for c in ds.cases]
    bar = dict(total=len(work), desc="validate", unit="case", disable=None)
    if jobs > 1 and len(work) > 1:
        # the platform's default start method; the worker is a top-level function taking picklable
        # arguments so that spawn (macOS, Windows) works too
        chunk = max(1, min(16, len(work) // (4 * jobs)))
        with multiprocessing.Pool(min(jobs, len(work))) as pool:
            for found in tqdm(pool.imap(_check_case_args, work, chunksize=chunk), **bar):
                problems += found
    else:
        for args in tqdm(work, **bar):
            problems += _check_case_args(args)
    return problems
