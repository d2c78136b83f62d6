"""Cube rotations, rotate-and-restore, SimTROT token losses, heads, EMA and the collapse monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3d.nn.contrastive import (
    NUM_OPS,
    NUM_ROTATIONS,
    BYOLTokenLoss,
    PredictionHead,
    ProjectionHead,
    TokenContrastiveLoss,
    collapse_stats,
    ema_update,
    op_matrix,
    random_ops,
    restore,
    restore_batch,
    rotate,
    rotate_batch,
)


def _key(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def test_ops_are_the_cube_group() -> None:
    mats = [op_matrix(op) for op in range(NUM_OPS)]
    assert NUM_ROTATIONS == 24 and NUM_OPS == 48
    assert torch.equal(mats[0], torch.eye(3, dtype=torch.int64))
    dets = [round(float(torch.det(m.double()))) for m in mats]
    assert dets[:24] == [1] * 24 and dets[24:] == [-1] * 24
    assert len({_key(m) for m in mats}) == 48
    for m in mats:  # signed permutation matrices
        assert torch.equal(m.abs().sum(0), torch.ones(3, dtype=torch.int64))
        assert torch.equal(m.abs().sum(1), torch.ones(3, dtype=torch.int64))
    # the 24 proper ones are closed under composition (a group)
    proper = {_key(m) for m in mats[:24]}
    for a in mats[:24]:
        for b in mats[:24:5]:
            assert _key(a @ b) in proper


def test_restore_inverts_rotate_exactly_for_all_48() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, 5, generator=g)
    outs = set()
    for op in range(NUM_OPS):
        y = rotate(x, op)
        assert y.shape == x.shape
        assert torch.equal(restore(y, op), x)
        outs.add(_key(y))
    assert len(outs) == NUM_OPS  # a non-symmetric tensor tells all 48 ops apart


def test_op_matrix_describes_rotate() -> None:
    x = torch.randn(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(1))
    centre = 2
    rng = np.random.default_rng(0)
    for op in range(NUM_OPS):
        m = op_matrix(op).numpy()
        y = rotate(x, op)
        for a in rng.integers(0, 5, size=(6, 3)):
            src = m @ (a - centre) + centre
            assert y[0, 0, a[0], a[1], a[2]] == x[0, 0, src[0], src[1], src[2]]


def test_rotations_equal_rot90_compositions() -> None:
    x = torch.randn(1, 2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    # BFS closure of quarter turns about the three axes: the rotation group of the cube.
    seen = {_key(x): x}
    frontier = [x]
    while frontier:
        nxt = []
        for t in frontier:
            for dims in ((2, 3), (3, 4), (2, 4)):
                r = torch.rot90(t, 1, dims)
                if _key(r) not in seen:
                    seen[_key(r)] = r
                    nxt.append(r)
        frontier = nxt
    assert len(seen) == 24
    ours = {_key(rotate(x, op)) for op in range(NUM_ROTATIONS)}
    assert ours == set(seen)
    mirrored = {_key(rotate(x, op)) for op in range(NUM_ROTATIONS, NUM_OPS)}
    assert not mirrored & set(seen)
    assert {_key(torch.flip(r, [2])) for r in seen.values()} == mirrored
    # a few explicit compositions
    for r in (torch.rot90(x, 1, (2, 3)), torch.rot90(torch.rot90(x, 1, (3, 4)), 2, (2, 4))):
        assert sum(torch.equal(rotate(x, op), r) for op in range(NUM_ROTATIONS)) == 1


def test_non_cubic_raises_when_axes_are_exchanged() -> None:
    x = torch.randn(1, 1, 4, 4, 6)
    swaps = [op for op in range(NUM_OPS) if (op_matrix(op).abs() != torch.eye(3, dtype=torch.int64)).any()]
    keeps = [op for op in range(NUM_OPS) if op not in swaps]
    assert len(keeps) == 8
    with pytest.raises(ValueError, match="cubic"):
        rotate(x, swaps[0])
    with pytest.raises(ValueError, match="cubic"):
        restore(x, swaps[-1])
    for op in keeps:  # flips alone never change the shape
        assert torch.equal(restore(rotate(x, op), op), x)
    # exchanging the two equal axes is fine
    xy_swap = [op for op in swaps if op_matrix(op)[2, 2] != 0]
    assert xy_swap and torch.equal(restore(rotate(x, xy_swap[0]), xy_swap[0]), x)


def test_restore_aligns_downsampled_feature_maps() -> None:
    """Rotate-and-restore on a feature map: with a rotation-equivariant stride-4 encoder stand-in,
    restore(f(rotate(x))) is exactly f(x), and unrestored maps are misaligned."""
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))

    def f(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool3d(F.avg_pool3d(t, 2) ** 2, 2)

    ref = f(x)
    misaligned = 0
    for op in range(NUM_OPS):
        z = f(rotate(x, op))
        torch.testing.assert_close(restore(z, op), ref, rtol=1e-6, atol=1e-6)
        misaligned += not torch.allclose(z, ref)
    assert misaligned >= 40


def test_batched_ops_are_per_sample() -> None:
    x = torch.randn(4, 2, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    ops = [0, 5, 23, 40]
    y = rotate_batch(x, ops)
    for i, op in enumerate(ops):
        assert torch.equal(y[i : i + 1], rotate(x[i : i + 1], op))
    assert torch.equal(restore_batch(y, ops), x)
    with pytest.raises(ValueError):
        rotate_batch(x, ops[:3])
    g = torch.Generator().manual_seed(0)
    drawn = random_ops(200, generator=g)
    assert min(drawn) >= 0 and max(drawn) < 24 and len(set(drawn)) == 24
    drawn = random_ops(400, allow_flip=True, generator=g)
    assert max(drawn) >= 24 and len(set(drawn)) == 48


# ----------------------------------------------------------------------------- contrastive loss


def _reference_loss(za: torch.Tensor, zb: torch.Tensor, tau: float, w: float) -> float:
    """SimTROT Eq. (3) by explicit loops over anchors and candidates, float64."""
    b = za.shape[0]
    views = [za.double().flatten(2).numpy(), zb.double().flatten(2).numpy()]  # (B,C,N)
    n = views[0].shape[2]

    def tok(v: int, i: int, m: int) -> np.ndarray:
        t = views[v][i, :, m]
        return t / np.linalg.norm(t)

    total, count = 0.0, 0
    for v in range(2):
        for i in range(b):
            for m in range(n):
                anchor = tok(v, i, m)
                num = math.exp(float(anchor @ tok(1 - v, i, m)) / tau)
                den = 0.0
                for v2 in range(2):
                    for j in range(b):
                        for m2 in range(n):
                            if (v2, j, m2) == (v, i, m):
                                continue
                            weight = w if (m2 == m and j != i) else 1.0
                            den += weight * math.exp(float(anchor @ tok(v2, j, m2)) / tau)
                total += -math.log(num / den)
                count += 1
    return total / count


@pytest.mark.parametrize("tau", [0.5, 0.1])
@pytest.mark.parametrize("w", [1.0, 5.0])
def test_loss_matches_loop_reference(tau: float, w: float) -> None:
    g = torch.Generator().manual_seed(5)
    za = torch.randn(3, 8, 2, 2, 2, generator=g)
    zb = za + 0.7 * torch.randn(3, 8, 2, 2, 2, generator=g)
    ref = _reference_loss(za, zb, tau, w)
    for dtype in (torch.float32, torch.float64):
        got = TokenContrastiveLoss(tau, w)(za.to(dtype), zb.to(dtype))
        assert got.dim() == 0
        assert abs(float(got) - ref) < 1e-5 * max(1.0, abs(ref)), (dtype, float(got), ref)
    chunked = TokenContrastiveLoss(tau, w, chunk_size=5)(za, zb)
    assert abs(float(chunked) - ref) < 1e-5 * max(1.0, abs(ref))


def test_unit_weight_is_plain_token_nt_xent() -> None:
    g = torch.Generator().manual_seed(6)
    za, zb = torch.randn(2, 16, 3, 2, 2, generator=g), torch.randn(2, 16, 3, 2, 2, generator=g)
    # Independent SimCLR NT-Xent: every token is a sample, cross-entropy over the 2M-1 others.
    a = F.normalize(za.flatten(2).transpose(1, 2).reshape(-1, 16), dim=1)
    b = F.normalize(zb.flatten(2).transpose(1, 2).reshape(-1, 16), dim=1)
    z = torch.cat([a, b])
    m = a.shape[0]
    sim = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(m, 2 * m), torch.arange(m)])
    ref = F.cross_entropy(sim, target)
    torch.testing.assert_close(TokenContrastiveLoss(0.5, 1.0)(za, zb), ref)
    # w = 1 needs no second volume
    one = TokenContrastiveLoss(0.5, 1.0)(za[:1], zb[:1])
    assert torch.isfinite(one)


def test_weighted_loss_needs_two_volumes() -> None:
    z = torch.randn(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match="at least 2 volumes per batch"):
        TokenContrastiveLoss(0.5, 5.0)(z, z)
    with pytest.raises(ValueError):
        TokenContrastiveLoss(0.5, 5.0)(z, z[:, :, :1])


def test_same_position_collapse_is_penalised_more_with_weight() -> None:
    g = torch.Generator().manual_seed(7)
    b, c, n = 4, 64, 8
    # Healthy: all 32 tokens nearly orthogonal, both views identical.
    healthy = torch.linalg.qr(torch.randn(c, b * n, generator=g))[0].T.reshape(b, n, c).transpose(1, 2)
    healthy = healthy.reshape(b, c, 2, 2, 2)
    # Collapse mode (Sec. 3.3): tokens differ across positions, but every volume has the same map.
    collapsed = healthy[:1].expand(b, -1, -1, -1, -1).clone()
    gaps = {}
    for w in (1.0, 5.0):
        loss = TokenContrastiveLoss(0.5, w)
        good, bad = float(loss(healthy, healthy)), float(loss(collapsed, collapsed))
        assert good < bad
        gaps[w] = bad - good
    assert gaps[5.0] > gaps[1.0] + 0.5
    # matching views beat mismatched ones
    shuffled = healthy[[1, 2, 3, 0]]
    assert float(TokenContrastiveLoss()(healthy, healthy)) < float(TokenContrastiveLoss()(healthy, shuffled))


def test_loss_gradients_with_and_without_chunks() -> None:
    g = torch.Generator().manual_seed(8)
    za = torch.randn(2, 3, 1, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(2, 3, 1, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for chunk in (None, 2):
        loss = TokenContrastiveLoss(0.3, 5.0, chunk_size=chunk)
        assert torch.autograd.gradcheck(loss, (za, zb))
    full = torch.autograd.grad(TokenContrastiveLoss(0.5, 5.0)(za, zb), (za, zb))
    chunked = torch.autograd.grad(TokenContrastiveLoss(0.5, 5.0, chunk_size=3)(za, zb), (za, zb))
    for a, b in zip(full, chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_loss_is_stable_at_low_temperature_and_half_precision() -> None:
    z = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(9))
    assert torch.isfinite(TokenContrastiveLoss(0.01, 5.0)(z, z))
    half = TokenContrastiveLoss(0.5, 5.0)(z.bfloat16(), z.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    ref = TokenContrastiveLoss(0.1, 5.0)(z, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = TokenContrastiveLoss(0.1, 5.0)(z, z)
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, ref)


# ----------------------------------------------------------------------------- BYOL, heads, EMA, monitor


def test_byol_token_loss() -> None:
    g = torch.Generator().manual_seed(10)
    p = torch.randn(2, 6, 2, 2, 2, generator=g, requires_grad=True)
    z = torch.randn(2, 6, 2, 2, 2, generator=g, requires_grad=True)
    loss_fn = BYOLTokenLoss()
    # zero for the same direction, whatever the per-token scale
    scale = torch.rand(2, 1, 2, 2, 2, generator=g) + 0.5
    assert float(loss_fn(p.detach() * scale, p.detach())) < 1e-6
    assert abs(float(loss_fn(-p.detach(), p.detach())) - 4.0) < 1e-5
    loss = loss_fn(p, z)
    ref = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert z.grad is None and p.grad is not None and p.grad.abs().sum() > 0
    sym = loss_fn.symmetric(p, z, z, p)
    torch.testing.assert_close(sym, 0.5 * (loss_fn(p, z) + loss_fn(z, p)))


def test_ema_update_math() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3))
    target = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3)).requires_grad_(False)
    online(torch.randn(2, 2, 2, 2, 2))  # move the running statistics away from their init
    before_t = {k: v.clone() for k, v in target.state_dict().items()}
    before_o = {k: v.clone() for k, v in online.state_dict().items()}
    ema_update(target, online, decay=0.9)
    after = target.state_dict()
    for name, _ in online.named_parameters():
        torch.testing.assert_close(after[name], 0.9 * before_t[name] + 0.1 * before_o[name])
    for name, _ in online.named_buffers():
        assert torch.equal(after[name], before_o[name])
    for k, v in online.state_dict().items():
        assert torch.equal(v, before_o[k])
    ema_update(target, online, decay=0.0)
    for k, v in online.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
    with pytest.raises(ValueError):
        ema_update(nn.Conv3d(2, 3, 1), online)


def test_heads_are_per_token() -> None:
    head = ProjectionHead(16, out_channels=8)
    x = torch.randn(2, 16, 3, 3, 3, generator=torch.Generator().manual_seed(11))
    y = head(x)
    assert y.shape == (2, 8, 3, 3, 3)
    # per-token: commutes with rotations and works on one token of one volume
    for op in (3, 17, 30):
        torch.testing.assert_close(head(rotate(x, op)), rotate(y, op))
    torch.testing.assert_close(head(x[:1, :, :1, :1, :1]), y[:1, :, :1, :1, :1])
    pred = PredictionHead(8, out_channels=8)
    assert pred(y).shape == y.shape
    pred(y).sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_batch_norm_head_commutes_with_rotation_and_separates_near_collapsed_tokens() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 3, 3, 3, generator=g)
    for norm in ("layer", "batch"):
        head = ProjectionHead(16, out_channels=8, norm=norm).train()
        y = head(x)
        # batch statistics do not depend on token order: rotate/restore still commutes with the head
        for op in (3, 17, 30):
            torch.testing.assert_close(head(rotate(x, op)), rotate(y, op))
    # Tokens that are one shared vector plus a small per-token part (cosine ~0.99, where a randomly
    # initialised Swin UNETR starts): a per-token LayerNorm keeps them one vector, so BYOL's loss is
    # already ~0; batch norm centres the shared part away and the projections differ.
    shared = torch.randn(1, 16, 1, 1, 1, generator=g)
    near = shared + 0.05 * torch.randn(2, 16, 3, 3, 3, generator=g)
    assert collapse_stats(near)["other_position_sim"] > 0.99
    torch.manual_seed(0)
    layer = collapse_stats(ProjectionHead(16, out_channels=8, norm="layer").train()(near).detach())
    torch.manual_seed(0)
    batch = collapse_stats(ProjectionHead(16, out_channels=8, norm="batch").train()(near).detach())
    assert layer["other_position_sim"] > 0.99 and layer["token_std"] < 0.03
    # (ReLU and the last layer's bias keep some shared direction: ~0.3-0.55 over init seeds)
    assert batch["other_position_sim"] < 0.75 and batch["token_std"] > 0.15
    with pytest.raises(ValueError, match="norm"):
        ProjectionHead(16, norm="group")


def test_collapse_stats() -> None:
    g = torch.Generator().manual_seed(12)
    c = 256
    healthy = torch.randn(4, c, 3, 3, 3, generator=g)
    s = collapse_stats(healthy)
    assert abs(float(s["token_std"]) - 1 / math.sqrt(c)) < 0.1 / math.sqrt(c)
    assert abs(float(s["same_position_sim"])) < 0.05 and abs(float(s["other_position_sim"])) < 0.05

    same_pos = healthy[:1].expand(4, -1, -1, -1, -1) * torch.rand(4, 1, 1, 1, 1, generator=g).add(0.5)
    s = collapse_stats(same_pos)
    assert abs(float(s["same_position_sim"]) - 1.0) < 1e-5
    assert abs(float(s["other_position_sim"])) < 0.05

    full = torch.ones(2, c, 2, 2, 2)
    s = collapse_stats(full)
    assert float(s["token_std"]) < 1e-6 and abs(float(s["other_position_sim"]) - 1) < 1e-5

    # brute force over pairs
    z = torch.randn(3, 5, 2, 1, 2, generator=g)
    t = F.normalize(z.flatten(2), dim=1)
    same, other = [], []
    for i in range(3):
        for j in range(3):
            for m in range(4):
                for n in range(4):
                    cos = float(t[i, :, m] @ t[j, :, n])
                    if m == n and i != j:
                        same.append(cos)
                    elif m != n:
                        other.append(cos)
    s = collapse_stats(z)
    assert abs(float(s["same_position_sim"]) - np.mean(same)) < 1e-5
    assert abs(float(s["other_position_sim"]) - np.mean(other)) < 1e-5
    assert math.isnan(float(collapse_stats(z[:1])["same_position_sim"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(13)
    za, zb = torch.randn(2, 8, 4, 4, 4, generator=g), torch.randn(2, 8, 4, 4, 4, generator=g)
    loss = TokenContrastiveLoss(0.5, 5.0, chunk_size=40)
    cpu = loss(za, zb)
    gpu = loss(za.cuda().requires_grad_(), zb.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
    gpu.backward()
    ops = [1, 30]
    assert torch.equal(restore_batch(rotate_batch(za.cuda(), ops), ops).cpu(), za)
