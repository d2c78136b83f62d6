"""ResEnc U-Net: equivalence with dynamic-network-architectures, presets, nnU-Net-style planning, config I/O."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from s3d.errors import S3DError
from s3d.nn.blocks import BasicBlockD
from s3d.nn.resenc import (
    PRESETS,
    NetworkConfigError,
    ResEncConfig,
    ResEncEncoder,
    ResEncUNet,
    UNetDecoder,
    adjust_patch_size,
    convert_dna_state_dict,
    plan_network,
    total_stride,
)

dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet",
                               reason="dynamic-network-architectures is the reference implementation")


def build_dna(cfg: ResEncConfig) -> nn.Module:
    """DNA's ResidualEncoderUNet as nnU-Net's ResEnc plans instantiate it."""
    return dna_unet.ResidualEncoderUNet(
        cfg.in_channels, cfg.n_stages, list(cfg.features), nn.Conv3d, [list(k) for k in cfg.kernel_sizes],
        [list(s) for s in cfg.strides], list(cfg.blocks), cfg.num_classes, list(cfg.decoder_convs),
        conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=cfg.deep_supervision,
    )


def randomize_(net: nn.Module, seed: int) -> None:
    """Random values for every parameter, norms included (default init has weight 1 / bias 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".norm." in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 10
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else math.sqrt(2 / fan_in)))


TINY = ResEncConfig(1, 1, (4, 8, 12), (1, 2, 2), ((1, 1, 1), (2, 2, 2), (2, 2, 2)), ((3, 3, 3),) * 3, (1, 1))
ANISO = ResEncConfig(2, 3, (4, 8, 12, 16), (1, 2, 1, 2), ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                     ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)), (1, 2, 1), deep_supervision=True)


def _outputs(y) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


@pytest.mark.parametrize("cfg,shape", [
    (TINY, (2, 1, 16, 16, 16)),
    (ANISO, (2, 2, 8, 16, 24)),
    (dataclasses.replace(ANISO, deep_supervision=False), (1, 2, 8, 16, 16)),
], ids=["tiny", "aniso-2in-3cls-ds", "aniso-no-ds"])
def test_matches_dna_with_converted_weights(cfg, shape):
    torch.manual_seed(0)
    dna = build_dna(cfg)
    randomize_(dna, seed=1)
    raw = dna.state_dict()
    sd = convert_dna_state_dict(raw)
    net = ResEncUNet(cfg)
    assert set(net.state_dict()) == set(sd)
    net.load_state_dict(sd, strict=True)
    # every dropped key really was a duplicate: same storage as a kept key
    kept_ptrs = {v.data_ptr() for v in sd.values()}
    dropped = [k for k in raw if k not in sd]
    assert dropped and all(raw[k].data_ptr() in kept_ptrs for k in dropped)
    assert all(".all_modules." in k or k.startswith("decoder.encoder.") for k in dropped)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = _outputs(dna(x)), _outputs(net(x))
    assert len(ref) == len(out) == (cfg.n_stages - 1 if cfg.deep_supervision else 1)
    for r, o in zip(ref, out, strict=True):
        assert r.shape == o.shape
        assert r.abs().max() > 0.1  # the comparison is not between two near-zero maps
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    assert out[0].shape == (shape[0], cfg.num_classes, *shape[2:])


@pytest.fixture(scope="module")
def resenc_l_pair():
    cfg = PRESETS["resenc-l"]
    torch.manual_seed(0)
    return cfg, build_dna(cfg), ResEncUNet(cfg)


def test_resenc_l_parameter_count_is_the_papers(resenc_l_pair):
    cfg, dna, net = resenc_l_pair
    n = sum(p.numel() for p in net.parameters())
    # S3D paper: ResEnc-L with 102.35M parameters
    assert round(n / 1e6, 2) == 102.35
    # DNA's parameters() deduplicates shared tensors; its state dict counts convs and norms twice
    assert n == sum(p.numel() for p in dna.parameters())
    assert sum(v.numel() for v in dna.state_dict().values()) > 1.9 * n
    assert cfg.features == (32, 64, 128, 256, 320, 320) and cfg.blocks == (1, 3, 4, 6, 6, 6)


