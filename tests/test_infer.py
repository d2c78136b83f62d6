"""Sliding-window inference against brute-force computations."""

from __future__ import annotations

import itertools

import pytest
import torch

from s3d.infer import gaussian_importance_map, sliding_window_positions, sliding_window_predict


@pytest.mark.parametrize("size,patch,step", [(10, 4, 0.5), (37, 16, 0.5), (16, 16, 0.5), (50, 20, 0.33)])
def test_positions_cover_the_axis_exactly(size, patch, step):
    (pos,) = sliding_window_positions([size], [patch], step)
    assert pos[0] == 0 and pos[-1] == size - patch
    assert all(0 < b - a <= patch * step + 1e-9 for a, b in zip(pos, pos[1:], strict=False))
    covered = set()
    for p in pos:
        covered |= set(range(p, p + patch))
    assert covered == set(range(size))


def test_gaussian_map_is_centred_positive_and_normalised():
    g = gaussian_importance_map((9, 12, 7))
    assert float(g.max()) == pytest.approx(1.0)
    assert float(g.min()) > 0
    assert torch.allclose(g, g.flip(0)) and torch.allclose(g, g.flip(1)) and torch.allclose(g, g.flip(2))


def _identity(x):
    return x[:, :1] * 1.0


@pytest.mark.parametrize("shape", [(1, 23, 30, 17), (1, 9, 40, 12)])
@pytest.mark.parametrize("tta", [None, (0, 1, 2)])
def test_translation_equivariant_net_is_reproduced_exactly(shape, tta):
    img = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = sliding_window_predict(_identity, img, (16, 16, 16), 1, mirror_axes=tta, batch_size=3)
    assert out.shape == (1, *shape[1:])
    assert torch.allclose(out, img, atol=1e-5)


def test_position_dependent_net_matches_brute_force_weighted_average():
    torch.manual_seed(0)
    img = torch.randn(1, 20, 12, 12)
    ramp = torch.linspace(0, 1, 8)[:, None, None].expand(8, 8, 8)

    def net(x):  # depends on the position inside the window, so overlaps and mirrors matter
        return torch.cat([x * ramp, -x], dim=1)

    patch = (8, 8, 8)
    got = sliding_window_predict(net, img, patch, 2, step_size=0.5, mirror_axes=(0,))
    g = gaussian_importance_map(patch)
    acc = torch.zeros(2, 20, 12, 12)
    w = torch.zeros(20, 12, 12)
    for s in itertools.product(*sliding_window_positions((20, 12, 12), patch, 0.5)):
        sl = tuple(slice(a, a + 8) for a in s)
        x = img[(slice(None), *sl)][None]
        pred = (net(x) + net(x.flip(2)).flip(2)) / 2
        acc[(slice(None), *sl)] += pred[0] * g
        w[sl] += g
    assert torch.allclose(got, acc / w, atol=1e-5)


def test_autocast_runs_the_network_in_bf16_and_accumulates_in_fp32():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    seen = []

    def net(x):
        y = conv(x)
        seen.append(y.dtype)
        return y

    img = torch.randn(1, 20, 18, 16)
    full = sliding_window_predict(net, img, (12, 12, 12), 3, autocast=None)
    half = sliding_window_predict(net, img, (12, 12, 12), 3, autocast=torch.bfloat16)
    assert seen[0] == torch.float32 and seen[-1] == torch.bfloat16
    assert half.dtype == torch.float32
    err = (half - full).abs().max().item()
    # bf16 keeps 8 mantissa bits: a visible but small difference, not a silent fp32 run
    assert 0 < err < 0.05 * full.abs().max().item()
