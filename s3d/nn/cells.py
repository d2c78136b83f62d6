"""Block-sparse encoder stages: activations kept as the visible cells of the block mask only.

S3D's encoder (Wald et al. 2024, section 4a) emulates sparse convolution on dense tensors: every conv runs
on the whole volume and its output is re-masked. With 75% masking, three quarters of that work is thrown
away. Where a stage's mask cells are large (>= ``MIN_SPARSE_BLOCK`` voxels per axis at its resolution),
this module computes the stage on the visible cells alone and gives the emulation's results:

- ``to_cells`` cuts the visible cells out of a (B, C, ...) tensor into a batch (N, C, *edge);
- ``pad_cells`` grows every cell by the halo a conv needs, copied from the neighbouring visible cells (a
  hidden neighbour or the volume border gives zeros, as the re-masked dense tensor and the conv's zero
  padding do);
- ``cell_conv`` is an unpadded conv of the padded cells, ``cell_instance_norm`` the masked InstanceNorm (all
  voxels of a visible cell are visible, so a sample's visible voxels are exactly its cells);
- ``from_cells`` puts cells back into a zero (B, C, ...) tensor, once per stage, for the decoder's skip.

The cell grid is the same at every block-sparse stage (the mask block is a multiple of the total stride),
only the cell edge shrinks with the stride, so the visible cells and their neighbours are found once per
step (``CellGrid``) and a strided conv maps cell n of one stage to cell n of the next. All copies are
vectorised over the cells (a handful of index ops per conv, none per cell), so the cost does not grow with
the number of cells in Python and a GPU sees a few large kernels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MIN_SPARSE_BLOCK",
    "CellGrid",
    "StageCells",
    "to_cells",
    "from_cells",
    "pad_cells",
    "cell_conv",
    "cell_instance_norm",
    "infer_block_size",
    "sparse_plan",
]

Size3 = tuple[int, int, int]

# Below this cell edge (voxels at a stage's resolution) a padded cell is mostly halo: a 3x3x3 conv reads
# (e+2)^3 / e^3 = 8x the cell's voxels for e = 2, 3.4x for e = 4, 1.95x for e = 8, so at 75% masking an e = 2
# stage would cost twice its dense conv and stays on the masked dense path. At e = 4 (0.84x of the dense conv's
# voxels) the cells still win: ResEnc-L 2 x 64^3 with stage 2 on cells, one core, 2026-12-05: 0.63x dense in
# fp32 instead of 0.71x with e >= 8 only, the same in bf16 (benchmarks/README.md, "Pre-training step cost").
MIN_SPARSE_BLOCK = 4

_OFFSETS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d != (0, 0, 0)]


class CellGrid:
    """The visible cells of a block mask and their neighbours, shared by every block-sparse stage.

    ``coarse``: (B, gi, gj, gk), nonzero = visible cell. ``index``: (N, 4) int64 rows (sample, ci, cj, ck),
    sample-major (the cells of one sample are consecutive). ``links[d]``: for each of the 26 neighbour
    offsets d, the rows n whose neighbour at offset d is visible and that neighbour's row.
    """

    def __init__(self, coarse: torch.Tensor) -> None:
        if coarse.ndim != 4:
            raise ValueError(f"cell grid shape {tuple(coarse.shape)}: expected (B, gi, gj, gk)")
        self.batch = int(coarse.shape[0])
        self.grid: Size3 = tuple(int(g) for g in coarse.shape[1:])  # type: ignore[assignment]
        self.index = (coarse != 0).nonzero()
        self.n = int(self.index.shape[0])
        b, i, j, k = self.index.unbind(1)
        self.coords = (b, i, j, k)
        # -1 marks hidden cells and, through the one-cell frame, the outside of the volume
        lut = torch.full((self.batch, *(g + 2 for g in self.grid)), -1, dtype=torch.long, device=coarse.device)
        lut[b, i + 1, j + 1, k + 1] = torch.arange(self.n, device=coarse.device)
        self.links: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for d in _OFFSETS:
            nb = lut[b, i + 1 + d[0], j + 1 + d[1], k + 1 + d[2]]
            rows = (nb >= 0).nonzero().squeeze(1)
            if rows.numel():
                self.links[d] = (rows, nb[rows])
        counts = torch.bincount(self.index[:, 0], minlength=self.batch).tolist()
        ends = list(itertools.accumulate(counts))
        self.ranges: list[tuple[int, int]] = [(e - c, e) for e, c in zip(ends, counts, strict=True)]


class StageCells:
    """The cells of ``grid`` at one stage's resolution: ``edge`` voxels per axis and cell."""

    def __init__(self, grid: CellGrid, edge: Sequence[int]) -> None:
        self.grid = grid
        self.edge: Size3 = tuple(int(e) for e in edge)  # type: ignore[assignment]
        if len(self.edge) != 3 or min(self.edge) < 1:
            raise ValueError(f"cell edge {edge}: expected three positive values")

    @property
    def spatial(self) -> Size3:
        return tuple(g * e for g, e in zip(self.grid.grid, self.edge, strict=True))  # type: ignore[return-value]

    def scaled(self, factor: Sequence[int]) -> StageCells:
        """The same cells at a resolution ``factor`` times finer per axis."""
        return StageCells(self.grid, [e * int(f) for e, f in zip(self.edge, factor, strict=True)])


