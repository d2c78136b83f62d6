"""Sparse (masked) ResEnc encoder: stage masks, masked InstanceNorm, no leaks, dense equivalence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s3d.nn.blocks import BasicBlockD, ConvNormAct, StackedConvBlocks, StackedResidualBlocks
from s3d.nn.resenc import PRESETS, ResEncConfig, ResEncEncoder
from s3d.nn.sparse import MaskedInstanceNorm3d, masked_instance_norm, masked_instance_norm_reference, stage_masks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

TINY = ResEncConfig(1, 1, (4, 8, 12), (1, 2, 2), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
# anisotropic: first pooling in-plane only, 1x3x3 kernels on the coarse axis, 2 input channels
ANISO = ResEncConfig(2, 1, (4, 6, 8), (2, 1, 2), ((1, 1, 1), (1, 2, 2), (2, 2, 2)),
                     ((1, 3, 3), (1, 3, 3), (3, 3, 3)), (1, 1))


def block_mask(batch: int, grid: tuple[int, int, int], block: tuple[int, int, int], seed: int,
               ratio: float = 0.6) -> torch.Tensor:
    """Random coarse visibility grid repeated to blocks; every sample has visible and masked cells."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(batch, 1, *grid, generator=g) > ratio).float()
    coarse.view(batch, -1)[:, 0] = 1.0
    coarse.view(batch, -1)[:, -1] = 0.0
    m = coarse
    for ax in range(3):
        m = m.repeat_interleave(block[ax], dim=2 + ax)
    return m


def make_encoder(cfg: ResEncConfig, seed: int = 0, device: str = "cpu") -> ResEncEncoder:
    """Encoder with random norm weights too (nnU-Net init zeroes every block's last norm)."""
    torch.manual_seed(seed)
    enc = ResEncEncoder(cfg)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".norm." in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
    return enc.to(device).eval()


# ---------------------------------------------------------------------------------------------- stage masks


def test_stage_masks_are_the_coarse_mask_at_each_resolution():
    strides = ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    block = (4, 8, 8)  # a multiple of the total stride (2, 4, 4)
    m = block_mask(3, (2, 3, 2), block, seed=0)
    coarse = m[:, :, :: block[0], :: block[1], :: block[2]]
    out = stage_masks(m, strides)
    assert len(out) == 3
    for cum, ms in zip(((1, 1, 1), (1, 2, 2), (2, 4, 4)), out, strict=True):
        expect = coarse
        for ax in range(3):
            expect = expect.repeat_interleave(block[ax] // cum[ax], dim=2 + ax)
        assert ms.dtype == torch.float32 and torch.equal(ms, expect)
    # bool masks work and give the same result
    assert all(torch.equal(a, b) for a, b in zip(stage_masks(m.bool(), strides), out, strict=True))


def test_stage_masks_reject_partial_blocks():
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    aligned = block_mask(2, (2, 2, 2), (4, 4, 4), seed=1)
    stage_masks(aligned, strides)
    with pytest.raises(ValueError, match="constant"):
        stage_masks(block_mask(2, (4, 4, 4), (2, 2, 2), seed=1), strides)  # 2^3 blocks, total stride 4
    with pytest.raises(ValueError, match="divisible"):
        stage_masks(torch.ones(1, 1, 6, 8, 8), strides)
    with pytest.raises(ValueError, match="expected"):
        stage_masks(torch.ones(1, 8, 8, 8), strides)


# ---------------------------------------------------------------------------------------------- masked IN


def brute_force_masked_in(x, m, w, b, eps=1e-5):
    out = torch.zeros_like(x, dtype=torch.float64)
    for i in range(x.shape[0]):
        vis = m[i, 0] > 0
        for c in range(x.shape[1]):
            v = x[i, c][vis].double()
            if v.numel() == 0:
                continue
            mean, var = v.mean(), v.var(unbiased=False)
            out[i, c][vis] = (v - mean) / torch.sqrt(var + eps) * w[c].double() + b[c].double()
    return out


def test_masked_instance_norm_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, 5, 7, generator=g) * 3 + torch.arange(4.0).view(1, 4, 1, 1, 1) * 10
    m = (torch.rand(3, 1, 6, 5, 7, generator=g) > 0.5).float()
    m[2] = 0.0  # a sample with nothing visible: zeros, not NaN
    norm = MaskedInstanceNorm3d(4, eps=1e-5, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4, generator=g))
        norm.bias.copy_(torch.randn(4, generator=g))
    y = norm(x, m)
    ref = brute_force_masked_in(x, m, norm.weight.detach(), norm.bias.detach())
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.all(y[(m == 0).expand_as(y)] == 0)
    assert torch.isfinite(y).all()


