"""Residual Encoder U-Net (nnU-Net ResEnc; Isensee et al. 2024) with a sparse (masked) encoder.

The network is computationally and parameter-name equivalent to ``ResidualEncoderUNet`` of
dynamic-network-architectures (DNA) as nnU-Net's ResEnc plans build it (conv bias, InstanceNorm3d
eps 1e-5 affine, LeakyReLU 0.01): a DNA state dict passed through ``convert_dna_state_dict`` loads
with ``strict=True`` and gives the same outputs. The encoder additionally accepts a block mask for
S3D masked-autoencoder pre-training (Wald et al. 2024, section 4; see ``s3d.nn.sparse``).

Presets (widths and residual blocks per stage; the number of stages, strides and kernels come from
``plan_network`` for a given patch size and spacing):

- ``resenc-l``: the S3D paper's fixed network: 6 stages, features 32-64-128-256-320-320, blocks
  1-3-4-6-6-6, isotropic strides 1-2-2-2-2-2, 3x3x3 kernels, 1 decoder conv per stage (102.35 M
  parameters with 1 input / 1 output channel). ``plan_network`` gives exactly this for the paper's
  160^3 patch at 1 mm isotropic.
- ``resenc-m``: nnU-Net's ResEnc-M widths and blocks (32..320, 1-3-4-6-6-6-6...). In nnU-Net, M and L
  share widths and blocks and differ only in the GPU-memory budget used to pick the patch size,
  which s3d leaves to the user; the preset's own topology equals ``resenc-l``'s.
- ``resenc-s``: CPU-sized (2-core training, tests): 5 stages, features 16-32-64-128-256 (capped at 256),
  blocks 1-2-2-2-2 (further stages 2), 1 decoder conv per stage.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from s3d.errors import S3DError
from s3d.nn.blocks import StackedConvBlocks, StackedResidualBlocks, init_weights
from s3d.nn.cells import StageCells, from_cells, to_cells
from s3d.nn.sparse import activation_dtype, as_float_mask, check_mask_fits, stage_masks

__all__ = [
    "NetworkConfigError",
    "ResEncConfig",
    "PRESETS",
    "plan_network",
    "adjust_patch_size",
    "total_stride",
    "ResEncEncoder",
    "UNetDecoder",
    "ResEncUNet",
    "convert_dna_state_dict",
]

Size3 = tuple[int, int, int]

# nnU-Net: UNet_featuremap_min_edge_length = 4 (no axis of the bottleneck shorter than this)
MIN_FEATURE_MAP_EDGE = 4


class NetworkConfigError(S3DError, ValueError):
    """An inconsistent network configuration: a ValueError for library callers, an S3DError for the CLI."""


def _triple(v: Any, what: str) -> Size3:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = (v, v, v)
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError(what)
        t = tuple(int(a) for a in v)
    except (TypeError, ValueError) as e:
        raise NetworkConfigError(f"network config: {what} {v!r} is not a number or three numbers") from e
    if len(t) != 3 or min(t) < 1:
        raise NetworkConfigError(f"network config: {what} {v!r} needs three positive integers")
    return t  # type: ignore[return-value]


def _default_strides() -> tuple[Size3, ...]:
    return ((1, 1, 1),) + ((2, 2, 2),) * 5


@dataclass
class ResEncConfig:
    """Topology of a ResEnc U-Net; one entry per encoder stage (highest resolution first).

    ``strides[s]`` is the downsampling of stage ``s`` (carried by the first conv of its first block;
    ``strides[0]`` is normally 1). ``decoder_convs`` has one entry per decoder stage in DNA order:
    entry 0 is the stage next to the bottleneck. ``deep_supervision`` makes the decoder return the
    logits of every decoder stage (highest resolution first) instead of only the last.
    """

    in_channels: int = 1
    num_classes: int = 1
    features: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    blocks: tuple[int, ...] = (1, 3, 4, 6, 6, 6)
    strides: tuple[Size3, ...] = field(default_factory=_default_strides)
    kernel_sizes: tuple[Size3, ...] = ((3, 3, 3),) * 6
    decoder_convs: tuple[int, ...] = (1, 1, 1, 1, 1)
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        self.in_channels = int(self.in_channels)
        self.num_classes = int(self.num_classes)
        self.features = tuple(int(f) for f in self.features)
        n = len(self.features)
        if isinstance(self.blocks, int):
            self.blocks = (self.blocks,) * n
        self.blocks = tuple(int(b) for b in self.blocks)
        if isinstance(self.strides, int):
            self.strides = (1,) + (self.strides,) * (n - 1)  # type: ignore[assignment]
        self.strides = tuple(_triple(s, "stride") for s in self.strides)
        if isinstance(self.kernel_sizes, int):
            self.kernel_sizes = (self.kernel_sizes,) * n  # type: ignore[assignment]
        self.kernel_sizes = tuple(_triple(k, "kernel size") for k in self.kernel_sizes)
        if isinstance(self.decoder_convs, int):
            self.decoder_convs = (self.decoder_convs,) * (n - 1)
        self.decoder_convs = tuple(int(c) for c in self.decoder_convs)
        self.deep_supervision = bool(self.deep_supervision)
        if n < 2:
            raise NetworkConfigError(f"network config: needs at least 2 stages, got features {self.features}")
        for name in ("blocks", "strides", "kernel_sizes"):
            if len(getattr(self, name)) != n:
                raise NetworkConfigError(f"network config: {name} has {len(getattr(self, name))} entries but "
                                         f"features has {n} (one per stage)")
        if len(self.decoder_convs) != n - 1:
            raise NetworkConfigError(f"network config: decoder_convs has {len(self.decoder_convs)} entries, "
                                     f"expected {n - 1} (stages - 1)")
        if min(self.features) < 1 or min(self.blocks) < 1 or min(self.decoder_convs) < 1:
            raise NetworkConfigError("network config: features, blocks and decoder_convs must be positive")
        if self.in_channels < 1 or self.num_classes < 1:
            raise NetworkConfigError(f"network config: in_channels {self.in_channels} and num_classes "
                                     f"{self.num_classes} must be positive")

    @property
    def n_stages(self) -> int:
        return len(self.features)

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists)."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "features": list(self.features),
            "blocks": list(self.blocks),
            "strides": [list(s) for s in self.strides],
            "kernel_sizes": [list(k) for k in self.kernel_sizes],
            "decoder_convs": list(self.decoder_convs),
            "deep_supervision": self.deep_supervision,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResEncConfig:
        """Inverse of ``to_dict``; lists become tuples again. Unknown keys are ignored (newer versions)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def total_stride(cfg: ResEncConfig) -> Size3:
    """Product of all stage strides per axis: input sizes must be multiples of it."""
    out = [1, 1, 1]
    for s in cfg.strides:
        out = [a * b for a, b in zip(out, s, strict=True)]
    return tuple(out)  # type: ignore[return-value]


