"""Two-view generation for token-level contrastive pre-training (SimTROT, Hu et al., Sec. 3.2).

Each view gets its own random texture augmentation Gamma_t (Gaussian noise, Gibbs ringing, intensity
scaling, intensity shift). View A is then masked with random cubic cells (BEiT-style random masking,
ratio 0.75 by default, SimTROT Fig. 6); view B is rotated by a random cube symmetry Gamma_s whose
inverse the caller applies to view B's feature map (`s3d.nn.contrastive.restore_batch`).

All operations are batched torch ops on the input's device; randomness comes from an optional
`torch.Generator` (CPU or on the data's device), so a fixed generator reproduces the views exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from s3d.rotations import random_ops, rotate_batch


@dataclass
class TextureAugConfig:
    """Texture augmentation Gamma_t; each transform is applied per sample with its own probability.

    The paper names the four transforms but not their settings; these ranges follow the MONAI
    transforms SimTROT builds on (RandScaleIntensity / RandShiftIntensity factors 0.1) and nnU-Net's
    Gaussian noise (variance up to 0.1 on z-scored data), with p = 0.5 each so that the two views of a
    volume usually differ in texture.
    """

    p_noise: float = 0.5
    noise_std: tuple[float, float] = (0.0, 0.1)  # std drawn per sample, in units of the (z-scored) intensity
    p_gibbs: float = 0.5
    # Fraction of the spectrum KEPT along each axis (1 = identity). MONAI's GibbsNoise alpha is the
    # opposite convention (0 = identity).
    gibbs_alpha: tuple[float, float] = (0.6, 0.95)
    p_scale: float = 0.5
    scale: float = 0.1  # multiply by 1 + U(-scale, scale)
    p_shift: float = 0.5
    shift: float = 0.1  # add U(-shift, shift) * std of the sample's channel

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TextureAugConfig:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0,1) drawn on the generator's device (on `device` without a generator), moved to `device`."""
    g_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=g_device).to(device)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return _rand((n,), generator, device) * (hi - lo) + lo


