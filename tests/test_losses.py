"""Segmentation loss against brute-force computations of nnU-Net's definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s3d.nn.losses import DeepSupervisionLoss, DiceCELoss, SoftDiceLoss, deep_supervision_weights


def _brute_dice(logits, target, smooth=1e-5):
    probs = logits.softmax(1)
    k = logits.shape[1]
    dices = []
    for c in range(1, k):
        p = probs[:, c]
        g = (target[:, 0] == c).float()
        inter = sum(float((p[b] * g[b]).sum()) for b in range(p.shape[0]))
        denom = sum(float(p[b].sum() + g[b].sum()) for b in range(p.shape[0]))
        dices.append((2 * inter + smooth) / (denom + smooth))
    return -sum(dices) / len(dices)


def test_soft_dice_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, 4, generator=g)
    target = torch.randint(0, 3, (2, 1, 6, 5, 4), generator=g)
    assert float(SoftDiceLoss()(logits, target)) == pytest.approx(_brute_dice(logits, target), rel=1e-5)


def test_dice_ce_is_sum_and_perfect_prediction_is_minimal():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    logits = torch.randn(2, 3, 8, 8, 8, generator=g)
    loss = DiceCELoss()(logits, target)
    expected = F.cross_entropy(logits, target[:, 0]) + _brute_dice(logits, target)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    perfect = F.one_hot(target[:, 0], 3).permute(0, 4, 1, 2, 3).float() * 50
    assert float(DiceCELoss()(perfect, target)) == pytest.approx(-1.0, abs=1e-4)


def test_deep_supervision_weights_follow_nnunet():
    w = deep_supervision_weights(4)
    raw = [1, 0.5, 0.25, 0.0]
    assert w == pytest.approx([x / sum(raw) for x in raw])


def test_deep_supervision_downsamples_target_and_weights_outputs():
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 2, (1, 1, 8, 8, 8), generator=g)
    outs = [torch.randn(1, 2, 8, 8, 8, generator=g), torch.randn(1, 2, 4, 4, 4, generator=g),
            torch.randn(1, 2, 2, 2, 2, generator=g)]
    base = DiceCELoss()
    w = deep_supervision_weights(3)
    t1 = target[:, :, ::2, ::2, ::2]  # nearest downsampling by 2 picks every other voxel
    expected = w[0] * base(outs[0], target) + w[1] * base(outs[1], t1)
    assert float(DeepSupervisionLoss(base)(outs, target)) == pytest.approx(float(expected), rel=1e-5)
