"""Block masks for S3D pre-training: exact ratios, block alignment with every encoder stage, CLI parsing."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from s3d.errors import S3DError
from s3d.nn.masking import (
    MaskConfigError,
    cumulative_strides,
    default_block_size,
    parse_mask_ratio,
    random_block_mask,
    validate_block_size,
)

ISO6 = [(1, 1, 1)] + [(2, 2, 2)] * 5  # nnU-Net ResEnc 3d_fullres on a 160^3 patch: 160 -> 5


def _coarse(mask: torch.Tensor, block) -> torch.Tensor:
    return mask[:, :, :: block[0], :: block[1], :: block[2]]


def _constant_in_blocks(mask: torch.Tensor, block) -> bool:
    # max-pool == min-pool over each block <=> every block is all-visible or all-masked
    hi = F.max_pool3d(mask, kernel_size=block, stride=block)
    lo = -F.max_pool3d(-mask, kernel_size=block, stride=block)
    return bool(torch.equal(hi, lo))


def test_default_block_size_is_total_stride_s3d_numbers():
    # S3D section 4: 5^3 bottleneck grid on a 160^3 patch -> 32^3 blocks
    assert default_block_size((160, 160, 160), ISO6) == (32, 32, 32)
    aniso = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert cumulative_strides(aniso)[-1] == (4, 16, 16)
    assert default_block_size((40, 96, 64), aniso) == (4, 16, 16)


def test_default_block_size_accepts_config_object():
    class Cfg:
        strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2))

    assert default_block_size((16, 24, 8), Cfg()) == (4, 4, 4)


def test_patch_not_divisible_by_total_stride_raises():
    with pytest.raises(ValueError, match="does not divide patch size"):
        default_block_size((100, 160, 160), ISO6)


def test_misaligned_block_size_raises():
    # the reference code's 16^3 grid on 160^3: the 5^3 bottleneck (stride 32) stays unmasked
    with pytest.raises(ValueError, match="stage 5"):
        validate_block_size((160, 160, 160), (16, 16, 16), ISO6)
    with pytest.raises(ValueError, match="does not divide"):
        validate_block_size((160, 160, 160), (64, 64, 64), ISO6)
    # a multiple of the total stride that tiles the patch is fine
    assert validate_block_size((128, 128, 128), (64, 64, 64), ISO6) == (64, 64, 64)


def test_fixed_ratio_exact_per_sample():
    patch, block = (40, 40, 40), (8, 8, 8)  # 125 cells, 0.75 * 125 = 93.75 -> 94 masked
    g = torch.Generator().manual_seed(0)
    m = random_block_mask(6, patch, block, 0.75, generator=g)
    assert m.shape == (6, 1, *patch) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert _constant_in_blocks(m, block)
    coarse = _coarse(m, block)
    masked_cells = (coarse == 0).flatten(1).sum(1)
    assert masked_cells.tolist() == [94] * 6
    frac = (m == 0).flatten(1).float().mean(1)
    torch.testing.assert_close(frac, torch.full((6,), 94 / 125))
    # samples differ (random permutation per sample), same seed reproduces
    assert not torch.equal(m[0], m[1])
    m2 = random_block_mask(6, patch, block, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)


def test_dynamic_ratio_in_range_and_varies():
    n = 125
    g = torch.Generator().manual_seed(1)
    m = random_block_mask(200, (20, 20, 20), (4, 4, 4), (0.6, 0.9), generator=g)
    masked = (_coarse(m, (4, 4, 4)) == 0).flatten(1).sum(1)
    lo, hi = math.floor(0.6 * n + 0.5), math.floor(0.9 * n + 0.5)
    assert int(masked.min()) >= lo and int(masked.max()) <= hi
    assert len(masked.unique()) > 10
    # uniform in [0.6, 0.9]: mean 0.75, std 0.3/sqrt(12) ~ 0.087
    r = masked.float() / n
    assert abs(float(r.mean()) - 0.75) < 0.03
    assert 0.06 < float(r.std()) < 0.11


def test_cells_chosen_uniformly():
    # every cell is equally likely to be masked (catches a biased permutation)
    g = torch.Generator().manual_seed(2)
    m = random_block_mask(4000, (4, 4, 4), (2, 2, 2), 0.5, generator=g)
    freq = (_coarse(m, (2, 2, 2)) == 0).float().mean(0).flatten()
    assert freq.shape == (8,)
    assert torch.all((freq - 0.5).abs() < 0.04), freq


def test_at_least_one_visible_and_one_masked_cell():
    low = random_block_mask(50, (4, 4, 4), (2, 2, 2), 0.01)
    high = random_block_mask(50, (4, 4, 4), (2, 2, 2), 0.99)
    assert ((_coarse(low, (2, 2, 2)) == 0).flatten(1).sum(1) == 1).all()
    assert ((_coarse(high, (2, 2, 2)) == 1).flatten(1).sum(1) == 1).all()
    with pytest.raises(ValueError, match="cells"):
        random_block_mask(1, (8, 8, 8), (8, 8, 8), 0.5)


def test_anisotropic_blocks():
    m = random_block_mask(3, (8, 32, 32), (2, 8, 8), 0.5, generator=torch.Generator().manual_seed(3))
    assert _constant_in_blocks(m, (2, 8, 8))
    assert ((_coarse(m, (2, 8, 8)) == 0).flatten(1).sum(1) == 32).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    m = random_block_mask(2, (16, 16, 16), (4, 4, 4), (0.6, 0.9), generator=g)
    assert m.device.type == "cuda"
    m = random_block_mask(2, (16, 16, 16), (4, 4, 4), 0.75, device="cuda")
    assert m.device.type == "cuda" and int((_coarse(m, (4, 4, 4)) == 0).sum()) == 2 * 48


def test_parse_mask_ratio():
    assert parse_mask_ratio("0.75") == 0.75
    assert parse_mask_ratio(" .5 ") == 0.5
    assert parse_mask_ratio("0.6-0.9") == (0.6, 0.9)
    assert parse_mask_ratio("0.6:0.9") == (0.6, 0.9)
    for bad in ["1.5", "0", "1", "0.9-0.6", "abc", "0.6-", "60-90", "-0.5", ""]:
        with pytest.raises(S3DError) as e:
            parse_mask_ratio(bad)
        assert isinstance(e.value, ValueError) and isinstance(e.value, MaskConfigError)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        random_block_mask(1, (8, 8, 8), (4, 4, 4), (0.9, 0.6))


@pytest.mark.parametrize("preset", ["resenc-s", "resenc-m", "resenc-l"])
def test_mask_aligned_with_every_stage_of_presets(preset):
    resenc = importlib.import_module("s3d.nn.resenc")
    sparse = importlib.import_module("s3d.nn.sparse")
    cfg = resenc.PRESETS[preset]
    total = cumulative_strides(cfg)[-1]
    patch = tuple(2 * t for t in total)  # a 2x2x2 bottleneck grid keeps the test small
    block = default_block_size(patch, cfg)
    assert block == total
    m = random_block_mask(2, patch, block, 0.5, generator=torch.Generator().manual_seed(4))
    coarse = _coarse(m, block)
    per_stage = sparse.stage_masks(m, cfg.strides)
    assert len(per_stage) == len(cfg.strides)
    for cum, ms in zip(cumulative_strides(cfg), per_stage, strict=True):
        # each stage sees exactly the coarse mask, blown up to its own resolution: masked cells stay masked
        assert tuple(ms.shape[2:]) == tuple(p // c for p, c in zip(patch, cum, strict=True))
        expect = coarse
        for ax in range(3):
            expect = expect.repeat_interleave(block[ax] // cum[ax], dim=2 + ax)
        assert torch.equal(ms.float(), expect)
    # the bottleneck is genuinely masked: some cells hidden, some visible in every sample
    bott = per_stage[-1].flatten(1)
    assert ((bott == 0).any(1) & (bott == 1).any(1)).all()
