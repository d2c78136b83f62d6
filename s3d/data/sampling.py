"""Patch sampling from the preprocessed store, with nnU-Net's foreground oversampling.

`PatchDataset` is what DataLoader workers iterate (s3d.data.loader): it holds a few numbers per
case, never a volume, and cuts every patch straight from the compressed store, so a worker's memory
does not grow with the corpus. Batch `n` of a run is a pure function of (seed, rank, n): workers
take turns (worker w of W makes batches w, w + W, ...; DataLoader returns them in that order), so
the data order is the same with any number of workers, after a resume at step n, and differs
between DDP ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from s3d.data.store import case_paths, read_crop

# Open store files kept per worker: re-opening costs a file open + header parse per patch, keeping
# all of them would map the whole corpus.
OPEN_FILES = 16


def crop_patch(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int], fill: float = 0) -> np.ndarray:
    """array (..., X, Y, Z) cropped at `start` (may be negative or run past the end) to `patch_size`;
    the part outside the volume is `fill` (0: the z-scored mean for images, background for labels)."""
    return read_crop(array, start, patch_size, fill)


def _start_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """Range of valid patch starts: a volume smaller than the patch is centred (nnU-Net's
    need_to_pad split evenly), otherwise the patch stays inside."""
    lo, hi = [], []
    for n, p in zip(shape, patch_size, strict=True):
        need = max(0, p - n)
        lo.append(-(need // 2))
        hi.append(n + need // 2 + need % 2 - p)
    return lo, hi


def patch_start(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator,
                class_locations: dict | None = None) -> list[int]:
    """Start voxel of a patch in a volume of `shape`.

    With class_locations (label -> (N, 3) voxels): pick a foreground class present in the case
    uniformly, then one of its voxels, and centre the patch there (clamped to the valid range), as
    nnU-Net does; a case without foreground, or no class_locations, gets a uniformly random start.
    """
    lo, hi = _start_bounds(shape, patch_size)
    candidates = [np.asarray(v) for k, v in (class_locations or {}).items() if int(k) != 0 and len(v)]
    if candidates:
        voxels = candidates[rng.integers(len(candidates))]
        v = voxels[rng.integers(len(voxels))]
        return [int(np.clip(c - p // 2, a, b)) for c, p, a, b in zip(v, patch_size, lo, hi, strict=True)]
    return [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)]


def inside_mask(shape: Sequence[int], start: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """(1, *patch) uint8: 1 where the patch lies inside the volume, 0 in the padding."""
    out = np.zeros((1, *patch_size), np.uint8)
    region = tuple(slice(max(0, -s), max(0, min(p, n - s))) for s, p, n in zip(start, patch_size, shape, strict=True))
    out[(slice(None), *region)] = 1
    return out


def sample_patch(
    data: np.ndarray,
    seg: np.ndarray | None,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    force_fg: bool = False,
    class_locations: dict | None = None,
    return_valid: bool = False,
) -> tuple[np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One patch (C, *patch) of in-memory arrays and its labels (*patch) or None (see patch_start;
    force_fg uses class_locations, or the labels of `seg` when they are not given)."""
    shape = data.shape[1:]
    locs = None
    if force_fg:
        locs = class_locations
        if locs is None and seg is not None:
            locs = {int(c): np.argwhere(seg == c) for c in np.unique(seg) if c != 0}
    start = patch_start(shape, patch_size, rng, locs)
    img = read_crop(data, start, patch_size, 0)
    lab = read_crop(seg, start, patch_size, 0) if seg is not None else None
    if return_valid:
        return img, lab, inside_mask(shape, start, patch_size)
    return img, lab


