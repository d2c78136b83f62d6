"""Swin UNETR: equality with MONAI's SwinUNETR on shared weights, the shifted-window mask against a brute-force
construction, token dependencies of a shifted block, deep supervision, config I/O, and SimTROT's token grid
(masking at the patch-embedding grid, exact rotate-and-restore for all 48 cube symmetries)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from s3d.nn.losses import DeepSupervisionLoss, DiceCELoss
from s3d.nn.resenc import NetworkConfigError
from s3d.nn.swin_unetr import (
    DEFAULT_MASK_RATIO,
    SIMTROT_CODE_MASK_NOISE_STD,
    SWIN_PRESETS,
    PatchEmbed,
    SwinTransformerBlock,
    SwinUNETR,
    SwinUNETRConfig,
    SwinViT,
    check_input_size,
    convert_monai_state_dict,
    encoder_tokens,
    mask_patches,
    patch_grid_mask,
    shifted_window_mask,
    token_grid_stride,
)
from s3d.rotations import NUM_OPS, restore, rotate

# Configs that exercise every window rule on non-cubic inputs. Window (3,5,3) on 32x32x64: stage grids
# (16,16,32), (8,8,16), (4,4,8), (2,2,4) -> padded windows, a window shrunk on one axis (no shift there) and a
# partly shrunk last stage (the relative-position-index quirk). Window 7 on 32x32x64: the paper's window,
# stage grids (16,16,32) ... (2,2,4): padded, partly shrunk (no shift on two axes), fully shrunk.
ODD_WINDOW = SwinUNETRConfig(in_channels=2, num_classes=3, feature_size=12, depths=(2, 2, 2, 2),
                             num_heads=(1, 2, 4, 8), window_size=(3, 5, 3))
WINDOW7 = dataclasses.replace(ODD_WINDOW, window_size=(7, 7, 7))


def _monai(cfg: SwinUNETRConfig):  # noqa: ANN202 - monai.networks.nets.SwinUNETR
    nets = pytest.importorskip("monai.networks.nets", reason="MONAI's SwinUNETR is the reference implementation "
                               "(pip install monai einops, or the dev extra)")
    pytest.importorskip("einops", reason="MONAI's SwinUNETR needs einops at run time")
    assert cfg.patch_size == (2, 2, 2)
    return nets.SwinUNETR(cfg.in_channels, cfg.num_classes, patch_size=2, depths=cfg.depths, num_heads=cfg.num_heads,
                          window_size=cfg.window_size, feature_size=cfg.feature_size, mlp_ratio=cfg.mlp_ratio,
                          qkv_bias=cfg.qkv_bias, normalize=cfg.normalize)


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights far from their init, so that a wrong relative-position index, norm or merge order shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if "relative_position_bias_table" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("cfg", "shape"), [(SWIN_PRESETS["swin-unetr-s"], (64, 64, 64)),
                                            (ODD_WINDOW, (32, 32, 64)), (WINDOW7, (32, 32, 64))],
                         ids=["cpu-preset-64cube", "window353-non-cubic", "window7-non-cubic"])
def test_equals_monai_on_shared_weights(cfg: SwinUNETRConfig, shape: tuple[int, int, int]) -> None:
    ref = _monai(cfg).eval()
    _randomise(ref, seed=1)
    ours = SwinUNETR(cfg).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(2)
    for size in (shape, shape[::-1]):  # a second size on the same modules: cached masks must follow it
        x = torch.randn(1, cfg.in_channels, *size, generator=g)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        assert got.shape == (1, cfg.num_classes, *size)
        assert expected.abs().max() > 0.1
        diff = (got - expected).abs().max().item()
        assert diff < 1e-4, (size, diff)  # float32; measured ~1e-6
    # the transformer in float64, two volumes: equal up to summation order (measured ~5e-15)
    ref.double()
    ours.double()
    x = torch.randn(2, cfg.in_channels, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        hidden_ref, hidden = ref.swinViT(x, True), ours.swinViT(x)
        tokens = encoder_tokens(ours, x)
    assert [h.shape for h in hidden] == [h.shape for h in hidden_ref]
    for h, h_ref in zip(hidden, hidden_ref, strict=True):
        assert (h - h_ref).abs().max().item() < 1e-10
    assert tokens.shape == (2, 16 * cfg.feature_size, *(s // 32 for s in shape))
    assert torch.equal(tokens, hidden[4])


def test_monai_encoder_weights_convert() -> None:
    """A bare MONAI SwinTransformer saved under DDP (the layout of the released SSL weights) loads into swinViT."""
    cfg = SWIN_PRESETS["swin-unetr-s"]
    ref = _monai(cfg)
    sd = {"module." + k: v for k, v in ref.swinViT.state_dict().items()}
    sd["module.rotation_head.weight"] = torch.zeros(4, 192)  # a pre-training head: dropped
    converted = convert_monai_state_dict(sd)
    assert set(converted) == {"swinViT." + k for k in ref.swinViT.state_dict()}
    ours = SwinUNETR(cfg)
    result = ours.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys
    assert all(not k.startswith("swinViT.") for k in result.missing_keys)
    ref_sd = ref.swinViT.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in ours.swinViT.state_dict().items())
    assert convert_monai_state_dict({"_orig_mod.module." + k: v for k, v in ref.state_dict().items()}).keys() == \
        ref.state_dict().keys()


# ------------------------------------------------------------------------------------ shifted windows


def _brute_force_allowed(grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """(windows, n, n) bool: may token i attend to token j of the same shifted window?

    Independent of Swin's three-slice construction: rolled position r holds the token from original position
    (r + shift) mod G. Two tokens of one rolled window may attend iff they are neighbours in the original grid
    too, i.e. their offset is the same before and after undoing the roll (the window does not straddle the
    wrap-around) on every axis.
    """
    counts = [g // w for g, w in zip(grid, window, strict=True)]
    out = []
    for win in itertools.product(*(range(c) for c in counts)):
        cells = list(itertools.product(*(range(w) for w in window)))
        rolled = [[wi * w + c for wi, w, c in zip(win, window, cell, strict=True)] for cell in cells]
        orig = [[(r + s) % g for r, s, g in zip(pos, shift, grid, strict=True)] for pos in rolled]
        n = len(cells)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i, j in itertools.product(range(n), range(n)):
            allowed[i, j] = all(rolled[i][a] - rolled[j][a] == orig[i][a] - orig[j][a] for a in range(3))
        out.append(allowed)
    return torch.stack(out)


@pytest.mark.parametrize(("grid", "window", "shift"), [((8, 6, 15), (4, 3, 5), (2, 1, 2)),
                                                        ((14, 4, 21), (7, 4, 7), (3, 0, 3))])
def test_shift_mask_matches_brute_force(grid, window, shift) -> None:
    mask = shifted_window_mask(grid, window, shift)
    allowed = _brute_force_allowed(grid, window, shift)
    assert mask.shape == allowed.shape
    assert torch.equal(mask == 0, allowed)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # the last window along a shifted axis straddles the wrap, so some pairs really are masked
    assert (~allowed).any()


def _expected_neighbours(p: tuple[int, int, int], grid, window, shift) -> set[tuple[int, int, int]]:
    """Real tokens whose output a change at token p reaches in one (S)W-MSA block, by brute force over the
    padded, rolled grid: same window after the roll, and not separated by the wrap-around."""
    padded = [-(-g // w) * w for g, w in zip(grid, window, strict=True)]
    rp = [(pi - s) % gp for pi, s, gp in zip(p, shift, padded, strict=True)]
    out = set()
    for q in itertools.product(*(range(g) for g in grid)):
        rq = [(qi - s) % gp for qi, s, gp in zip(q, shift, padded, strict=True)]
        same_window = all(a // w == b // w for a, b, w in zip(rp, rq, window, strict=True))
        no_wrap = all(a - b == pi - qi for a, b, pi, qi in zip(rp, rq, p, q, strict=True))
        if same_window and no_wrap:
            out.add(q)
    return out


@pytest.mark.parametrize("shifted", [False, True], ids=["W-MSA", "SW-MSA"])
def test_block_mixes_only_within_shifted_regions(shifted: bool) -> None:
    """Perturb one token of a non-cubic, padded grid (with an axis shorter than the window, hence unshifted)
    and check exactly which outputs move."""
    torch.manual_seed(0)
    grid, window = (6, 3, 9), (4, 4, 4)
    used_window, used_shift = (4, 3, 4), ((2, 0, 2) if shifted else (0, 0, 0))  # axis 1 shrinks to 3, unshifted
    block = SwinTransformerBlock(8, 2, window, (2, 2, 2) if shifted else (0, 0, 0), 2.0, True, 0.0, 0.0, 0.0)
    _randomise(block, seed=4)
    block = block.double().eval()
    padded = [-(-g // w) * w for g, w in zip(grid, used_window, strict=True)]
    mask = shifted_window_mask(padded, used_window, used_shift).double() if shifted else None
    x = torch.randn(1, *grid, 8, dtype=torch.float64)
    with torch.no_grad():
        base = block(x, mask)
        for p in [(0, 0, 0), (5, 2, 8), (1, 1, 1), (2, 0, 7), (3, 2, 6), (4, 1, 0), (0, 2, 4)]:
            x2 = x.clone()
            x2[0, p[0], p[1], p[2]] += torch.randn(8, dtype=torch.float64)  # not constant: norm1 would remove it
            moved = ((block(x2, mask) - base).abs().amax(dim=-1)[0] > 1e-9).nonzero().tolist()
            assert {tuple(m) for m in moved} == _expected_neighbours(p, grid, used_window, used_shift), p


# -------------------------------------------------------------------------------- network, config, I/O


def test_deep_supervision_outputs_and_loss() -> None:
    cfg = dataclasses.replace(SWIN_PRESETS["swin-unetr-s"], num_classes=2, deep_supervision=True)
    net = SwinUNETR(cfg).eval()
    x = torch.randn(1, 1, 32, 32, 64)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert [tuple(o.shape[2:]) for o in outs] == [(32 // f, 32 // f, 64 // f) for f in (1, 2, 4, 8, 16)]
    net.deep_supervision = False  # inference switch: the config (and so the weights' keys) stay
    single = net(x)
    assert torch.is_tensor(single) and torch.allclose(single, outs[0])
    plain = SwinUNETR(dataclasses.replace(cfg, deep_supervision=False))
    assert set(net.state_dict()) - set(plain.state_dict()) == {f"ds_heads.{i}.{p}" for i in range(4)
                                                             for p in ("weight", "bias")}
    net.deep_supervision = True
    net.train()
    target = torch.randint(0, 2, (1, 1, 32, 32, 64))
    loss = DeepSupervisionLoss(DiceCELoss())(net(x), target)  # the loss ResEnc fine-tuning uses
    loss.backward()
    assert torch.isfinite(loss)
    # every parameter gets a gradient but the lowest head's (weight 0 in nnU-Net's deep-supervision weights)
    no_grad = {n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad <= {"ds_heads.3.weight", "ds_heads.3.bias"}, no_grad


def test_config_roundtrip_presets_and_errors() -> None:
    for name, cfg in SWIN_PRESETS.items():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert d["arch"] == "swin-unetr"
        assert SwinUNETRConfig.from_dict(d) == cfg, name
    a = SWIN_PRESETS["swin-unetr"]
    a.feature_size = 1
    assert SWIN_PRESETS["swin-unetr"].feature_size == 48  # presets hand out copies
    paper = SWIN_PRESETS["swin-unetr"]
    assert (paper.feature_size, paper.depths, paper.num_heads, paper.window_size, paper.patch_size) == \
        (48, (2, 2, 2, 2), (3, 6, 12, 24), (7, 7, 7), (2, 2, 2))
    assert token_grid_stride(paper) == (32, 32, 32)
    with torch.device("meta"):  # the paper's network at SimTROT's 128^3: 62.19 M parameters, 4^3 tokens of 768
        net = SwinUNETR(paper)
        assert sum(p.numel() for p in net.parameters()) == 62_186_659
        assert encoder_tokens(net, torch.empty(2, 1, 128, 128, 128)).shape == (2, 768, 4, 4, 4)
    for bad in ({"depths": (2, 2, 2)}, {"num_heads": (5, 6, 12, 24)}, {"window_size": (7, 0, 7)},
                {"patch_size": "2"}, {"drop_path_rate": 1.0}, {"num_classes": 0}):
        with pytest.raises(NetworkConfigError):
            SwinUNETRConfig(**bad)
    check_input_size((32, 64, 32), paper)
    for bad_shape in ((64, 48, 64), (32, 32, 32), (0, 32, 64), (32, 64)):
        with pytest.raises(NetworkConfigError):
            check_input_size(bad_shape, paper)
    with pytest.raises(NetworkConfigError):
        SwinUNETR(SWIN_PRESETS["swin-unetr-s"])(torch.zeros(1, 1, 32, 32, 40))
    anisotropic = dataclasses.replace(SWIN_PRESETS["swin-unetr-s"], patch_size=(1, 2, 2))  # SimTROT on Synapse
    assert token_grid_stride(anisotropic) == (16, 32, 32)
    with torch.no_grad():
        assert SwinUNETR(anisotropic).eval()(torch.zeros(1, 1, 16, 32, 64)).shape == (1, 1, 16, 32, 64)


# --------------------------------------------------------------------------------- SimTROT token grid


def test_patch_grid_mask() -> None:
    g = torch.Generator().manual_seed(0)
    assert DEFAULT_MASK_RATIO == 0.75
    m = patch_grid_mask(3, (16, 8, 24), (2, 2, 2), generator=g)
    assert m.shape == (3, 1, 16, 8, 24)
    cells = F.avg_pool3d(m, 2)
    assert torch.equal(cells, cells.round())  # every embedding patch is wholly visible or wholly masked
    assert (cells.flatten(1) == 0).sum(1).tolist() == [round(0.75 * 8 * 4 * 12)] * 3
    coarse = patch_grid_mask(2, (16, 16, 16), (2, 2, 2), cell_size=(4, 8, 8), generator=g)
    assert torch.equal(F.avg_pool3d(coarse, (4, 8, 8)), F.avg_pool3d(coarse, (4, 8, 8)).round())
    with pytest.raises(NetworkConfigError):
        patch_grid_mask(1, (16, 16, 16), (2, 2, 2), cell_size=(3, 2, 2))
    with pytest.raises(ValueError):
        patch_grid_mask(1, (16, 16, 16), (2, 2, 2), ratio=1.0)


def test_masked_patches_reach_only_their_own_embedding() -> None:
    cfg = SWIN_PRESETS["swin-unetr-s"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 32, 16, generator=g)
    mask = patch_grid_mask(2, x.shape[2:], cfg.patch_size, generator=g)
    xm = mask_patches(x, mask, noise_std=SIMTROT_CODE_MASK_NOISE_STD, generator=g)
    assert torch.equal(xm[mask.bool().expand_as(x)], x[mask.bool().expand_as(x)])
    noise = xm[~mask.bool().expand_as(x)]
    assert 0.08 < noise.std().item() < 0.12 and abs(noise.mean().item()) < 0.01
    assert (noise != x[~mask.bool().expand_as(x)]).float().mean() > 0.99
    assert torch.equal(mask_patches(x, mask), x * mask)
    embed = SwinViT(cfg).patch_embed
    with torch.no_grad():
        e, em = embed(x), embed(mask_patches(x, mask))
    visible = F.max_pool3d(mask, 2).bool().expand_as(e)
    assert torch.equal(em[visible], e[visible])
    assert torch.allclose(em[~visible], embed.proj.bias.view(1, -1, 1, 1, 1).expand_as(e)[~visible])
    with pytest.raises(ValueError):
        mask_patches(x, mask[:, :, :8])


def _sum_pool(x: torch.Tensor, stride: int) -> torch.Tensor:
    return F.avg_pool3d(x, stride) * stride**3


@pytest.mark.parametrize("stride", [2, 32], ids=["patch-grid", "token-grid"])
def test_restore_maps_every_token_to_its_input_patch(stride: int) -> None:
    """restore(pool(rotate(x))) == pool(x) bit for bit, for all 48 cube symmetries: token m of a rotated view,
    restored, is computed from exactly the input cell of token m. Integer-valued inputs keep sums exact."""
    assert token_grid_stride(SWIN_PRESETS["swin-unetr"])[0] == 32
    x = torch.randint(-1000, 1000, (2, 1, 96, 96, 96), generator=torch.Generator().manual_seed(5)).float()
    expected = _sum_pool(x, stride)
    for op in range(NUM_OPS):
        got = restore(_sum_pool(rotate(x, op), stride), op)
        assert torch.equal(got, expected), op


def test_restored_patch_embedding_depends_on_its_own_patch_only() -> None:
    """On the real patch embedding: after rotate -> embed -> restore, the gradient of token m with respect to
    the unrotated input is non-zero exactly on token m's input patch, for every op."""
    torch.manual_seed(6)
    embed = PatchEmbed((2, 2, 2), 1, 4).double()
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    for op in range(NUM_OPS):
        y = restore(embed(rotate(x, op)), op)
        for m in [(0, 0, 0), (1, 3, 2), (3, 0, 3)]:
            (grad,) = torch.autograd.grad(y[0, :, m[0], m[1], m[2]].sum(), x, retain_graph=True)
            support = grad[0, 0] != 0
            cell = torch.zeros_like(support)
            cell[2 * m[0]:2 * m[0] + 2, 2 * m[1]:2 * m[1] + 2, 2 * m[2]:2 * m[2] + 2] = True
            assert torch.equal(support, cell), (op, m)
