"""SimTROT view generation: texture augmentation, Gibbs ringing, cell masks, rotated views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s3d.data.views import TextureAugConfig, gibbs_ringing, make_views, random_patch_mask, texture_augment
from s3d.nn.contrastive import restore_batch

OFF = TextureAugConfig(p_noise=0.0, p_gibbs=0.0, p_scale=0.0, p_shift=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Low-frequency test volume (a few smooth blobs), float32."""
    g = _gen(seed)
    coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape[2:]], indexing="ij")
    out = torch.zeros(shape)
    for _ in range(4):
        c = torch.rand(3, generator=g) - 0.5
        r2 = sum((x - ci) ** 2 for x, ci in zip(coords, c, strict=True))
        out += torch.exp(-r2 / 0.2)
    return out + 0.01 * torch.randn(shape, generator=g)


@pytest.mark.parametrize(("spatial", "patch", "ratio"), [((16, 16, 16), (4, 4, 4), 0.75),
                                                          ((10, 12, 9), (4, 4, 4), 0.75),
                                                          ((8, 8, 8), (2, 4, 8), 0.6)])
def test_mask_ratio_is_exact_per_sample(spatial: tuple, patch: tuple, ratio: float) -> None:
    b = 5
    m = random_patch_mask((b, 1, *spatial), patch, ratio, _gen(0))
    assert m.shape == (b, 1, *spatial) and m.dtype == torch.float32
    assert set(torch.unique(m).tolist()) <= {0.0, 1.0}
    grid = [-(-s // p) for s, p in zip(spatial, patch, strict=True)]
    cells = int(np.prod(grid))
    for i in range(b):
        masked = 0
        for idx in np.ndindex(*grid):
            sl = tuple(slice(k * p, (k + 1) * p) for k, p in zip(idx, patch, strict=True))
            block = m[i, 0][sl]
            assert block.min() == block.max()  # cells are all-or-nothing
            masked += int(block.max() == 0)
        assert masked == round(ratio * cells)
    assert not torch.equal(m[0], m[1])  # independent per sample


def test_mask_keeps_one_cell_and_is_deterministic() -> None:
    m = random_patch_mask((3, 1, 4, 4, 4), (4, 4, 4), 0.75, _gen(1))
    assert torch.equal(m, torch.ones_like(m))  # one cell: round(0.75) = 1 would blank the view
    m = random_patch_mask((3, 1, 8, 8, 8), (4, 4, 4), 0.75, _gen(1))
    assert (m.flatten(1).sum(1) == 2 * 64).all()
    assert torch.equal(m, random_patch_mask((3, 1, 8, 8, 8), (4, 4, 4), 0.75, _gen(1)))
    assert float(random_patch_mask((1, 1, 8, 8, 8), (2, 2, 2), 1.0, _gen(1)).sum()) == 0
    with pytest.raises(ValueError):
        random_patch_mask((1, 8, 8, 8), (2, 2, 2), 0.5)


def test_gibbs_matches_full_fft_reference() -> None:
    x = _smooth((2, 2, 12, 10, 9), 2)
    alpha = torch.tensor([0.5, 0.8])
    got = gibbs_ringing(x, alpha)
    assert got.dtype == torch.float32 and not got.is_complex() and got.shape == x.shape
    for i in range(2):
        spec = np.fft.fftn(x[i].double().numpy(), axes=(1, 2, 3))
        keep = np.ones(spec.shape[1:], bool)
        for axis, n in enumerate(spec.shape[1:]):
            k = np.abs(np.fft.fftfreq(n) * n)
            shape = [1, 1, 1]
            shape[axis] = n
            keep &= (k <= float(alpha[i]) * n / 2).reshape(shape)
        ref = np.fft.ifftn(spec * keep, axes=(1, 2, 3))
        assert np.abs(ref.imag).max() < 1e-9  # the truncation is Hermitian-symmetric, so the result is real
        np.testing.assert_allclose(got[i].numpy(), ref.real, atol=1e-5)


def test_gibbs_identity_at_one_and_ringing_grows_as_alpha_drops() -> None:
    x = _smooth((1, 1, 16, 16, 16), 3)
    torch.testing.assert_close(gibbs_ringing(x, torch.tensor([1.0])), x, atol=1e-5, rtol=0)
    errors = [float((gibbs_ringing(x, torch.tensor([a])) - x).abs().mean()) for a in (0.95, 0.7, 0.4, 0.2)]
    assert errors[0] < 0.05 * float(x.abs().mean())
    assert errors == sorted(errors) and errors[-1] > 5 * errors[0]


@pytest.mark.parametrize("which", ["p_noise", "p_gibbs", "p_scale", "p_shift"])
def test_augmentation_probability_is_respected(which: str) -> None:
    cfg = TextureAugConfig(**{**OFF.to_dict(), which: 0.3, "noise_std": (0.05, 0.1), "gibbs_alpha": (0.3, 0.5)})
    x = torch.randn(2000, 1, 2, 2, 2, generator=_gen(4))
    out = texture_augment(x, cfg, _gen(5))
    changed = (out - x).flatten(1).abs().amax(1) > 1e-6
    assert abs(float(changed.float().mean()) - 0.3) < 0.05  # binomial std 0.01: a 5-sigma bound


def test_augmentation_ranges() -> None:
    x = torch.randn(64, 2, 6, 6, 6, generator=_gen(6)) * 3 + 1
    cfg = TextureAugConfig(**{**OFF.to_dict(), "p_scale": 1.0, "scale": 0.1})
    ratio = (texture_augment(x, cfg, _gen(7)) / x).flatten(1)
    assert torch.allclose(ratio.amin(1), ratio.amax(1), atol=1e-5)  # one factor per sample
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.03
    cfg = TextureAugConfig(**{**OFF.to_dict(), "p_shift": 1.0, "shift": 0.1})
    delta = texture_augment(x, cfg, _gen(8)) - x
    std = x.flatten(2).std(2, correction=0)
    per = delta.flatten(2)
    assert torch.allclose(per.amin(2), per.amax(2), atol=1e-5)  # constant per sample and channel
    assert (per.amax(2).abs() <= 0.1 * std + 1e-5).all()
    cfg = TextureAugConfig(**{**OFF.to_dict(), "p_noise": 1.0, "noise_std": (0.2, 0.2)})
    noise = texture_augment(x, cfg, _gen(9)) - x
    assert abs(float(noise.std()) - 0.2) < 0.01 and abs(float(noise.mean())) < 0.01
    assert torch.equal(texture_augment(x, OFF, _gen(9)), x)


def test_make_views_pipeline_aligns_with_restore() -> None:
    x = torch.randn(3, 2, 8, 8, 8, generator=_gen(10))
    v = make_views(x, OFF, _gen(11), mask_ratio=0.5, mask_patch=(4, 4, 4))
    assert set(v) == {"view_a", "view_b", "ops", "mask"}
    assert v["mask"].shape == (3, 1, 8, 8, 8) and len(v["ops"]) == 3
    assert torch.equal(v["view_a"], x * v["mask"])
    assert torch.equal(restore_batch(v["view_b"], v["ops"]), x)
    assert all(0 <= op < 24 for op in v["ops"])


def test_make_views_with_texture() -> None:
    x = _smooth((4, 1, 16, 16, 16), 12) + 1.0
    v = make_views(x, TextureAugConfig(), _gen(13), allow_flip=True, mask_patch=(4, 4, 4))
    mask = v["mask"].expand_as(x).bool()
    assert (v["view_a"][~mask] == 0).all()
    assert (v["view_a"][mask] != 0).all()
    assert abs(float(mask.float().mean()) - 0.25) < 1e-6
    b = restore_batch(v["view_b"], v["ops"])
    assert not torch.equal(b, x)
    # texture only: the restored view stays close to the input (relative error well below 1)
    assert float((b - x).abs().mean() / x.abs().mean()) < 0.3
    ops = make_views(x.repeat(40, 1, 1, 1, 1)[:, :, :4, :4, :4], OFF, _gen(14), allow_flip=True)["ops"]
    assert max(ops) >= 24


def test_make_views_is_deterministic_under_a_generator() -> None:
    x = torch.randn(2, 1, 8, 8, 8, generator=_gen(15))
    a = make_views(x, TextureAugConfig(), _gen(16), mask_patch=(2, 2, 2))
    b = make_views(x, TextureAugConfig(), _gen(16), mask_patch=(2, 2, 2))
    c = make_views(x, TextureAugConfig(), _gen(17), mask_patch=(2, 2, 2))
    assert a["ops"] == b["ops"]
    for k in ("view_a", "view_b", "mask"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["view_a"], c["view_a"])
    assert make_views(x, mask_patch=(2, 2, 2))["view_a"].shape == x.shape  # global RNG works too


def test_make_views_rejects_non_cubic() -> None:
    with pytest.raises(ValueError, match="cubic"):
        make_views(torch.zeros(2, 1, 8, 8, 4))


def test_config_round_trip() -> None:
    cfg = TextureAugConfig(p_noise=0.2, gibbs_alpha=(0.5, 0.7))
    assert TextureAugConfig.from_dict(cfg.to_dict()) == cfg
