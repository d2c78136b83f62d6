"""Which files of a pre-training corpus would poison pre-training, and why.

A clinical archive holds scout/localizer scans, empty or broken exports, 2-D screenshots and 4-D
series next to the 3-D volumes we want (Wald et al., "Revisiting MAE pre-training for 3D medical
image segmentation", arXiv 2410.23132, section "Pre-training Dataset", filter them out before
pre-training). Every check here returns a one-line reason (or None) and never raises for a bad
file: the caller skips the file and records the reason next to its path. Reasons that come from
the readers are their S3DError messages and so start with the path ("PATH: file not found",
"PATH: cannot read image header (...)"); the checks' own reasons do not repeat it.

Checks run cheapest first: `header_reason` reads only the header, `array_reason` looks at the
voxels, `check_file` does both and hands the voxels on so that nothing is read twice, and
`fov_reason` judges the volume after resampling to the target spacing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from s3d.data.io import (
    Geometry,
    ImageHeader,
    _one_line,
    check_declared_size,
    count_nonfinite,
    read_header,
    read_image,
)
from s3d.errors import S3DError

# Header spacings are float32 and often written from DICOM with round-off (the TCIA brain series
# in shared/data/unlabeled declare 6.4999995 and 6.5000033 mm for 6.5 mm slices): a spacing
# within this relative tolerance of max_spacing counts as equal, like same_grid's rtol in io.py.
SPACING_RTOL = 1e-3


@dataclass
class CurationConfig:
    """Thresholds for skipping a file. min_slices and min_voxels hold on the file's own voxel grid and,
    when the caller gives a target spacing, on the grid after resampling to it as well: a header with
    a 1e-6 mm spacing describes a volume that resampling to 1 mm turns into a single voxel.

    The defaults keep every real volume in shared/data (0.43 x 0.43 x 6.5 mm clinical brain
    series, 19-slice prostate MR, 1 mm hippocampus crops of 24+ slices, CT at 1.5 and 3 mm).
    """

    # Scout scans are what the S3D paper filters by "field of view in any axis"; the numbers are
    # lost in our text copy of the paper (shared/seeds/002_a1b7103c4e4239cd.txt), but nnssl, the
    # authors' code, filters the same proprietary (FLOY) brain MRI data with MIN_FOV = 50 mm per
    # axis (src/nnssl/dataset_conversion/filter_mris_all.py, github.com/MIC-DKFZ/nnssl).
    # We count slices, not mm: a 50 mm rule would also drop the 1 mm hippocampus crops
    # (24-59 mm), which are real anatomy, while scouts are recognisable by their few slices
    # (tri-plane localizers store 1 to 5 per plane). 8 = 50 mm at the coarsest spacing we
    # keep (6.5 mm), so every series nnssl's FOV rule keeps at that spacing passes here too.
    # Small volumes at fine spacing are judged after resampling, by fov_reason.
    min_slices: int = 8
    # nnssl drops files under 200 KB as "probably broken" (same filter_mris_all.py); on gzipped
    # files the size measures content, not voxels, and would drop real files here (the hippocampus
    # crops are 40-65 KB, the prostate DWI 159 KB). Empty images are caught by array_reason's
    # constant-image check instead; this floor only stops stubs/thumbnails, and sits well below
    # the smallest real volumes we know (21 x 26 x 22 = 12k voxels in edge_cases, 43k in MSD
    # hippocampus): 16^3.
    min_voxels: int = 16**3
    # nnssl's MAX_SPACING = 6.5 mm for the same data (filter_mris_all.py; it rejects >= 6.5, we
    # reject only coarser, with SPACING_RTOL): typical 2-D clinical brain series are 5 mm slices
    # with 1-1.5 mm gaps, and the 0.43 x 0.43 x 6.5 mm TCIA series should be kept by default.
    # nnssl's Dataset800_Rocket_v0.py uses 8 mm ("often Z around 5/6, so we keep that in") for
    # another clinical set: raise it for such data.
    max_spacing: float = 6.5
    # fov_reason: a volume smaller than this fraction of the patch in >= 2 axes would fill the
    # patch mostly with padding (S3D samples 160^3 patches at 1 mm); 0 disables
    min_fov_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.min_slices, int) and self.min_slices >= 1):
            raise S3DError(f"curation: min_slices must be an integer >= 1, got {self.min_slices!r}")
        if not (isinstance(self.min_voxels, int) and self.min_voxels >= 0):
            raise S3DError(f"curation: min_voxels must be an integer >= 0, got {self.min_voxels!r}")
        if not (isinstance(self.max_spacing, (int, float)) and self.max_spacing > 0):
            raise S3DError(f"curation: max_spacing must be a positive number of mm, got {self.max_spacing!r}")
        if not (isinstance(self.min_fov_fraction, (int, float)) and math.isfinite(self.min_fov_fraction)
                and self.min_fov_fraction >= 0):
            raise S3DError(f"curation: min_fov_fraction must be a number >= 0, got {self.min_fov_fraction!r}")

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> CurationConfig:
        """Missing keys take the defaults (older files); unknown keys are an error (typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise S3DError(f"curation: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _line(text: str) -> str:
    return " ".join(str(text).split())


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _header_problem(h: ImageHeader, cfg: CurationConfig, target_spacing: Sequence[float] | None = None
                    ) -> str | None:
    if h.components != 1:
        return f"{h.components} components per voxel (RGB/vector image), not one scalar volume"
    if h.spatial_shape is None:
        dims = list(h.shape)
        while len(dims) > 3 and dims[-1] == 1:
            dims.pop()
        if len(dims) < 3:
            return f"{len(dims)}-D image (shape {tuple(h.shape)}), not a 3-D volume"
        volumes = int(np.prod(dims[3:]))
        return f"{len(dims)}-D image with {volumes} volumes (shape {tuple(h.shape)}): store one 3-D volume per file"
    if np.issubdtype(h.dtype, np.complexfloating):
        return f"complex voxels ({h.dtype}): store magnitude images"
    try:  # the reader's own size checks (truncated, impossible compression, memory budget), in its words
        check_declared_size(h)
    except S3DError as e:
        return _line(e).removeprefix(f"{h.path}: ")
    spacing = np.asarray(h.spacing, dtype=np.float64)
    if spacing.size != 3 or not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return f"voxel spacing {_fmt(spacing)} mm is not positive and finite"
    shape = h.spatial_shape
    axis = int(np.argmin(shape))
    if shape[axis] < cfg.min_slices:
        return f"localizer/scout-like: only {shape[axis]} slices along axis {axis} (shape {shape})"
    axis = int(np.argmax(spacing))
    if spacing[axis] > cfg.max_spacing * (1 + SPACING_RTOL):
        return (f"spacing {spacing[axis]:.4g} mm along axis {axis} is coarser than max_spacing "
                f"{cfg.max_spacing:g} mm (spacing {_fmt(spacing)})")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels < cfg.min_voxels:
        return f"only {voxels} voxels (shape {shape}), fewer than min_voxels {cfg.min_voxels}"
    if target_spacing is None:
        return None
    from s3d.data.resample import shape_for_spacing

    target = tuple(float(t) for t in target_spacing)
    grid = shape_for_spacing(shape, spacing, target)
    where = f"after resampling to {_fmt(target)} mm (shape {shape} at spacing {_fmt(spacing)} mm -> {grid})"
    axis = int(np.argmin(grid))
    if grid[axis] < cfg.min_slices:
        return f"only {grid[axis]} slices along axis {axis} {where}, fewer than min_slices {cfg.min_slices}"
    voxels = int(np.prod(grid, dtype=np.int64))
    if voxels < cfg.min_voxels:
        return f"only {voxels} voxels {where}, fewer than min_voxels {cfg.min_voxels}"
    return None


def header_reason(path: str | Path, cfg: CurationConfig | None = None,
                  target_spacing: Sequence[float] | None = None) -> str | None:
    """Why the file should be skipped judging by its header alone (no voxels read), or None.

    Unreadable header, not one 3-D scalar volume, complex voxels, an uncompressed file shorter than
    its header declares, bad spacing, spacing coarser than cfg.max_spacing, fewer than
    cfg.min_slices along an axis, fewer than cfg.min_voxels voxels; the last two also on the grid
    after resampling to `target_spacing` (mm per axis), when given.
    """
    cfg = cfg or CurationConfig()
    try:
        return _header_problem(read_header(path), cfg, target_spacing)
    except S3DError as e:
        return _line(e)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad file is a reason, never a crash
        return f"{path}: cannot read image header ({_one_line(e)})"


def array_reason(data: np.ndarray, path: str | Path | None = None, cfg: CurationConfig | None = None) -> str | None:
    """Why the voxels `data` (any shape, usually (i, j, k)) would poison pre-training, or None.

    NaN/inf voxels (z-scoring turns the whole volume into NaN), a constant image (an empty export:
    nothing to reconstruct, and a zero std), complex voxels. `path` and `cfg` are for symmetry
    with header_reason; no threshold applies to the voxels yet.
    """
    data = np.asarray(data)
    if data.size == 0:
        return "no voxels"
    if np.iscomplexobj(data):
        return f"complex voxels ({data.dtype}): store magnitude images"
    bad = count_nonfinite(data)
    if bad:
        return f"{bad} NaN/inf voxels (of {data.size})"
    lo, hi = data.min(), data.max()
    if lo == hi:
        return f"constant image (all voxels = {lo.item():g})"
    return None


def check_file(path: str | Path, cfg: CurationConfig | None = None, target_spacing: Sequence[float] | None = None
               ) -> tuple[str | None, np.ndarray | None, Geometry | None]:
    """(reason, data, geometry): the header checks (on the resampled grid too, given `target_spacing`),
    then read_image, then the voxel checks.

    data is float32 (i, j, k) as read_image gives it; data and geometry are None when the file is
    skipped (reason not None). A reader error (e.g. a truncated .nii.gz, whose gzip stream ends
    early) becomes the reason, in the reader's own one-line words.
    """
    cfg = cfg or CurationConfig()
    reason = header_reason(path, cfg, target_spacing)
    if reason is not None:
        return reason, None, None
    try:
        data, geometry = read_image(path)
    except S3DError as e:
        return _line(e), None, None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        return f"{path}: cannot read image ({_one_line(e)})", None, None
    reason = array_reason(data, path, cfg)
    if reason is not None:
        return reason, None, None
    return None, data, geometry


def fov_reason(shape_at_target: Sequence[int], patch_size: Sequence[int], min_fraction: float = 1.0,
               min_axes: int = 2) -> str | None:
    """Why a preprocessed volume is too small for the patch, or None.

    shape_at_target: (i, j, k) voxels after resampling to the target spacing; patch_size: the
    pre-training patch in the same voxels. Skipped when the volume is smaller than
    min_fraction * patch along at least min_axes axes: the patch would be mostly padding. One thin
    axis alone (a slab of axial slices) is fine: the patch still holds whole slices of anatomy.
    min_fraction 0 never skips.
    """
    shape = [int(s) for s in shape_at_target]
    patch = [int(p) for p in patch_size]
    if len(shape) != len(patch):
        raise ValueError(f"fov_reason: shape {tuple(shape)} and patch {tuple(patch)} differ in length")
    if not (math.isfinite(min_fraction) and min_fraction >= 0):
        raise ValueError(f"fov_reason: min_fraction must be finite and >= 0, got {min_fraction}")
    if min_axes < 1:
        raise ValueError(f"fov_reason: min_axes must be >= 1, got {min_axes}")
    small = [a for a, (s, p) in enumerate(zip(shape, patch, strict=True)) if s < min_fraction * p]
    if len(small) < min_axes:
        return None
    return (f"smaller than {min_fraction:g} x patch {tuple(patch)} along axes {tuple(small)} "
            f"(shape {tuple(shape)} at the target spacing)")
