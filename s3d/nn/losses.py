"""Supervised segmentation losses (nnU-Net's Dice + cross-entropy, with deep supervision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftDiceLoss(nn.Module):
    """Negative soft Dice over foreground classes, batch Dice as nnU-Net computes it.

    nnU-Net (MemoryEfficientSoftDiceLoss): softmax probabilities, sums over the batch and all
    voxels per class ("batch_dice"), background excluded, smooth 1e-5 in numerator and denominator.

    forward(logits (B,K,...), target (B,1,...) int) -> scalar in [-1, 0].
    """

    def __init__(self, smooth: float = 1e-5, include_background: bool = False) -> None:
        super().__init__()
        self.smooth = smooth
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(1)
        onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = (0, *range(2, probs.ndim))
        intersect = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersect + self.smooth) / (denom + self.smooth).clamp_min(1e-8)
        return -dice.mean()


class DiceCELoss(nn.Module):
    """Dice + cross-entropy with equal weights (nnU-Net DC_and_CE_loss).

    forward(logits (B,K,...), target (B,1,...) int) -> scalar.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice = SoftDiceLoss()
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target[:, 0].long())
        return self.ce_weight * ce + self.dice_weight * self.dice(logits, target)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net: weights 1/2^i from the highest resolution down, the lowest output gets 0, normalised."""
    w = [1 / (2**i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def downsample_target(target: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour label map at a decoder output's resolution (nnU-Net uses order 0 too)."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=shape, mode="nearest").to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of `loss` over deep-supervision outputs (highest resolution first).

    forward(outputs: Tensor | list[Tensor] (B,K,...), target (B,1,...)) -> scalar. A single
    tensor is treated as one output with weight 1.
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(outputs):
            return self.loss(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs, strict=True):
            if w > 0:
                total = total + w * self.loss(out, downsample_target(target, tuple(out.shape[2:])))
        return total