def _cell_view(x: torch.Tensor, cells: StageCells) -> torch.Tensor:
    """(B, C, gi*ei, gj*ej, gk*ek) as a (B, gi, gj, gk, C, ei, ej, ek) view (x must be contiguous)."""
    (gi, gj, gk), (ei, ej, ek) = cells.grid.grid, cells.edge
    return x.view(x.shape[0], x.shape[1], gi, ei, gj, ej, gk, ek).permute(0, 2, 4, 6, 1, 3, 5, 7)


def _cut(x: torch.Tensor, cells: StageCells) -> torch.Tensor:
    """The visible cells of a full tensor (reads only those cells)."""
    return _cell_view(x.contiguous(), cells)[cells.grid.coords]


def _place(y: torch.Tensor, cells: StageCells) -> torch.Tensor:
    """Cells into a zero full tensor."""
    out = y.new_zeros((cells.grid.batch, y.shape[1]) + cells.spatial)
    _cell_view(out, cells)[cells.grid.coords] = y
    return out


# each is the other's backward: the cells are distinct, so cutting and placing are adjoint
class _ToCells(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cells):  # noqa: ANN001, ANN205
        ctx.cells = cells
        return _cut(x, cells)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return _place(g, ctx.cells), None


class _FromCells(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, cells):  # noqa: ANN001, ANN205
        ctx.cells = cells
        return _place(y, cells)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return _cut(g, ctx.cells), None


def to_cells(x: torch.Tensor, cells: StageCells) -> torch.Tensor:
    """The visible cells of x (B, C, *cells.spatial) as (N, C, *cells.edge), in ``cells.grid.index`` order."""
    if x.ndim != 5 or x.shape[0] != cells.grid.batch or tuple(x.shape[2:]) != cells.spatial:
        raise ValueError(f"to_cells: input {tuple(x.shape)} does not fit {cells.grid.batch} samples of "
                         f"{cells.spatial} voxels")
    return _ToCells.apply(x, cells)


def from_cells(y: torch.Tensor, cells: StageCells) -> torch.Tensor:
    """Cells (N, C, *edge) back into a (B, C, *spatial) tensor that is exactly 0 in hidden cells."""
    if y.ndim != 5 or y.shape[0] != cells.grid.n or tuple(y.shape[2:]) != cells.edge:
        raise ValueError(f"from_cells: {tuple(y.shape)} is not {cells.grid.n} cells of edge {cells.edge}")
    return _FromCells.apply(y, cells)


