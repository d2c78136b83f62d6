"""Swin UNETR (Hatamizadeh et al. 2022, "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images", arXiv 2201.01266) in plain PyTorch, and the token grid SimTROT pre-trains on.

Encoder (``swinViT``): a non-overlapping patch embedding (Conv3d, kernel = stride = patch), then four
stages of Swin Transformer blocks (Liu et al. 2021) that alternate W-MSA and SW-MSA (windows shifted by
half a window, with the attention mask that keeps wrapped-around regions apart) and use a learned
relative position bias; every stage ends with patch merging (2x2x2 neighbours -> LayerNorm -> Linear,
halving the grid and doubling the width). It returns five hidden states: the patch embedding and the
output of each stage, LayerNorm-ed without affine parameters (``normalize``).
Decoder: UNETR residual conv blocks (conv-IN-LReLU-conv-IN + residual, LReLU) on the input and on the
first three hidden states, transposed-conv up blocks that concatenate them, a 1x1x1 output conv.

Computation and state-dict keys equal MONAI's ``monai.networks.nets.SwinUNETR`` (v1.x, ``downsample=
"merging"``, ``use_v2=False``, ``patch_norm=False``), so a MONAI state dict loads with ``strict=True`` and
gives the same outputs; ``convert_monai_state_dict`` also takes MONAI's released self-supervised encoder
weights (Tang et al. 2022, keys ``module.layers1.0...``). MONAI behaviours kept on purpose, because
pre-trained weights were trained with them:

- a stage whose grid is <= the window along an axis uses the grid as window there and does not shift
  along it; a stage whose grid is not a multiple of the window is zero-padded (after ``norm1``) and
  the padded tokens take part in attention as keys, as in Video Swin;
- for such a shrunk window of n tokens, the relative position bias is read from the top-left n x n
  block of the full window's index table (not re-indexed for the smaller window);
- the shifted-window mask adds -100 (not -inf) between regions, as Swin's reference code does.

Token grid (SimTROT, Hu et al., arXiv 2408.05889): tokens are the patch embeddings of the last encoder
stage, ``encoder_tokens`` (hidden state 4, after the 4th merging). Its stride is patch * 16 per axis
(``token_grid_stride``): 32 for patch 2. Token m sits on input cell m of that size, because the patch
embedding does not overlap and each merging halves the grid exactly; rotating a cubic input therefore
permutes the cells exactly as ``rotate`` permutes the token grid, and ``restore`` (``s3d.rotations``) puts
every token back on the cell it came from. On ResEnc this holds only approximately (strided 3x3x3
convolutions are not centred on their cells).

Patch size, "patch 4 -> 4^3 tokens at 128^3": SimTROT Sec. 3.1 describes Swin UNETR with the 2-D Swin
Transformer's numbers (patch 4, 32^3 patches, 3 mergings, 4^3 tokens). Its implementation (Sec. 4.2:
patch [2,2,2] for BraTS, [1,2,2] for Synapse's 64x128x128 crops; ``Pretrain/models/ssl_head.py``:
``patch_size=(2, 2, 2)``) and MONAI's SwinUNETR use patch 2 and merge after all four stages
(128^3 -> 64^3 embeddings -> 32, 16, 8 -> 4^3). Both give 4^3 tokens at 128^3 (total stride 32); the
presets use patch 2, which is what the released weights need. ``patch_size`` is per axis, so Synapse's
(1,2,2) works (a cubic 4^3 token grid from an anisotropic crop); only (2,2,2) matches MONAI's tensor
shapes, whose last up block is fixed at 2x.

Presets:

- ``swin-unetr``: the paper's setting (Hatamizadeh et al. 2022; SimTROT Sec. 4.2; MONAI BTCV/BraTS
  tutorials): feature_size 48, depths (2,2,2,2), heads (3,6,12,24), window 7, patch 2 (62.2 M parameters
  with 1 input / 1 output channel). Inputs: multiples of 32 per axis, 128^3 in SimTROT's BraTS setting.
- ``swin-unetr-s``: CPU-sized (tests, 2-core runs): feature_size 12, depths (2,2,2,2) (so every stage
  still has a W-MSA and an SW-MSA block), heads (1,2,4,8), window 4, which tiles the 32/16/8/4 stage grids
  of a 64^3 patch without padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s3d.nn.masking import Ratio, random_block_mask, validate_mask_ratio
from s3d.nn.resenc import NetworkConfigError, _Presets, _triple

__all__ = [
    "SwinUNETRConfig",
    "SWIN_PRESETS",
    "SwinViT",
    "SwinUNETR",
    "token_grid_stride",
    "check_input_size",
    "encoder_tokens",
    "patch_grid_mask",
    "mask_patches",
    "shifted_window_mask",
    "convert_monai_state_dict",
    "DEFAULT_MASK_RATIO",
    "SIMTROT_CODE_MASK_NOISE_STD",
]

Size3 = tuple[int, int, int]

# The encoder always has four stages: MONAI's SwinUNETR wires exactly four (layers1..layers4) into its
# decoder, and the released weights have four.
NUM_STAGES = 4
# MONAI (after Swin, Liu et al. 2021): additive mask between regions of a shifted window
_MASK_VALUE = -100.0
# UNETR blocks (MONAI UnetResBlock): LeakyReLU 0.01, InstanceNorm3d without affine parameters, eps 1e-5
_NEG_SLOPE = 0.01

# SimTROT Sec. 4.4 / Fig. 6: ratio 0.75 is the default and the best; "the masked patches cannot account for
# over 85% of total patches, as there is no visual information left for the model".
DEFAULT_MASK_RATIO = 0.75
# Public SimTROT code (Pretrain/utils/synapse_utils.py, patchify_augmentation) fills masked patches with
# N(0, 0.1^2) noise; s3d's default is zeros, as s3d.data.views.make_views masks view A.
SIMTROT_CODE_MASK_NOISE_STD = 0.1


def _per_stage(v: Any, what: str) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v,) * NUM_STAGES
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError(what)
        return tuple(int(a) for a in v)
    except (TypeError, ValueError) as e:
        raise NetworkConfigError(f"network config: {what} {v!r} is not a number or {NUM_STAGES} numbers") from e


@dataclass
class SwinUNETRConfig:
    """Topology of a Swin UNETR; ``depths`` / ``num_heads`` have one entry per encoder stage (4).

    Stage s works at width ``feature_size * 2**s`` on a grid of input / (patch * 2**s); the bottleneck
    (hidden state 4, the SimTROT tokens) has ``16 * feature_size`` channels at input / (patch * 16).
    ``deep_supervision`` adds a 1x1x1 head on each of the four lower decoder stages and makes forward
    return all five logits (highest resolution first), as ``ResEncConfig`` does.
    """

    in_channels: int = 1
    num_classes: int = 1
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: Size3 = (7, 7, 7)
    patch_size: Size3 = (2, 2, 2)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    normalize: bool = True
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        self.in_channels = int(self.in_channels)
        self.num_classes = int(self.num_classes)
        self.feature_size = int(self.feature_size)
        self.depths = _per_stage(self.depths, "depths")
        self.num_heads = _per_stage(self.num_heads, "num_heads")
        self.window_size = _triple(self.window_size, "window size")
        self.patch_size = _triple(self.patch_size, "patch size")
        self.mlp_ratio = float(self.mlp_ratio)
        self.qkv_bias = bool(self.qkv_bias)
        self.drop_rate = float(self.drop_rate)
        self.attn_drop_rate = float(self.attn_drop_rate)
        self.drop_path_rate = float(self.drop_path_rate)
        self.normalize = bool(self.normalize)
        self.deep_supervision = bool(self.deep_supervision)
        if len(self.depths) != NUM_STAGES or len(self.num_heads) != NUM_STAGES:
            raise NetworkConfigError(f"network config: Swin UNETR has {NUM_STAGES} stages; depths {self.depths} and "
                                     f"num_heads {self.num_heads} need {NUM_STAGES} entries each")
        if min(self.depths) < 1 or min(self.num_heads) < 1 or self.feature_size < 1:
            raise NetworkConfigError("network config: depths, num_heads and feature_size must be positive")
        for s, h in enumerate(self.num_heads):
            if (self.feature_size << s) % h:
                raise NetworkConfigError(f"network config: stage {s} width {self.feature_size << s} is not divisible "
                                         f"by its {h} attention heads")
        if self.in_channels < 1 or self.num_classes < 1:
            raise NetworkConfigError(f"network config: in_channels {self.in_channels} and num_classes "
                                     f"{self.num_classes} must be positive")
        if self.mlp_ratio <= 0:
            raise NetworkConfigError(f"network config: mlp_ratio {self.mlp_ratio} must be positive")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise NetworkConfigError(f"network config: {name} {getattr(self, name)} must lie in [0, 1)")

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists), with ``"arch": "swin-unetr"`` to tell it from a ResEnc config."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return {"arch": "swin-unetr", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SwinUNETRConfig:
        """Inverse of ``to_dict``; unknown keys (``arch``, newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SWIN_PRESETS: Mapping[str, SwinUNETRConfig] = _Presets({
    # Hatamizadeh et al. 2022 / MONAI SwinUNETR(feature_size=48); SimTROT's Swin encoder (ssl_head.py)
    "swin-unetr": SwinUNETRConfig(1, 1, 48, (2, 2, 2, 2), (3, 6, 12, 24), (7, 7, 7), (2, 2, 2)),
    # s3d's CPU size: a quarter of the widths, window 4 (tiles a 64^3 patch's stage grids 32/16/8/4)
    "swin-unetr-s": SwinUNETRConfig(1, 1, 12, (2, 2, 2, 2), (1, 2, 4, 8), (4, 4, 4), (2, 2, 2)),
})


def token_grid_stride(cfg: SwinUNETRConfig) -> Size3:
    """Input voxels per token of the last encoder stage (patch * 2**4 per axis): inputs must be multiples of it."""
    return tuple(p * 2**NUM_STAGES for p in cfg.patch_size)  # type: ignore[return-value]


def check_input_size(spatial: Sequence[int], cfg: SwinUNETRConfig) -> None:
    """ValueError unless every axis is a positive multiple of ``token_grid_stride(cfg)`` and the token grid
    has at least 2 tokens.

    MONAI asks the same multiple (``patch_size ** 5``, i.e. 32 for patch 2): otherwise the decoder's skips
    would not line up with the padded grids of patch embedding and merging. A single token would leave the
    bottleneck block's InstanceNorm nothing to normalise over (PyTorch raises there, in MONAI too).
    """
    stride = token_grid_stride(cfg)
    sp = tuple(int(s) for s in spatial)
    if len(sp) != 3 or any(s < 1 or s % t for s, t in zip(sp, stride, strict=True)):
        raise NetworkConfigError(f"Swin UNETR input {sp}: every axis must be a positive multiple of {stride} "
                                 "(patch size x 16)")
    if all(s == t for s, t in zip(sp, stride, strict=True)):
        raise NetworkConfigError(f"Swin UNETR input {sp}: gives a single bottleneck token; at least one axis must "
                                 f"be {tuple(2 * t for t in stride)} or longer")


# --------------------------------------------------------------------------------------------- windows


def _stage_window(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Size3, Size3]:
    """Window and shift actually used on a stage grid: axes no longer than the window use the whole axis
    as window and are not shifted (MONAI ``get_window_size``)."""
    w = tuple(g if g <= wi else wi for g, wi in zip(grid, window, strict=True))
    s = tuple(0 if g <= wi else si for g, wi, si in zip(grid, window, shift, strict=True))
    return w, s  # type: ignore[return-value]


def _partition(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """(B,D,H,W,C) with D,H,W multiples of the window -> (B * windows, tokens per window, C), windows in
    raster order within each volume."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def _merge_windows(windows: torch.Tensor, window: Size3, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``_partition``: (B * windows, n, C) -> (B,D,H,W,C)."""
    b, d, h, w = shape
    wd, wh, ww = window
    x = windows.view(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def shifted_window_mask(grid: Sequence[int], window: Sequence[int], shift: Sequence[int],
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Additive attention mask (windows, n, n) for SW-MSA on a (padded) grid that is a multiple of the window.

    The grid is rolled by -shift before partitioning, so a window at the far end of an axis holds tokens from
    both ends of the volume. Along each axis the rolled coordinates split into [0, G - w), [G - w, G - s) and
    [G - s, G) (Swin's three slices); tokens whose region labels differ get -100 and so (almost) no weight.
    """
    labels = torch.zeros(tuple(int(g) for g in grid), device=device)
    for axis, (g, w, s) in enumerate(zip(grid, window, shift, strict=True)):
        coord = torch.arange(int(g), device=device)
        region = (coord >= g - w).long() + (coord >= g - s).long() if s > 0 else torch.zeros_like(coord)
        shape = [1, 1, 1]
        shape[axis] = int(g)
        labels = labels * 3 + region.view(shape)
    win = _partition(labels[None, ..., None], tuple(int(w) for w in window)).squeeze(-1)  # (windows, n)
    same = win[:, :, None] == win[:, None, :]
    return torch.zeros(same.shape, device=device).masked_fill_(~same, _MASK_VALUE)


def _relative_position_index(window: Size3) -> torch.Tensor:
    """(n, n) index into the (2wd-1)(2wh-1)(2ww-1) bias table: the offset between two tokens of a window."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (3, n)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, n, n), offsets in [-(w-1), w-1]
    wd, wh, ww = window
    return (rel[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1) + (rel[2] + ww - 1)


# ----------------------------------------------------------------------------------------- transformer


class _DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.linear2(self.drop(F.gelu(self.linear1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias (Swin, Liu et al. 2021).

    forward(x (B*windows, n, C), mask (windows, n, n) or None) -> (B*windows, n, C).
    """

    def __init__(self, dim: int, num_heads: int, window: Size3, qkv_bias: bool, attn_drop: float,
                 proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1), num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)  # Swin / MONAI init

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        # a window shrunk to the grid reads the top-left n x n block of the full window's table (see module doc)
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)  # (heads, n, n)
        drop = self.attn_drop if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=drop)
        else:
            # (volume, window) as two batch dims, so the per-window mask broadcasts over volumes instead of
            # being copied B times
            nw = mask.shape[0]
            q, k, v = (t.view(bw // nw, nw, self.num_heads, n, -1) for t in (q, k, v))
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (windows, heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop)
            out = out.view(bw, self.num_heads, n, -1)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: x + drop_path(W-MSA or SW-MSA(norm1(x))), then x + drop_path(MLP(norm2(x))).

    forward(x (B,D,H,W,C), mask from ``shifted_window_mask`` for the stage grid or None) -> same shape.
    ``shift`` is the configured shift (half a window for odd blocks, 0 for even ones); axes no longer than
    the window are never shifted.
    """

    def __init__(self, dim: int, num_heads: int, window: Size3, shift: Size3, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias, attn_drop, drop)
        self.drop_path = _DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = _stage_window((d, h, w), self.window, self.shift)
        x = self.norm1(x)
        pads = [(-n) % wi for n, wi in zip((d, h, w), window, strict=True)]
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded = x.shape[1:4]
        shifted = any(shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        out = self.attn(_partition(x, window), mask if shifted else None)
        x = _merge_windows(out, window, (b, *padded))
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w].contiguous() if any(pads) else x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self._attention(x, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """(B,D,H,W,C) -> (B,D/2,H/2,W/2,2C): concatenate each 2x2x2 neighbourhood, LayerNorm, Linear (no bias).

    Odd axes are zero-padded first. The concatenation order is MONAI's ``"merging"`` (v0.9) one, which the
    released weights use: offsets (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1), (1,1,1).
    """

    _OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2] for i, j, k in self._OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One encoder stage: ``depth`` Swin blocks (even ones W-MSA, odd ones SW-MSA), then patch merging.

    forward(x (B,C,D,H,W)) -> (B,2C,D/2,H/2,W/2).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window: Size3, drop_path: Sequence[float],
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float) -> None:
        super().__init__()
        self.window = window
        self.shift: Size3 = tuple(w // 2 for w in window)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window, self.shift if i % 2 else (0, 0, 0), mlp_ratio, qkv_bias,
                                 drop, attn_drop, drop_path[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim)
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None

    def _mask(self, padded: Sequence[int], window: Size3, shift: Size3, device: torch.device) -> torch.Tensor:
        # one cached mask per stage: training sees one patch size, and at 128^3 with window 7 the first
        # stage's mask is 1000 x 343 x 343 floats (MONAI rebuilds it every forward)
        key = (tuple(padded), window, shift, device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, shifted_window_mask(padded, window, shift, device))
        return self._mask_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[2:]
        window, shift = _stage_window(grid, self.window, self.shift)
        padded = [-(-g // w) * w for g, w in zip(grid, window, strict=True)]
        mask = self._mask(padded, window, shift, x.device) if any(shift) else None
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.downsample(x).permute(0, 4, 1, 2, 3)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv3d with kernel = stride = patch; (B,C_in,X,Y,Z) -> (B,F,X/p,Y/p,Z/p)."""

    def __init__(self, patch: Size3, in_channels: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(-n) % p for n, p in zip(x.shape[2:], self.patch, strict=True)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return self.proj(x)


def _channel_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over channels of (B,C,...) without affine parameters (MONAI ``proj_out(normalize=True)``)."""
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],)).movedim(-1, 1)


class SwinViT(nn.Module):
    """Swin Transformer encoder; forward(x (B,C_in,X,Y,Z)) -> 5 hidden states, highest resolution first.

    Hidden state 0 is the patch embedding (F channels at input / patch), hidden state s + 1 the output of
    stage s after its patch merging (2^(s+1) F channels at input / (patch * 2^(s+1))). The last one is the
    SimTROT token grid. With ``normalize`` each is LayerNorm-ed over channels (no affine parameters).
    """

    def __init__(self, cfg: SwinUNETRConfig) -> None:
        super().__init__()
        self.normalize = cfg.normalize
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.feature_size)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # stochastic depth rises linearly over all blocks (Swin; MONAI)
        n = sum(cfg.depths)  # plain floats: the network must also build under torch.device("meta")
        rates = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        for s in range(NUM_STAGES):
            first = sum(cfg.depths[:s])
            layer = BasicLayer(cfg.feature_size << s, cfg.depths[s], cfg.num_heads[s], cfg.window_size,
                               rates[first:first + cfg.depths[s]], cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_rate,
                               cfg.attn_drop_rate)
            # MONAI registers each stage as a one-element ModuleList: keys are layersN.0.*
            setattr(self, f"layers{s + 1}", nn.ModuleList([layer]))

    def stages(self) -> list[BasicLayer]:
        return [getattr(self, f"layers{s + 1}")[0] for s in range(NUM_STAGES)]

    def forward(self, x: torch.Tensor, normalize: bool | None = None) -> list[torch.Tensor]:
        normalize = self.normalize if normalize is None else normalize
        x = self.pos_drop(self.patch_embed(x))
        hidden = [x]
        for stage in self.stages():
            x = stage(x.contiguous())
            hidden.append(x)
        return [_channel_layer_norm(h) for h in hidden] if normalize else hidden


# --------------------------------------------------------------------------------------------- decoder


class _Conv(nn.Module):
    """A conv held as ``.conv`` so keys read ``...conv1.conv.weight`` like MONAI's ``Convolution``."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UnetResBlock(nn.Module):
    """conv3x3x3-IN-LReLU-conv3x3x3-IN, plus the input (through conv1x1x1-IN when the width changes), LReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = _Conv(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False))
        self.conv2 = _Conv(nn.Conv3d(c_out, c_out, 3, padding=1, bias=False))
        self.norm1 = nn.InstanceNorm3d(c_out)
        self.norm2 = nn.InstanceNorm3d(c_out)
        if c_in != c_out:
            self.conv3 = _Conv(nn.Conv3d(c_in, c_out, 1, bias=False))
            self.norm3 = nn.InstanceNorm3d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), _NEG_SLOPE)))
        residual = self.norm3(self.conv3(x)) if hasattr(self, "conv3") else x
        return F.leaky_relu(out + residual, _NEG_SLOPE)


class UnetrBasicBlock(nn.Module):
    """MONAI's ``UnetrBasicBlock(res_block=True)``: one residual block held as ``.layer``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.layer = UnetResBlock(c_in, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class UnetrUpBlock(nn.Module):
    """Transposed conv (kernel = stride = ``up``, no bias), concatenate the skip, residual block."""

    def __init__(self, c_in: int, c_out: int, up: Size3 = (2, 2, 2)) -> None:
        super().__init__()
        self.transp_conv = _Conv(nn.ConvTranspose3d(c_in, c_out, kernel_size=up, stride=up, bias=False))
        self.conv_block = UnetResBlock(2 * c_out, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat((self.transp_conv(x), skip), dim=1))


class SwinUNETR(nn.Module):
    """Swin UNETR: forward(x (B,C_in,X,Y,Z)) -> logits (B,K,X,Y,Z), or with deep supervision a list of five
    logits (full resolution, then input / 2, / 4, / 8, / 16), as ``ResEncUNet`` returns them.

    Every axis of x must be a multiple of ``token_grid_stride(cfg)``. State-dict keys equal MONAI's
    ``SwinUNETR``; the deep-supervision heads (``ds_heads.*``, absent from MONAI) exist only when
    ``cfg.deep_supervision`` is set, so a MONAI state dict loads strictly into the default config. Unlike
    ResEnc, switch a deep-supervision network to single-output inference with ``model.deep_supervision =
    False`` (keeping its config, so its weights still load), not by editing the config.
    """

    def __init__(self, cfg: SwinUNETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        f = cfg.feature_size
        self.swinViT = SwinViT(cfg)
        self.encoder1 = UnetrBasicBlock(cfg.in_channels, f)
        self.encoder2 = UnetrBasicBlock(f, f)
        self.encoder3 = UnetrBasicBlock(2 * f, 2 * f)
        self.encoder4 = UnetrBasicBlock(4 * f, 4 * f)
        self.encoder10 = UnetrBasicBlock(16 * f, 16 * f)
        self.decoder5 = UnetrUpBlock(16 * f, 8 * f)
        self.decoder4 = UnetrUpBlock(8 * f, 4 * f)
        self.decoder3 = UnetrUpBlock(4 * f, 2 * f)
        self.decoder2 = UnetrUpBlock(2 * f, f)
        # from the patch-embedding grid back to the input grid, hence the patch size as upsampling factor
        self.decoder1 = UnetrUpBlock(f, f, cfg.patch_size)
        self.out = _Conv(_Conv(nn.Conv3d(f, cfg.num_classes, kernel_size=1)))  # MONAI UnetOutBlock: out.conv.conv
        self.deep_supervision = cfg.deep_supervision
        if cfg.deep_supervision:
            # heads on decoder2..decoder5 (widths f, 2f, 4f, 8f), highest resolution first
            self.ds_heads = nn.ModuleList(nn.Conv3d(f << s, cfg.num_classes, kernel_size=1) for s in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        check_input_size(x.shape[2:], self.cfg)
        hidden = self.swinViT(x)
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, self.encoder4(hidden[2]))
        dec1 = self.decoder3(dec2, self.encoder3(hidden[1]))
        dec0 = self.decoder2(dec1, self.encoder2(hidden[0]))
        logits = self.out(self.decoder1(dec0, self.encoder1(x)))
        if not (self.deep_supervision and hasattr(self, "ds_heads")):
            return logits
        return [logits] + [head(d) for head, d in zip(self.ds_heads, (dec0, dec1, dec2, dec3), strict=True)]


# ---------------------------------------------------------------------------------- SimTROT token grid


def encoder_tokens(encoder: SwinViT | SwinUNETR, x: torch.Tensor) -> torch.Tensor:
    """The last encoder stage's patch embeddings, SimTROT's tokens: (B, 16F, X/t, Y/t, Z/t), t = token stride.

    This is hidden state 4 of ``swinViT`` (after the 4th patch merging; LayerNorm-ed if the config
    normalizes), the tensor Swin UNETR's bottleneck block ``encoder10`` reads: 4^3 tokens for a 128^3 input
    (SimTROT Sec. 3.1), 768 channels with the paper's feature size 48.
    """
    vit = encoder.swinViT if isinstance(encoder, SwinUNETR) else encoder
    return vit(x)[-1]


def patch_grid_mask(batch_size: int, spatial_size: Sequence[int], patch_size: Sequence[int],
                    ratio: Ratio = DEFAULT_MASK_RATIO, cell_size: Sequence[int] | None = None,
                    generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """SimTROT's random mask on one view, drawn at the patch-embedding grid: (B,1,*spatial) float, 1 = visible.

    ``round(ratio * cells)`` cells of ``cell_size`` voxels (default: one embedding patch) are masked per
    sample. Cells must be whole patches, so every patch embedding sees its patch either entirely or not at
    all. SimTROT (Sec. 4.4, Fig. 6) uses 0.75 and reports that masking more than 85 % of the patches fails
    ("there is no visual information left for the model"). Its public code masks 8^3 cells (4x8x8 on
    Synapse) rather than single embedding patches: pass ``cell_size`` to reproduce that.
    """
    patch = _triple(patch_size, "patch size")
    cell = patch if cell_size is None else _triple(cell_size, "mask cell size")
    if any(c % p for c, p in zip(cell, patch, strict=True)):
        raise NetworkConfigError(f"mask cell size {cell} must be a multiple of the patch size {patch} per axis, "
                                 "so that no patch embedding is partly masked")
    return random_block_mask(batch_size, spatial_size, cell, validate_mask_ratio(ratio), generator, device)


def mask_patches(x: torch.Tensor, mask: torch.Tensor, noise_std: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B,C,X,Y,Z) with masked voxels (mask (B,1,X,Y,Z) == 0) set to 0 (``make_views``' convention) or, with
    ``noise_std > 0``, to N(0, noise_std^2) noise (SimTROT's public code: ``SIMTROT_CODE_MASK_NOISE_STD``).
    Visible voxels are returned unchanged."""
    if mask.shape[0] != x.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit input {tuple(x.shape)}: expected "
                         f"({x.shape[0]}, 1, {', '.join(str(s) for s in x.shape[2:])})")
    visible = mask.to(device=x.device, dtype=torch.bool)
    if noise_std == 0:
        fill = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        rng_device = generator.device if generator is not None else x.device
        fill = torch.randn(x.shape, generator=generator, device=rng_device, dtype=x.dtype).to(x.device) * noise_std
    return torch.where(visible, x, fill)


# ------------------------------------------------------------------------------------------- weights

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_ENCODER_ROOTS = ("patch_embed.",) + tuple(f"layers{s + 1}." for s in range(NUM_STAGES))
_UNETR_ROOTS = ("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10.", "decoder1.", "decoder2.",
                "decoder3.", "decoder4.", "decoder5.", "out.", "ds_heads.")


def convert_monai_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MONAI ``SwinUNETR`` or bare ``SwinTransformer`` state dict with s3d's keys.

    DDP / torch.compile prefixes are stripped. Keys of a bare encoder (``patch_embed.*``, ``layersN.*``, as
    in MONAI's released self-supervised weights ``model_swinvit.pt``, Tang et al. 2022) move under
    ``swinViT.``; what has no counterpart in Swin UNETR (their pre-training heads, a final ``norm``) is
    dropped. That encoder names the MLP layers ``mlp.fc1`` / ``mlp.fc2``, which MONAI's ``load_from`` copies
    into ``mlp.linear1`` / ``mlp.linear2``; they are renamed the same way. Load the result with
    ``strict=False`` when it holds only the encoder.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k, stripped = key, True
        while stripped:
            stripped = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        if k.startswith(_ENCODER_ROOTS):
            k = "swinViT." + k
        elif not k.startswith(_UNETR_ROOTS):
            continue
        k = k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        out[k] = value
    return out

