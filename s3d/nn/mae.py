"""S3D masked autoencoder around the ResEnc U-Net (Wald et al. 2024, section 4; SparK, Tian et al. 2023).

The encoder is the segmentation network's encoder (sparse: it zeroes masked voxels after every conv and
normalises over visible voxels only). Before decoding, each stage's masked positions are filled with a
learnable mask token and, at every resolution except the highest, passed through a 3x3x3 "densification"
convolution. The reconstruction decoder is a U-Net decoder with one output channel and is discarded at
fine-tuning; only ``encoder.*`` weights transfer.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from s3d.nn.resenc import ResEncConfig

__all__ = ["MAEModel", "MaskedMSELoss"]


class MaskedMSELoss(nn.Module):
    """Mean squared error over masked voxels only (S3D: L2 in z-score space, "only ... where regions were masked").

    forward(recon (B,C,...), target (B,C,...), mask (B,1,...) or (B,C,...), 1 = visible) -> scalar:
    ``sum((recon - target)^2 * (1 - mask)) / number of masked elements in the batch``. Visible voxels
    contribute nothing. With no masked voxel at all the loss is 0 (still attached to the graph).
    """

    def forward(self, recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """`valid` (B,1,...) 1 inside the image, 0 where the patch was padded beyond it: padding is
        trivially "reconstructed" and would otherwise dilute the loss on small volumes."""
        if recon.shape != target.shape:
            raise ValueError(f"MaskedMSELoss: recon shape {tuple(recon.shape)} != target shape {tuple(target.shape)}")
        hidden = (1.0 - mask.float()).expand_as(recon)
        if valid is not None:
            hidden = hidden * valid.float().expand_as(recon)
        # float32 accumulation: under autocast recon may be half precision and the sum is over ~10^6 voxels
        sq = (recon.float() - target.float()).square()
        n_masked = hidden.sum()
        return (sq * hidden).sum() / n_masked.clamp_min(1.0)


class MAEModel(nn.Module):
    """ResEnc encoder + mask tokens + densification convs + 1-channel U-Net decoder.

    forward(x (B,C_in,i,j,k), mask (B,1,i,j,k) 1 = visible, or None for no masking) -> (B,1,i,j,k).
    ``self.encoder`` is a ``ResEncEncoder(cfg)``, so its state-dict keys (``encoder.stem.*``,
    ``encoder.stages.*``) are exactly those of ``ResEncUNet(cfg)``: transfer is a key filter.
    """

    # block-sparse high-resolution stages (``s3d.nn.cells``): the emulation's results, computed on
    # visible cells only (False: every stage on the masked dense path); block_size None: read it off the mask
    block_sparse: bool = True
    block_size: tuple[int, int, int] | None = None

    def __init__(self, cfg: ResEncConfig) -> None:
        super().__init__()
        from s3d.nn.resenc import ResEncEncoder, UNetDecoder

        self.cfg = cfg
        self.encoder = ResEncEncoder(cfg)
        channels = [int(c) for c in self.encoder.output_channels]
        self.strides = [tuple(int(v) for v in s) for s in cfg.strides]

        self.mask_tokens = nn.ParameterList()
        for c in channels:
            p = nn.Parameter(torch.zeros(1, c, 1, 1, 1))
            # SparK / nnssl SparK3D: trunc_normal_(std=.02, a=-.02, b=.02)
            nn.init.trunc_normal_(p, mean=0.0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(p)

        # S3D section 4(c): 3x3x3 conv "at every resolution except the highest"; skips are highest-res first
        self.densify = nn.ModuleList(
            [nn.Identity()] + [nn.Conv3d(c, c, kernel_size=3, padding=1, bias=True) for c in channels[1:]]
        )

        # reconstruction is one map at full resolution; deep supervision heads would be dead weight
        dec_cfg = dataclasses.replace(cfg, deep_supervision=False) if dataclasses.is_dataclass(cfg) else cfg
        self.decoder = UNetDecoder(dec_cfg, num_classes=1)

    def fill_and_densify(self, skips: list[torch.Tensor], mask: torch.Tensor | None,
                         masks: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Fill every skip's masked positions with its stage's mask token, then densify.

        ``masks``: the per-stage masks (``stage_masks(mask, self.strides)``) if already computed. The sparse
        encoder leaves masked positions at exactly 0, so filling is ``skip + token * (1 - m)`` in one pass.
        """
        if mask is None:
            return [densify(skip) for skip, densify in zip(skips, self.densify, strict=True)]
        if masks is None:
            from s3d.nn.sparse import stage_masks

            masks = stage_masks(mask, self.strides, dtype=skips[0].dtype)
        out = []
        for skip, m, token, densify in zip(skips, masks, self.mask_tokens, self.densify, strict=True):
            hidden = 1.0 - m.to(device=skip.device, dtype=skip.dtype)  # (B,1,...): 1/C of the skip's size
            out.append(densify(torch.addcmul(skip, hidden, token.to(skip.dtype))))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self._decode(self.decoder(self.fill_and_densify(list(self.encoder(x)), None)))
        if mask.shape[0] != x.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != x.shape[2:]:
            raise ValueError(f"MAEModel: mask shape {tuple(mask.shape)} does not fit input {tuple(x.shape)}")
        from s3d.nn.sparse import activation_dtype, stage_masks

        # one mask per stage, once per step, in the activation dtype; the encoder zeroes the hidden input
        act = activation_dtype(x)
        mask = mask.to(device=x.device, dtype=act)
        masks = stage_masks(mask, self.strides, dtype=act)
        cells = None
        if self.block_sparse:
            from s3d.nn.cells import infer_block_size, sparse_plan
            from s3d.nn.resenc import total_stride

            block = self.block_size or infer_block_size(mask, total_stride(self.cfg))
            cells = sparse_plan(mask, block, self.strides)
        skips = self.encoder(x, mask, masks, cells)
        return self._decode(self.decoder(self.fill_and_densify(list(skips), mask, masks)))

    @staticmethod
    def _decode(recon: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return recon[0] if isinstance(recon, (list, tuple)) else recon

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``encoder.*`` entries of the state dict (keys as in ``ResEncUNet``), detached."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("encoder.")}