def gibbs_ringing(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Gibbs ringing by k-space truncation (idea of MONAI's GibbsNoise): x (B,C,X,Y,Z) float, alpha (B,)
    fraction of the spectrum kept per axis: frequency bins with |k| > alpha * size / 2 along any axis are
    zeroed. The box is symmetric under k -> -k, so the spectrum stays Hermitian and the result real
    (irfftn). alpha = 1 returns x (up to FFT round-off)."""
    spatial = x.shape[2:]
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    spec = torch.fft.rfftn(work, dim=(2, 3, 4))
    a = alpha.to(device=x.device, dtype=work.dtype).view(-1, 1, 1, 1)
    keep = torch.ones(x.shape[0], *spec.shape[2:], dtype=torch.bool, device=x.device)
    for axis, size in enumerate(spatial):
        if axis < 2:
            k = torch.fft.fftfreq(size, d=1.0 / size, device=x.device).abs()  # integer bins 0..size/2
        else:
            k = torch.fft.rfftfreq(size, d=1.0 / size, device=x.device)
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        keep = keep & (k.view(1, *shape).to(work.dtype) <= a * (size / 2))
    out = torch.fft.irfftn(spec * keep[:, None], s=tuple(spatial), dim=(2, 3, 4))
    return out.to(x.dtype)


def texture_augment(x: torch.Tensor, cfg: TextureAugConfig | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Gamma_t on a batch (B,C,X,Y,Z): Gibbs ringing, Gaussian noise, intensity scaling, intensity shift,
    each drawn per sample with its probability. Returns a new tensor; x is not modified."""
    cfg = cfg or TextureAugConfig()
    b, dev = x.shape[0], x.device
    out = x.clone()
    # Draw every random number whether or not a transform fires, so one sample's draws never shift
    # another's and a fixed generator gives the same views for the same batch.
    fire = _rand((4, b), generator, torch.device("cpu")) < torch.tensor(
        [cfg.p_gibbs, cfg.p_noise, cfg.p_scale, cfg.p_shift])[:, None]
    alpha = _uniform(b, *cfg.gibbs_alpha, generator, dev)
    noise_std = _uniform(b, *cfg.noise_std, generator, dev)
    noise = torch.randn(x.shape, generator=generator,
                        device=generator.device if generator is not None else dev).to(dev, x.dtype)
    factor = 1 + _uniform(b, -cfg.scale, cfg.scale, generator, dev)
    offset = _uniform(b, -cfg.shift, cfg.shift, generator, dev)

    sel = fire[0].nonzero().flatten().to(dev)
    if sel.numel():
        out[sel] = gibbs_ringing(out[sel], alpha[sel])
    view = (-1,) + (1,) * (x.dim() - 1)
    on = [f.to(dev, x.dtype).view(view) for f in fire[1:]]
    out = out + on[0] * noise_std.view(view).to(x.dtype) * noise
    out = out * (1 + on[1] * (factor.view(view).to(x.dtype) - 1))
    std = x.flatten(2).std(dim=2, correction=0)[..., None, None, None]  # per sample and channel
    out = out + on[2] * offset.view(view).to(x.dtype) * std
    return out


def random_patch_mask(shape: Sequence[int], patch: Sequence[int] = (16, 16, 16), ratio: float = 0.75,
                      generator: torch.Generator | None = None, device: torch.device | str | None = None
                      ) -> torch.Tensor:
    """Random cell mask (B,1,X,Y,Z) float, 1 = visible, 0 = masked.

    The volume is tiled with `patch`-sized cells (the last cell of an axis is cut when the size is not a
    multiple); exactly round(ratio * cells) cells per sample are masked, but at least one cell stays
    visible when ratio < 1 (a fully masked view carries nothing to contrast).
    """
    if len(shape) != 5:
        raise ValueError(f"mask shape must be (B,1,X,Y,Z), got {tuple(shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    b, spatial = int(shape[0]), tuple(int(s) for s in shape[2:])
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"mask patch must be 3 positive ints, got {patch}")
    grid = tuple(-(-s // p) for s, p in zip(spatial, patch, strict=True))
    cells = grid[0] * grid[1] * grid[2]
    n_masked = round(ratio * cells)
    if ratio < 1.0:
        n_masked = min(n_masked, cells - 1)
    device = torch.device(device) if device is not None else torch.device("cpu")
    order = _rand((b, cells), generator, torch.device("cpu")).argsort(dim=1)
    visible = torch.ones(b, cells)
    visible.scatter_(1, order[:, :n_masked], 0.0)
    m = visible.view(b, 1, *grid).to(device)
    for axis, p in enumerate(patch):
        m = m.repeat_interleave(p, dim=2 + axis)
    return m[:, :, : spatial[0], : spatial[1], : spatial[2]].contiguous()


def make_views(x: torch.Tensor, cfg: TextureAugConfig | None = None, generator: torch.Generator | None = None,
               allow_flip: bool = False, mask_ratio: float = 0.75, mask_patch: Sequence[int] = (16, 16, 16)
               ) -> dict:
    """SimTROT's two views of a batch x (B,C,X,Y,Z); the spatial size must be cubic (rotations exchange axes).

    Returns {"view_a": texture(x) * mask  (masked view, same frame as x),
             "view_b": rotate(texture'(x), ops[i]) per sample (independent texture draw),
             "ops": list[int] (0..23, or 0..47 with allow_flip; undo on features with restore_batch),
             "mask": (B,1,X,Y,Z) float, 1 = visible}.
    """
    if x.dim() != 5:
        raise ValueError(f"make_views expects (B,C,X,Y,Z), got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if len(set(spatial)) != 1:
        raise ValueError(f"make_views: spatial size {spatial} must be cubic, the 90-degree rotations of view B "
                         "exchange axes")
    cfg = cfg or TextureAugConfig()
    b = x.shape[0]
    ops = random_ops(b, allow_flip=allow_flip, generator=generator)
    mask = random_patch_mask((b, 1, *spatial), mask_patch, mask_ratio, generator, device=x.device).to(x.dtype)
    view_a = texture_augment(x, cfg, generator) * mask
    view_b = rotate_batch(texture_augment(x, cfg, generator), ops)
    return {"view_a": view_a, "view_b": view_b, "ops": ops, "mask": mask}