def _halo_slices(d: int, lo: int, hi: int, e: int) -> tuple[slice, slice] | None:
    """Along one axis, (destination in the padded cell, source in the neighbour) for neighbour offset d."""
    if d < 0:
        return (slice(0, lo), slice(e - lo, e)) if lo else None
    if d > 0:
        return (slice(lo + e, lo + e + hi), slice(0, hi)) if hi else None
    return slice(lo, lo + e), slice(0, e)


def _halo_copies(grid: CellGrid, lo: Size3, hi: Size3, edge: Size3):  # noqa: ANN202
    for d, (rows, src) in grid.links.items():
        per_axis = [_halo_slices(*a) for a in zip(d, lo, hi, edge, strict=True)]
        if all(p is not None for p in per_axis):
            dst = tuple(p[0] for p in per_axis)  # type: ignore[index]
            srcs = tuple(p[1] for p in per_axis)  # type: ignore[index]
            yield rows, src, dst, srcs


class _PadCells(torch.autograd.Function):
    """Each cell grown by ``lo`` / ``hi`` voxels per axis, filled from the visible neighbours (else 0).
    Backward: the centre's gradient plus every halo's gradient added back to the neighbour it came from."""

    @staticmethod
    def forward(ctx, y, grid, lo, hi):  # noqa: ANN001, ANN205
        e = tuple(y.shape[2:])
        out = y.new_zeros(y.shape[:2] + tuple(a + b + c for a, b, c in zip(lo, e, hi, strict=True)))
        centre = tuple(slice(a, a + b) for a, b in zip(lo, e, strict=True))
        out[(slice(None), slice(None)) + centre] = y
        for rows, src, dst, srcs in _halo_copies(grid, lo, hi, e):
            out[(slice(None), slice(None)) + dst].index_copy_(0, rows, y[(slice(None), slice(None)) + srcs][src])
        ctx.grid, ctx.lo, ctx.hi, ctx.edge, ctx.centre = grid, lo, hi, e, centre
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: ANN001, ANN205
        full = (slice(None), slice(None))
        gy = g[full + ctx.centre].contiguous()
        for rows, src, dst, srcs in _halo_copies(ctx.grid, ctx.lo, ctx.hi, ctx.edge):
            gy[full + srcs].index_add_(0, src, g[full + dst][rows])
        return gy, None, None, None