class PatchDataset(IterableDataset):
    """Endless batches {"image": (B,C,*patch) float32, "seg": (B,1,*patch) int64 (labeled cases),
    "valid": (B,1,*patch) uint8 (with_valid_mask)} cut from store cases (s3d.data.preprocess.PreprocessedCase).

    The last round(B * oversample_foreground) samples of every batch are forced to contain
    foreground (nnU-Net: 1/3). channels_as_samples: each sample is one channel of a case (S3D
    pre-training feeds one modality at a time), so the batch has C = 1. "valid" is 1 inside the
    volume and, for cases with a loss mask (anatomy / anonymisation), inside that mask.
    start_step: the first batch number this iterator makes (a resumed run continues the sequence).
    """

    def __init__(self, cases: Sequence, patch_size: Sequence[int], batch_size: int,
                 oversample_foreground: float = 1 / 3, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_as_samples: bool = False, with_valid_mask: bool = False, start_step: int = 0) -> None:
        super().__init__()
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.n_fg = int(round(batch_size * oversample_foreground))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_step = start_step
        self.channels_as_samples = channels_as_samples
        self.with_valid_mask = with_valid_mask
        # A few numbers per case in numpy arrays, not a list of objects: forked workers share these
        # pages (no reference counts written into them) and 100k cases cost a few MB.
        folders = sorted({str(Path(c.path).parent) for c in cases})
        where = {f: i for i, f in enumerate(folders)}
        self._folders = folders
        self._folder = np.array([where[str(Path(c.path).parent)] for c in cases], np.int32)
        self._ids = np.array([c.case_id.encode() for c in cases])
        self._shapes = np.array([c.shape for c in cases], np.int32).reshape(-1, 3)
        self._channels = np.array([c.num_channels for c in cases], np.int32)
        self._has_seg = np.array([c.has_seg for c in cases], bool)
        self._has_mask = np.array([c.has_loss_mask for c in cases], bool)
        self.labeled = bool(self._has_seg.all())
        self._labels = [tuple(c.class_location_labels) for c in cases] if self.labeled else None
        self._check_batch_memory()
        self._open: OrderedDict[int, dict] = OrderedDict()
        self._locations: OrderedDict[int, dict] = OrderedDict()

    def _check_batch_memory(self) -> None:
        """S3DError when one batch alone (float32 image + label per sample) exceeds the memory budget: a
        mistyped --patch-size or --batch-size fails on one line, not as a MemoryError in a worker."""
        from s3d.data.io import memory_budget
        from s3d.errors import S3DError

        channels = 1 if self.channels_as_samples else int(self._channels.max())
        need = float(self.batch_size) * float(np.prod([float(p) for p in self.patch_size])) * (4 * channels + 4)
        budget = memory_budget()
        if need > budget:
            patch = " x ".join(str(p) for p in self.patch_size)
            raise S3DError(f"--patch-size {patch} with --batch-size {self.batch_size}: one batch is about "
                           f"{need / 2**30:.3g} GiB before the network runs, more than the memory budget "
                           f"{budget / 2**30:.3g} GiB (S3D_MAX_IMAGE_BYTES)")

    def __getstate__(self) -> dict:
        # open store files belong to one process; a worker started by spawn / forkserver opens its own
        return {**self.__dict__, "_open": OrderedDict(), "_locations": OrderedDict()}

    def from_step(self, step: int) -> PatchDataset:
        """The same dataset, its stream starting at batch `step` (a resumed run)."""
        new = PatchDataset.__new__(PatchDataset)
        new.__dict__.update({**self.__getstate__(), "start_step": int(step)})
        return new

    def __len__(self) -> int:  # number of cases, not of batches (the stream is endless)
        return len(self._ids)

    def case(self, index: int):  # noqa: ANN201 - PreprocessedCase
        from s3d.data.preprocess import PreprocessedCase

        case_id = self._ids[index].decode()
        return PreprocessedCase(
            case_id=case_id, path=case_paths(self._folders[self._folder[index]], case_id)["data"],
            shape=tuple(int(s) for s in self._shapes[index]), has_seg=bool(self._has_seg[index]),
            num_channels=int(self._channels[index]), has_loss_mask=bool(self._has_mask[index]),
            class_location_labels=self._labels[index] if self._labels else (),
        )

    def _arrays(self, index: int) -> dict:
        if index not in self._open:
            self._open[index] = self.case(index).open()
            while len(self._open) > OPEN_FILES:
                self._open.popitem(last=False)
        self._open.move_to_end(index)
        return self._open[index]

    def _class_locations(self, index: int) -> dict:
        if index not in self._locations:
            self._locations[index] = self.case(index).class_locations
            while len(self._locations) > 4 * OPEN_FILES:
                self._locations.popitem(last=False)
        self._locations.move_to_end(index)
        return self._locations[index]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self.start_step + worker
        while True:
            yield self.batch(n)
            n += workers

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        """Batch number `n` of this (seed, rank)."""
        rng = np.random.default_rng([self.seed, self.rank, n])
        images, segs, valids = [], [], []
        for i in range(self.batch_size):
            idx = int(rng.integers(len(self._ids)))
            shape = tuple(int(s) for s in self._shapes[idx])
            lead: tuple = ()
            if self.channels_as_samples:
                c = int(rng.integers(self._channels[idx]))
                lead = (slice(c, c + 1),)
            force = self.labeled and i >= self.batch_size - self.n_fg
            start = patch_start(shape, self.patch_size, rng, self._class_locations(idx) if force else None)
            arrays = self._arrays(idx)
            images.append(read_crop(arrays["data"], start, self.patch_size, 0, lead=lead))
            if self.labeled:
                segs.append(read_crop(arrays["seg"], start, self.patch_size, 0))
            if self.with_valid_mask:
                valid = inside_mask(shape, start, self.patch_size)
                if "lossmask" in arrays:
                    valid *= read_crop(arrays["lossmask"], start, self.patch_size, 0)[None]
                valids.append(valid)
        out = {"image": torch.from_numpy(np.stack(images).astype(np.float32, copy=False))}
        if self.labeled:
            out["seg"] = torch.from_numpy(np.stack(segs)[:, None].astype(np.int64))
        if self.with_valid_mask:
            out["valid"] = torch.from_numpy(np.stack(valids))
        return out
