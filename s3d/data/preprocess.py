"""nnU-Net-style preprocessing: crop to the nonzero region, normalise, resample to a target spacing.

The Plan records every decision, so `s3d predict` replays it forward on new images and backward on
the network's probabilities (`restore_probabilities`). The fingerprint / planning rules follow
nnU-Net v2 (Isensee et al., Nature Methods 2021; nnunetv2 `DatasetFingerprintExtractor` and
`ExperimentPlanner`); where we deviate it is said at the spot.

Output layout of `preprocess_dataset(ds, out_dir, plan)`:
    out_dir/plan.json          Plan.to_dict(), written LAST: its presence marks a finished folder
    out_dir/store.json         the store format (s3d.data.store); absent in folders of an older s3d (.npz)
    out_dir/fingerprint.json   dataset statistics (when given)
    out_dir/dataset.json       copy of the raw dataset.json (generated for a plain image folder)
    out_dir/cases/             one case = CASE.b2nd (+ CASE_seg.b2nd, CASE_locations.npy) + CASE.json,
                               laid out by s3d.data.store.write_case

Cases are chunked, compressed blosc2 arrays (as nnU-Net v2 and nnssl store theirs): a training patch
decompresses only the blocks it overlaps, so loader memory does not depend on the volume count and
a corpus of 100k brains fits on a disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s3d.data.resample import (
    ANISOTROPY_THRESHOLD,
    anisotropic_axis,
    axis_orders,
    resample_to_shape,
    shape_for_spacing,
)
from s3d.data.resample import resample_label as _resample_label_to_shape
from s3d.errors import S3DError
from s3d.files import prepare_output_dir, read_json, refuse_inputs, write_json

NORMALIZATIONS = ("zscore", "ct", "none")
# nnU-Net sample_foreground_locations: up to 10000 voxels per class, but at least 1 % of the class
NUM_CLASS_LOCATIONS = 10_000
MIN_CLASS_COVERAGE = 0.01
# nnU-Net's fingerprint samples 10e7 foreground voxels over the whole dataset for the intensity
# statistics; we take 1e7: the 0.5/99.5 percentiles are already stable to <0.1 % with far fewer,
# and the samples must fit in memory of a laptop.
NUM_FOREGROUND_SAMPLES = 10_000_000
# nnU-Net ExperimentPlanner.determine_use_mask_for_norm: z-score inside the nonzero mask only when
# cropping to it shrank the median case to less than 3/4 of its size (e.g. skull-stripped brains).
MASK_FOR_NORM_RELATIVE_SIZE = 0.75


# --------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """What preprocessing did; predict replays it forward and backward."""

    target_spacing: tuple[float, float, float]
    normalization: list[str]  # per channel: "zscore" | "ct" | "none"
    ct_stats: list[dict | None]  # per channel for "ct": {"mean", "std", "p005", "p995"}
    channel_names: dict[int, str]
    labels: dict[str, int]
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD
    # per channel: z-score over the nonzero region only (and 0 outside), nnU-Net's use_mask_for_norm
    use_nonzero_mask: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            sp = tuple(float(s) for s in self.target_spacing)
        except (TypeError, ValueError):
            sp = ()
        if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
            raise S3DError(f"target spacing {tuple(self.target_spacing)}: needs three positive, finite numbers of mm")
        self.target_spacing = sp

    def to_dict(self) -> dict:
        return {
            "target_spacing": [float(s) for s in self.target_spacing],
            "normalization": list(self.normalization),
            "ct_stats": [None if s is None else {k: float(v) for k, v in s.items()} for s in self.ct_stats],
            "channel_names": {str(k): str(v) for k, v in self.channel_names.items()},
            "labels": {str(k): int(v) for k, v in self.labels.items()},
            "anisotropy_threshold": float(self.anisotropy_threshold),
            "use_nonzero_mask": [bool(b) for b in self.use_nonzero_mask],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        n = len(d["normalization"])
        return cls(
            target_spacing=tuple(float(s) for s in d["target_spacing"]),
            normalization=[str(s) for s in d["normalization"]],
            ct_stats=list(d.get("ct_stats") or [None] * n),
            channel_names={int(k): str(v) for k, v in d["channel_names"].items()},
            labels={str(k): int(v) for k, v in d["labels"].items()},
            anisotropy_threshold=float(d.get("anisotropy_threshold", ANISOTROPY_THRESHOLD)),
            use_nonzero_mask=[bool(b) for b in d.get("use_nonzero_mask") or [False] * n],
        )

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class DatasetProblems(S3DError):
    """Validation found problems; `problems` holds all of them (one line each), str() is one line."""

    def __init__(self, root: str | Path, problems: Sequence[str]) -> None:
        self.root = str(root)
        self.problems = [" ".join(str(p).split()) for p in problems]
        n = len(self.problems)
        more = f" (and {n - 1} more; `s3d preprocess` lists them all)" if n > 1 else ""
        super().__init__(f"{root}: {n} problem{'s' if n != 1 else ''} in the dataset: {self.problems[0]}{more}")


# ------------------------------------------------------------------------------------ array steps
def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """Half-open [[lo, hi]] * 3 of voxels where any channel of data (C,i,j,k) is nonzero (nnU-Net
    create_nonzero_mask; its hole filling cannot change a bounding box, so we skip it). The whole
    image when everything is zero."""
    mask = np.any(data != 0, axis=0)
    bbox = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, int(mask.shape[axis])])
    return bbox


def _slices(bbox: Sequence[Sequence[int]]) -> tuple[slice, slice, slice]:
    return tuple(slice(int(lo), int(hi)) for lo, hi in bbox)


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, list[list[int]]]:
    """data (C,i,j,k), seg (i,j,k) or None -> both cropped to the nonzero bbox, and bbox [[lo, hi]]*3
    (half-open). Returns views into the inputs."""
    bbox = nonzero_bbox(data)
    sl = _slices(bbox)
    return data[(slice(None), *sl)], (None if seg is None else seg[sl]), bbox


def _rms(v: np.ndarray) -> float:
    """Root mean square of float32 `v`, scaled by its peak first: squaring valid float32 intensities
    above ~1e19 (a large scl_slope) overflowed to inf and z-scored the image to all zeros."""
    peak = float(np.max(np.abs(v))) if v.size else 0.0
    if peak == 0.0:
        return 0.0
    return peak * math.sqrt(np.square(v / np.float32(peak)).mean(dtype=np.float64))


def _zscore(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """float32 (x - mean) / std with float64 accumulators (no float64 copy of the volume)."""
    if mask is None:
        out = x.astype(np.float32, copy=True)
        mean = out.mean(dtype=np.float64)
        out -= np.float32(mean)
        out /= np.float32(max(_rms(out), 1e-8))
        return out
    out = np.zeros(x.shape, dtype=np.float32)
    vals = x[mask].astype(np.float32)
    if vals.size:
        vals -= np.float32(vals.mean(dtype=np.float64))
        vals /= np.float32(max(_rms(vals), 1e-8))
        out[mask] = vals
    return out


def normalize(data: np.ndarray, plan: Plan, seg: np.ndarray | None = None) -> np.ndarray:
    """data (C,i,j,k) any numeric dtype -> float32 normalised per channel as `plan` says.

    zscore: (x - mean) / std over the whole image, or over the nonzero region with 0 outside when
    plan.use_nonzero_mask[c] (nnU-Net ZScoreNormalization). ct: clip to the dataset foreground's
    [p005, p995] then (x - mean) / std with the dataset foreground mean/std (nnU-Net
    CTNormalization). none: cast only. `seg` is accepted for API symmetry; masks come from the data.
    """
    if data.ndim != 4 or data.shape[0] != len(plan.normalization):
        raise S3DError(f"image has shape {tuple(data.shape)}: the plan expects {len(plan.normalization)} "
                       f"channel(s) ({', '.join(plan.channel_names.values())})")
    out = np.empty(data.shape, dtype=np.float32)
    nonzero = None
    for c, scheme in enumerate(plan.normalization):
        x = data[c]
        if scheme == "zscore":
            use_mask = c < len(plan.use_nonzero_mask) and plan.use_nonzero_mask[c]
            if use_mask and nonzero is None:
                nonzero = np.any(data != 0, axis=0)
            out[c] = _zscore(x, nonzero if use_mask else None)
        elif scheme == "ct":
            st = plan.ct_stats[c] if c < len(plan.ct_stats) else None
            if not st:
                raise S3DError(f"plan: channel {c} uses ct normalisation but has no ct_stats")
            np.clip(x, st["p005"], st["p995"], out=out[c])
            out[c] -= np.float32(st["mean"])
            out[c] /= np.float32(max(st["std"], 1e-8))
        elif scheme == "none":
            out[c] = x
        else:
            raise S3DError(f"plan: unknown normalisation {scheme!r} (choose {', '.join(NORMALIZATIONS)})")
    return out


def _target(shape: tuple[int, ...], old_spacing: Sequence[float], new_spacing: Sequence[float] | None,
            new_shape: Sequence[int] | None, anisotropy_threshold: float) -> tuple[Sequence[int], int | None]:
    """Output shape and the axis to treat as anisotropic, from either a target spacing or a shape."""
    if new_shape is None:
        if new_spacing is None:
            raise ValueError("give new_spacing or new_shape")
        new_shape = shape_for_spacing(shape, old_spacing, new_spacing)
    if new_spacing is None:
        new_spacing = [o * s / n for o, s, n in zip(old_spacing, shape, new_shape, strict=True)]
    return new_shape, anisotropic_axis(old_spacing, new_spacing, anisotropy_threshold)


def resample_image(
    data: np.ndarray | torch.Tensor,
    old_spacing: Sequence[float],
    new_spacing: Sequence[float] | None = None,
    *,
    new_shape: Sequence[int] | None = None,
    order: int = 3,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray | torch.Tensor:
    """data (C,i,j,k) from old_spacing to new_spacing (or new_shape), `order` in plane and nearest
    along an anisotropic axis (nnU-Net separate-z rule, see s3d.data.resample)."""
    new_shape, axis = _target(tuple(data.shape[-3:]), old_spacing, new_spacing, new_shape, anisotropy_threshold)
    return resample_to_shape(data, new_shape, axis_orders(order, axis))


def resample_label(
    seg: np.ndarray | torch.Tensor,
    old_spacing: Sequence[float],
    new_spacing: Sequence[float] | None = None,
    *,
    new_shape: Sequence[int] | None = None,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray | torch.Tensor:
    """Label map (i,j,k) from old_spacing to new_spacing (or new_shape): one-hot linear in plane,
    nearest along an anisotropic axis, argmax (nnU-Net resize_segmentation, order 1, order_z 0)."""
    new_shape, axis = _target(tuple(seg.shape[-3:]), old_spacing, new_spacing, new_shape, anisotropy_threshold)
    return _resample_label_to_shape(seg, new_shape, axis_orders(1, axis))


def sample_class_locations(
    seg: np.ndarray, labels: Iterable[int], num_samples: int = NUM_CLASS_LOCATIONS, seed: int = 1234
) -> dict[int, np.ndarray]:
    """label -> voxel coordinates (N, 3) int64: all voxels of a label when it has at most
    num_samples, else a random subset of max(num_samples, 1 % of the label) without replacement
    (nnU-Net sample_foreground_locations, seed 1234). Labels absent from seg map to (0, 3)."""
    rng = np.random.default_rng(seed)
    flat = seg.ravel()
    idx = np.flatnonzero(flat)
    vals = flat[idx]
    order = np.argsort(vals, kind="stable")
    idx, vals = idx[order], vals[order]
    out: dict[int, np.ndarray] = {}
    for lab in sorted(int(v) for v in labels):
        if lab == 0:
            continue
        lo, hi = np.searchsorted(vals, lab, "left"), np.searchsorted(vals, lab, "right")
        members = idx[lo:hi]
        n = min(num_samples, members.size)
        n = max(n, math.ceil(members.size * MIN_CLASS_COVERAGE))
        if n < members.size:
            members = np.sort(rng.choice(members, n, replace=False))
        out[lab] = np.stack(np.unravel_index(members, seg.shape), axis=1).astype(np.int64).reshape(-1, 3)
    return out


# ----------------------------------------------------------------------------------- one case
def check_resampled_size(source: str, new_shape: Sequence[int], target_spacing: Sequence[float], channels: int,
                         with_seg: bool) -> None:
    """S3DError naming `source` when resampling onto `new_shape` would take more than the memory budget:
    a tiny target spacing (an option, a model config) fails on one line instead of a MemoryError."""
    from s3d.data.io import memory_budget

    voxels = float(np.prod([float(n) for n in new_shape]))
    # float32 image and its interpolation temporary per channel; the label's running max, argmax and
    # per-label score (resample_label)
    need = voxels * (8 * channels + (10 if with_seg else 0))
    budget = memory_budget()
    if need > budget:
        spacing = " x ".join(f"{s:g}" for s in target_spacing)
        raise S3DError(f"{source}: resampling it to {spacing} mm means a {tuple(int(n) for n in new_shape)} grid, "
                       f"about {need / 2**30:.3g} GiB, more than the memory budget {budget / 2**30:.3g} GiB "
                       "(S3D_MAX_IMAGE_BYTES)")


def preprocess_case(
    images: np.ndarray,
    geometry: Any,
    plan: Plan,
    seg: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """images (C,i,j,k) on their original grid (any numeric dtype), geometry (s3d.data.io.Geometry),
    seg (i,j,k) or None -> (data (C,*new) float32, seg (*new) int16 or None, props).

    Crop to the nonzero bbox, normalise, resample to plan.target_spacing (images order 3, labels
    one-hot order 1, nearest along an anisotropic axis). props holds what is needed to
    go back: geometry (Geometry.to_dict()), spacing (original), bbox, shape_before_crop,
    shape_after_crop, shape_after_resample, lowres_axis, and class_locations {label: (N,3) int64
    array}, the only entry that is not JSON-safe (preprocess_dataset stores it in the npz).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise S3DError(f"{getattr(geometry, 'source', 'image')}: expected (C,i,j,k) images, got {images.shape}")
    spacing = tuple(float(s) for s in geometry.spacing)
    if seg is not None and tuple(seg.shape) != tuple(images.shape[1:]):
        raise S3DError(f"{getattr(geometry, 'source', 'image')}: label shape {tuple(seg.shape)} != image shape "
                       f"{tuple(images.shape[1:])}")
    data, seg_c, bbox = crop_to_nonzero(images, seg)
    shape_after_crop = tuple(int(s) for s in data.shape[1:])
    data = normalize(data, plan, seg_c)
    new_shape = shape_for_spacing(shape_after_crop, spacing, plan.target_spacing)
    check_resampled_size(getattr(geometry, "source", "image"), new_shape, plan.target_spacing, len(data),
                         seg_c is not None)
    axis = anisotropic_axis(spacing, plan.target_spacing, plan.anisotropy_threshold)
    data = resample_to_shape(data, new_shape, axis_orders(3, axis))
    out_seg = None
    locations: dict[int, np.ndarray] = {}
    if seg_c is not None:
        out_seg = _resample_label_to_shape(np.ascontiguousarray(seg_c), new_shape, axis_orders(1, axis))
        out_seg = np.ascontiguousarray(out_seg, dtype=np.int16)
        labels = sorted(set(plan.labels.values()) | {int(v) for v in np.unique(out_seg)})
        locations = sample_class_locations(out_seg, labels)
    props = {
        "geometry": geometry.to_dict(),
        "spacing": list(spacing),
        "target_spacing": [float(s) for s in plan.target_spacing],
        "bbox": bbox,
        "shape_before_crop": [int(s) for s in images.shape[1:]],
        "shape_after_crop": list(shape_after_crop),
        "shape_after_resample": list(new_shape),
        "lowres_axis": axis,
        "class_locations": locations,
    }
    return np.ascontiguousarray(data, dtype=np.float32), out_seg, props


