"""Random block masks for S3D masked-autoencoder pre-training (Wald et al. 2024, section 4).

A mask is a ``(B, 1, i, j, k)`` float tensor at input resolution, 1 = visible, 0 = masked. It is drawn
on a coarse grid of ``patch / block`` cells and repeated up to the input, so masked regions are whole
blocks. S3D samples the grid in the bottleneck (5^3 for a 160^3 patch, i.e. 32^3 blocks) so that the
mask stays block-aligned at every encoder stage, the bottleneck included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from s3d.errors import S3DError

__all__ = [
    "MaskConfigError",
    "cumulative_strides",
    "default_block_size",
    "validate_block_size",
    "random_block_mask",
    "parse_mask_ratio",
    "validate_mask_ratio",
]

Ratio = float | tuple[float, float]


class MaskConfigError(S3DError, ValueError):
    """Bad block size or mask ratio: a ValueError for library callers, an S3DError for the CLI."""


def _strides_of(cfg: Any) -> list[tuple[int, int, int]]:
    strides = getattr(cfg, "strides", cfg)
    out = []
    for s in strides:
        if isinstance(s, int):
            s = (s, s, s)
        out.append(tuple(int(v) for v in s))
    return out


def cumulative_strides(cfg: Any) -> list[tuple[int, int, int]]:
    """Total downsampling factor per axis at the output of each stage (first stage first).

    ``cfg`` is a ``ResEncConfig`` (anything with ``.strides``) or a sequence of per-stage strides.
    """
    acc = (1, 1, 1)
    out = []
    for s in _strides_of(cfg):
        if len(s) != 3 or min(s) < 1:
            raise MaskConfigError(f"network strides: each stage needs three positive strides, got {s}")
        acc = tuple(a * b for a, b in zip(acc, s, strict=True))
        out.append(acc)
    return out


def validate_block_size(patch_size: Sequence[int], block_size: Sequence[int], cfg: Any) -> tuple[int, int, int]:
    """Check that ``block_size`` tiles the patch and is a multiple of every stage's cumulative stride.

    The second condition is what makes every stage (the bottleneck included) see whole masked cells:
    with a 16^3 grid on a 160^3 patch the 5^3 bottleneck voxels straddle visible and masked blocks, so
    the bottleneck is effectively unmasked. Raises ``MaskConfigError`` (a ValueError) otherwise.
    """
    patch = tuple(int(p) for p in patch_size)
    block = tuple(int(b) for b in block_size)
    if len(patch) != 3 or len(block) != 3:
        raise MaskConfigError(f"mask block size {block} / patch size {patch}: both need three axes")
    if min(block) < 1:
        raise MaskConfigError(f"mask block size {block}: every axis must be >= 1")
    for ax, (p, b) in enumerate(zip(patch, block, strict=True)):
        if p % b:
            raise MaskConfigError(f"mask block size {block} does not divide patch size {patch} (axis {ax})")
    for stage, cum in enumerate(cumulative_strides(cfg)):
        for ax, (b, c) in enumerate(zip(block, cum, strict=True)):
            if b % c:
                raise MaskConfigError(
                    f"mask block size {block} is not a multiple of the cumulative stride {cum} of encoder stage "
                    f"{stage} (axis {ax}); masks would not align with that stage"
                )
    return block


def default_block_size(patch_size: Sequence[int], cfg: Any) -> tuple[int, int, int]:
    """Block size = the encoder's total stride per axis (S3D: 32^3 blocks, a 5^3 grid for 160^3 patches).

    The grid of cells is then the bottleneck grid, as in S3D section 4 "Masking strategy".
    Raises ``MaskConfigError`` (a ValueError) if the patch is not divisible by the total stride.
    """
    cum = cumulative_strides(cfg)
    block = cum[-1] if cum else (1, 1, 1)
    return validate_block_size(patch_size, block, cfg)


def validate_mask_ratio(ratio: Ratio) -> Ratio:
    """Return ``ratio`` as a float in (0, 1) or an ordered pair ``(lo, hi)`` with 0 < lo <= hi < 1."""
    if isinstance(ratio, (tuple, list)):
        if len(ratio) != 2:
            raise MaskConfigError(f"mask ratio {ratio!r}: a range needs exactly two values (lo, hi)")
        lo, hi = float(ratio[0]), float(ratio[1])
        if not (0.0 < lo < 1.0 and 0.0 < hi < 1.0):
            raise MaskConfigError(f"mask ratio range {lo}-{hi}: both ends must lie strictly between 0 and 1")
        if lo > hi:
            raise MaskConfigError(f"mask ratio range {lo}-{hi}: lower end is above the upper end")
        return (lo, hi)
    r = float(ratio)
    if not 0.0 < r < 1.0 or math.isnan(r):
        raise MaskConfigError(f"mask ratio {r}: must lie strictly between 0 and 1")
    return r


_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_mask_ratio(text: str) -> Ratio:
    """Parse a CLI mask ratio: ``"0.75"`` -> 0.75 (fixed), ``"0.6-0.9"`` -> (0.6, 0.9) (drawn per sample)."""
    s = str(text).strip()
    m = re.fullmatch(_NUM, s)
    if m:
        return validate_mask_ratio(float(m.group(1)))
    m = re.fullmatch(_NUM + "(?:-|:|,)" + _NUM, s)
    if m:
        return validate_mask_ratio((float(m.group(1)), float(m.group(2))))
    raise MaskConfigError(f"--mask-ratio {text!r}: expected a fraction like 0.75 or a range like 0.6-0.9")


def _per_sample_ratio(batch_size: int, ratio: Ratio, generator: torch.Generator | None, rng_device) -> torch.Tensor:
    ratio = validate_mask_ratio(ratio)
    if isinstance(ratio, tuple):
        lo, hi = ratio
        u = torch.rand(batch_size, generator=generator, device=rng_device, dtype=torch.float64)
        return lo + (hi - lo) * u
    return torch.full((batch_size,), ratio, dtype=torch.float64, device=rng_device)


def random_block_mask(
    batch_size: int,
    patch_size: Sequence[int],
    block_size: Sequence[int],
    ratio: Ratio,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random block mask, 1 = visible, shape ``(B, 1, *patch_size)`` float32.

    Per sample, exactly ``round(r * n_cells)`` of the ``n_cells = prod(patch / block)`` cells are masked,
    picked by a random permutation (MAE, He et al. 2022 "random masking"; S3D found no gain from
    structured masking). ``r`` is ``ratio`` or, for a pair ``(lo, hi)``, drawn uniformly per sample
    (S3D's dynamic 60-90 %). At least one cell stays visible and at least one is masked.
    Random numbers come from ``generator`` (on its device) for reproducibility.
    """
    patch = tuple(int(p) for p in patch_size)
    block = tuple(int(b) for b in block_size)
    if len(patch) != 3 or len(block) != 3 or min(block) < 1 or any(p % b for p, b in zip(patch, block, strict=True)):
        raise MaskConfigError(f"mask block size {block} must have three axes that divide patch size {patch}")
    if batch_size < 1:
        raise MaskConfigError(f"mask batch size {batch_size}: must be >= 1")
    grid = tuple(p // b for p, b in zip(patch, block, strict=True))
    n_cells = math.prod(grid)
    if n_cells < 2:
        raise MaskConfigError(
            f"mask block size {block} covers the whole patch {patch}: need >= 2 cells to mask some and keep some"
        )
    rng_device = generator.device if generator is not None else torch.device("cpu")
    r = _per_sample_ratio(batch_size, ratio, generator, rng_device)
    # round half up, then keep >= 1 masked and >= 1 visible cell so the loss and the encoder both have input
    n_masked = torch.floor(r * n_cells + 0.5).long().clamp_(1, n_cells - 1)
    noise = torch.rand(batch_size, n_cells, generator=generator, device=rng_device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each cell in a random permutation
    coarse = (rank >= n_masked[:, None]).float().view(batch_size, 1, *grid)
    out_device = torch.device(device) if device is not None else rng_device
    coarse = coarse.to(out_device)
    for ax, b in enumerate(block):
        coarse = coarse.repeat_interleave(b, dim=2 + ax)
    return coarse.contiguous()
