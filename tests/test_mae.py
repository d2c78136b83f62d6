"""S3D masked autoencoder: masked-only L2 loss, sparse encoding, mask tokens, densification, weight transfer."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from torch import nn

from s3d.nn.mae import MaskedMSELoss
from s3d.nn.masking import default_block_size, random_block_mask

# ----------------------------------------------------------------------------------------------- loss


def _brute_force_masked_mse(recon, target, mask) -> float:
    r, t, m = recon.double().numpy(), target.double().numpy(), np.broadcast_to(mask.double().numpy(), recon.shape)
    total, count = 0.0, 0
    for idx in np.ndindex(*r.shape):
        if m[idx] == 0:
            total += (r[idx] - t[idx]) ** 2
            count += 1
    return total / count


def test_loss_equals_brute_force_masked_mean():
    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(2, 1, 4, 5, 6, generator=g), torch.randn(2, 1, 4, 5, 6, generator=g)
    mask = (torch.rand(2, 1, 4, 5, 6, generator=g) > 0.3).float()
    loss = MaskedMSELoss()(recon, target, mask)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(_brute_force_masked_mse(recon, target, mask), rel=1e-6)
    # a plain MSE would differ: visible errors are large here
    assert abs(float(loss) - float(((recon - target) ** 2).mean())) > 1e-3
    # two channels share one mask: the count is per element
    r2, t2 = torch.randn(2, 2, 3, 3, 3, generator=g), torch.randn(2, 2, 3, 3, 3, generator=g)
    m2 = (torch.rand(2, 1, 3, 3, 3, generator=g) > 0.5).float()
    assert float(MaskedMSELoss()(r2, t2, m2)) == pytest.approx(_brute_force_masked_mse(r2, t2, m2), rel=1e-6)


def test_loss_ignores_visible_voxels():
    g = torch.Generator().manual_seed(1)
    recon, target = torch.randn(2, 1, 6, 6, 6, generator=g), torch.randn(2, 1, 6, 6, 6, generator=g)
    mask = random_block_mask(2, (6, 6, 6), (3, 3, 3), 0.5, generator=g)
    crit = MaskedMSELoss()
    base = crit(recon, target, mask)
    noise = 100 * torch.randn(recon.shape, generator=g)
    assert torch.equal(crit(recon + noise * mask, target, mask), base)
    assert not torch.allclose(crit(recon + noise * (1 - mask), target, mask), base)
    # bool mask works the same
    assert torch.equal(crit(recon, target, mask.bool()), base)
    # no gradient reaches visible voxels
    r = recon.clone().requires_grad_(True)
    crit(r, target, mask).backward()
    assert torch.all(r.grad[mask == 1] == 0)
    assert torch.all(r.grad[(mask == 0) & (recon != target)] != 0)


def test_loss_all_visible_is_zero_and_differentiable():
    r = torch.randn(1, 1, 2, 2, 2, requires_grad=True)
    loss = MaskedMSELoss()(r, torch.zeros_like(r), torch.ones_like(r))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(r.grad == 0)


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def resenc():
    return importlib.import_module("s3d.nn.resenc")


def _tiny_cfg(resenc, n_stages: int = 4, deep_supervision: bool = False):
    feats = (4, 8, 12, 16, 16)[:n_stages]
    return resenc.ResEncConfig(
        in_channels=1,
        num_classes=3,
        features=feats,
        blocks=(1,) * n_stages,
        strides=((1, 1, 1),) + ((2, 2, 2),) * (n_stages - 1),
        kernel_sizes=((3, 3, 3),) * n_stages,
        decoder_convs=(1,) * (n_stages - 1),
        deep_supervision=deep_supervision,
    )


def _model(resenc, seed=0, **kw):
    from s3d.nn.mae import MAEModel

    torch.manual_seed(seed)
    return MAEModel(_tiny_cfg(resenc, **kw))


def test_output_shape_and_structure(resenc):
    model = _model(resenc)
    n = 4
    assert isinstance(model.encoder, resenc.ResEncEncoder)
    convs = [m for m in model.densify if isinstance(m, nn.Conv3d)]
    assert len(convs) == n - 1
    assert not isinstance(model.densify[0], nn.Conv3d)  # highest resolution is left as is
    for conv, c in zip(model.densify[1:], model.encoder.output_channels[1:], strict=True):
        assert conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1)
        assert conv.in_channels == conv.out_channels == c
    assert len(model.mask_tokens) == n
    for tok, c in zip(model.mask_tokens, model.encoder.output_channels, strict=True):
        assert tok.shape == (1, c, 1, 1, 1)
        assert 0 < tok.detach().abs().max().item() <= 0.02
    x = torch.randn(2, 1, 16, 16, 16)
    mask = random_block_mask(2, (16, 16, 16), default_block_size((16, 16, 16), model.cfg), 0.75)
    assert model(x, mask).shape == (2, 1, 16, 16, 16)


def test_deep_supervision_config_still_gives_one_map(resenc):
    model = _model(resenc, deep_supervision=True)
    out = model(torch.randn(1, 1, 16, 16, 16), torch.ones(1, 1, 16, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 16, 16, 16)


def test_reconstruction_independent_of_masked_input(resenc):
    model = _model(resenc).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 16, 16, 16, generator=g)
    mask = random_block_mask(2, (16, 16, 16), (8, 8, 8), 0.6, generator=g)
    with torch.no_grad():
        out = model(x, mask)
        perturbed = model(x + 50 * torch.randn(x.shape, generator=g) * (1 - mask), mask)
        assert torch.equal(out, perturbed)
        # ...while visible voxels do matter
        changed = model(x + torch.randn(x.shape, generator=g) * mask, mask)
        assert not torch.allclose(out, changed)


def test_mask_tokens_and_densify_receive_gradient(resenc):
    model = _model(resenc)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = random_block_mask(2, (16, 16, 16), (8, 8, 8), 0.5, generator=torch.Generator().manual_seed(6))
    loss = MaskedMSELoss()(model(x, mask), x, mask)
    loss.backward()
    for i, tok in enumerate(model.mask_tokens):
        assert tok.grad is not None and float(tok.grad.abs().sum()) > 0, f"mask token {i} has no gradient"
    for conv in model.densify[1:]:
        assert float(conv.weight.grad.abs().sum()) > 0
    # mask tokens only act through masked positions: with nothing masked they get no gradient
    model.zero_grad()
    ones = torch.ones_like(mask)
    (model(x, ones) - x).square().mean().backward()
    assert all(tok.grad is None or float(tok.grad.abs().sum()) == 0 for tok in model.mask_tokens)


def test_all_visible_mask_matches_no_mask(resenc):
    model = _model(resenc).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.ones(1, 1, 16, 16, 16)), model(x, None), atol=1e-4, rtol=1e-4)


def test_encoder_keys_transfer_to_segmentation_network(resenc):
    model = _model(resenc)
    cfg = model.cfg
    seg = resenc.ResEncUNet(dataclasses.replace(cfg, deep_supervision=True))
    enc_sd = model.encoder_state_dict()
    assert enc_sd and all(k.startswith("encoder.") for k in enc_sd)
    seg_enc_keys = {k for k in seg.state_dict() if k.startswith("encoder.")}
    assert set(enc_sd) == seg_enc_keys
    assert any(k.startswith("encoder.stem.") for k in enc_sd) and any(k.startswith("encoder.stages.") for k in enc_sd)
    seg.encoder.load_state_dict({k[len("encoder.") :]: v for k, v in enc_sd.items()}, strict=True)
    for k, v in seg.encoder.state_dict().items():
        assert torch.equal(v, enc_sd["encoder." + k])
    # loading the filtered dict into the whole network leaves only decoder weights missing
    res = seg.load_state_dict(enc_sd, strict=False)
    assert not res.unexpected_keys
    assert res.missing_keys and all(k.startswith("decoder.") for k in res.missing_keys)
    # nothing of the pre-training-only parts leaks into the transfer
    assert not any("mask_tokens" in k or "densify" in k for k in enc_sd)


def _hippocampus_batch(hippocampus_dir, n=2, size=32) -> torch.Tensor:
    import nibabel as nib

    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:n]
    out = []
    for f in files:
        a = np.asarray(nib.load(str(f)).dataobj, dtype=np.float32)
        a = (a - a.mean()) / max(float(a.std()), 1e-8)  # S3D: loss in z-score space
        pad = [(max(0, size - s) // 2, max(0, size - s) - max(0, size - s) // 2) for s in a.shape]
        a = np.pad(a, pad)
        starts = [(s - size) // 2 for s in a.shape]
        out.append(a[tuple(slice(st, st + size) for st in starts)])
    return torch.from_numpy(np.stack(out)[:, None].copy())


def test_sgd_lowers_loss_on_real_images(resenc, hippocampus_dir):
    x = _hippocampus_batch(hippocampus_dir)
    assert x.shape == (2, 1, 32, 32, 32)
    model = _model(resenc, seed=0, n_stages=4)
    block = default_block_size((32, 32, 32), model.cfg)
    assert block == (8, 8, 8)
    mask = random_block_mask(2, (32, 32, 32), block, 0.75, generator=torch.Generator().manual_seed(0))
    crit = MaskedMSELoss()
    # S3D trains with lr 1e-2, Nesterov momentum 0.99 for 250k steps; in 30 steps that stays on the
    # "predict the mean" plateau (~0.88), so this overfitting check uses a larger step and momentum 0.9
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=3e-5)
    losses = []
    # one intra-op thread: on a shared 2-core runner two OpenMP threads spin against other jobs and a step
    # takes 2.7 s instead of 0.1 s (measured); results are identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(30):
            loss = crit(model(x, mask), x, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            final = crit(model(x, mask), x, mask).item()
    finally:
        torch.set_num_threads(threads)
    assert np.isfinite(final)
    assert final < 0.8 * losses[0], losses


def test_loss_ignores_padding_outside_the_image():
    from s3d.nn.mae import MaskedMSELoss

    g = torch.Generator().manual_seed(0)
    recon, target = torch.randn(2, 1, 8, 8, 8, generator=g), torch.randn(2, 1, 8, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8, 8)  # everything hidden
    valid = torch.zeros(2, 1, 8, 8, 8)
    valid[:, :, :5] = 1  # the image ends at i = 5, the rest is padding
    loss = MaskedMSELoss()(recon, target, mask, valid)
    brute = ((recon - target)[:, :, :5] ** 2).mean()
    assert float(loss) == pytest.approx(float(brute), rel=1e-6)
    recon2 = recon.clone()
    recon2[:, :, 5:] += 100.0  # errors in the padding do not count
    assert float(MaskedMSELoss()(recon2, target, mask, valid)) == pytest.approx(float(loss), rel=1e-6)
