"""Sparse (masked) convolution support for the ResEnc encoder.

S3D (Wald et al. 2024, section 4a, after SparK by Tian et al. 2023): a CNN that sees a block-masked
input must (1) re-apply the mask after every convolution, otherwise the receptive field erodes the
masked regions from their borders, and (2) normalise with statistics of the visible voxels only,
otherwise the zeros shift the mean and variance. This module provides the two pieces the encoder
needs: the mask at each stage's resolution and an InstanceNorm that ignores masked voxels.

A mask is a ``(B, 1, i, j, k)`` float or bool tensor at input resolution, 1 = visible, 0 = masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "stage_masks",
    "masked_instance_norm",
    "masked_instance_norm_reference",
    "MaskedInstanceNorm3d",
    "as_float_mask",
    "check_mask_fits",
]


def as_float_mask(mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``mask`` (bool/int/float) as a floating tensor; float masks keep their dtype unless ``dtype`` is given."""
    if dtype is not None:
        return mask.to(dtype)
    return mask if mask.is_floating_point() else mask.to(torch.float32)


def _stride3(s: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(s, int):
        return (s, s, s)
    t = tuple(int(v) for v in s)
    if len(t) != 3:
        raise ValueError(f"stride {s}: expected three values (one per axis)")
    return t  # type: ignore[return-value]


def stage_masks(mask: torch.Tensor, strides: Sequence[int | Sequence[int]], check: bool = True) -> list[torch.Tensor]:
    """The mask at the output resolution of every encoder stage.

    mask: (B,1,i,j,k) at input resolution, 1 = visible. strides: per-stage strides (stage 0 first).
    Returns one (B,1,i/c0,j/c1,k/c2) floating mask per stage, where c is the stage's cumulative stride.

    Downsampling takes one voxel per stride block. That is exact only when the mask is constant
    within every block of the total (cumulative) stride, i.e. the masking block size is a multiple of
    the total stride; otherwise some stage would see a partially masked cell and the sparse
    computation would no longer be equivalent to a computation on visible voxels only, so this raises
    ``ValueError`` (when ``check``; the check costs one device sync per call).
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask shape {tuple(mask.shape)}: expected (B, 1, i, j, k)")
    m = as_float_mask(mask)
    cums: list[tuple[int, int, int]] = []
    acc = (1, 1, 1)
    for s in strides:
        acc = tuple(a * b for a, b in zip(acc, _stride3(s), strict=True))  # type: ignore[assignment]
        cums.append(acc)
    total = cums[-1] if cums else (1, 1, 1)
    spatial = tuple(int(v) for v in m.shape[2:])
    if any(n % t for n, t in zip(spatial, total, strict=True)):
        raise ValueError(f"mask spatial shape {spatial} is not divisible by the network's total stride {total}")
    if check and total != (1, 1, 1):
        b = m.shape[0]
        blocks = m.reshape(b, spatial[0] // total[0], total[0], spatial[1] // total[1], total[1],
                           spatial[2] // total[2], total[2])
        if not torch.equal(blocks.amax(dim=(2, 4, 6)), blocks.amin(dim=(2, 4, 6))):
            raise ValueError(f"mask is not constant within blocks of the network's total stride {total}: the "
                             "masking block size must be a multiple of it, or a stage would see a partial mask")
    return [m[:, :, :: c[0], :: c[1], :: c[2]].contiguous() for c in cums]


def masked_instance_norm(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """InstanceNorm over visible voxels only; masked voxels of the output are exactly 0.

    x: (B,C,*spatial); mask: (B,1,*spatial) or (B,C,*spatial), 1 = visible; weight, bias: (C,).
    Per (sample, channel): mean and biased variance over the voxels where mask is 1, as
    ``F.instance_norm`` does over all voxels. Statistics and the affine step run in float32 at least (also
    under autocast: half-precision sums over ~10^6 voxels lose the variance); the result has x's dtype.
    The gradient reaches x at visible voxels only. A sample with no visible voxel gives zeros.
    """
    if mask.shape[0] != x.shape[0] or mask.shape[1] not in (1, x.shape[1]) or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit input {tuple(x.shape)}")
    if mask.shape[1] == 1:
        return _MaskedInstanceNorm.apply(x, mask, weight, bias, eps)
    return masked_instance_norm_reference(x, mask, weight, bias, eps)


def masked_instance_norm_reference(
    x: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``masked_instance_norm`` written with plain autograd ops (any mask broadcastable over channels).

    Slower and hungrier than the fused path (autograd keeps more temporaries); used for per-channel masks
    and as the reference the fused forward/backward is tested against.
    """
    dims = tuple(range(2, x.ndim))
    acc = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(acc)
        m = mask.to(device=x.device, dtype=acc)
        n = m.sum(dim=dims, keepdim=True)
        if n.shape[1] == 1 and x.shape[1] != 1:
            n = n.expand(-1, x.shape[1], *n.shape[2:])
        n = n.clamp_min(1.0)
        mean = (xf * m).sum(dim=dims, keepdim=True) / n
        # two-pass variance: E[x^2] - mean^2 cancels badly when |mean| >> std (conv bias, raw intensities)
        d = (xf - mean).mul_(m)
        var = (d * d).sum(dim=dims, keepdim=True) / n
        scale = torch.rsqrt(var + eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if weight is not None:
            scale = scale * weight.to(acc).reshape(shape)
        y = d * scale
        if bias is not None:
            y = y.add_(bias.to(acc).reshape(shape)).mul_(m)
    return y.to(x.dtype)


class _MaskedInstanceNorm(torch.autograd.Function):
    """Fused masked InstanceNorm for a (B,1,...) mask with a hand-written backward.

    Per-(sample, channel) sums over visible voxels are batched dot products (``bmm``), which read the
    tensor once and allocate nothing full-sized; only the masked, centred input ``d`` is kept for the
    backward (the same memory as the input that ``F.instance_norm`` keeps). With ``xhat = d * rstd`` over
    the n visible voxels, the backward is the usual normalisation one restricted to them:
    ``dx = m * w * rstd * (g - sum(g)/n - xhat * sum(g * xhat)/n)``, ``dw = sum(g * xhat)``, ``db = sum(g)``.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps):  # noqa: ANN001, ANN205
        b, c = x.shape[:2]
        v = x[0, 0].numel()
        stat = (b, c) + (1,) * (x.ndim - 2)  # per-(sample, channel) statistics, broadcastable over voxels
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(acc)
            m = mask.to(device=x.device, dtype=acc)
            n = m.reshape(b, v).sum(dim=1).clamp_min(1.0).reshape((b, 1) + stat[2:])
            # the conv output's masked voxels are dropped here: S3D's "re-mask after every conv"
            mean = torch.bmm(xf.reshape(b, c, v), m.reshape(b, v, 1)).reshape(stat) / n
            # two-pass variance: E[x^2] - mean^2 cancels badly when |mean| >> std
            d = (xf - mean).mul_(m)
            dd = d.reshape(b * c, 1, v)
            var = torch.bmm(dd, dd.transpose(1, 2)).reshape(stat) / n
            rstd = torch.rsqrt(var + eps)
            wv = None if weight is None else weight.to(acc).reshape((1, c) + stat[2:])
            scale = rstd if wv is None else rstd * wv
            if bias is None:
                y = d * scale  # d is zero at masked voxels already
            else:
                y = torch.addcmul(bias.to(acc).reshape((1, c) + stat[2:]), d, scale).mul_(m)
        ctx.save_for_backward(d, m, n, rstd, wv)
        ctx.in_dtype = x.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        d, m, n, rstd, wv = ctx.saved_tensors
        b, c = d.shape[:2]
        v = d[0, 0].numel()
        stat = rstd.shape
        with torch.autocast(d.device.type, enabled=False):
            g = grad_out.to(d.dtype)
            sum_g = torch.bmm(g.reshape(b, c, v), m.reshape(b, v, 1)).reshape(stat)  # visible voxels only
            sum_gd = torch.bmm(g.reshape(b * c, 1, v), d.reshape(b * c, v, 1)).reshape(stat)
            grad_w = grad_b = grad_x = None
            if ctx.weight_dtype is not None and ctx.needs_input_grad[2]:
                grad_w = (sum_gd * rstd).sum(dim=0).reshape(c).to(ctx.weight_dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
                grad_b = sum_g.sum(dim=0).reshape(c).to(ctx.bias_dtype)
            if ctx.needs_input_grad[0]:
                a = rstd if wv is None else rstd * wv
                coef_d = -a * rstd.square() * sum_gd / n
                coef_1 = -a * sum_g / n
                grad_x = (g * a).addcmul_(d, coef_d).add_(coef_1).mul_(m).to(ctx.in_dtype)
        return grad_x, None, grad_w, grad_b, None


class MaskedInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` whose statistics can be restricted to visible voxels.

    forward(x (B,C,i,j,k), mask (B,1,i,j,k) or None) -> (B,C,i,j,k). Without a mask this is exactly
    ``nn.InstanceNorm3d`` (``F.instance_norm``); with one see ``masked_instance_norm``. Parameters and
    state-dict keys are those of ``nn.InstanceNorm3d``, so weights move freely between the two.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None:
            return super().forward(x)
        if self.track_running_stats:
            raise ValueError("MaskedInstanceNorm3d: running statistics are not supported together with a mask")
        if x.ndim != 5:
            raise ValueError(f"MaskedInstanceNorm3d: expected a 5-D input (B,C,i,j,k), got shape {tuple(x.shape)}")
        return masked_instance_norm(x, mask, self.weight, self.bias, self.eps)


def check_mask_fits(x: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError unless mask is (B,1,*spatial) for input x (B,C,*spatial)."""
    if mask.ndim != 5 or mask.shape[0] != x.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit input {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, 1, {', '.join(str(s) for s in x.shape[2:])})")