def restore_probabilities(probs: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
    """probs (K,*shape_after_resample) -> (K,*original shape) float32 on the original grid.

    Linear resampling back to the cropped shape (nearest along the anisotropic axis, as forward),
    pasted into the bbox. nnU-Net v2 resamples logits with the same orders and takes the argmax; s3d
    resamples probabilities so saved maps stay distributions (the argmax can differ at near-ties).
    Outside the bbox the probability of class 0 is 1. A tensor is resampled on its own device.
    """
    cropped = _restore_cropped(probs, props)
    full = np.zeros((cropped.shape[0], *props["shape_before_crop"]), dtype=np.float32)
    full[0] = 1.0
    full[(slice(None), *_slices(props["bbox"]))] = cropped
    return full


def restore_segmentation(probs: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
    """probs (K,*shape_after_resample) -> argmax label map on the original grid (uint8, or uint16
    for more than 256 classes); background outside the bbox."""
    cropped = _restore_cropped(probs, props)
    dtype = np.uint8 if cropped.shape[0] <= 256 else np.uint16
    full = np.zeros(props["shape_before_crop"], dtype=dtype)
    full[_slices(props["bbox"])] = cropped.argmax(0)
    return full


def _restore_cropped(probs: np.ndarray | torch.Tensor, props: dict) -> np.ndarray:
    shape = tuple(probs.shape[1:])
    if probs.ndim != 4 or shape != tuple(props["shape_after_resample"]):
        raise ValueError(f"probabilities of shape {tuple(probs.shape)} do not match the preprocessed shape "
                         f"{tuple(props['shape_after_resample'])}")
    out = resample_to_shape(probs, props["shape_after_crop"], axis_orders(1, props.get("lowres_axis")))
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------- dataset level
def _worker_init() -> None:
    # each worker is one of `jobs` processes: more torch threads would only fight over the cores
    torch.set_num_threads(1)


def _map(fn: Callable, items: Sequence, jobs: int, desc: str) -> Iterable:
    """Results of fn over items (any order) with a tqdm bar; `jobs` processes (fork where available:
    workers inherit the imported modules instead of re-importing torch)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="case", leave=False)
    try:
        if jobs <= 1 or len(items) <= 1:
            for it in items:
                yield fn(it)
                bar.update()
            return
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else None
        ctx = mp.get_context(method)
        with ctx.Pool(min(jobs, len(items)), initializer=_worker_init) as pool:
            for r in pool.imap_unordered(fn, items, chunksize=1):
                yield r
                bar.update()
    finally:
        bar.close()


_VALIDATED: set[str] = set()


def _dataset_key(ds: Any) -> str:
    """Changes whenever a file of the dataset changes, so a validated dataset is checked only once per process."""
    h = hashlib.sha1(str(Path(ds.root).resolve()).encode())
    for case in ds.cases:
        h.update(json.dumps([case.case_id, source_stamp([*case.images, case.label])]).encode())
    return h.hexdigest()


def check_dataset(ds: Any, jobs: int = 1) -> None:
    """Run s3d.data.dataset.validate; raise DatasetProblems with all problems found."""
    from s3d.data.dataset import validate

    key = _dataset_key(ds)
    if key in _VALIDATED:
        return
    problems = validate(ds, jobs=jobs)
    if problems:
        raise DatasetProblems(ds.root, problems)
    _VALIDATED.add(key)


def _case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _fingerprint_case(args: tuple) -> dict:
    case, num_samples = args
    from s3d.data.io import read_channels, read_label

    images, geometry = read_channels(case.images)
    seg = read_label(case.label)[0] if case.label is not None else None
    data, seg_c, bbox = crop_to_nonzero(images, seg)
    fg = seg_c > 0 if seg_c is not None else np.any(data != 0, axis=0)
    rng = np.random.default_rng(_case_seed(case.case_id))
    samples = []
    n_fg = int(fg.sum())
    pick = None
    if n_fg > num_samples:
        pick = np.sort(rng.choice(n_fg, num_samples, replace=False))
    for c in range(data.shape[0]):
        vals = data[c][fg]
        samples.append((vals[pick] if pick is not None else vals).astype(np.float32))
    counts = {}
    if seg is not None:
        values, n = np.unique(seg, return_counts=True)
        counts = {int(v): int(k) for v, k in zip(values, n, strict=True)}
    shape = [int(s) for s in images.shape[1:]]
    crop_shape = [int(s) for s in data.shape[1:]]
    return {
        "case_id": case.case_id,
        "spacing": [float(s) for s in geometry.spacing],
        "shape": shape,
        "shape_after_crop": crop_shape,
        "relative_size_after_crop": float(np.prod(crop_shape) / max(1, np.prod(shape))),
        "samples": samples,
        "label_counts": counts,
    }


def target_spacing_from(
    spacings: np.ndarray, shapes: np.ndarray, anisotropy_threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[float, float, float]:
    """nnU-Net ExperimentPlanner.determine_fullres_target_spacing: the median spacing per axis,
    except that when the median spacing of the worst axis is > threshold x the others and its
    median size < 1/threshold of the others, that axis gets the 10th percentile of its spacings
    (not finer than the other axes) so that the few thin-slice cases are not thrown away."""
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 3)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    other_spacing = max(target[a] for a in others)
    aniso_spacing = target[worst] > anisotropy_threshold * other_spacing
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(target_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        t = float(np.percentile(spacings[:, worst], 10))
        if t < other_spacing:
            t = max(other_spacing, t) + 1e-5
        target[worst] = t
    return tuple(float(s) for s in target)


def _parse_spacing(spacing: str | Sequence[float]) -> str | tuple[float, float, float]:
    if isinstance(spacing, str):
        if spacing.strip().lower() == "median":
            return "median"
        parts = spacing.replace(",", " ").replace("x", " ").split()
    else:
        parts = list(spacing)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise S3DError(f"--spacing {spacing!r}: give 'median' or three positive numbers in mm (X Y Z)")
    return values


def _normalization_schemes(norm: str | Sequence[str] | None, channel_names: dict[int, str]) -> list[str]:
    n = len(channel_names)
    if norm is None or norm == "auto":
        # nnU-Net picks the scheme from the channel name: "CT" -> CT normalisation, else z-score
        return ["ct" if str(channel_names[c]).strip().lower() == "ct" else "zscore" for c in sorted(channel_names)]
    schemes = [norm] * n if isinstance(norm, str) else list(norm)
    if len(schemes) != n:
        raise S3DError(f"--norm {norm!r}: give one scheme or one per channel ({n})")
    for s in schemes:
        if s not in NORMALIZATIONS:
            raise S3DError(f"--norm {s!r}: choose one of {', '.join(NORMALIZATIONS)}")
    return schemes


def plan_dataset(
    ds: Any,
    spacing: str | Sequence[float] = "median",
    norm: str | Sequence[str] | None = None,
    *,
    jobs: int = 1,
    validate: bool = True,
) -> tuple[Plan, dict]:
    """Fingerprint `ds` (s3d.data.dataset.Dataset) and plan its preprocessing -> (Plan, fingerprint).

    spacing: "median" (nnU-Net's rule, see target_spacing_from) or (x, y, z) mm per array axis.
    norm: None/"auto" (CT channels "ct", others "zscore"), one scheme for all channels, or a list.
    The fingerprint (JSON-safe) has per-case spacings and shapes, per-channel foreground intensity
    statistics (mean, std, median, min, max, p005, p995 of sampled foreground voxels: label > 0, or
    the nonzero region for unlabeled data) and voxel counts per label.
    """
    target = _parse_spacing(spacing)
    if not ds.cases:
        raise S3DError(f"{ds.root}: no cases found")
    if validate:
        check_dataset(ds, jobs)
    channel_names = {int(k): str(v) for k, v in ds.channel_names.items()}
    schemes = _normalization_schemes(norm, channel_names)
    per_case = NUM_FOREGROUND_SAMPLES // len(ds.cases)
    results = sorted(_map(_fingerprint_case, [(c, per_case) for c in ds.cases], jobs, "fingerprint"),
                     key=lambda r: r["case_id"])
    spacings = np.array([r["spacing"] for r in results])
    shapes_crop = np.array([r["shape_after_crop"] for r in results])
    if target == "median":
        target = target_spacing_from(spacings, shapes_crop)
    intensity, ct_stats = [], []
    for c in range(len(channel_names)):
        vals = np.concatenate([r["samples"][c] for r in results]) if results else np.zeros(0, np.float32)
        if vals.size:
            st = {
                "mean": float(vals.mean(dtype=np.float64)),
                "std": float(vals.std(dtype=np.float64)),
                "median": float(np.median(vals)),
                "min": float(vals.min()),
                "max": float(vals.max()),
                "p005": float(np.percentile(vals, 0.5)),
                "p995": float(np.percentile(vals, 99.5)),
                "n_samples": int(vals.size),
            }
        else:
            st = {k: 0.0 for k in ("mean", "std", "median", "min", "max", "p005", "p995")} | {"n_samples": 0}
        intensity.append(st)
        ct_stats.append({k: st[k] for k in ("mean", "std", "p005", "p995")} if schemes[c] == "ct" else None)
    relative = float(np.median([r["relative_size_after_crop"] for r in results]))
    use_mask = [s == "zscore" and relative < MASK_FOR_NORM_RELATIVE_SIZE for s in schemes]
    label_counts: dict[int, int] = {}
    for r in results:
        for k, v in r["label_counts"].items():
            label_counts[k] = label_counts.get(k, 0) + v
    plan = Plan(
        target_spacing=tuple(float(t) for t in target),
        normalization=schemes,
        ct_stats=ct_stats,
        channel_names=channel_names,
        labels={str(k): int(v) for k, v in ds.labels.items()},
        use_nonzero_mask=use_mask,
    )
    fingerprint = {
        "num_cases": len(results),
        "case_ids": [r["case_id"] for r in results],
        "spacings": spacings.tolist(),
        "shapes": [r["shape"] for r in results],
        "shapes_after_crop": shapes_crop.tolist(),
        "median_spacing": [float(s) for s in np.median(spacings, axis=0)],
        "median_shape_after_crop": [float(s) for s in np.median(shapes_crop, axis=0)],
        "median_relative_size_after_cropping": relative,
        "intensity": {str(c): intensity[c] for c in range(len(channel_names))},
        "label_counts": {str(k): v for k, v in sorted(label_counts.items())},
    }
    return plan, fingerprint


# Patch the store is laid out for when the training patch is not known yet (nnU-Net v2's fallback);
# any other patch still reads correctly, only touching a few more blocks.
DEFAULT_LAYOUT_PATCH = (128, 128, 128)


def case_is_current(meta: Path, digest: str, stamp: list | None = None) -> bool:
    """True when CASE.json exists, was made with the plan of `digest` and the current store format,
    and (when `stamp` is given) from source files of that size and modification time."""
    from s3d.data.store import STORE_VERSION

    try:
        props = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return (props.get("plan_digest") == digest and props.get("store_version") == STORE_VERSION
            and (stamp is None or props.get("source_stamp") == stamp))


def source_stamp(paths: Sequence[str | Path | None]) -> list:
    """[[name, size, mtime_ns], ...] of a case's source files: changes when any of them is edited."""
    out = []
    for p in paths:
        if p is None:
            continue
        try:
            st = os.stat(p)
            out.append([Path(p).name, int(st.st_size), int(st.st_mtime_ns)])
        except OSError:
            out.append([Path(p).name, None, None])
    return out


def _preprocess_one(args: tuple) -> tuple[str, bool]:
    case, cases_dir, plan_dict, digest, overwrite, patch_size = args
    from s3d.data.io import read_channels, read_label
    from s3d.data.store import case_paths, write_case

    stamp = source_stamp([*case.images, case.label])
    if not overwrite and case_is_current(case_paths(cases_dir, case.case_id)["meta"], digest, stamp):
        return case.case_id, False
    plan = Plan.from_dict(plan_dict)
    images, geometry = read_channels(case.images)
    seg = read_label(case.label)[0] if case.label is not None else None
    data, seg_out, props = preprocess_case(images, geometry, plan, seg)
    del images, seg
    locations = props.pop("class_locations")
    props.update(case_id=case.case_id, shape=list(data.shape[1:]), has_seg=seg_out is not None,
                 num_channels=int(data.shape[0]), plan_digest=digest, source_stamp=stamp,
                 class_location_labels=sorted(int(k) for k in locations))
    write_case(cases_dir, case.case_id, data, props, patch_size, seg=seg_out, locations=locations)
    return case.case_id, True


def remove_old_store(out_dir: Path) -> int:
    """Delete the .npz cases of an older s3d (never mixed with blosc2 cases); how many there were."""
    old = sorted((out_dir / "cases").glob("*.npz")) if (out_dir / "cases").is_dir() else []
    if old:
        from tqdm.auto import tqdm

        tqdm.write(f"{out_dir}: holds {len(old)} case(s) in the old .npz format; rebuilding them as blosc2")
        for f in old:
            f.unlink()
            f.with_suffix(".json").unlink(missing_ok=True)
    return len(old)


def write_store_marker(out_dir: Path, patch_size: Sequence[int]) -> None:
    from s3d.data.store import STORE_FORMAT, STORE_VERSION

    write_json(out_dir / "store.json", {"format": STORE_FORMAT, "version": STORE_VERSION,
                                        "layout_patch": [int(p) for p in patch_size]}, indent=1)


def _dataset_json(ds: Any) -> dict:
    src = Path(ds.root) / "dataset.json"
    if getattr(ds, "kind", "") == "nnunet" and src.is_file():
        return read_json(src)
    return {
        "channel_names": {str(k): v for k, v in ds.channel_names.items()},
        "labels": dict(ds.labels),
        "numTraining": len(ds.cases),
        "file_ending": ds.file_ending,
        "source": str(ds.root),
    }


def preprocess_dataset(
    ds: Any,
    out_dir: str | Path,
    plan: Plan,
    jobs: int = 1,
    overwrite: bool = False,
    *,
    fingerprint: dict | None = None,
    validate: bool = True,
    patch_size: Sequence[int] = DEFAULT_LAYOUT_PATCH,
) -> list[str]:
    """Validate `ds` (DatasetProblems lists every problem; nothing is written then) and preprocess
    every case into out_dir (layout in the module docstring) with `jobs` processes. Finished cases
    made with the same plan from unchanged source files are skipped unless overwrite; cases of an
    older s3d (.npz) are rebuilt and cases no longer in `ds` removed.
    `patch_size` (voxels) is the training patch the blosc2 chunks are laid out for. Returns the ids
    of the cases (re)written."""
    out_dir = Path(out_dir)
    if not ds.cases:
        raise S3DError(f"{ds.root}: no cases found")
    if validate:
        check_dataset(ds, jobs)
    refuse_inputs(out_dir, (ds.root,), inside_inputs_ok=True)
    plan_file = out_dir / "plan.json"
    if plan_file.exists() and not overwrite:
        old = read_json(plan_file)
        if Plan.from_dict(old).to_dict() != plan.to_dict():
            raise S3DError(f"{plan_file}: folder was preprocessed with a different plan; use --overwrite or "
                           "another output folder")
    cases_dir = prepare_output_dir(out_dir / "cases")
    if plan_file.exists():
        plan_file.unlink()  # re-appears only when every case is done (finetune treats it as "finished")
    # cases no longer in the dataset go: training reads every case of the folder
    keep = {c.case_id for c in ds.cases}
    for p in cases_dir.iterdir():
        if ".tmp-" in p.name or _case_of_file(p.name) not in keep:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    remove_old_store(out_dir)
    write_store_marker(out_dir, patch_size)
    write_json(out_dir / "dataset.json", _dataset_json(ds), indent=1)
    if fingerprint is not None:
        write_json(out_dir / "fingerprint.json", fingerprint, indent=1)
    plan_dict, digest = plan.to_dict(), plan.digest()
    work = [(c, cases_dir, plan_dict, digest, overwrite, tuple(patch_size)) for c in ds.cases]
    written = [case_id for case_id, wrote in _map(_preprocess_one, work, jobs, "preprocess") if wrote]
    write_json(plan_file, plan_dict, indent=1)
    return written


def _case_of_file(name: str) -> str:
    """The case id a file of cases/ belongs to (inverse of s3d.data.store.case_paths)."""
    for suffix in ("_seg.b2nd", "_lossmask.b2nd", "_locations.npy", ".b2nd", ".json", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# ------------------------------------------------------------------------------------ loading
@dataclass
class PreprocessedCase:
    """One case of a preprocessed folder; arrays are read on demand, patches without the whole volume."""

    case_id: str
    path: Path  # cases/CASE.b2nd
    shape: tuple[int, int, int]
    has_seg: bool
    num_channels: int = 1
    has_loss_mask: bool = False
    class_location_labels: tuple[int, ...] = ()
    _props: dict | None = field(default=None, repr=False, compare=False)

    def file(self, kind: str) -> Path:
        """Path of the case's `kind` file: data, seg, lossmask, locations or meta (s3d.data.store)."""
        from s3d.data.store import case_paths

        return case_paths(self.path.parent, self.case_id)[kind]

    @property
    def props(self) -> dict:
        """CASE.json (geometry, bbox, spacings...): read when first asked for, not at load time, so
        that a corpus of 100k cases does not hold 100k property dicts."""
        if self._props is None:
            self._props = read_json(self.file("meta"))
        return self._props

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """data (C,i,j,k) float32, seg (i,j,k) int16 or None: the whole volume."""
        from s3d.data.store import open_array

        data = np.asarray(open_array(self.path)[...])
        seg = np.asarray(open_array(self.file("seg"))[...]) if self.has_seg else None
        return data, seg

    def open(self) -> dict[str, Any]:
        """Memory-mapped arrays {"data", "seg"?, "lossmask"?} to cut patches from (s3d.data.store.read_crop)."""
        from s3d.data.store import open_array

        out = {"data": open_array(self.path)}
        if self.has_seg:
            out["seg"] = open_array(self.file("seg"))
        if self.has_loss_mask:
            out["lossmask"] = open_array(self.file("lossmask"))
        return out

    @property
    def class_locations(self) -> dict[int, np.ndarray]:
        """label -> (N, 3) int64 voxel coordinates in the preprocessed grid."""
        from s3d.data.store import read_locations

        return read_locations(self.file("locations"), self.class_location_labels)


def case_from_props(meta: Path, props: dict) -> PreprocessedCase:
    """The case whose CASE.json is `meta`, holding `props` (its parsed content)."""
    from s3d.data.store import case_paths

    case_id = str(props.get("case_id", meta.stem))
    return PreprocessedCase(
        case_id=case_id,
        path=case_paths(meta.parent, case_id)["data"],
        shape=tuple(int(s) for s in props["shape"]),
        has_seg=bool(props.get("has_seg")),
        num_channels=int(props.get("num_channels", 1)),
        has_loss_mask=bool(props.get("has_loss_mask")),
        class_location_labels=tuple(int(k) for k in props.get("class_location_labels", [])),
    )


def check_store(out_dir: Path) -> None:
    """S3DError when out_dir was written by an older s3d (.npz cases) or by a newer store version."""
    from s3d.data.store import STORE_FORMAT, STORE_VERSION

    marker = out_dir / "store.json"
    if not marker.is_file():
        if any((out_dir / "cases").glob("*.npz")):
            raise S3DError(f"{out_dir}: preprocessed by an older s3d (.npz cases); rebuild it with "
                           "`s3d preprocess ... --overwrite` (the blosc2 store reads patches, not volumes)")
        raise S3DError(f"{out_dir}: not a preprocessed folder (no store.json); run `s3d preprocess`")
    info = read_json(marker)
    if not isinstance(info, dict) or info.get("format") != STORE_FORMAT or info.get("version") != STORE_VERSION:
        raise S3DError(f"{marker}: store format {info!r} is not this s3d's ({STORE_FORMAT} v{STORE_VERSION}); "
                       "rebuild it with `s3d preprocess ... --overwrite`")


def load_preprocessed(out_dir: str | Path) -> tuple[Plan, list[PreprocessedCase]]:
    """(Plan, cases sorted by id) of a folder written by preprocess_dataset or preprocess_corpus.

    Only small per-case facts (shape, channels, labels present) are kept; properties and voxels are
    read when used. Cases whose CASE.json is missing (still being written) are left out: a corpus
    store has its plan.json from the start, so training can begin on what is preprocessed while
    other parts are still running.
    """
    out_dir = Path(out_dir)
    plan_file = out_dir / "plan.json"
    if not plan_file.is_file():
        if any((out_dir / "cases").glob("*.npz")):
            check_store(out_dir)
        raise S3DError(f"{out_dir}: not a finished preprocessed folder (no plan.json); run `s3d preprocess`")
    check_store(out_dir)
    plan = Plan.from_dict(read_json(plan_file))
    cases = []
    for meta in sorted((out_dir / "cases").glob("*.json")):
        if ".tmp-" in meta.name or not meta.with_suffix(".b2nd").is_file():
            continue
        cases.append(case_from_props(meta, read_json(meta)))
    if not cases:
        raise S3DError(f"{out_dir / 'cases'}: no preprocessed cases found")
    return plan, cases
