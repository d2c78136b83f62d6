"""Separable resampling against torch's trilinear interpolation, polynomial reproduction of the cubic
kernel, nnU-Net's anisotropy rule, and label resampling on a real hippocampus label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s3d.data.resample import (
    anisotropic_axis,
    axis_orders,
    axis_taps,
    lowres_axis,
    resample_label,
    resample_to_shape,
    shape_for_spacing,
)


@pytest.mark.parametrize("new_shape", [(13, 4, 5), (3, 17, 11), (20, 9, 2), (7, 9, 5)])
def test_linear_matches_torch_trilinear(new_shape):
    # torch's align_corners=False uses the same (o + 0.5) * in / out - 0.5 source coordinate
    x = torch.randn(2, 7, 9, 5, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x[None], size=new_shape, mode="trilinear", align_corners=False)[0]
    ours = resample_to_shape(x, new_shape, order=1)
    assert isinstance(ours, torch.Tensor) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    ours_np = resample_to_shape(x.numpy(), new_shape, order=1)
    assert isinstance(ours_np, np.ndarray)
    np.testing.assert_allclose(ours_np, ref.numpy(), atol=1e-5)


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def test_cubic_reproduces_quadratic_in_interior():
    # Keys' a = -0.5 kernel is exact for polynomials up to degree 2 where all 4 taps are inside
    shape, new = (12, 10, 9), (29, 23, 5)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")

    def f(a, b, c):
        return 0.3 * a**2 - 0.7 * a * b + 0.2 * b**2 + 1.5 * c - 0.1 * c**2 + 2.0

    out = resample_to_shape(f(i, j, k).astype(np.float32), new, order=3)
    xs = [_source_coords(n, m) for n, m in zip(shape, new, strict=True)]
    ref = f(*np.meshgrid(*xs, indexing="ij"))
    inner = np.ix_(*[(x >= 1) & (x <= n - 2) for x, n in zip(xs, shape, strict=True)])
    assert out[inner].size > 100
    np.testing.assert_allclose(out[inner], ref[inner], rtol=1e-4, atol=1e-3)
    # not trivially true: linear interpolation misses the curvature
    lin = resample_to_shape(f(i, j, k).astype(np.float32), new, order=1)
    assert np.abs(lin[inner] - ref[inner]).max() > 1e-2


def test_cubic_interpolates_samples_and_weights_sum_to_one():
    x = np.random.default_rng(1).normal(size=(5, 4, 3)).astype(np.float32)
    up = resample_to_shape(x, (15, 4, 3), order=3)
    # output o = 3m + 1 lands exactly on input sample m: (3m + 1.5) / 3 - 0.5 = m
    np.testing.assert_allclose(up[1::3], x, atol=1e-6)
    for order in (0, 1, 3):
        _, w = axis_taps(7, 19, order)
        torch.testing.assert_close(w.sum(1), torch.ones(19))


@pytest.mark.parametrize("order", [0, 1, 3])
def test_identity_when_shape_unchanged(order):
    x = np.random.default_rng(2).normal(size=(2, 6, 7, 8)).astype(np.float32)
    np.testing.assert_array_equal(resample_to_shape(x, (6, 7, 8), order=order), x)
    seg = np.random.default_rng(3).integers(0, 3, (6, 7, 8)).astype(np.int16)
    np.testing.assert_array_equal(resample_label(seg, (6, 7, 8)), seg)


def test_input_dtypes_and_3d_input():
    x = np.random.default_rng(4).integers(0, 255, (6, 7, 8)).astype(np.uint8)
    out = resample_to_shape(x, (12, 7, 4), order=1)
    assert out.shape == (12, 7, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, resample_to_shape(x.astype(np.float64), (12, 7, 4), order=1), atol=1e-4)


def test_anisotropy_rule():
    assert lowres_axis((0.5, 0.5, 3.0)) == 2
    assert lowres_axis((0.5, 0.5, 1.4)) is None  # ratio 2.8 <= 3
    assert lowres_axis((3.0, 3.0, 0.5)) is None  # two axes tie for the largest spacing (nnU-Net: no separate z)
    assert anisotropic_axis((1, 1, 1), (1, 1, 4)) == 2  # falls back to the target spacing
    assert anisotropic_axis((4, 1, 1), (1, 1, 1)) == 0
    assert axis_orders(3, 2) == (3, 3, 0) and axis_orders(1, None) == (1, 1, 1)
    assert shape_for_spacing((280, 320, 22), (0.6875, 0.6875, 6.5), (1, 1, 1)) == (192, 220, 143)


def test_nearest_along_anisotropic_axis_keeps_slices_unmixed():
    rng = np.random.default_rng(5)
    vals = rng.normal(size=6).astype(np.float32) * 10
    data = np.broadcast_to(vals, (1, 8, 8, 6)).copy()  # each k-slice constant, thick slices
    new = shape_for_spacing(data.shape[1:], (0.5, 0.5, 3.0), (1.0, 1.0, 1.0))
    out = resample_to_shape(data, new, axis_orders(3, anisotropic_axis((0.5, 0.5, 3.0), (1.0, 1.0, 1.0))))
    assert out.shape == (1, 4, 4, 18)
    for k in range(out.shape[-1]):
        plane = out[0, :, :, k]
        assert np.isclose(plane, plane.flat[0], atol=1e-5).all()
        assert np.isclose(vals, plane.flat[0], atol=1e-5).any(), "output slice is a blend of input slices"
    # the same resampling with cubic on all axes does blend them (so the check above can fail)
    mixed = resample_to_shape(data, new, 3)
    assert not all(np.isclose(vals, mixed[0, 0, 0, k], atol=1e-3).any() for k in range(new[-1]))


def _nnunet_style_label_resample(seg: np.ndarray, new_shape) -> np.ndarray:
    """Reference: nnU-Net resize_segmentation (per label, order 1, >= 0.5) via torch trilinear."""
    out = np.zeros(new_shape, dtype=seg.dtype)
    hits = np.zeros(new_shape, dtype=np.int64)
    for c in np.unique(seg):
        m = F.interpolate(torch.from_numpy((seg == c).astype(np.float32))[None, None], size=new_shape,
                          mode="trilinear", align_corners=False)[0, 0].numpy()
        out[m >= 0.5] = c
        hits += m >= 0.5
    return out, hits


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_label_resampling_on_real_hippocampus(hippocampus_dir):
    from s3d.data.io import read_label

    seg, _ = read_label(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz")
    labels = set(np.unique(seg).tolist())
    assert labels == {0, 1, 2}
    up_shape = tuple(int(round(s * 1.6)) for s in seg.shape)
    up = resample_label(seg, up_shape)
    assert up.dtype == seg.dtype and set(np.unique(up).tolist()) == labels
    ref, hits = _nnunet_style_label_resample(seg, up_shape)
    single = hits == 1
    assert single.mean() > 0.99
    np.testing.assert_array_equal(up[single], ref[single])
    back = resample_label(up, seg.shape)
    for c in (1, 2):
        assert _dice(back == c, seg == c) > 0.95
    # torch input stays a tensor
    t = resample_label(torch.from_numpy(seg), up_shape)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), up)


def test_label_resampling_nearest_axis_and_single_label():
    seg = np.zeros((6, 6, 4), dtype=np.int16)
    seg[:, :, 1] = 3
    out = resample_label(seg, (6, 6, 12), order=(1, 1, 0))
    assert set(np.unique(out).tolist()) == {0, 3}
    assert (out[:, :, 3:6] == 3).all() and (out[:, :, :3] == 0).all()
    np.testing.assert_array_equal(resample_label(np.full((3, 3, 3), 2, np.int16), (5, 5, 5)), np.full((5, 5, 5), 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(2, 9, 10, 11)
    cpu = resample_to_shape(x, (13, 7, 20), (3, 1, 0))
    gpu = resample_to_shape(x.cuda(), (13, 7, 20), (3, 1, 0))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    seg = torch.randint(0, 3, (9, 10, 11))
    torch.testing.assert_close(resample_label(seg.cuda(), (13, 7, 20)).cpu(), resample_label(seg, (13, 7, 20)))
