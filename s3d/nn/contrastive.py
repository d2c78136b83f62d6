"""Token-level contrastive learning (SimTROT / B-TROT; Hu et al., "Enhancing 3D Transformer Segmentation
Model for Medical Image with Token-level Representation Learning", Sec. 3.2-3.3).

Tokens are the voxels of an encoder feature map `(B,C,X,Y,Z)`. One view of each volume is rotated by a
cube symmetry before the encoder, and the encoder's feature map of that view is rotated back
("rotate-and-restore", Sec. 3.2) so that tokens at the same index describe the same anatomy in both
views. Rotations are exact index permutations (`torch.permute` + `torch.flip`), never interpolation,
so restoring a rotated tensor gives it back bit for bit.

Rotate-and-restore on FEATURE MAPS: `restore(encoder(rotate(x)), op)` is aligned with `encoder(x)`
token by token as long as (a) every axis that the op exchanges has the same length, both in the input
and in the feature map, i.e. cubic views with isotropic strides, and (b) each spatial size is a
multiple of the encoder's total stride, so that token m of the rotated view covers exactly the
rotated input cell of token m. `rotate`/`restore` raise ValueError when (a) fails.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from s3d.rotations import (  # noqa: F401 - re-exported: rotate-and-restore is part of this API
    NUM_OPS,
    NUM_ROTATIONS,
    op_matrix,
    op_permutation,
    random_ops,
    restore,
    restore_batch,
    rotate,
    rotate_batch,
)


def _tokens(z: torch.Tensor) -> torch.Tensor:
    """(B,C,*spatial) -> (B,N,C)."""
    return z.flatten(2).transpose(1, 2)


class TokenContrastiveLoss(nn.Module):
    """Token-level NT-Xent with same-position weighting (SimTROT Eq. 1 and Eq. 3).

    forward(z_a (B,C,X,Y,Z), z_b (B,C,X,Y,Z)) -> scalar. z_b must already be restored to z_a's frame.

    Anchors are all 2BN tokens (volume i, position m, view v). The positive of (i, m, v) is (i, m, 1-v).
    The denominator sums exp(cos/tau) over every other token of both views in the batch (the anchor
    itself excluded, the positive included, as in SimCLR). Tokens at the SAME position m in OTHER
    volumes j != i (either view) enter that sum as w * exp(cos/tau): these are the pairs whose
    similarity is the paper's collapse mode (Sec. 3.3), and w > 1 penalises it. w = 1 is Eq. (1).
    The loss is the mean over all anchors of both views.

    Note: the public SimTROT code multiplies the cosine (w * cos inside the exponential) rather than the
    exponential term, and leaves out the same-position pairs of the other view; this follows Eq. (3)
    as written (w multiplies the exponential terms), counting same-position tokens of both views.

    The (2BN)^2 similarity matrix is built in chunks of `chunk_size` anchors (default: as many as keep
    a chunk under 2**24 entries); under autograd each chunk is recomputed in backward
    (activation checkpointing), so memory stays O(chunk * 2BN).
    """

    def __init__(self, temperature: float = 0.5, same_position_weight: float = 5.0,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if same_position_weight <= 0:
            raise ValueError(f"same_position_weight must be > 0, got {same_position_weight}")
        self.temperature = float(temperature)  # SimTROT: tau = 0.5
        self.same_position_weight = float(same_position_weight)  # SimTROT: w = 5 (Fig. 6)
        self.chunk_size = chunk_size

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.shape != z_b.shape or z_a.dim() < 3:
            raise ValueError(f"views must have equal shapes (B,C,...), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
        b = z_a.shape[0]
        if b < 2 and self.same_position_weight != 1.0:
            raise ValueError("TokenContrastiveLoss with same_position_weight != 1 needs at least 2 volumes per batch "
                             f"(got {b}): the weight acts on same-position tokens of different volumes")
        # float32 at least: exp/logsumexp of cos/tau is badly conditioned in half precision under AMP.
        dtype = torch.promote_types(z_a.dtype, torch.float32)
        ta = F.normalize(_tokens(z_a).to(dtype), dim=-1)
        tb = F.normalize(_tokens(z_b).to(dtype), dim=-1)
        n = ta.shape[1]
        total = 2 * b * n
        # Row r = v * B * N + i * N + m.
        feats = torch.cat([ta.reshape(b * n, -1), tb.reshape(b * n, -1)], dim=0)
        idx = torch.arange(total, device=feats.device)
        volume = (idx // n) % b
        position = idx % n
        positive = (idx + b * n) % total

        chunk = self.chunk_size or max(1, (1 << 24) // total)
        losses = []
        # Autocast would run the similarity matmul in half precision again; keep it in float32.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            for start in range(0, total, chunk):
                rows = idx[start : start + chunk]
                args = (feats, rows, volume, position, positive)
                if feats.requires_grad and chunk < total:
                    losses.append(checkpoint(self._chunk_loss, *args, use_reentrant=False))
                else:
                    losses.append(self._chunk_loss(*args))
        return torch.cat(losses).mean()

    def _chunk_loss(self, feats: torch.Tensor, rows: torch.Tensor, volume: torch.Tensor, position: torch.Tensor,
                    positive: torch.Tensor) -> torch.Tensor:
        """Per-anchor losses (K,) for anchor rows `rows` (K,) against all 2BN tokens."""
        logits = feats[rows] @ feats.T / self.temperature  # (K, 2BN)
        pos_logit = logits.gather(1, positive[rows, None]).squeeze(1)
        same_pos_other_vol = (position[None, :] == position[rows, None]) & (volume[None, :] != volume[rows, None])
        if self.same_position_weight != 1.0:
            # w * exp(s) = exp(s + log w): weighting inside logsumexp stays numerically stable.
            logits = logits + same_pos_other_vol.to(logits.dtype) * math.log(self.same_position_weight)
        self_mask = rows[:, None] == torch.arange(feats.shape[0], device=feats.device)[None, :]
        logits = logits.masked_fill(self_mask, float("-inf"))
        return torch.logsumexp(logits, dim=1) - pos_logit


HEAD_NORMS = ("layer", "batch")


class _TokenLayerNorm(nn.Module):
    """LayerNorm over channels of every token of (B,C,X,Y,Z)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ProjectionHead(nn.Module):
    """Per-token MLP on (B,C_in,X,Y,Z) -> (B,C_out,X,Y,Z): 1x1x1 conv, norm, ReLU, 1x1x1 conv.

    norm="layer" (SimTROT's heads): a per-token LayerNorm over channels rather than SimCLR's BatchNorm.
    With the batch of 2 used for 3D pre-training (SimTROT Sec. 4.1) the negatives of the loss keep tokens
    apart, and a per-token norm acts on each token alone.

    norm="batch" (B-TROT's heads): BatchNorm over every token of the batch (B*X*Y*Z samples per channel),
    BYOL's MLP as published (Grill et al. 2020, Sec. 3.3: linear, batch norm, ReLU, linear; SimTROT
    Sec. 3.2 "following settings in BYOL"). BYOL's loss has no negatives; centring each channel over the
    tokens is what stops a projection that maps every token to one vector from being a fixed point
    (measured: with LayerNorm heads, 200 B-TROT steps on Swin UNETR took the encoder's tokens from cosine
    0.989 to 0.9992 to each other, with batch norm to 0.978; benchmarks/README.md). Batch statistics do
    not depend on token order, so this head commutes with rotate/restore too.

    hidden_channels defaults to max(in_channels, out_channels).
    """

    def __init__(self, in_channels: int, hidden_channels: int | None = None, out_channels: int = 128,
                 norm: str = "layer") -> None:
        super().__init__()
        hidden = hidden_channels or max(in_channels, out_channels)
        if norm not in HEAD_NORMS:
            raise ValueError(f"norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, hidden, kernel_size=1),
            # no running statistics: the heads are training-only, and running means would be rank-local
            # buffers that differ between DDP ranks
            _TokenLayerNorm(hidden) if norm == "layer" else nn.BatchNorm3d(hidden, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PredictionHead(ProjectionHead):
    """BYOL's online predictor q (Grill et al. 2020; SimTROT Sec. 3.2 'pred'): same per-token MLP shape
    as ProjectionHead, (B,C_in,X,Y,Z) -> (B,C_out,X,Y,Z)."""


class BYOLTokenLoss(nn.Module):
    """SimTROT Eq. (2) on normalised tokens: mean over tokens of ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z).

    forward(p_online (B,C,...), z_target (B,C,...)) -> scalar; the target is detached (no gradient into
    the target path). BYOL symmetrises by swapping the views: the caller computes
    0.5 * (loss(pred(online_a), target_b) + loss(pred(online_b), target_a)), or uses `symmetric`.
    """

    def forward(self, p_online: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
        if p_online.shape != z_target.shape:
            raise ValueError(f"shapes differ: {tuple(p_online.shape)} vs {tuple(z_target.shape)}")
        dtype = torch.promote_types(p_online.dtype, torch.float32)
        p = F.normalize(p_online.to(dtype), dim=1)
        z = F.normalize(z_target.detach().to(dtype), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()

    def symmetric(self, p_a: torch.Tensor, z_b: torch.Tensor, p_b: torch.Tensor, z_a: torch.Tensor) -> torch.Tensor:
        """0.5 * (loss(p_a, z_b) + loss(p_b, z_a)): predictions of each view against the other's target."""
        return 0.5 * (self(p_a, z_b) + self(p_b, z_a))


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, decay: float = 0.99) -> None:
    """BYOL target update in place: xi <- decay * xi + (1 - decay) * theta for every parameter
    (Grill et al. 2020, tau = 0.99 base); buffers (e.g. norm statistics) are copied from online."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    t_params, o_params = dict(target.named_parameters()), dict(online.named_parameters())
    if t_params.keys() != o_params.keys():
        raise ValueError("ema_update: target and online modules have different parameters")
    for name, t in t_params.items():
        t.lerp_(o_params[name].to(t.dtype), 1.0 - decay)
    t_bufs, o_bufs = dict(target.named_buffers()), dict(online.named_buffers())
    if t_bufs.keys() != o_bufs.keys():
        raise ValueError("ema_update: target and online modules have different buffers")
    for name, t in t_bufs.items():
        t.copy_(o_bufs[name])


@torch.no_grad()
def collapse_stats(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitor for a token map z (B,C,...); returns 0-dim float tensors.

    - token_std: mean over channels of the std (over all B*N tokens) of L2-normalised tokens. About
      1/sqrt(C) for tokens spread over the sphere, 0 when all tokens coincide (SimSiam's monitor).
    - same_position_sim: mean cosine similarity of tokens at the same position in different volumes;
      1 is SimTROT's collapse mode (Sec. 3.3). NaN when B < 2.
    - other_position_sim: mean cosine similarity of tokens at different positions (any volumes), for
      contrast. NaN when there is a single position.
    """
    t = F.normalize(_tokens(z).to(torch.promote_types(z.dtype, torch.float32)), dim=-1)  # (B,N,C)
    b, n, _ = t.shape
    token_std = t.reshape(b * n, -1).std(dim=0, correction=0).mean()
    # Sums of cosines over pairs from sums of vectors: sum_{i,j} <t_i, t_j> = |sum_i t_i|^2.
    per_pos = t.sum(dim=0)  # (N,C)
    self_sims = (t * t).sum()  # B*N unless some tokens are zero
    same_all = (per_pos * per_pos).sum()
    nan = torch.tensor(float("nan"), device=t.device)
    same = (same_all - self_sims) / (b * (b - 1) * n) if b > 1 else nan
    everything = t.sum(dim=(0, 1))
    other = ((everything * everything).sum() - same_all) / (b * b * n * (n - 1)) if n > 1 else nan
    return {"token_std": token_std, "same_position_sim": same, "other_position_sim": other}
