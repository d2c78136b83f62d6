"""Sparse (masked) convolution support for the ResEnc encoder.

S3D (Wald et al. 2024, section 4a, after SparK by Tian et al. 2023): a CNN that sees a block-masked
input must (1) re-apply the mask after every convolution, otherwise the receptive field erodes the
masked regions from their borders, and (2) normalise with statistics of the visible voxels only,
otherwise the zeros shift the mean and variance. This module provides the two pieces the encoder
needs: the mask at each stage's resolution and an InstanceNorm that ignores masked voxels. Stages whose
mask cells are large can instead compute the visible cells only, with the same results: ``s3d.nn.cells``.

A mask is a ``(B, 1, i, j, k)`` float or bool tensor at input resolution, 1 = visible, 0 = masked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "activation_dtype",
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


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype convolutions of ``x`` produce: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else torch.float32


def stage_masks(mask: torch.Tensor, strides: Sequence[int | Sequence[int]], check: bool = True,
                dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """The mask at the output resolution of every encoder stage.

    mask: (B,1,i,j,k) at input resolution, 1 = visible. strides: per-stage strides (stage 0 first).
    Returns one (B,1,i/c0,j/c1,k/c2) floating mask per stage, where c is the stage's cumulative stride,
    in ``dtype`` (default: the mask's floating dtype, float32 for bool masks). Pass the activation dtype
    (``activation_dtype``) so that no layer has to convert, or promote, per use.

    Downsampling takes one voxel per stride block. That is exact only when the mask is constant
    within every block of the total (cumulative) stride, i.e. the masking block size is a multiple of
    the total stride; otherwise some stage would see a partially masked cell and the sparse
    computation would no longer be equivalent to a computation on visible voxels only, so this raises
    ``ValueError`` (when ``check``; the check costs one device sync per call).
    """
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"mask shape {tuple(mask.shape)}: expected (B, 1, i, j, k)")
    m = as_float_mask(mask, dtype)
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


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and per-channel coefficients: float32 for half-precision activations, else their own dtype."""
    return torch.promote_types(dtype, torch.float32)


def _channel_affine(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """``x * scale + shift`` per row of x (R, V) in one pass, with float32 coefficients even for a bf16 x.

    The inference-mode batch-norm kernel is exactly a per-channel affine map that takes float32 parameters
    with a half-precision input (math in float32, output in x's dtype); a broadcast ``addcmul`` would
    either round the coefficients to bf16 or promote the whole output to float32.
    """
    r = x.shape[0]
    acc = _stat_dtype(x.dtype)
    zero = torch.zeros(r, dtype=acc, device=x.device)
    one = torch.ones(r, dtype=acc, device=x.device)
    return torch.ops.aten.native_batch_norm(x.view(1, r, -1), scale, shift, zero, one, False, 0.0, 0.0)[0].view_as(x)


class _MaskedInstanceNorm(torch.autograd.Function):
    """Masked InstanceNorm for a (B,1,...) mask with a hand-written backward, as cheap as a plain one.

    Everything full-sized stays in the activation dtype (bf16 under autocast); only per-(sample, channel)
    numbers are float32. Statistics come from the native batch-norm kernels, which accumulate a
    half-precision input in float32 (double for float32) in one read:
    - forward: ``xm = x * m`` (exact: m is 0/1), mean and variance of xm over all V voxels, converted to the
      visible-voxel ones (``xm`` is 0 on the ``V - n`` hidden voxels), then one fused affine pass and the mask;
    - backward: ``sum(g)`` and ``sum(g * (x - mean))`` over visible voxels in one native reduction, then
      ``dx = m * (w * rstd * g + c_x * xm + c_0)``, the usual normalisation backward restricted to the n
      visible voxels, with per-channel ``c_x``, ``c_0``.
    Only ``xm`` is kept for the backward (``F.instance_norm`` keeps its input, the same size).
    The variance from all-voxel moments is ``(var_all + mean_all^2) / f - (mean_all / f)^2`` with f = n / V:
    it cancels only when |mean| >> std by ~eps * mean^2 / std^2 (float64 for the conversion, the moments
    themselves from the two-pass/Welford kernel), far below bf16 resolution and 1e-6 for typical conv outputs.
    """

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps):  # noqa: ANN001, ANN205
        b, c = x.shape[:2]
        v = x[0, 0].numel()
        acc = _stat_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            m = mask.to(device=x.device, dtype=x.dtype).reshape(b, 1, v)
            # the conv output's masked voxels are dropped here: S3D's "re-mask after every conv"
            xm = (x.reshape(b, c, v) * m).reshape(b * c, v)
            mean_all = torch.zeros(b * c, dtype=acc, device=x.device)
            var_all = torch.ones(b * c, dtype=acc, device=x.device)
            # training mode with momentum 1 writes the batch mean and the unbiased variance into the buffers
            torch.ops.aten.native_batch_norm(xm.view(1, b * c, v), None, None, mean_all, var_all, True, 1.0, 0.0)
            n = m.reshape(b, v).sum(dim=1, dtype=torch.float64)
            f = (n / v).clamp_min(1.0 / v).repeat_interleave(c)
            mu_a = mean_all.double()
            var_a = var_all.double() * ((v - 1) / v) if v > 1 else torch.zeros_like(mu_a)
            mean = mu_a / f
            var = ((var_a + mu_a.square()) / f - mean.square()).clamp_min(0.0)
            rstd = torch.rsqrt(var + eps)
            w = None if weight is None else weight.to(acc).repeat(b)
            bb = None if bias is None else bias.to(acc).repeat(b)
            y = torch.ops.aten.native_batch_norm(
                xm.view(1, b * c, v), w, bb, mean.to(acc), var.to(acc), False, 0.0, float(eps))[0]
            y = y.view(b, c, v).mul_(m)
        ctx.save_for_backward(xm, m, mean.to(acc), rstd, n, None if weight is None else weight.to(acc))
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # not a view: autograd forbids in-place ops (the LeakyReLU) on views created inside a Function
        return torch.ops.aten._unsafe_view(y, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        xm, m, mean, rstd, n, weight = ctx.saved_tensors
        b = m.shape[0]
        bc, v = xm.shape
        c = bc // b
        acc = mean.dtype
        with torch.autocast(xm.device.type, enabled=False):
            gm = (grad_out.to(xm.dtype).reshape(b, c, v) * m).reshape(bc, v)
            ones = torch.ones(bc, dtype=acc, device=xm.device)
            # grad_weight of the native reduction with invstd 1 is sum(g * (x - mean)), grad_bias is sum(g);
            # both over visible voxels because gm is 0 elsewhere
            _, s_gd, s_g = torch.ops.aten.native_batch_norm_backward(
                gm.view(1, bc, v), xm.view(1, bc, v), ones, None, None, mean, ones, True, 0.0, [False, True, True])
            s_gd, s_g = s_gd.double(), s_g.double()
            grad_w = grad_b = grad_x = None
            if ctx.weight_dtype is not None and ctx.needs_input_grad[2]:
                grad_w = (s_gd * rstd).view(b, c).sum(dim=0).to(ctx.weight_dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
                grad_b = s_g.view(b, c).sum(dim=0).to(ctx.bias_dtype)
            if ctx.needs_input_grad[0]:
                nn_ = n.clamp_min(1.0).repeat_interleave(c)
                a = rstd if weight is None else rstd * weight.double().repeat(b)
                c_x = -a * rstd.square() * s_gd / nn_
                c_0 = -a * s_g / nn_ - c_x * mean.double()
                grad_x = _channel_affine(xm, c_x.to(acc), c_0.to(acc))
                grad_x.add_(_channel_affine(gm, a.to(acc), None))
                grad_x = grad_x.view(b, c, v).mul_(m).view(grad_out.shape)
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
