"""Conv/norm/residual blocks of the ResEnc U-Net, mask-aware.

Module and attribute names mirror dynamic-network-architectures (nnU-Net's network library:
``ConvDropoutNormReLU.conv/.norm``, ``StackedConvBlocks.convs``, ``BasicBlockD.conv1/conv2/skip``,
``StackedResidualBlocks.blocks``) so that state-dict keys are identical to theirs, minus the
``all_modules`` Sequential that registers every conv and norm a second time.

Every ``forward`` takes an optional ``mask`` (B,1,...) at the block's OUTPUT resolution (1 = visible).
With a mask, each conv output is multiplied by it and norms use visible voxels only (S3D section 4a);
inputs are expected to be zero at masked voxels already (the encoder zeroes its input).
Without a mask the computation is the plain dense one.

``forward_cells`` is the same computation on the visible cells of a block mask only (``s3d.nn.cells``):
input and output are (N, C, *edge) cell batches, with the cells at the block's input and output resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from s3d.nn.cells import StageCells, cell_conv, cell_instance_norm
from s3d.nn.sparse import MaskedInstanceNorm3d

__all__ = ["ConvNormAct", "StackedConvBlocks", "BasicBlockD", "StackedResidualBlocks", "init_weights"]

# nnU-Net ResEnc plans: LeakyReLU(negative_slope=0.01, inplace=True), InstanceNorm3d(eps=1e-5, affine=True)
NEG_SLOPE = 0.01
NORM_EPS = 1e-5

Size3 = tuple[int, int, int]


def _triple(v: int | Sequence[int]) -> Size3:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"expected three values (one per axis), got {v}")
    return t  # type: ignore[return-value]


def _chain_cells(layers: nn.Sequential, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells
                 ) -> torch.Tensor:
    """``forward_cells`` of ``layers`` in a row: only the first changes the resolution (it carries the stride)."""
    for n, layer in enumerate(layers):
        y = layer.forward_cells(y, cells_in if n == 0 else cells_out, cells_out)
    return y


class ConvNormAct(nn.Module):
    """Conv3d -> InstanceNorm (masked: visible-voxel statistics, masked voxels zeroed) -> LeakyReLU.

    DNA's ``ConvDropoutNormReLU`` without dropout.

    forward(x (B,C_in,i,j,k), mask (B,1,i',j',k') at the output resolution or None) -> (B,C_out,i',j',k').
    Padding is (k-1)//2 ("same" for odd kernels), as in DNA.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, bias: bool = True, act: bool = True) -> None:
        super().__init__()
        k, s = _triple(kernel_size), _triple(stride)
        self.conv = nn.Conv3d(in_channels, out_channels, k, s, padding=[(a - 1) // 2 for a in k], bias=bias)
        self.norm = MaskedInstanceNorm3d(out_channels, eps=NORM_EPS, affine=True)
        self.nonlin = nn.LeakyReLU(NEG_SLOPE, inplace=True) if act else None
        self.stride = s

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv(x)
        # with a mask, the masked norm zeroes the conv output's masked voxels before taking statistics and
        # leaves them at exactly 0: that is the per-conv re-masking, without a separate pass over y
        y = self.norm(y) if mask is None else self.norm(y, mask)
        if self.nonlin is not None:
            y = self.nonlin(y)
        return y

    def forward_cells(self, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells) -> torch.Tensor:
        # hidden cells do not exist here, so re-masking is implicit and the norm sees visible voxels only
        y = cell_instance_norm(cell_conv(self.conv, y, cells_in, cells_out), cells_out, self.norm.weight,
                               self.norm.bias, self.norm.eps)
        if self.nonlin is not None:
            y = self.nonlin(y)
        return y


class StackedConvBlocks(nn.Module):
    """``num_convs`` ConvNormAct in a row; the first carries the stride (DNA ``StackedConvBlocks``)."""

    def __init__(self, num_convs: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 initial_stride: int | Sequence[int] = 1, bias: bool = True) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        self.convs = nn.Sequential(
            ConvNormAct(in_channels, out_channels, kernel_size, initial_stride, bias),
            *[ConvNormAct(out_channels, out_channels, kernel_size, 1, bias) for _ in range(num_convs - 1)],
        )
        self.output_channels = out_channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for c in self.convs:
            x = c(x, mask)
        return x

    def forward_cells(self, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells) -> torch.Tensor:
        return _chain_cells(self.convs, y, cells_in, cells_out)


class BasicBlockD(nn.Module):
    """ResNet-D basic block (He et al. 2019 "Bag of tricks"; DNA ``BasicBlockD``).

    conv1 (k, stride) -> IN -> LeakyReLU -> conv2 (k) -> IN, plus a skip that is the identity, or
    AvgPool(stride) and/or a bias-free 1x1 conv + IN when the stride or the width changes; sum, LeakyReLU.
    forward(x (B,C_in,...), mask at the output resolution or None) -> (B,C_out,.../stride).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, bias: bool = True) -> None:
        super().__init__()
        s = _triple(stride)
        self.stride = s
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, s, bias, act=True)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, 1, bias, act=False)
        self.nonlin2 = nn.LeakyReLU(NEG_SLOPE, inplace=True)
        has_stride = any(v != 1 for v in s)
        ops: list[nn.Module] = []
        if has_stride:
            # ResNet-D: average the skip instead of a strided 1x1 conv that would drop 7/8 of the voxels.
            # With a block-aligned mask every pooling window is all-visible or all-zero, so this stays sparse.
            ops.append(nn.AvgPool3d(s, s))
        if in_channels != out_channels:
            # DNA builds the projection with conv_bias=False regardless of the network's setting
            ops.append(ConvNormAct(in_channels, out_channels, 1, 1, bias=False, act=False))
        self.skip = nn.Sequential(*ops) if ops else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        residual = x
        if self.skip is not None:
            for op in self.skip:
                residual = op(residual, mask) if isinstance(op, ConvNormAct) else op(residual)
        out = self.conv2(self.conv1(x, mask), mask)
        # not in place: `residual` may be x itself, which autograd or the caller may still need
        out = out + residual
        return self.nonlin2(out)

    def forward_cells(self, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells) -> torch.Tensor:
        residual = y
        if self.skip is not None:
            for op in self.skip:
                # the pooling window (the stride) divides the cell edge, so pooling each cell is exact
                residual = (op.forward_cells(residual, cells_out, cells_out) if isinstance(op, ConvNormAct)
                            else op(residual))
        out = self.conv2.forward_cells(self.conv1.forward_cells(y, cells_in, cells_out), cells_out, cells_out)
        return self.nonlin2(out + residual)


class StackedResidualBlocks(nn.Module):
    """``n_blocks`` BasicBlockD; only the first carries the stride and the width change."""

    def __init__(self, n_blocks: int, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 initial_stride: int | Sequence[int] = 1, bias: bool = True) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.blocks = nn.Sequential(
            BasicBlockD(in_channels, out_channels, kernel_size, initial_stride, bias),
            *[BasicBlockD(out_channels, out_channels, kernel_size, 1, bias) for _ in range(n_blocks - 1)],
        )
        self.output_channels = out_channels

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, mask)
        return x

    def forward_cells(self, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells) -> torch.Tensor:
        return _chain_cells(self.blocks, y, cells_in, cells_out)


def init_weights(module: nn.Module) -> None:
    """nnU-Net's ResEnc initialisation, for ``net.apply(init_weights)``.

    DNA ``ResidualEncoderUNet.initialize``: Kaiming-normal convs with the LeakyReLU slope
    (``InitWeights_He(1e-2)``), zero conv biases, and the last norm of every residual block set to zero
    (``init_last_bn_before_add_to_0``) so each block starts as its skip path.
    """
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=NEG_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    if isinstance(module, BasicBlockD):
        nn.init.zeros_(module.conv2.norm.weight)
        nn.init.zeros_(module.conv2.norm.bias)

