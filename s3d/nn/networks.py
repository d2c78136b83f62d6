"""One entry point for every segmentation network s3d trains: ResEnc U-Net (``s3d.nn.resenc``) and Swin UNETR
(``s3d.nn.swin_unetr``).

A network travels as the ``network`` object of config.json. Swin UNETR configs carry ``"arch": "swin-unetr"``
(``SwinUNETRConfig.to_dict``); a dict without ``arch`` is a ResEnc config, which every s3d version before
Swin UNETR wrote. ``network_config_from_dict`` / ``build_network`` dispatch on that, so pre-training,
fine-tuning, the model check, prediction and export treat both alike.

Encoder, i.e. what ``s3d finetune --weights`` transfers and ``s3d weights export --encoder-only`` keeps:

- ResEnc: ``encoder.*`` (stem and stages), what every pre-training method trains.
- Swin UNETR: ``swinViT.*`` (patch embedding and the four Swin stages), what SimTROT / B-TROT train (their
  tokens are its last hidden state) and what MONAI's released self-supervised weights hold (Tang et al.
  2022). The UNETR conv blocks on the skips (``encoder1``..``encoder4``, ``encoder10``) are not part of it:
  no pre-training objective here reaches them, so "transferring" them would copy random initialisations;
  they train with the decoder (and are in its warm-up group) during fine-tuning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from s3d.errors import S3DError
from s3d.nn.resenc import PRESETS, ResEncConfig, ResEncUNet, total_stride
from s3d.nn.swin_unetr import SWIN_PRESETS, SwinUNETR, SwinUNETRConfig, check_input_size, token_grid_stride

NetworkConfig = ResEncConfig | SwinUNETRConfig

SWIN_ARCH = "swin-unetr"

# Default patches when the data do not plan one: SimTROT's brain tumour setting is 128^3 (Sec. 4.1), which a CPU
# cannot train; 64^3 is the smallest cube whose token grid (2^3 for patch 2) has more than one token.
SWIN_DEFAULT_PATCH: Mapping[str, tuple[int, int, int]] = {"swin-unetr": (128, 128, 128),
                                                          "swin-unetr-s": (64, 64, 64)}


def arch_names() -> list[str]:
    """Every ``--arch`` value: the ResEnc presets, then the Swin UNETR presets."""
    return [*PRESETS, *SWIN_PRESETS]


def is_swin(arch: str | NetworkConfig) -> bool:
    """Whether ``arch`` (a preset name or a config) is a Swin UNETR."""
    return isinstance(arch, SwinUNETRConfig) or (isinstance(arch, str) and arch in SWIN_PRESETS)


def preset(name: str) -> NetworkConfig:
    """A fresh copy of the preset ``name`` from either table; S3DError naming ``--arch`` when unknown."""
    if name in PRESETS:
        return PRESETS[name]
    if name in SWIN_PRESETS:
        return SWIN_PRESETS[name]
    raise S3DError(f"--arch {name}: unknown, choose one of {', '.join(arch_names())}")


def network_config_from_dict(d: Mapping[str, Any]) -> NetworkConfig:
    """The config a ``network`` object of config.json describes (``to_dict``'s inverse for both kinds).

    NetworkConfigError (a ValueError) on a bad topology, as the configs' own ``from_dict`` raise."""
    if not isinstance(d, Mapping):
        raise TypeError(f"network config is a {type(d).__name__}, not an object")
    arch = d.get("arch")
    if arch is None:
        return ResEncConfig.from_dict(d)
    if arch == SWIN_ARCH:
        return SwinUNETRConfig.from_dict(d)
    raise ValueError(f"network config: arch {arch!r} is not one of {SWIN_ARCH!r} (or absent for ResEnc)")


def build_network(cfg: NetworkConfig) -> nn.Module:
    """The segmentation network ``cfg`` describes (randomly initialised)."""
    if isinstance(cfg, SwinUNETRConfig):
        return SwinUNETR(cfg)
    return ResEncUNet(cfg)


def inference_network(cfg: NetworkConfig) -> nn.Module:
    """A network that loads the tensors of ``cfg``'s network and returns the full-resolution logits only.

    ResEnc has every deep-supervision head either way, so its config is switched off; Swin UNETR's heads exist
    only when its config enables them, so the network keeps the config (its tensors load) and is switched to
    single output afterwards (see ``SwinUNETR``)."""
    if isinstance(cfg, SwinUNETRConfig):
        net = SwinUNETR(cfg)
        net.deep_supervision = False
        return net
    return ResEncUNet(dataclasses.replace(cfg, deep_supervision=False))


def with_task(cfg: NetworkConfig, in_channels: int, num_classes: int, deep_supervision: bool) -> NetworkConfig:
    """A copy of ``cfg`` for a dataset's channels and classes (e.g. a pre-trained network fine-tuned)."""
    return dataclasses.replace(cfg, in_channels=int(in_channels), num_classes=int(num_classes),
                               deep_supervision=bool(deep_supervision))


def encoder_prefixes(cfg: NetworkConfig | nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the transferable encoder (module docstring)."""
    if isinstance(cfg, (SwinUNETRConfig, SwinUNETR)):
        return ("swinViT.",)
    return ("encoder.",)


def encoder_module(network: nn.Module) -> nn.Module:
    """The submodule holding the tensors under ``encoder_prefixes(network)`` (fine-tuning's encoder group)."""
    return network.swinViT if isinstance(network, SwinUNETR) else network.encoder


def input_stride(cfg: NetworkConfig) -> tuple[int, int, int]:
    """Every input axis must be a multiple of this (ResEnc: product of strides; Swin: token grid stride)."""
    if isinstance(cfg, SwinUNETRConfig):
        return token_grid_stride(cfg)
    return total_stride(cfg)


def check_patch_size(patch_size: Sequence[int], cfg: NetworkConfig, option: str = "--patch-size") -> None:
    """S3DError naming ``option`` unless ``patch_size`` can run through ``cfg``'s network unchanged.

    Swin UNETR patches are refused rather than rounded up: its token grid is what SimTROT restores and what
    ``s3d predict`` tiles, so a silently enlarged patch would change both (and cost 2-8x the memory)."""
    patch = tuple(int(p) for p in patch_size)
    stride = input_stride(cfg)
    if isinstance(cfg, SwinUNETRConfig):
        try:
            check_input_size(patch, cfg)
        except ValueError:
            pass
        else:
            return
        raise S3DError(f"{option} {' '.join(map(str, patch))}: Swin UNETR needs multiples of its token grid "
                       f"stride {' '.join(map(str, stride))} (patch size x 16) per axis and at least 2 tokens "
                       f"(e.g. {2 * stride[0]} {2 * stride[1]} {2 * stride[2]})")
    bad = [p for p, s in zip(patch, stride, strict=True) if p % s]
    if bad:
        raise S3DError(f"{option} {' '.join(map(str, patch))}: must be divisible by the network's total stride "
                       f"{' '.join(map(str, stride))}")
