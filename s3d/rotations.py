"""Exact cube symmetries of 3-D tensors: the 24 rotations in 90-degree steps (and x one mirror flip,
48 ops), as index permutations and flips, never interpolation.

Used by SimTROT's rotate-and-restore (Hu et al., Sec. 3.2): one view is rotated before the encoder and
its feature map is restored afterwards. `restore(rotate(x, op), op)` gives `x` back bit for bit. Axes
that an op exchanges must have equal length (cubic views), else ValueError.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

NUM_ROTATIONS = 24  # proper rotations of a cube (det +1)
NUM_OPS = 48  # ... and the same times one mirror flip (det -1), the full cube symmetry group


def _sign(perm: tuple[int, ...]) -> int:
    inversions = sum(1 for a, b in itertools.combinations(perm, 2) if a > b)
    return -1 if inversions % 2 else 1


def _build_ops() -> list[tuple[tuple[int, int, int], tuple[bool, bool, bool]]]:
    proper, improper = [], []
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            det = _sign(perm) * (-1) ** sum(flips)
            (proper if det == 1 else improper).append((perm, flips))
    # Identity first, so op 0 is "no rotation"; proper rotations are 0..23, mirrored ops 24..47.
    return proper + improper


_OPS = _build_ops()


def op_permutation(op: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The op as (perm, flips): rotate(x) = x.permute(0, 1, *(2 + p for p in perm)).flip(spatial axes k
    with flips[k])."""
    if not 0 <= op < NUM_OPS:
        raise ValueError(f"op {op} is not in 0..{NUM_OPS - 1}")
    return _OPS[op]


def op_matrix(op: int) -> torch.Tensor:
    """(3,3) int64 signed permutation matrix M of the op on centred voxel coordinates:
    rotate(x)[a] = x[M a] (coordinates measured from the centre of the volume); det(M) = +1 for op < 24."""
    perm, flips = op_permutation(op)
    m = torch.zeros(3, 3, dtype=torch.int64)
    for k in range(3):
        m[perm[k], k] = -1 if flips[k] else 1
    return m


def _check_shape(shape: Sequence[int], perm: tuple[int, ...], op: int, what: str) -> None:
    spatial = tuple(shape[2:])
    if len(spatial) != 3:
        raise ValueError(f"{what} must be (B,C,X,Y,Z), got shape {tuple(shape)}")
    if tuple(spatial[p] for p in perm) != spatial:
        raise ValueError(f"op {op} exchanges spatial axes of different lengths {spatial}: rotate-and-restore needs "
                         "cubic views (and cubic feature maps, i.e. isotropic encoder strides)")


def rotate(x: torch.Tensor, op: int) -> torch.Tensor:
    """Apply cube symmetry `op` (0..47) to (B,C,X,Y,Z); same shape out. Exact (permute/flip only)."""
    perm, flips = op_permutation(op)
    _check_shape(x.shape, perm, op, "rotate input")
    y = x.permute(0, 1, *(2 + p for p in perm))
    dims = [2 + k for k in range(3) if flips[k]]
    return y.flip(dims) if dims else y


def restore(z: torch.Tensor, op: int) -> torch.Tensor:
    """Undo `rotate(., op)` on (B,C,X,Y,Z), e.g. on the encoder feature map of a rotated view."""
    perm, flips = op_permutation(op)
    _check_shape(z.shape, perm, op, "restore input")
    dims = [2 + k for k in range(3) if flips[k]]
    y = z.flip(dims) if dims else z
    inverse = [perm.index(k) for k in range(3)]
    return y.permute(0, 1, *(2 + p for p in inverse))


def rotate_batch(x: torch.Tensor, ops: Sequence[int]) -> torch.Tensor:
    """Per-sample `rotate`: x (B,C,X,Y,Z), ops list of B ints -> (B,C,X,Y,Z)."""
    if len(ops) != x.shape[0]:
        raise ValueError(f"got {len(ops)} ops for a batch of {x.shape[0]}")
    return torch.cat([rotate(x[i : i + 1], int(op)) for i, op in enumerate(ops)], dim=0).contiguous()


def restore_batch(z: torch.Tensor, ops: Sequence[int]) -> torch.Tensor:
    """Per-sample `restore`: z (B,C,X,Y,Z), ops list of B ints -> (B,C,X,Y,Z)."""
    if len(ops) != z.shape[0]:
        raise ValueError(f"got {len(ops)} ops for a batch of {z.shape[0]}")
    return torch.cat([restore(z[i : i + 1], int(op)) for i, op in enumerate(ops)], dim=0).contiguous()


def random_ops(n: int, allow_flip: bool = False, generator: torch.Generator | None = None) -> list[int]:
    """n ops drawn uniformly from the 24 rotations (or all 48 cube symmetries with `allow_flip`)."""
    high = NUM_OPS if allow_flip else NUM_ROTATIONS
    device = generator.device if generator is not None else "cpu"
    return [int(v) for v in torch.randint(high, (n,), generator=generator, device=device).tolist()]