def test_fused_masked_instance_norm_gradients():
    """The hand-written backward against finite differences (gradcheck) and against plain autograd."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(2, 1, 4, 3, 5, generator=g) > 0.4).double()
    m[1, 0, :2] = 0
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_instance_norm(x, m, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: masked_instance_norm(x, m), (x,))
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fused = torch.autograd.grad((masked_instance_norm(x, m, w, b) * gy).sum(), (x, w, b))
    ref = torch.autograd.grad((masked_instance_norm_reference(x, m, w, b) * gy).sum(), (x, w, b))
    for a, r in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)
    assert torch.all(fused[0][(m == 0).expand_as(x)] == 0)


def test_per_channel_mask_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, 6, generator=g)
    m = (torch.rand(2, 3, 5, 4, 6, generator=g) > 0.5).float()
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    y = masked_instance_norm(x, m, w, b)
    for c in range(3):
        ref = brute_force_masked_in(x[:, c:c + 1], m[:, c:c + 1], w[c:c + 1], b[c:c + 1])
        torch.testing.assert_close(y[:, c:c + 1].double(), ref, atol=1e-5, rtol=1e-5)


def test_masked_instance_norm_without_mask_is_instance_norm():
    x = torch.randn(2, 3, 5, 6, 4)
    norm = MaskedInstanceNorm3d(3, affine=True)
    ref = nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    ref.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x), ref(x))
    torch.testing.assert_close(norm(x, torch.ones(2, 1, 5, 6, 4)), ref(x), atol=1e-5, rtol=1e-5)


def test_masked_instance_norm_half_precision_uses_float32_statistics():
    g = torch.Generator().manual_seed(1)
    # a large offset: a bf16 sum over 4000 voxels would be off by hundreds and wreck the variance
    x = (100 + 10 * torch.randn(2, 2, 20, 20, 10, generator=g)).bfloat16()
    m = (torch.rand(2, 1, 20, 20, 10, generator=g) > 0.3).float()
    w, b = torch.tensor([1.5, 0.5]), torch.tensor([0.1, -0.2])
    y = masked_instance_norm(x, m, w, b)
    assert y.dtype == torch.bfloat16
    ref = brute_force_masked_in(x.float(), m, w, b)
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg,shape", [(TINY, (2, 1, 16, 16, 16)), (ANISO, (2, 2, 8, 16, 16))], ids=["iso", "aniso"])
def test_all_visible_mask_equals_dense(cfg, shape, device):
    enc = make_encoder(cfg, device=device)
    x = torch.randn(shape, device=device)
    with torch.no_grad():
        dense = enc(x)
        sparse = enc(x, torch.ones(shape[0], 1, *shape[2:], device=device))
    for d, s in zip(dense, sparse, strict=True):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5)


def test_all_visible_mask_equals_dense_resenc_s():
    # float64: through 9 residual blocks down to a 2x2x2 bottleneck, float32 round-off of two different
    # (equally valid) variance algorithms reaches ~2e-5, which would hide nothing but fail 1e-5
    enc = make_encoder(PRESETS["resenc-s"], seed=1).double()
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        dense, sparse = enc(x), enc(x, torch.ones(1, 1, 32, 32, 32, dtype=torch.float64))
    assert len(dense) == 5
    for d, s in zip(dense, sparse, strict=True):
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, d, atol=1e-10, rtol=1e-10)


def _hook_all(enc: ResEncEncoder, record: list) -> list:
    handles = []
    for name, mod in enc.named_modules():
        if isinstance(mod, (ConvNormAct, StackedConvBlocks, BasicBlockD, StackedResidualBlocks)):
            def hook(module, args, output, name=name):
                record.append((name, args[1] if len(args) > 1 else None, output.detach()))
            handles.append(mod.register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg,shape,block", [
    (TINY, (2, 1, 16, 16, 16), (4, 4, 4)),
    (ANISO, (2, 2, 8, 16, 16), (4, 8, 8)),
], ids=["iso", "aniso"])
def test_masked_positions_are_zero_after_every_conv_block_and_stage(cfg, shape, block, device):
    enc = make_encoder(cfg, device=device)
    grid = tuple(s // b for s, b in zip(shape[2:], block, strict=True))
    m = block_mask(shape[0], grid, block, seed=3).to(device)
    x = torch.randn(shape, device=device)
    record: list = []
    handles = _hook_all(enc, record)
    try:
        with torch.no_grad():
            skips = enc(x, m)
    finally:
        for h in handles:
            h.remove()
    n_modules = sum(isinstance(mod, (ConvNormAct, StackedConvBlocks, BasicBlockD, StackedResidualBlocks))
                    for mod in enc.modules())
    assert len(record) == n_modules  # every conv, block and stage ran and was checked
    for name, mk, out in record:
        assert mk is not None, f"{name} ran without a mask"
        assert mk.shape[2:] == out.shape[2:], name
        assert torch.all(out * (1 - mk) == 0), f"masked voxels not zero after {name}"
        assert (out * mk).abs().sum() > 0, f"visible voxels all zero after {name}"
    for skip, ms in zip(skips, stage_masks(m, cfg.strides), strict=True):
        assert torch.all(skip[(ms == 0).expand_as(skip)] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg,shape,total", [(TINY, (2, 1, 16, 16, 16), (4, 4, 4)),
                                             (ANISO, (2, 2, 8, 16, 16), (2, 4, 4))], ids=["iso", "aniso"])
def test_sparse_encoder_equals_dense_encoder_on_the_visible_box(cfg, shape, total, device):
    """Independent reference: with a single visible box, masked zeros act exactly like zero padding and
    visible-only statistics are the statistics of the crop, so the sparse encoder must equal the plain
    dense encoder run on the cropped box, at every stage. (float64: the bottleneck holds 4-8 voxels, where
    float32 round-off of the two variance algorithms alone reaches 2e-5.)"""
    enc = make_encoder(cfg, device=device).double()
    x = torch.randn(shape, device=device, dtype=torch.float64)
    boxes = [((0, 8), (4, 16), (4, 12)), ((4, 8), (0, 8), (8, 16))]  # multiples of the total stride
    m = torch.zeros(shape[0], 1, *shape[2:], device=device, dtype=torch.float64)
    for i, box in enumerate(boxes):
        m[i, 0, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = 1
    with torch.no_grad():
        sparse = enc(x, m)
        for i, box in enumerate(boxes):
            crop = x[i:i + 1, :, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
            dense = enc(crop)
            cum = (1, 1, 1)
            for s, (sp, de) in enumerate(zip(sparse, dense, strict=True)):
                cum = tuple(a * b for a, b in zip(cum, cfg.strides[s], strict=True))
                sl = [slice(lo // c, hi // c) for (lo, hi), c in zip(box, cum, strict=True)]
                torch.testing.assert_close(sp[i:i + 1, :, sl[0], sl[1], sl[2]], de, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_input_content_does_not_leak(device):
    enc = make_encoder(TINY, device=device)
    m = block_mask(2, (4, 4, 4), (4, 4, 4), seed=5).to(device)
    x = torch.randn(2, 1, 16, 16, 16, device=device)
    noisy = x + 100 * torch.randn_like(x) * (1 - m)
    record_a: list = []
    record_b: list = []
    with torch.no_grad():
        handles = _hook_all(enc, record_a)
        a = enc(x, m)
        for h in handles:
            h.remove()
        handles = _hook_all(enc, record_b)
        b = enc(noisy, m)
        for h in handles:
            h.remove()
    assert all(torch.equal(sa, sb) for sa, sb in zip(a, b, strict=True))
    assert all(torch.equal(ra[2], rb[2]) for ra, rb in zip(record_a, record_b, strict=True))
    # ... while a single visible voxel does change the encoding, down to the bottleneck
    vis = m[0, 0].nonzero()[0]
    poked = x.clone()
    poked[0, 0, vis[0], vis[1], vis[2]] += 5.0
    with torch.no_grad():
        c = enc(poked, m)
    for sa, sc in zip(a, c, strict=True):
        assert not torch.equal(sa[0], sc[0])
        assert torch.equal(sa[1], sc[1])  # the other sample is untouched


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_reaches_visible_input_only(device):
    enc = make_encoder(TINY, device=device).train()
    m = block_mask(2, (4, 4, 4), (4, 4, 4), seed=6).to(device)
    x = torch.randn(2, 1, 16, 16, 16, device=device, requires_grad=True)
    skips = enc(x, m)
    g = torch.Generator().manual_seed(0)
    loss = sum((s * torch.randn(s.shape, generator=g).to(device)).sum() for s in skips)
    loss.backward()
    hidden = (m == 0).expand_as(x)
    assert torch.all(x.grad[hidden] == 0)
    assert (x.grad[~hidden] != 0).float().mean() > 0.9
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_mask_errors():
    enc = make_encoder(TINY)
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="does not fit"):
        enc(x, torch.ones(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="constant"):
        enc(x, block_mask(1, (8, 8, 8), (2, 2, 2), seed=0))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_autocast_bf16_cpu():
    enc = make_encoder(TINY)
    m = block_mask(2, (4, 4, 4), (4, 4, 4), seed=7)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        ref, ref_dense = enc(x, m), enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, out_dense = enc(x, m), enc(x)
    for o, r in zip(out_dense, ref_dense, strict=True):
        assert o.dtype == torch.bfloat16 and _rel_err(o, r) < 0.05
    for o, r, ms in zip(out, ref, stage_masks(m, TINY.strides), strict=True):
        assert o.dtype == torch.bfloat16  # the mask must not promote activations back to float32
        assert torch.all(o[(ms == 0).expand_as(o)] == 0)
        assert _rel_err(o, r) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(dtype):
    enc = make_encoder(PRESETS["resenc-s"], device="cuda").train()
    m = block_mask(2, (2, 2, 2), (16, 16, 16), seed=8).cuda()
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    with torch.no_grad():
        ref = enc(x, m)
    with torch.autocast("cuda", dtype=dtype):
        out = enc(x, m)
        loss = sum(o.float().square().mean() for o in out)
    loss.backward()
    assert math.isfinite(loss.item())
    for o, r, ms in zip(out, ref, stage_masks(m, enc.strides), strict=True):
        assert o.dtype == dtype
        assert torch.all(o[(ms == 0).expand_as(o)] == 0)
        assert _rel_err(o, r) < 0.05


def test_leaky_relu_and_residual_keep_zeros():
    """A block on an input that is zero at masked voxels keeps them zero even with nonzero biases."""
    blk = BasicBlockD(3, 5, 3, 2)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) + 0.5)
    m_out = block_mask(1, (2, 2, 2), (2, 2, 2), seed=9)
    m_in = F.interpolate(m_out, scale_factor=2, mode="nearest")
    x = torch.randn(1, 3, 8, 8, 8) * m_in
    y = blk(x, m_out)
    assert torch.all(y[(m_out == 0).expand_as(y)] == 0)
    # and without the mask the same block fills the masked voxels (the test above is not vacuous)
    assert (blk(x) * (1 - m_out)).abs().sum() > 0


# ---------------------------------------------------------------------------------------------- cheap masked IN


def _norm_case(seed: int, dtype: torch.dtype, shape=(3, 4, 6, 5, 7)):
    """Input with channel offsets, a random mask with one all-hidden and one all-visible sample, and g."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + torch.arange(shape[1]).view(1, -1, 1, 1, 1) * 3).to(dtype)
    m = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.6).to(dtype)
    m[1] = 0
    m[2] = 1
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    gy = torch.randn(shape, generator=g).to(dtype)
    return x, m, w, b, gy