def test_resenc_l_matches_dna(resenc_l_pair):
    cfg, dna, net = resenc_l_pair
    randomize_(dna, seed=3)
    net.load_state_dict(convert_dna_state_dict(dna.state_dict()), strict=True)
    # smallest input for 5 poolings by 2: the bottleneck is 1x1x2 (InstanceNorm needs > 1 voxel)
    x = torch.randn(1, 1, 32, 32, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, out = dna(x), net(x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_deep_supervision_weights_load_into_plain_network():
    torch.manual_seed(0)
    ds = ResEncUNet(ANISO)
    plain = ResEncUNet(dataclasses.replace(ANISO, deep_supervision=False))
    plain.load_state_dict(ds.state_dict(), strict=True)
    x = torch.randn(1, 2, 8, 16, 16)
    with torch.no_grad():
        outs = ds(x)
        assert [o.shape[2:] for o in outs] == [(8, 16, 16), (8, 8, 8), (4, 4, 4)]
        torch.testing.assert_close(plain(x), outs[0])


def test_encoder_and_decoder_keys_and_channels():
    enc, dec = ResEncEncoder(ANISO), UNetDecoder(dataclasses.replace(ANISO, deep_supervision=False), num_classes=1)
    assert enc.output_channels == [4, 8, 12, 16]
    assert enc.strides == [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert dec.seg_layers[0].out_channels == 1
    net_keys = set(ResEncUNet(ANISO).state_dict())
    assert {"encoder." + k for k in enc.state_dict()} | {"decoder." + k for k in dec.state_dict()} == net_keys
    # ResNet-D skip: stride 1->2 and width change give AvgPool (index 0) + 1x1 conv/norm (index 1), no conv bias
    assert "encoder.stages.1.blocks.0.skip.1.conv.weight" in net_keys
    assert "encoder.stages.1.blocks.0.skip.1.conv.bias" not in net_keys
    assert "encoder.stem.convs.0.conv.bias" in net_keys
    x = torch.randn(1, 2, 8, 16, 16)
    skips = enc(x)
    assert [tuple(s.shape[1:]) for s in skips] == [(4, 8, 16, 16), (8, 8, 8, 8), (12, 4, 4, 4), (16, 2, 2, 2)]
    assert dec(skips).shape == (1, 1, 8, 16, 16)


def test_nnunet_initialisation():
    torch.manual_seed(0)
    net = ResEncUNet(PRESETS["resenc-s"])
    blocks = [m for m in net.modules() if isinstance(m, BasicBlockD)]
    assert len(blocks) == sum(PRESETS["resenc-s"].blocks)
    for b in blocks:  # init_last_bn_before_add_to_0
        assert torch.all(b.conv2.norm.weight == 0) and torch.all(b.conv2.norm.bias == 0)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    for c in convs:
        if c.bias is not None:
            assert torch.all(c.bias == 0)
    # InitWeights_He(1e-2): kaiming normal, std = sqrt(2 / (1 + 0.01^2) / fan_in)
    w = net.encoder.stages[3].blocks[1].conv1.conv.weight
    expect = math.sqrt(2 / (1 + 1e-4) / w[0].numel())
    assert abs(w.std().item() / expect - 1) < 0.02


def test_convert_strips_wrapper_prefixes():
    net = ResEncUNet(TINY)
    sd = {"module._orig_mod." + k: v for k, v in net.state_dict().items()}
    sd["module.encoder.stem.convs.0.all_modules.0.weight"] = net.state_dict()["encoder.stem.convs.0.conv.weight"]
    out = convert_dna_state_dict(sd)
    assert set(out) == set(net.state_dict())


# ---------------------------------------------------------------------------------------------- config


def test_config_json_round_trip():
    cfg = plan_network((16, 256, 256), (6.5, 0.43, 0.43), preset="resenc-s", in_channels=2, num_classes=4)
    cfg.deep_supervision = True
    back = ResEncConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.strides, tuple) and all(isinstance(s, tuple) for s in back.strides)
    assert isinstance(back.kernel_sizes[0], tuple) and isinstance(back.features, tuple)
    assert ResEncConfig.from_dict({**cfg.to_dict(), "future_field": 1}) == cfg


def test_config_validation():
    with pytest.raises(NetworkConfigError, match="blocks"):
        ResEncConfig(features=(4, 8), blocks=(1, 1, 1), strides=(1, 2), kernel_sizes=3, decoder_convs=1)
    with pytest.raises(ValueError, match="decoder_convs"):
        ResEncConfig(features=(4, 8), blocks=1, strides=(1, 2), kernel_sizes=3, decoder_convs=(1, 1))
    with pytest.raises(ValueError, match="stride"):
        ResEncConfig(features=(4, 8), blocks=1, strides=((1, 1, 1), (2, 0, 2)), kernel_sizes=3, decoder_convs=1)
    short = ResEncConfig(features=(4, 8), blocks=1, strides=(1, 2), kernel_sizes=3, decoder_convs=1)
    assert short.strides == ((1, 1, 1), (2, 2, 2)) and short.kernel_sizes == ((3, 3, 3),) * 2


def test_presets_are_copies():
    a = PRESETS["resenc-m"]
    a.deep_supervision = True
    a.num_classes = 7
    assert PRESETS["resenc-m"].deep_supervision is False and PRESETS["resenc-m"].num_classes == 1
    assert set(PRESETS) == {"resenc-s", "resenc-m", "resenc-l"}


# ---------------------------------------------------------------------------------------------- planning


def test_plan_hippocampus_patch():
    # nnU-Net's 3d_fullres plan for Dataset004_Hippocampus: patch 40x56x40, 4 stages, all 2x2x2, kernels 3
    cfg = plan_network((40, 56, 40), (1.0, 1.0, 1.0), preset="resenc-m", in_channels=1, num_classes=3)
    assert cfg.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3
    assert cfg.kernel_sizes == ((3, 3, 3),) * 4
    assert cfg.features == (32, 64, 128, 256) and cfg.blocks == (1, 3, 4, 6) and cfg.decoder_convs == (1, 1, 1)
    assert cfg.num_classes == 3
    assert adjust_patch_size((40, 56, 40), cfg) == (40, 56, 40)
    assert adjust_patch_size((36, 50, 35), cfg) == (40, 56, 40)


def test_plan_paper_patch_gives_resenc_l():
    cfg = plan_network((160, 160, 160), (1.0, 1.0, 1.0), preset="resenc-l", in_channels=1, num_classes=1)
    assert cfg == PRESETS["resenc-l"]


def test_plan_anisotropic_by_hand():
    # worked through nnU-Net's rules by hand: the 6.5 mm axis is neither pooled nor convolved (kernel 1)
    # until the in-plane spacing has grown to 3.44 mm (ratio 1.89 < 2); then everything is pooled until
    # that axis reaches 4 voxels, and in-plane pooling continues alone to 4 voxels
    cfg = plan_network((16, 256, 256), (6.5, 0.43, 0.43), preset="resenc-s")
    assert cfg.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert cfg.kernel_sizes == ((1, 3, 3),) * 3 + ((3, 3, 3),) * 4
    assert cfg.features == (16, 32, 64, 128, 256, 256, 256)  # doubled, capped at the preset's widest
    assert cfg.blocks == (1, 2, 2, 2, 2, 2, 2) and len(cfg.decoder_convs) == 6
    assert total_stride(cfg) == (4, 64, 64)
    torch.manual_seed(0)
    small = dataclasses.replace(cfg, features=(2,) * 7, blocks=(1,) * 7)
    out = ResEncUNet(small)(torch.randn(1, 1, 8, 128, 128))
    assert out.shape == (1, cfg.num_classes, 8, 128, 128)


def test_plan_max_stages_and_errors():
    cfg = plan_network((128, 128, 128), (1, 1, 1), preset="resenc-m", max_stages=4)
    assert cfg.n_stages == 4 and cfg.features == (32, 64, 128, 256)
    with pytest.raises(S3DError, match="too small"):
        plan_network((6, 6, 6), (1, 1, 1))
    with pytest.raises(S3DError, match="preset"):
        plan_network((64, 64, 64), (1, 1, 1), preset="resenc-xl")
    with pytest.raises(S3DError, match="spacing"):
        plan_network((64, 64, 64), (1, 0, 1))


@pytest.mark.parametrize("seed", range(6))
def test_plan_properties_random(seed):
    rng = np.random.default_rng(seed)
    patch = tuple(int(v) for v in rng.integers(12, 200, size=3))
    spacing = tuple(float(v) for v in rng.choice([0.4, 0.8, 1.0, 1.5, 3.0, 5.0], size=3))
    cfg = plan_network(patch, spacing, preset="resenc-m")
    size, sp = np.array(patch, float), np.array(spacing)
    k3 = np.zeros(3, bool)
    for stride, kernel in zip(cfg.strides[1:], cfg.kernel_sizes[:-1], strict=True):
        pooled = np.array(stride) == 2
        assert pooled.any()
        # an axis is pooled only while it is >= 8 voxels and within a factor 2 of the finest such axis
        assert np.all(size[pooled] >= 8)
        assert np.all(sp[pooled] / sp[size >= 8].min() < 2)
        # kernels become 3 (for good) once an axis' spacing is within a factor 2 of the finest spacing
        k3 |= sp / sp.min() < 2
        assert kernel == tuple(int(v) for v in np.where(k3, 3, 1))
        size[pooled] = np.ceil(size[pooled] / 2)
        sp[pooled] *= 2
    assert np.all(size >= 4)  # nnU-Net's minimum bottleneck edge
    assert cfg.kernel_sizes[-1] == (3, 3, 3)
    patch2 = adjust_patch_size(patch, cfg)
    for p, p2, t in zip(patch, patch2, total_stride(cfg), strict=True):
        assert p2 >= p and p2 % t == 0 and p2 - p < t


def test_plan_on_real_hippocampus_median_shape(hippocampus_dir):
    nib = pytest.importorskip("nibabel")
    shapes, spacings = [], []
    for f in sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz")):
        img = nib.load(str(f))
        shapes.append(img.shape[:3])
        spacings.append(img.header.get_zooms()[:3])
    assert len(shapes) > 100
    median = tuple(int(v) for v in np.median(np.array(shapes), axis=0))
    spacing = tuple(float(v) for v in np.median(np.array(spacings), axis=0))
    cfg = plan_network(median, spacing, preset="resenc-s", num_classes=3)
    patch = adjust_patch_size(median, cfg)
    assert cfg.n_stages == 4 and patch == (40, 56, 40)
    with torch.no_grad():
        out = ResEncUNet(dataclasses.replace(cfg, features=(4, 8, 8, 8), blocks=(1, 1, 1, 1)))(
            torch.randn(1, 1, *patch))
    assert out.shape == (1, 3, *patch)
