"""Patch sampling from preprocessed cases, with nnU-Net's foreground oversampling."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


def crop_patch(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int], fill: float = 0) -> np.ndarray:
    """array (..., X, Y, Z) cropped at `start` (may be negative or run past the end) to `patch_size`;
    the part outside the volume is `fill` (0: the z-scored mean for images, background for labels)."""
    lead = array.shape[:-3]
    out = np.full((*lead, *patch_size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch_size, array.shape[-3:], strict=True):
        lo, hi = max(s, 0), min(s + p, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = array[(..., *src)]
    return out


def _start_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """Range of valid patch starts: a volume smaller than the patch is centred (nnU-Net's
    need_to_pad split evenly), otherwise the patch stays inside."""
    lo, hi = [], []
    for n, p in zip(shape, patch_size, strict=True):
        need = max(0, p - n)
        lo.append(-(need // 2))
        hi.append(n + need // 2 + need % 2 - p)
    return lo, hi


def sample_patch(
    data: np.ndarray,
    seg: np.ndarray | None,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    force_fg: bool = False,
    class_locations: dict | None = None,
    return_valid: bool = False,
) -> tuple[np.ndarray, np.ndarray | None] | tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """One patch (C, *patch) and its labels (*patch) or None.

    force_fg: pick a foreground class present in the case uniformly, then one of its voxels, and
    centre the patch there (clamped to the valid range), as nnU-Net does; falls back to a random
    location for cases without foreground.
    """
    shape = data.shape[1:]
    lo, hi = _start_bounds(shape, patch_size)
    start = None
    if force_fg:
        locs = class_locations
        if locs is None and seg is not None:
            locs = {int(c): np.argwhere(seg == c) for c in np.unique(seg) if c != 0}
        candidates = [np.asarray(v) for k, v in (locs or {}).items() if int(k) != 0 and len(v)]
        if candidates:
            voxels = candidates[rng.integers(len(candidates))]
            v = voxels[rng.integers(len(voxels))]
            start = [int(np.clip(c - p // 2, a, b)) for c, p, a, b in zip(v, patch_size, lo, hi, strict=True)]
    if start is None:
        start = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)]
    img = crop_patch(data, start, patch_size, 0)
    lab = crop_patch(seg, start, patch_size, 0) if seg is not None else None
    if return_valid:  # 1 inside the volume, 0 in the padding
        return img, lab, crop_patch(np.ones((1, *shape), np.uint8), start, patch_size, 0)
    return img, lab


class PatchDataset(IterableDataset):
    """Endless batches {"image": (B,C,*patch) float32, "seg": (B,1,*patch) int64 (labeled cases only)}.

    The last round(B * oversample_foreground) samples of every batch are forced to contain
    foreground (nnU-Net: 1/3). Randomness is a function of (seed, rank, worker), so DDP ranks and
    DataLoader workers draw different patches reproducibly. Loaded cases are kept in an LRU cache
    of `cache_bytes`. channels_as_samples: each sample is one channel of a case (S3D pre-training
    feeds one modality at a time), so the batch has C = 1. with_valid_mask: also yield "valid"
    (B,1,*patch) uint8, 1 inside the volume and 0 in the padding.
    """

    def __init__(self, cases: list, patch_size: Sequence[int], batch_size: int, oversample_foreground: float = 1 / 3,
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_as_samples: bool = False,
                 cache_bytes: int = 4 << 30, with_valid_mask: bool = False) -> None:
        super().__init__()
        if not cases:
            raise ValueError("PatchDataset needs at least one case")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.n_fg = int(round(batch_size * oversample_foreground))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_as_samples = channels_as_samples
        self.with_valid_mask = with_valid_mask
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self.labeled = all(getattr(c, "has_seg", False) for c in self.cases)

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        data, seg = self.cases[index].load()
        self._cache[index] = (data, seg)
        while len(self._cache) > 1 and sum(d.nbytes + (s.nbytes if s is not None else 0)
                                           for d, s in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return data, seg

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.rank, worker])
        while True:
            yield self.batch(rng)

    def batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        images, segs, valids = [], [], []
        for i in range(self.batch_size):
            idx = int(rng.integers(len(self.cases)))
            case = self.cases[idx]
            data, seg = self._load(idx)
            if self.channels_as_samples:
                c = int(rng.integers(data.shape[0]))
                data = data[c : c + 1]
            force = i >= self.batch_size - self.n_fg
            locs = getattr(case, "class_locations", None) if seg is not None else None
            img, lab, valid = sample_patch(data, seg, self.patch_size, rng, force_fg=force and seg is not None,
                                           class_locations=locs, return_valid=True)
            images.append(img)
            valids.append(valid)
            segs.append(lab)
        out = {"image": torch.from_numpy(np.stack(images).astype(np.float32, copy=False))}
        if self.labeled and all(s is not None for s in segs):
            out["seg"] = torch.from_numpy(np.stack(segs)[:, None].astype(np.int64))
        if self.with_valid_mask:
            out["valid"] = torch.from_numpy(np.stack(valids))
        return out