def _out_and_grads(fn, x, m, w, b, gy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, m, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


def test_masked_norm_equals_reference_formula_fp32_and_bf16():
    """Outputs and gradients of the fast path against the straightforward float formula (the reference)."""
    x, m, w, b, gy = _norm_case(5, torch.float32)
    fast = _out_and_grads(masked_instance_norm, x, m, w, b, gy)
    ref = _out_and_grads(masked_instance_norm_reference, x, m, w, b, gy)
    for name, a, r in zip(("y", "dx", "dw", "db"), fast, ref, strict=True):
        torch.testing.assert_close(a, r, atol=2e-5, rtol=2e-5, msg=name)
    assert torch.all(fast[1][1] == 0) and torch.all(fast[0][1] == 0)  # all-hidden sample: zeros, no NaN
    xb, mb, gb = x.bfloat16(), m.bfloat16(), gy.bfloat16()
    fast_b = _out_and_grads(masked_instance_norm, xb, mb, w, b, gb)
    ref_b = _out_and_grads(masked_instance_norm_reference, xb.float(), mb.float(), w, b, gb.float())
    assert fast_b[0].dtype == fast_b[1].dtype == torch.bfloat16 and fast_b[2].dtype == torch.float32
    for name, a, r in zip(("y", "dx", "dw", "db"), fast_b, ref_b, strict=True):
        assert _rel_err(a, r) < 1e-2, name
    assert torch.all(fast_b[1][(mb == 0).expand_as(xb)] == 0)


def test_masked_norm_half_precision_makes_no_full_size_float32_tensor():
    """Under bf16 the elementwise work stays bf16: no op in forward or backward outputs a full-size float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x, m, w, b, gy = _norm_case(6, torch.bfloat16, shape=(3, 3, 8, 8, 8))
    seen: list[tuple[str, torch.dtype, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append((str(func), t.dtype, t.numel()))
            return out

    xr = x.clone().requires_grad_()
    with Record():
        masked_instance_norm(xr, m, w, b).backward(gy)
    big = [s for s in seen if s[2] >= x.numel()]
    assert big, "nothing recorded: the check would be vacuous"
    assert not [s for s in big if s[1] != torch.bfloat16], big
    # and the straightforward reference does make them (the check can fail)
    seen.clear()
    with Record():
        masked_instance_norm_reference(x, m, w, b)
    assert [s for s in seen if s[2] >= x.numel() and s[1] == torch.float32]


def test_encoder_masks_are_computed_once_in_the_activation_dtype(monkeypatch):
    import s3d.nn.sparse as sparse
    from s3d.nn.mae import MAEModel

    calls: list[torch.dtype] = []
    original = sparse.stage_masks

    def counting(mask, strides, check=True, dtype=None):  # noqa: ANN001
        out = original(mask, strides, check, dtype)
        calls.append(out[0].dtype)
        return out

    monkeypatch.setattr(sparse, "stage_masks", counting)
    torch.manual_seed(0)
    model = MAEModel(TINY)
    norm_masks: list[torch.dtype] = []
    for mod in model.encoder.modules():
        if isinstance(mod, MaskedInstanceNorm3d):
            mod.register_forward_hook(lambda mod, args, out: norm_masks.append(args[1].dtype))
    m = block_mask(2, (4, 4, 4), (4, 4, 4), seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 1, 16, 16, 16), m)
    assert calls == [torch.bfloat16]  # once per step, shared by the encoder and the mask tokens
    assert norm_masks and set(norm_masks) == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- block sparsity


def _cell_mask(batch: int, grid: tuple[int, int, int], edge: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Random cells; sample 0 mixed, sample 1 all hidden, sample 2 all visible (when batch allows)."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(batch, 1, *grid, generator=g) > 0.5).double()
    coarse.view(batch, -1)[0, 0], coarse.view(batch, -1)[0, -1] = 1.0, 0.0
    if batch > 1:
        coarse[1] = 0
    if batch > 2:
        coarse[2] = 1
    m = coarse
    for ax in range(3):
        m = m.repeat_interleave(edge[ax], dim=2 + ax)
    return m


def _grid_cells(m: torch.Tensor, edge: tuple[int, int, int]):
    from s3d.nn.cells import CellGrid, StageCells

    return StageCells(CellGrid(m[:, 0, :: edge[0], :: edge[1], :: edge[2]]), edge)


def test_pad_cells_equals_windows_cut_from_the_full_tensor():
    """Brute force: scatter the cells into the zero full tensor, zero-pad it, cut every cell's window."""
    from s3d.nn.cells import from_cells, pad_cells, to_cells

    edge, grid = (4, 3, 2), (2, 3, 2)
    m = _cell_mask(3, grid, edge, seed=7)
    cells = _grid_cells(m, edge)
    x = torch.randn(3, 2, 8, 9, 4, dtype=torch.float64) * m
    y = to_cells(x, cells).requires_grad_(True)
    lo, hi = (1, 2, 0), (2, 1, 2)
    got = pad_cells(y, cells, lo, hi)
    full = torch.nn.functional.pad(from_cells(y, cells), (lo[2], hi[2], lo[1], hi[1], lo[0], hi[0]))
    want = torch.stack([full[b, :, i * edge[0]: i * edge[0] + lo[0] + edge[0] + hi[0],
                             j * edge[1]: j * edge[1] + lo[1] + edge[1] + hi[1],
                             k * edge[2]: k * edge[2] + lo[2] + edge[2] + hi[2]]
                        for b, i, j, k in cells.grid.index.tolist()])
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    (ga,) = torch.autograd.grad((got * g).sum(), y)
    (gb,) = torch.autograd.grad((want * g).sum(), y)
    torch.testing.assert_close(ga, gb, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="halo"):
        pad_cells(y, cells, (5, 0, 0), (0, 0, 0))


def test_to_and_from_cells_keep_visible_voxels_and_zero_the_rest():
    from s3d.nn.cells import from_cells, to_cells

    edge = (2, 4, 2)
    m = _cell_mask(3, (3, 2, 2), edge, seed=8)
    cells = _grid_cells(m, edge)
    x = torch.randn(3, 5, 6, 8, 4, dtype=torch.float64, requires_grad=True)
    y = to_cells(x, cells)
    assert y.shape == (cells.grid.n, 5, *edge) and cells.grid.n == int(m[:, 0, ::2, ::4, ::2].sum())
    back = from_cells(y, cells)
    assert torch.equal(back, x.detach() * m)
    (g,) = torch.autograd.grad(back.sum(), x)
    assert torch.equal(g, m.expand_as(x))
    with pytest.raises(ValueError, match="does not fit"):
        to_cells(x[:, :, :4], cells)


@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)),
                                           ((1, 1, 1), (1, 1, 1))])
