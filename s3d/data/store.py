"""Preprocessed volumes as chunked, compressed blosc2 NDArrays (`.b2nd`), read one patch at a time.

nnU-Net v2 and nnssl store their preprocessed data this way: a patch read decompresses only the
blocks it overlaps, so a DataLoader worker never holds a whole volume, and a float32 brain costs a
fraction of its uncompressed size on disk. Arrays are `(C, X, Y, Z)` images or `(X, Y, Z)` label
and mask maps; block and chunk shapes follow the training patch (`blosc2_layout`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from s3d.errors import S3DError
from s3d.files import atomic_path

SUFFIX = ".b2nd"
# Written to store.json; a folder without it (or with another value) was made by an older s3d.
STORE_FORMAT = "blosc2-ndarray"
STORE_VERSION = 1

# nnU-Net v2 comp_blosc2_params: the unit of decompression (a block) at most 128 KiB so that it stays
# in a core's L2 cache, a chunk at most 6 MiB and no chunk axis longer than 1.5 x the patch.
MAX_BLOCK_BYTES = 128 * 1024
MAX_CHUNK_BYTES = 6 * 1024**2
CHUNK_TO_PATCH = 1.5
# nnU-Net v2 save_case: LZ4HC at level 5 (fast to decompress, ~2-4x smaller than raw float32)
CLEVEL = 5


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blosc2_layout(shape: Sequence[int], patch_size: Sequence[int], itemsize: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for an array of `shape` (..., X, Y, Z) read in patches of `patch_size` (X, Y, Z).

    Leading (channel) axes get 1, so one channel is read without the others. A block starts as the
    patch rounded up to a power of two (clipped to the array) and its longest axis relative to the
    patch is halved until it fits MAX_BLOCK_BYTES; the chunk then grows by whole blocks along its
    least covered axis up to CHUNK_TO_PATCH x the patch and MAX_CHUNK_BYTES.
    """
    spatial = [int(s) for s in shape[-3:]]
    lead = [1] * (len(shape) - 3)
    patch = [max(1, int(p)) for p in patch_size]
    limit = [max(1, min(n, math.floor(CHUNK_TO_PATCH * p))) for n, p in zip(spatial, patch, strict=True)]
    block = [min(_pow2_ceil(p), lim) for p, lim in zip(patch, limit, strict=True)]

    def nbytes(s: Sequence[int]) -> int:
        return math.prod(s) * itemsize

    while nbytes(block) > MAX_BLOCK_BYTES and max(block) > 1:
        # ties go to the last axis, the fastest-varying one in C order
        axis = max((a for a in range(3) if block[a] > 1), key=lambda a: (block[a] / patch[a], a))
        block[axis] = max(1, _pow2_ceil(block[axis]) // 2)
    chunk = list(block)
    while True:
        grow = []
        for a in range(3):
            if chunk[a] >= limit[a]:
                continue
            cand = list(chunk)
            cand[a] = min(chunk[a] + block[a], limit[a])
            if nbytes(cand) <= MAX_CHUNK_BYTES:
                grow.append((chunk[a] / limit[a], a, cand))
        if not grow:
            break
        chunk = min(grow)[2]
    return tuple(lead + chunk), tuple(lead + block)


def write_array(path: str | Path, array: np.ndarray, patch_size: Sequence[int]) -> None:
    """Write `array` (..., X, Y, Z) to `path` (.b2nd) atomically, laid out for `patch_size` reads."""
    import blosc2

    path = Path(path)
    array = np.ascontiguousarray(array)
    chunks, blocks = blosc2_layout(array.shape, patch_size, array.dtype.itemsize)
    cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": CLEVEL, "filters": [blosc2.Filter.SHUFFLE], "nthreads": 1}
    # the temporary name keeps the .b2nd suffix: blosc2 picks the container format from it
    with atomic_path(path, keep_suffix=SUFFIX) as tmp:
        blosc2.asarray(array, urlpath=str(tmp), mode="w", chunks=chunks, blocks=blocks, cparams=cparams)


def open_array(path: str | Path):  # noqa: ANN201 - blosc2.NDArray, imported lazily
    """The array at `path`, memory-mapped read-only: slicing it decompresses only the blocks it touches."""
    import blosc2

    try:
        return blosc2.open(str(path), mode="r", mmap_mode="r", dparams={"nthreads": 1})
    except FileNotFoundError:
        raise S3DError(f"{path}: preprocessed array not found; rerun `s3d preprocess`") from None
    except Exception as e:  # noqa: BLE001 - a damaged file is a user-fixable problem, in one line
        raise S3DError(f"{path}: cannot read preprocessed array ({' '.join(str(e).split())[:200]}); "
                       "rerun `s3d preprocess --overwrite`") from e


def read_crop(array, start: Sequence[int], size: Sequence[int], fill: float = 0,  # noqa: ANN001
              lead: Sequence[int | slice] = ()) -> np.ndarray:
    """array[(*lead, X, Y, Z)] cropped at `start` (may be negative or run past the end) to `size`;
    the part outside the volume is `fill`. `array` is a numpy array or a blosc2 NDArray: only the
    overlapping region is read. `lead` indexes the leading axes (e.g. `(slice(c, c + 1),)` for one
    channel), whole leading axes when shorter."""
    shape = tuple(int(s) for s in array.shape)
    n_lead = len(shape) - 3
    lead = tuple(lead) + (slice(None),) * (n_lead - len(lead))
    lead_shape = [len(range(*sl.indices(n))) if isinstance(sl, slice) else None
                  for sl, n in zip(lead, shape[:n_lead], strict=True)]
    out_lead = [n for n in lead_shape if n is not None]
    out = np.full((*out_lead, *size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, size, shape[-3:], strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(p), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[(..., *dst)] = array[(*lead, *src)]
    return out


# ------------------------------------------------------------------------------------ one case
# cases/CASE.b2nd (C,X,Y,Z) float32 image; CASE_seg.b2nd (X,Y,Z) int16 labels; CASE_lossmask.b2nd
# (X,Y,Z) uint8, 1 where the loss counts (from an anatomy / anonymisation mask); CASE_locations.npy
# (M,4) int32 rows (label, i, j, k) for foreground oversampling; CASE.json the properties, written
# last so that its presence means the arrays beside it are complete.
def case_paths(cases_dir: str | Path, case_id: str) -> dict[str, Path]:
    d = Path(cases_dir)
    return {"data": d / f"{case_id}{SUFFIX}", "seg": d / f"{case_id}_seg{SUFFIX}",
            "lossmask": d / f"{case_id}_lossmask{SUFFIX}", "locations": d / f"{case_id}_locations.npy",
            "meta": d / f"{case_id}.json"}


def write_case(cases_dir: str | Path, case_id: str, data: np.ndarray, props: dict, patch_size: Sequence[int], *,
               seg: np.ndarray | None = None, loss_mask: np.ndarray | None = None,
               locations: dict[int, np.ndarray] | None = None) -> None:
    """Write one preprocessed case (layout above); `props` must be JSON-safe and goes to CASE.json last."""
    from s3d.files import write_json

    paths = case_paths(cases_dir, case_id)
    paths["meta"].unlink(missing_ok=True)  # a rewrite is incomplete until the new JSON lands
    write_array(paths["data"], data, patch_size)
    for key, arr in (("seg", seg), ("lossmask", loss_mask)):
        if arr is not None:
            write_array(paths[key], arr, patch_size)
        else:
            paths[key].unlink(missing_ok=True)
    if locations:
        rows = np.concatenate([np.column_stack([np.full(len(v), k, np.int64), v])
                               for k, v in sorted(locations.items())]).astype(np.int32)
        with atomic_path(paths["locations"]) as tmp, open(tmp, "wb") as f:
            np.save(f, rows)  # a file object, so numpy does not append ".npy" to the temporary name
    else:
        paths["locations"].unlink(missing_ok=True)
    write_json(paths["meta"], {**props, "store_version": STORE_VERSION, "has_loss_mask": loss_mask is not None},
               indent=None)


def read_locations(path: str | Path, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """label -> (N, 3) int64 voxel coordinates from a CASE_locations.npy ((0, 3) for absent labels)."""
    locs = {int(k): np.zeros((0, 3), np.int64) for k in labels}
    if not locs:
        return locs
    try:
        rows = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return locs
    except (OSError, ValueError) as e:
        raise S3DError(f"{path}: cannot read class locations ({' '.join(str(e).split())}); "
                       "rerun `s3d preprocess --overwrite`") from e
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    for k in locs:
        locs[k] = np.ascontiguousarray(rows[rows[:, 0] == k, 1:])
    return locs