class _Presets(Mapping[str, ResEncConfig]):
    """Read-only preset table; every lookup returns a fresh copy, so callers may mutate what they get."""

    def __init__(self, table: dict[str, ResEncConfig]) -> None:
        self._table = table

    def __getitem__(self, key: str) -> ResEncConfig:
        return dataclasses.replace(self._table[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"PRESETS({', '.join(self._table)})"


_ISO6 = ((1, 1, 1),) + ((2, 2, 2),) * 5
PRESETS: Mapping[str, ResEncConfig] = _Presets({
    # S3D (Wald et al. 2024, section 3 "fixed" ResEnc-L; nnU-Net ResEnc widths 32..320, blocks 1,3,4,6,6,6)
    "resenc-l": ResEncConfig(1, 1, (32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6), _ISO6, ((3, 3, 3),) * 6,
                             (1,) * 5),
    # nnU-Net nnUNetPlannerResEncM: same widths/blocks as L (only the planned patch differs there)
    "resenc-m": ResEncConfig(1, 1, (32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6), _ISO6, ((3, 3, 3),) * 6,
                             (1,) * 5),
    # s3d's own CPU size: half the widths, fewer blocks, 5 stages
    "resenc-s": ResEncConfig(1, 1, (16, 32, 64, 128, 256), (1, 2, 2, 2, 2), _ISO6[:5], ((3, 3, 3),) * 5,
                             (1,) * 4),
})


def _pool_and_conv_props(patch: Size3, spacing: tuple[float, float, float],
                         max_stages: int | None) -> tuple[list[Size3], list[Size3]]:
    """Per-stage strides and kernels as nnU-Net's ``get_pool_and_conv_props`` plans them.

    Repeatedly halve every axis that (a) is still >= 2 * MIN_FEATURE_MAP_EDGE long and (b) has a spacing
    within a factor 2 of the finest current spacing among those axes; if only one axis qualifies it
    must be >= 3 * MIN_FEATURE_MAP_EDGE. Kernels start at 1 and become 3 once an axis' spacing is
    within a factor 2 of the finest spacing (so very coarse axes get 1-voxel kernels until pooling
    the fine axes has made them comparable); the bottleneck always uses 3x3x3.
    """
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(p) for p in patch]
    strides: list[Size3] = [(1, 1, 1)]
    kernels: list[Size3] = []
    kernel = [1, 1, 1]
    while max_stages is None or len(strides) < max_stages:
        valid = [a for a in range(3) if cur_size[a] >= 2 * MIN_FEATURE_MAP_EDGE]
        if not valid:
            break
        finest = min(cur_spacing[a] for a in valid)
        valid = [a for a in valid if cur_spacing[a] / finest < 2]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * MIN_FEATURE_MAP_EDGE:
            break
        for a in range(3):
            if kernel[a] != 3 and cur_spacing[a] / min(cur_spacing) < 2:
                kernel[a] = 3
        pool = [1, 1, 1]
        for a in valid:
            pool[a] = 2
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
        strides.append(tuple(pool))  # type: ignore[arg-type]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
    kernels.append((3, 3, 3))
    return strides, kernels


def plan_network(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    preset: str | ResEncConfig = "resenc-m",
    in_channels: int = 1,
    num_classes: int = 2,
    max_stages: int | None = None,
) -> ResEncConfig:
    """nnU-Net-style topology for a patch size (voxels) and spacing (mm), both in (i, j, k) order.

    Strides and kernels follow nnU-Net's planner (see ``_pool_and_conv_props``); widths and blocks
    come from the preset, extended for extra stages as nnU-Net does (widths double up to the preset's
    largest width, blocks repeat the last entry) or truncated. The planned pooling assumes the patch
    is a multiple of the total stride: pass it through ``adjust_patch_size(patch, cfg)``.
    """
    if isinstance(preset, ResEncConfig):
        base = dataclasses.replace(preset)
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise S3DError(f"network preset {preset!r}: unknown, choose one of {', '.join(PRESETS)}")
    try:
        patch = tuple(int(p) for p in patch_size)
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as e:
        raise S3DError(f"patch size {patch_size!r} / spacing {spacing!r}: expected three numbers each") from e
    if len(patch) != 3 or min(patch) < 1:
        raise S3DError(f"patch size {tuple(patch_size)}: needs three positive integers")
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise S3DError(f"spacing {tuple(spacing)}: needs three positive numbers (mm)")
    if max_stages is not None and max_stages < 2:
        raise S3DError(f"max_stages {max_stages}: a U-Net needs at least 2 stages")
    strides, kernels = _pool_and_conv_props(patch, sp, max_stages)  # type: ignore[arg-type]
    n = len(strides)
    if n < 2:
        raise S3DError(f"patch size {patch}: too small to downsample even once (an axis needs >= "
                       f"{2 * MIN_FEATURE_MAP_EDGE} voxels at the finest spacing)")
    cap = max(base.features)
    features = list(base.features[:n])
    while len(features) < n:
        features.append(min(2 * features[-1], cap))
    blocks = list(base.blocks[:n]) + [base.blocks[-1]] * max(0, n - len(base.blocks))
    dec = list(base.decoder_convs[: n - 1]) + [base.decoder_convs[-1]] * max(0, n - 1 - len(base.decoder_convs))
    return ResEncConfig(
        in_channels=in_channels,
        num_classes=num_classes,
        features=tuple(features),
        blocks=tuple(blocks),
        strides=tuple(strides),
        kernel_sizes=tuple(kernels),
        decoder_convs=tuple(dec),
        deep_supervision=base.deep_supervision,
    )


def adjust_patch_size(patch_size: Sequence[int], cfg: ResEncConfig) -> Size3:
    """The patch rounded up per axis to a multiple of the network's total stride (nnU-Net pads up too)."""
    total = total_stride(cfg)
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise S3DError(f"patch size {tuple(patch_size)}: needs three positive integers")
    return tuple(-(-p // t) * t for p, t in zip(patch, total, strict=True))  # type: ignore[return-value]


class ResEncEncoder(nn.Module):
    """Stem + residual stages; returns one feature map per stage (highest resolution first).

    forward(x (B,C_in,i,j,k), mask (B,1,i,j,k) or None) -> list of (B,features[s],i/c_s,j/c_s,k/c_s),
    c_s the cumulative stride of stage s; spatial sizes must be multiples of the total stride.
    With a mask (1 = visible; block-aligned, blocks a multiple of the total stride) the input is zeroed
    at masked voxels, every conv output is re-masked at its resolution and every InstanceNorm uses
    visible voxels only, so masked positions of every output are exactly 0 and the outputs do not
    depend on masked input voxels (S3D section 4a / SparK). Without a mask: the dense DNA computation.
    """

    def __init__(self, cfg: ResEncConfig) -> None:
        super().__init__()
        self.stem = StackedConvBlocks(1, cfg.in_channels, cfg.features[0], cfg.kernel_sizes[0], 1, bias=True)
        stages = []
        c_in = cfg.features[0]
        for s in range(cfg.n_stages):
            stages.append(StackedResidualBlocks(cfg.blocks[s], c_in, cfg.features[s], cfg.kernel_sizes[s],
                                                cfg.strides[s], bias=True))
            c_in = cfg.features[s]
        self.stages = nn.Sequential(*stages)
        self.output_channels: list[int] = list(cfg.features)
        self.strides: list[Size3] = list(cfg.strides)
        self.kernel_sizes: list[Size3] = list(cfg.kernel_sizes)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                masks: Sequence[torch.Tensor] | None = None,
                cells: Sequence[StageCells | None] | None = None) -> list[torch.Tensor]:
        """``masks``: the per-stage masks ``stage_masks(mask, self.strides)`` when the caller has them
        already (the MAE needs them again for its mask tokens); computed here otherwise.
        ``cells``: per stage, its visible cells where it runs block-sparse (``s3d.nn.cells.sparse_plan``: a
        prefix of the stages), None where it keeps the masked dense path. The stem runs on cells when stage
        0 does. Either way the outputs are the same up to float rounding."""
        skips: list[torch.Tensor] = []
        if mask is None:
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                skips.append(x)
            return skips
        check_mask_fits(x, mask)
        # masks in the dtype the convs produce (bf16 under autocast): a float32 mask would promote or convert
        # every masked layer's activations
        act = activation_dtype(x)
        mask = as_float_mask(mask.to(x.device), act)
        per_stage = list(masks) if masks is not None else stage_masks(mask, self.strides, dtype=act)
        if len(per_stage) != len(self.stages):
            raise ValueError(f"masks: {len(per_stage)} given, the encoder has {len(self.stages)} stages")
        per_cells = list(cells) if cells is not None else [None] * len(per_stage)
        if len(per_cells) != len(self.stages):
            raise ValueError(f"cells: {len(per_cells)} given, the encoder has {len(self.stages)} stages")
        y: torch.Tensor | None = None  # the running activations as visible cells, while stages are sparse
        prev: StageCells | None = None
        if per_cells[0] is not None:
            # cutting out the visible cells drops the hidden input, as zeroing it does on the dense path
            prev = per_cells[0].scaled(self.strides[0])
            y = self.stem.forward_cells(to_cells(x, prev), prev, prev)
        else:
            # zero the hidden input first: the stem's 3x3x3 conv would otherwise carry masked intensities
            # into visible border voxels (the nnssl reference implementation skips this and leaks)
            x = self.stem(x * mask, mask)
        for stage, m, c in zip(self.stages, per_stage, per_cells, strict=True):
            if y is not None and c is not None:
                y, prev = stage.forward_cells(y, prev, c), c
                x = from_cells(y, c)  # the decoder's skip (and the next dense stage's input), once per stage
            else:
                y = None
                x = stage(x, m)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling, skip concatenation and conv blocks per stage; 1x1 heads (DNA ``UNetDecoder``).

    forward(skips: list from ``ResEncEncoder``) -> logits (B,num_classes,i,j,k), or with deep
    supervision a list of logits, one per decoder stage, highest resolution first. Heads exist for
    every decoder stage either way, so weights load with or without deep supervision.
    """

    def __init__(self, cfg: ResEncConfig, num_classes: int | None = None) -> None:
        super().__init__()
        num_classes = cfg.num_classes if num_classes is None else int(num_classes)
        feats, n = cfg.features, cfg.n_stages
        transpconvs, stages, seg_layers = [], [], []
        for s in range(1, n):
            below, skip_c, stride = feats[-s], feats[-(s + 1)], cfg.strides[-s]
            transpconvs.append(nn.ConvTranspose3d(below, skip_c, stride, stride, bias=True))
            stages.append(StackedConvBlocks(cfg.decoder_convs[s - 1], 2 * skip_c, skip_c, cfg.kernel_sizes[-(s + 1)],
                                            1, bias=True))
            seg_layers.append(nn.Conv3d(skip_c, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)
        self.deep_supervision = cfg.deep_supervision
        self.num_classes = num_classes
        self.apply(init_weights)

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs: list[torch.Tensor] = []
        last = len(self.stages) - 1
        for s, (up, block) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            x = block(torch.cat((up(x), skips[-(s + 2)]), dim=1))
            if self.deep_supervision:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                outputs.append(self.seg_layers[-1](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


class ResEncUNet(nn.Module):
    """ResEnc U-Net for segmentation: forward(x (B,C_in,i,j,k)) -> logits (B,K,i,j,k) (list with deep supervision).

    State-dict keys equal DNA ``ResidualEncoderUNet``'s minus its duplicates (``convert_dna_state_dict``).
    """

    def __init__(self, cfg: ResEncConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ResEncEncoder(cfg)
        self.decoder = UNetDecoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def convert_dna_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DNA ``ResidualEncoderUNet`` state dict (e.g. nnU-Net's ``network_weights``) with s3d's keys.

    DNA registers every conv/norm twice (``...conv`` and ``...all_modules.N``) and its decoder keeps the
    encoder as a submodule (``decoder.encoder.*``); both copies are dropped. DDP / torch.compile
    prefixes are stripped. Everything else keeps its name.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        stripped = True
        while stripped:
            stripped = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p):], True
        if ".all_modules." in k or k.startswith("decoder.encoder."):
            continue
        out[k] = value
    return out