def test_cell_conv_equals_dense_conv_on_visible_cells(kernel, stride):
    from s3d.nn.cells import cell_conv, from_cells, to_cells

    torch.manual_seed(0)
    conv = nn.Conv3d(3, 4, kernel, stride, padding=[(k - 1) // 2 for k in kernel]).double()
    edge, grid = (4, 3, 2), (2, 3, 2)  # every cell touches the border on some axis, the middle j-cells not all
    out_shape = tuple(g * e for g, e in zip(grid, edge, strict=True))
    m = _cell_mask(3, grid, edge, seed=1)
    m_in = m
    for ax in range(3):
        m_in = m_in.repeat_interleave(stride[ax], dim=2 + ax)
    x = torch.randn(3, 3, *(n * s for n, s in zip(out_shape, stride, strict=True)), dtype=torch.float64)
    x = (x * m_in).requires_grad_(True)  # the encoder's tensors are zero in hidden cells
    gy = torch.randn(3, 4, *out_shape, dtype=torch.float64) * m  # a loss that reads visible outputs only
    dense = conv(x)
    grads_dense = torch.autograd.grad((dense * gy).sum(), (x, conv.weight, conv.bias))
    cells_out = _grid_cells(m, edge)
    cells_in = cells_out.scaled(stride)
    sparse = from_cells(cell_conv(conv, to_cells(x, cells_in), cells_in, cells_out), cells_out)
    grads_sparse = torch.autograd.grad((sparse * gy).sum(), (x, conv.weight, conv.bias))
    vis = (m > 0).expand_as(dense)
    torch.testing.assert_close(sparse[vis], dense[vis], atol=1e-12, rtol=1e-12)
    assert torch.all(sparse[~vis] == 0)
    # the dense conv also sends gradient into hidden input voxels; the cells do not hold those (they are
    # zeroed inputs, so nothing upstream of them sees that gradient)
    torch.testing.assert_close(grads_sparse[0], grads_dense[0] * m_in, atol=1e-12, rtol=1e-12)
    for a, r in zip(grads_sparse[1:], grads_dense[1:], strict=True):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-12)


def _mae_grads(model, x, m, block_sparse: bool):
    from s3d.nn.mae import MaskedMSELoss

    model.block_sparse = block_sparse
    model.zero_grad(set_to_none=True)
    recon = model(x, m)
    loss = MaskedMSELoss()(recon, x, m)
    loss.backward()
    return recon.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_block_sparse_mae_equals_emulation(monkeypatch):
    """Forward, loss and every gradient (masked norm statistics included) agree with the masked dense path."""
    import s3d.nn.blocks as blocks
    from s3d.nn.mae import MAEModel

    cfg = ResEncConfig(1, 1, (4, 6, 8), (1, 2, 1), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
    torch.manual_seed(0)
    model = MAEModel(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm." in name:  # nnU-Net zero-inits every block's last norm: make them all count
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    edge = (8, 8, 8)  # cells of 8 -> 4 at stage 1 (block-sparse), 2 at stage 2 (dense fallback)
    m = _cell_mask(3, (2, 3, 2), edge, seed=2)
    x = torch.randn(3, 1, 16, 24, 16, dtype=torch.float64)
    calls = []
    original = blocks.cell_conv
    monkeypatch.setattr(blocks, "cell_conv",
                        lambda conv, y, ci, co: calls.append(co.edge) or original(conv, y, ci, co))
    ref = _mae_grads(model, x, m, False)
    assert not calls
    got = _mae_grads(model, x, m, True)
    # stem + stage 0 (1 block, 2 convs) at edge 8, stage 1 (2 blocks, 4 convs and the first block's 1x1
    # projection of the skip) at edge 4; stage 2 falls back
    assert sorted(calls, reverse=True) == [(8, 8, 8)] * 3 + [(4, 4, 4)] * 5
    # float64: the cell path's batch-norm statistics and the masked norm's moments round differently (~1e-12)
    torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(got[1], ref[1], atol=1e-10, rtol=1e-8)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        scale = max(ref[2][name].abs().max().item(), 1e-6)  # conv biases before a norm: ~0 gradients
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-8 * scale, rtol=1e-8, msg=name)


def test_sparse_plan_falls_back_at_coarse_stages_and_reads_the_block_size():
    from s3d.nn.cells import infer_block_size, sparse_plan

    m = _cell_mask(2, (2, 2, 2), (16, 16, 16), seed=3)
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    plan = sparse_plan(m, (16, 16, 16), strides)
    assert [p.edge if p is not None else None for p in plan] == [(16, 16, 16), (8, 8, 8), (4, 4, 4), None]
    assert plan[0].grid is plan[1].grid  # one grid of cells, found once per step
    assert plan[0].grid.index.tolist() == (m[:, 0, ::16, ::16, ::16] > 0).nonzero().tolist()
    assert [p is None for p in sparse_plan(m, (16, 16, 16), strides, min_edge=16)] == [False, True, True, True]
    assert infer_block_size(m, (8, 8, 8)) == (16, 16, 16)
    assert infer_block_size(_cell_mask(1, (4, 2, 1), (8, 16, 32), seed=4), (8, 8, 8))[:2] == (8, 16)


def test_block_sparse_mae_under_bf16_autocast_matches_emulation():
    from s3d.nn.mae import MAEModel

    cfg = ResEncConfig(1, 1, (4, 6, 8), (1, 1, 1), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
    torch.manual_seed(1)
    model = MAEModel(cfg)
    m = _cell_mask(2, (2, 2, 2), (16, 16, 16), seed=5).float()
    x = torch.randn(2, 1, 32, 32, 32)
    out = {}
    for flag in (False, True):
        model.block_sparse = flag
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[flag] = model(x, m)
    assert out[True].dtype == out[False].dtype
    assert _rel_err(out[True], out[False]) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_sparse_mae_equals_emulation_cuda():
    """The cells path on a GPU (index copies on strided views, per-sample batch norms): float32 forward and
    gradients as the emulation's, and a bf16 autocast step that stays close."""
    from s3d.nn.mae import MAEModel

    cfg = ResEncConfig(1, 1, (4, 6, 8), (1, 2, 1), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
    torch.manual_seed(0)
    model = MAEModel(cfg).cuda()
    m = _cell_mask(3, (2, 3, 2), (8, 8, 8), seed=2).float().cuda()
    x = torch.randn(3, 1, 16, 24, 16, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):  # no TF32 rounding
        ref = _mae_grads(model, x, m, False)
        got = _mae_grads(model, x, m, True)
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=1e-4)
    for name in ref[2]:
        scale = max(ref[2][name].abs().max().item(), 1e-6)
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-4 * scale, rtol=1e-3, msg=name)
    out = {}
    for flag in (False, True):
        model.block_sparse = flag
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[flag] = model(x, m)
    assert _rel_err(out[True], out[False]) < 0.02


@pytest.mark.parametrize("visible", [0.0, 1.0])
def test_block_sparse_mae_on_a_batch_with_no_or_only_visible_cells(visible):
    """A whole batch hidden (no cell at all) or visible: the same outputs and the same set of gradients (zeros
    included: SGD's momentum and DDP's reducer treat a missing gradient differently from a zero one)."""
    from s3d.nn.mae import MAEModel

    cfg = ResEncConfig(1, 1, (4, 6, 8), (1, 2, 1), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
    torch.manual_seed(3)
    model = MAEModel(cfg).double()
    model.block_size = (8, 8, 8)
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    m = torch.full((2, 1, 16, 16, 16), visible, dtype=torch.float64)
    ref = _mae_grads(model, x, m, False)
    got = _mae_grads(model, x, m, True)
    torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-8)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        scale = max(ref[2][name].abs().max().item(), 1e-6)
        torch.testing.assert_close(got[2][name], ref[2][name], atol=1e-8 * scale, rtol=1e-8, msg=name)
