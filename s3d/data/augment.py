"""Data augmentation as batched torch operations, run on the training device.

Probabilities and ranges are nnU-Net's defaults (nnUNetTrainer.get_training_transforms): rotation
+-30 deg and scaling 0.7-1.4 each with p 0.2 per sample, mirroring p 0.5 per axis, Gaussian noise
p 0.1, Gaussian blur p 0.2 (sigma 0.5-1), multiplicative brightness p 0.15 (0.75-1.25), contrast
p 0.15 (0.75-1.25), simulated low resolution p 0.25 (zoom 0.5-1), gamma p 0.3 (+ inverted p 0.1,
0.7-1.5). Doing this in torch on the GPU (or the CPU's spare threads) replaces nnU-Net's
multi-process CPU pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _u(n: int, lo: float, hi: float, device, g) -> torch.Tensor:  # noqa: ANN001
    return torch.rand(n, generator=g, device="cpu").to(device) * (hi - lo) + lo


def _p(n: int, p: float, g) -> torch.Tensor:  # noqa: ANN001
    return torch.rand(n, generator=g) < p


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B,3) angles in radians about axes 0, 1, 2 -> (B,3,3) rotation matrices R0 @ R1 @ R2."""
    c, s = torch.cos(angles), torch.sin(angles)
    b = angles.shape[0]
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device).expand(b, 3, 3)
    mats = []
    for axis in range(3):
        i, j = [a for a in range(3) if a != axis]
        m = eye.clone()
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c[:, axis], -s[:, axis], s[:, axis], c[:, axis]
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def affine_warp(image: torch.Tensor, seg: torch.Tensor | None, matrices: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample (B,C,X,Y,Z) with per-sample 3x3 matrices acting on voxel coordinates around the
    patch centre (output voxel v reads input voxel M v): trilinear for images, nearest for labels."""
    shape = torch.tensor(image.shape[2:], dtype=matrices.dtype, device=matrices.device)
    half = (shape - 1) / 2
    # grid_sample's normalised coordinates are per axis; undo that so rotations stay rigid on
    # non-cubic patches, and reverse axis order because the grid's last dim is (Z, Y, X).
    theta = matrices * half[None, None, :] / half[None, :, None]
    theta = theta.flip(1).flip(2)
    theta = torch.cat([theta, torch.zeros_like(theta[:, :, :1])], dim=2)
    grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=True)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_seg = None
    if seg is not None:
        out_seg = F.grid_sample(seg.float(), grid.float(), mode="nearest", padding_mode="zeros",
                                align_corners=True).to(seg.dtype)
    return out, out_seg


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N,C,X,Y,Z), kernel radius 3 sigma, border replicated."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        weight = k.view(shape).repeat(c, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), weight, groups=c)
    return x


@dataclass
class Augmenter:
    """Callable augmentation: `augmenter(image (B,C,X,Y,Z), seg (B,1,X,Y,Z) | None) -> (image, seg)`."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    rotation_axes: tuple[int, ...] = (0, 1, 2)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)

    @classmethod
    def for_segmentation(cls, patch_size: Sequence[int]) -> Augmenter:
        """nnU-Net's default; for strongly anisotropic patches (one axis < 1/3 of the others) rotate
        only in-plane, about the short axis, as nnU-Net's 2D-style augmentation does."""
        short = min(range(3), key=lambda a: patch_size[a])
        others = [patch_size[a] for a in range(3) if a != short]
        if patch_size[short] * 3 < min(others):
            return cls(rotation_axes=(short,))
        return cls()

    @classmethod
    def for_pretraining(cls, patch_size: Sequence[int]) -> Augmenter:
        """S3D: "minor spatial augmentations of affine scaling, rotation and mirroring" only."""
        base = cls.for_segmentation(patch_size)
        return cls(rotation_axes=base.rotation_axes, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0,
                   p_lowres=0, p_gamma=0, p_gamma_inverted=0)

    def __call__(self, image: torch.Tensor, seg: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, seg = self.spatial(image, seg, generator)
        return self.intensity(image, generator), seg

    def spatial(self, image: torch.Tensor, seg: torch.Tensor | None, g: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, dev = image.shape[0], image.device
        rot = _p(b, self.p_rotation, g)
        scl = _p(b, self.p_scale, g)
        if rot.any() or scl.any():
            angles = torch.zeros(b, 3)
            lim = math.radians(self.rotation_deg)
            for a in self.rotation_axes:
                angles[:, a] = torch.where(rot, _u(b, -lim, lim, "cpu", g), torch.zeros(b))
            # nnU-Net draws one zoom per sample; sampling a zoom > 1 shows a smaller field of view
            zoom = torch.where(scl, _u(b, *self.scale_range, "cpu", g), torch.ones(b))
            mats = rotation_matrices(angles) / zoom[:, None, None]
            sel = (rot | scl).nonzero().flatten().to(dev)
            warped, wseg = affine_warp(image[sel], seg[sel] if seg is not None else None, mats.to(dev)[sel])
            image = image.clone()
            image[sel] = warped
            if seg is not None:
                seg = seg.clone()
                seg[sel] = wseg
        for axis in self.mirror_axes:
            flip = _p(b, 0.5, g).to(dev)
            if flip.any():
                image = torch.where(flip[:, None, None, None, None], image.flip(axis + 2), image)
                if seg is not None:
                    seg = torch.where(flip[:, None, None, None, None], seg.flip(axis + 2), seg)
        return image, seg

    def intensity(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        x = x.clone()
        sel = _p(b, self.p_noise, g)
        if sel.any():
            std = _u(b, *self.noise_variance, dev, g).sqrt()
            noise = torch.randn(x.shape, generator=g).to(dev) * std[:, None, None, None, None]
            x = torch.where(sel.to(dev)[:, None, None, None, None], x + noise, x)
        for i in _p(b, self.p_blur, g).nonzero().flatten().tolist():
            x[i : i + 1] = gaussian_blur(x[i : i + 1], float(_u(1, *self.blur_sigma, "cpu", g)))
        sel = _p(b, self.p_brightness, g).to(dev)
        if sel.any():
            f = _u(b, *self.brightness_range, dev, g)
            x = torch.where(sel[:, None, None, None, None], x * f[:, None, None, None, None], x)
        sel = _p(b, self.p_contrast, g).to(dev)
        if sel.any():
            f = _u(b, *self.contrast_range, dev, g)[:, None, None, None, None]
            mean = x.mean(dim=(2, 3, 4), keepdim=True)
            lo, hi = x.amin(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)
            x = torch.where(sel[:, None, None, None, None], ((x - mean) * f + mean).clamp(lo, hi), x)
        for i in _p(b, self.p_lowres, g).nonzero().flatten().tolist():
            zoom = float(_u(1, *self.lowres_zoom, "cpu", g))
            size = [max(1, int(round(s * zoom))) for s in x.shape[2:]]
            small = F.interpolate(x[i : i + 1], size=size, mode="nearest")
            x[i : i + 1] = F.interpolate(small, size=list(x.shape[2:]), mode="trilinear", align_corners=False)
        inv = _p(b, self.p_gamma_inverted, g)
        for i in (inv | _p(b, self.p_gamma, g)).nonzero().flatten().tolist():
            x[i] = _gamma(x[i], float(_u(1, *self.gamma_range, "cpu", g)), bool(inv[i]))
        return x


def _gamma(x: torch.Tensor, gamma: float, invert: bool) -> torch.Tensor:
    """nnU-Net's gamma transform with retained statistics: rescale to [0,1], power, rescale back,
    then restore mean and std."""
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    lo, hi = x.min(), x.max()
    rng = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).pow(gamma) * rng + lo
    y = (y - y.mean()) / y.std().clamp_min(1e-7) * std + mean
    return -y if invert else y
