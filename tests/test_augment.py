"""Augmentation: identities, label/image consistency, rigid rotations, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from s3d.data.augment import Augmenter, affine_warp, gaussian_blur, rotation_matrices

_OFF = dict(p_rotation=0, p_scale=0, mirror_axes=(), p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
            p_gamma=0, p_gamma_inverted=0)


def _blob(shape=(2, 1, 24, 20, 16)):
    g = torch.Generator().manual_seed(0)
    x = gaussian_blur(torch.randn(shape, generator=g), 2.0)
    return x, (x > 0.02).long()


def test_all_probabilities_zero_is_identity():
    x, s = _blob()
    y, t = Augmenter(**_OFF)(x, s)
    assert torch.equal(x, y) and torch.equal(s, t)


def test_identity_matrix_warp_is_identity():
    x, s = _blob()
    y, t = affine_warp(x, s, torch.eye(3).expand(2, 3, 3))
    assert torch.allclose(x, y, atol=1e-5) and torch.equal(s, t)


def test_90_degree_rotation_of_cubic_patch_equals_rot90():
    x = torch.randn(1, 1, 9, 9, 9, generator=torch.Generator().manual_seed(1))
    angles = torch.tensor([[math.pi / 2, 0.0, 0.0]])
    y, _ = affine_warp(x, None, rotation_matrices(angles))
    candidates = [torch.rot90(x, k, dims=(3, 4)) for k in (1, 3)]
    assert any(torch.allclose(y, c, atol=1e-4) for c in candidates)


def test_spatial_augmentation_keeps_labels_aligned_with_image():
    x, s = _blob((4, 1, 24, 24, 24))
    aug = Augmenter(**{**_OFF, "p_rotation": 1.0, "p_scale": 1.0, "mirror_axes": (0, 1, 2)})
    y, t = aug(x, s, torch.Generator().manual_seed(3))
    assert set(t.unique().tolist()) <= {0, 1}
    agree = ((y > 0.02).long() == t).float().mean()
    assert agree > 0.95
    assert not torch.equal(x, y)


def test_pure_mirroring_is_exact_and_consistent():
    x, s = _blob()
    y, t = Augmenter(**{**_OFF, "mirror_axes": (0, 1, 2)})(x, s, torch.Generator().manual_seed(4))
    assert torch.equal((y > 0.02).long(), t)
    assert sorted(y.flatten().tolist()) == pytest.approx(sorted(x.flatten().tolist()))


def test_intensity_augmentation_is_deterministic_and_keeps_shape():
    x, _ = _blob()
    aug = Augmenter(p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_lowres=1, p_gamma=1)
    a, _ = aug(x, None, torch.Generator().manual_seed(7))
    b, _ = aug(x, None, torch.Generator().manual_seed(7))
    assert a.shape == x.shape and torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.allclose(a, x)


def test_anisotropic_patch_rotates_in_plane_only():
    assert Augmenter.for_segmentation((8, 64, 64)).rotation_axes == (0,)
    assert Augmenter.for_segmentation((40, 56, 40)).rotation_axes == (0, 1, 2)
    pre = Augmenter.for_pretraining((64, 64, 64))
    assert pre.p_noise == 0 and pre.p_gamma == 0 and pre.p_rotation > 0