def pad_cells(y: torch.Tensor, cells: StageCells, lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
    """Cells (N, C, *edge) -> (N, C, *(lo + edge + hi)) with each cell's halo from its neighbours.

    The result equals cutting each cell's window out of the full, zero-outside tensor ``from_cells(y)``
    padded with zeros, without building that tensor. Halo widths must not exceed the cell edge.
    """
    lo3, hi3 = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
    if any(v < 0 or v > e for v, e in zip(lo3 + hi3, cells.edge * 2, strict=True)):
        raise ValueError(f"pad_cells: halo {lo3} / {hi3} must lie within 0 and the cell edge {cells.edge}")
    if not any(lo3 + hi3):
        return y
    return _PadCells.apply(y, cells.grid, lo3, hi3)


def cell_conv(conv: nn.Conv3d, y: torch.Tensor, cells_in: StageCells, cells_out: StageCells) -> torch.Tensor:
    """``conv`` of the full re-masked tensor, at the voxels of the visible output cells, from cells.

    y: (N, C, *cells_in.edge) -> (N, C', *cells_out.edge). Output voxel o of a cell reads input voxels
    ``o * stride - padding + [0, kernel)`` relative to its input cell's origin, so the window of a cell is
    ``(edge_out - 1) * stride + kernel`` voxels starting ``padding`` before the cell: the cell with a halo
    of ``padding`` below and the rest above, then an unpadded conv. Values and gradients equal the dense
    conv's at visible outputs.
    """
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if isinstance(p, str) or any(d != 1 for d in conv.dilation) or conv.groups != 1:
        raise ValueError("cell_conv: needs numeric padding, dilation 1 and groups 1")
    if any(ei != eo * si for ei, eo, si in zip(cells_in.edge, cells_out.edge, s, strict=True)):
        raise ValueError(f"cell_conv: stride {tuple(s)} does not map cells of {cells_in.edge} to {cells_out.edge}")
    win = [(eo - 1) * si + ki for eo, si, ki in zip(cells_out.edge, s, k, strict=True)]
    hi = [max(w - ei - pi, 0) for w, ei, pi in zip(win, cells_in.edge, p, strict=True)]
    padded = pad_cells(y, cells_in, p, hi)
    if any(w != n for w, n in zip(win, padded.shape[2:], strict=True)):
        padded = padded[:, :, : win[0], : win[1], : win[2]]
    return nn.functional.conv3d(padded, conv.weight, conv.bias, s, 0)


def cell_instance_norm(y: torch.Tensor, cells: StageCells, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The masked InstanceNorm on visible cells (N, C, *edge): batch norm over one sample's cells (statistics
    per channel over its cells and their voxels) is that sample's visible-voxel instance norm."""
    parts = [nn.functional.batch_norm(y[lo:hi], None, None, weight, bias, True, 0.0, eps)
             for lo, hi in cells.grid.ranges if hi > lo]
    if not parts:
        # no visible voxel in the batch: the affine map of nothing, so that weight and bias still get their
        # (zero) gradients as on the dense path (an optimiser's momentum and DDP's reducer expect them)
        shape = (1, -1, 1, 1, 1)
        if weight is not None:
            y = y * weight.view(shape)
        return y if bias is None else y + bias.view(shape)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def infer_block_size(mask: torch.Tensor, multiple_of: Sequence[int] = (1, 1, 1)) -> Size3:
    """The largest cell edge per axis (a multiple of ``multiple_of`` dividing the shape) within which
    ``mask`` (B,1,i,j,k) is constant: the masking block size, recovered from the mask itself."""
    out = []
    for ax, (n, mult) in enumerate(zip(mask.shape[2:], multiple_of, strict=True)):
        best = 1
        for e in sorted((d for d in range(int(mult), n + 1, int(mult)) if n % d == 0), reverse=True):
            shape = list(mask.shape[:2]) + [int(v) for v in mask.shape[2:]]
            shape[2 + ax: 3 + ax] = [n // e, e]
            cells = mask.reshape(shape)
            if torch.equal(cells.amax(dim=3 + ax), cells.amin(dim=3 + ax)):
                best = e
                break
        out.append(best)
    return tuple(out)  # type: ignore[return-value]


def sparse_plan(mask: torch.Tensor, block: Sequence[int], strides: Sequence[Sequence[int]],
                min_edge: int = MIN_SPARSE_BLOCK) -> list[StageCells | None]:
    """Per encoder stage: its cells where they are at least ``min_edge`` voxels per axis (block-sparse pays
    there), None where the stage keeps the masked dense path. Sparse stages form a prefix (the cumulative
    stride only grows, so the edge only shrinks), all sharing one ``CellGrid``.

    mask: (B,1,i,j,k) at input resolution, 1 = visible, constant within ``block``-sized cells; strides: the
    per-stage strides (stage 0 first).
    """
    block3 = tuple(int(b) for b in block)
    if any(n % b for n, b in zip(mask.shape[2:], block3, strict=True)):
        raise ValueError(f"block {block3} does not tile the mask's shape {tuple(mask.shape[2:])}")
    grid: CellGrid | None = None
    out: list[StageCells | None] = []
    cum = (1, 1, 1)
    for s in strides:
        s3 = (s, s, s) if isinstance(s, int) else tuple(int(v) for v in s)
        cum = tuple(a * b for a, b in zip(cum, s3, strict=True))  # type: ignore[assignment]
        edge = [b // c if b % c == 0 else 0 for b, c in zip(block3, cum, strict=True)]
        if min(edge) < min_edge:
            out.append(None)
            continue
        if grid is None:
            grid = CellGrid(mask[:, 0, :: block3[0], :: block3[1], :: block3[2]])
        out.append(StageCells(grid, edge))
    return out
