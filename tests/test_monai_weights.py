"""MONAI's released Swin UNETR weights as `--weights FILE.pt`: a fine-tuned SwinUNETR state dict (plain, or under
"state_dict" with DDP's `module.` prefix) and the self-supervised encoder layout of `model_swinvit.pt`, built here
with MONAI's own SwinUNETR (small feature_size) and checked tensor by tensor against it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import hippocampus_subset, run_s3d

from s3d.errors import S3DError
from s3d.hub import resolve_weights
from s3d.nn.networks import build_network, network_config_from_dict, with_task
from s3d.train.finetune import transfer_encoder

monai_nets = pytest.importorskip("monai.networks.nets")

# swin-unetr-s's topology, so the weights build the CPU-sized network
MONAI_KW = {"in_channels": 1, "out_channels": 3, "feature_size": 12, "num_heads": (1, 2, 4, 8), "window_size": 4}
PATCH = ["--patch-size", "64", "64", "64"]  # multiple of the token stride 32, more than one token


@pytest.fixture(scope="module")
def monai_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return monai_nets.SwinUNETR(**MONAI_KW).state_dict()


def ssl_layout(sd: dict[str, torch.Tensor]) -> dict:
    """The encoder as MONAI's SwinUNETR.load_from reads `model_swinvit.pt`: {"state_dict": {"module.patch_embed.*",
    "module.layersN.0.blocks.i.*" with the MLP as mlp.fc1 / mlp.fc2, ...}} plus pre-training heads it ignores."""
    enc = {}
    for k, v in sd.items():
        if k.startswith("swinViT."):
            k = k[len("swinViT."):].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
            enc["module." + k] = v.clone()
    enc["module.rotation_head.weight"] = torch.zeros(4, 16 * MONAI_KW["feature_size"])
    enc["module.contrastive_head.weight"] = torch.zeros(512, 16 * MONAI_KW["feature_size"])
    return {"state_dict": enc}


def test_the_ssl_layout_is_what_monai_load_from_reads(monai_sd):
    # the layout above is faithful exactly when MONAI itself restores the encoder from it
    net = monai_nets.SwinUNETR(**MONAI_KW)
    net.load_from(weights=ssl_layout(monai_sd))
    got = net.state_dict()
    assert all(torch.equal(got[k], monai_sd[k]) for k in monai_sd if k.startswith("swinViT."))


@pytest.mark.parametrize("layout", ["plain", "ddp-state_dict", "model", "ssl"])
def test_every_layout_resolves_to_the_matching_swin_config_and_transfers_every_encoder_tensor(
        layout, monai_sd, tmp_path):
    obj = {"plain": lambda: monai_sd,
           "ddp-state_dict": lambda: {"epoch": 7, "best_acc": 0.5,
                                      "state_dict": {f"module.{k}": v for k, v in monai_sd.items()}},
           "model": lambda: {"model": monai_sd},
           "ssl": lambda: ssl_layout(monai_sd)}[layout]()
    path = tmp_path / ("model_swinvit.pt" if layout == "ssl" else "model.pt")
    torch.save(obj, path)
    cache = tmp_path / "cache"
    resolved = resolve_weights(str(path), cache_dir=cache)
    net_cfg = network_config_from_dict(resolved.config["network"])
    assert resolved.config["network"] | {"num_classes": 1} == network_config_from_dict(
        {"arch": "swin-unetr", "in_channels": 1, "num_classes": 1, "feature_size": 12, "depths": [2, 2, 2, 2],
         "num_heads": [1, 2, 4, 8], "window_size": [4, 4, 4], "patch_size": [2, 2, 2]}).to_dict()
    assert resolved.config["source"]["format"] == "monai-swin-unetr"
    assert resolved.path is not None and resolved.path.is_relative_to(cache / "s3d-converted")
    net = build_network(with_task(net_cfg, 1, 3, False))
    report = transfer_encoder(net, resolved.state_dict, source=str(path))
    encoder_keys = [k for k in net.state_dict() if k.startswith("swinViT.")]
    assert report["encoder_tensors_loaded"] == len(encoder_keys) > 0 and not report["encoder_tensors_missing"]
    assert all(torch.equal(net.state_dict()[k], monai_sd[k]) for k in encoder_keys)
    # converted once: the second resolution reads the cache
    assert resolve_weights(str(path), cache_dir=cache).path == resolved.path


def test_finetune_with_model_swinvit_pt_on_real_scans(monai_sd, hippocampus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    dataset = hippocampus_subset(hippocampus_dir, tmp_path / "Dataset004_Small", 4)
    weights = tmp_path / "model_swinvit.pt"
    torch.save(ssl_layout(monai_sd), weights)
    code, said = run_s3d(["finetune", "--arch", "swin-unetr", str(dataset), str(tmp_path / "ft"), "--weights",
                          str(weights), *PATCH, "--steps", "3", "--batch-size", "1", "--val-every", "0",
                          "--checkpoint-every", "3", "--device", "cpu", "-j", "1", "--workers", "0",
                          "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, said
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["network"]["arch"] == "swin-unetr" and cfg["network"]["feature_size"] == 12
    report = cfg["transfer"]
    assert report["encoder_tensors_loaded"] == report["encoder_tensors_in_network"] > 0
    assert not report["encoder_tensors_missing"]


@pytest.mark.parametrize("content", [{"state_dict": {"backbone.conv.weight": torch.zeros(2, 1, 3, 3, 3)}},
                                     {"epoch": 3}, [torch.zeros(1)]])
def test_a_pth_that_is_neither_nnssl_nor_monai_fails_with_one_line_naming_the_file(content, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(S3DError) as e:
        resolve_weights(str(path), cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert "\n" not in message and str(path) in message


def test_monai_v2_weights_are_refused_with_one_line(tmp_path):
    torch.manual_seed(0)
    sd = monai_nets.SwinUNETR(**MONAI_KW, use_v2=True).state_dict()
    path = Path(tmp_path / "v2.pt")
    torch.save(sd, path)
    with pytest.raises(S3DError, match=r"use_v2=True") as e:
        resolve_weights(str(path), cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
