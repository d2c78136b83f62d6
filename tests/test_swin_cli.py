"""Swin UNETR through the product (`--arch swin-unetr-s`): token pre-training, encoder transfer, prediction on
the input's grid, evaluation, export and the model check, on real hippocampus scans."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import hippocampus_subset, run_s3d
from safetensors.torch import load_file

from s3d.nn.networks import build_network, encoder_prefixes, network_config_from_dict, preset
from s3d.nn.swin_unetr import SwinUNETRConfig, token_grid_stride

PATCH = ["--patch-size", "64", "64", "64"]  # the smallest cube with more than one token (stride 32)
N_CASES = 5
N_PREDICT = 2


def _one_line_error(code: int, said: str) -> str:
    line = said.strip().splitlines()[-1] if said.strip() else ""
    assert code == 2, said
    assert "Traceback" not in said and line.startswith("s3d: error: "), said
    return line


@pytest.fixture(scope="module")
def dataset(hippocampus_dir, tmp_path_factory):
    """The first N_CASES real hippocampus cases as an nnU-Net raw dataset."""
    return hippocampus_subset(hippocampus_dir, tmp_path_factory.mktemp("data") / "Dataset004_Small", N_CASES)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def runs(dataset, cache, tmp_path_factory):
    """btrot pre-training on the images, then fine-tuning with its weights (1 + 3 steps of one patch, CPU)."""
    from click.testing import CliRunner

    from s3d.cli import cli

    root = tmp_path_factory.mktemp("runs")
    common = ["--arch", "swin-unetr-s", *PATCH, "--device", "cpu", "-j", "1", "--workers", "0",
              "--cache-dir", str(cache)]
    # hippocampus crops (~36 x 50 x 35 at 1 mm) are smaller than the patch: keep them, padded
    res = CliRunner().invoke(cli, ["pretrain", str(dataset / "imagesTr"), str(root / "pre"), "--method", "btrot",
                                   "--steps", "1", "--batch-size", "1", "--checkpoint-every", "1",
                                   "--min-fov-fraction", "0", *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["finetune", str(dataset), str(root / "ft"), "--weights", str(root / "pre"),
                                   "--steps", "3", "--batch-size", "1", "--val-every", "0", "--checkpoint-every",
                                   "3", *common],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "pre", root / "ft"


def test_btrot_gradients_reach_the_online_encoder_and_never_the_target():
    from s3d.train.pretrain import PretrainConfig, make_objective, network_config

    cfg = PretrainConfig(method="btrot", arch="swin-unetr-s", patch_size=(64, 64, 64), batch_size=1)
    assert cfg.lr == 1e-4  # SimTROT Sec. 4.2
    net_cfg = network_config(cfg)
    torch.manual_seed(0)
    obj, _ = make_objective(cfg, net_cfg)
    assert obj.tokens(obj.encoder, torch.zeros(1, 1, 64, 64, 64)).shape == (1, 16 * net_cfg.feature_size, 2, 2, 2)
    target_before = {k: v.clone() for k, v in obj.target_encoder.state_dict().items()}
    loss, logs = obj({"image": torch.randn(1, 1, 64, 64, 64)})
    loss.backward()
    online = dict(obj.encoder.named_parameters())
    assert all(p.grad is not None for p in online.values())
    assert online["patch_embed.proj.weight"].grad.abs().sum() > 0  # through all four stages to the embedding
    assert all(p.grad is None and not p.requires_grad for p in obj.target_encoder.parameters())
    assert all(p.grad is None for p in obj.target_head.parameters())
    # view A is masked in whole embedding patches (2^3), 3/4 of them (SimTROT Sec. 4.4)
    mask = obj.views(torch.randn(2, 1, 64, 64, 64))["mask"]
    cells = mask[:, 0].unflatten(1, (32, 2)).unflatten(3, (32, 2)).unflatten(5, (32, 2))
    assert torch.equal(cells.amin(dim=(2, 4, 6)), cells.amax(dim=(2, 4, 6)))
    assert float(1 - mask.mean()) == pytest.approx(0.75, abs=1 / 32**3)
    with torch.no_grad():  # an optimiser step on the online encoder: the EMA target follows it, slowly
        for p in online.values():
            p.sub_(p.grad)
    obj.after_step(1)
    target = dict(obj.target_encoder.named_parameters())
    assert not torch.equal(target["patch_embed.proj.weight"], target_before["patch_embed.proj.weight"])
    assert torch.allclose(target["patch_embed.proj.weight"], 0.99 * target_before["patch_embed.proj.weight"]
                          + 0.01 * online["patch_embed.proj.weight"])


def test_simtrot_on_swin_trains_encoder_and_head_through_restored_tokens():
    from s3d.train.pretrain import PretrainConfig, make_objective, network_config

    cfg = PretrainConfig(method="simtrot", arch="swin-unetr-s", patch_size=(64, 64, 64), batch_size=2)
    assert (cfg.temperature, cfg.same_position_weight, cfg.view_mask_ratio) == (0.5, 5.0, 0.75)  # SimTROT
    torch.manual_seed(0)
    obj, _ = make_objective(cfg, network_config(cfg))
    loss, logs = obj({"image": torch.randn(2, 1, 64, 64, 64)})
    loss.backward()
    assert torch.isfinite(loss) and {"token_std", "same_position_sim"} <= set(logs)
    assert all(p.grad is not None for p in obj.encoder.parameters())
    assert all(p.grad is not None for p in obj.head.parameters())


def test_mae_and_off_grid_patches_on_swin_are_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    line = _one_line_error(*run_s3d(["pretrain", str(data), str(tmp_path / "o1"), "--method", "mae", "--arch",
                                  "swin-unetr-s", *PATCH], capsys))
    assert "--method mae --arch swin-unetr-s: not applicable to a hierarchical transformer" in line
    line = _one_line_error(*run_s3d(["pretrain", str(data), str(tmp_path / "o2"), "--method", "simtrot", "--arch",
                                  "swin-unetr-s", "--patch-size", "48", "48", "48"], capsys))
    assert line.startswith("s3d: error: --patch-size 48 48 48: Swin UNETR needs multiples of") and "32" in line
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_network_factory_round_trips_both_kinds():
    swin = preset("swin-unetr-s")
    assert isinstance(swin, SwinUNETRConfig) and token_grid_stride(swin) == (32, 32, 32)
    assert network_config_from_dict(swin.to_dict()) == swin
    resenc = preset("resenc-s")
    assert network_config_from_dict(resenc.to_dict()) == resenc
    assert type(build_network(resenc)).__name__ == "ResEncUNet"
    assert encoder_prefixes(swin) == ("swinViT.",) and encoder_prefixes(resenc) == ("encoder.",)
    from s3d.train.pretrain import PretrainConfig

    assert PretrainConfig(arch="resenc-s").lr == 1e-2 and PretrainConfig(arch="swin-unetr").lr == 1e-4
    assert PretrainConfig(arch="swin-unetr", lr=3e-4).lr == 3e-4


def test_pretrain_finetune_predict_evaluate_export(runs, dataset, tmp_path, capsys):
    from s3d.train.finetune import transfer_encoder

    pre, ft = runs
    pre_sd = load_file(str(pre / "model.safetensors"))
    assert any(k.startswith("swinViT.layers4.") for k in pre_sd) and not any(k.startswith("target_") for k in pre_sd)
    pre_cfg = json.loads((pre / "config.json").read_text())
    assert pre_cfg["network"]["arch"] == "swin-unetr" and pre_cfg["pretrain"]["lr"] == 1e-4

    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["network"]["arch"] == "swin-unetr" and cfg["network"]["deep_supervision"] is True
    report = cfg["transfer"]
    assert report["encoder_tensors_loaded"] == report["encoder_tensors_in_network"] > 0
    assert not report["encoder_tensors_missing"]
    # the transfer copies every swinViT.* tensor and nothing else
    net = build_network(network_config_from_dict(cfg["network"]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    transfer_encoder(net, pre_sd, source=str(pre))
    after = net.state_dict()
    encoder_keys = [k for k in after if k.startswith("swinViT.")]
    assert len(encoder_keys) == report["encoder_tensors_in_network"]
    assert all(torch.equal(after[k], pre_sd[k]) for k in encoder_keys)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("swinViT."))
    # the fine-tuned model has the deep-supervision heads its config promises
    assert any(k.startswith("ds_heads.") for k in load_file(str(ft / "model.safetensors")))

    images = sorted((dataset / "imagesTr").glob("*.nii.gz"))[:N_PREDICT]
    inp, labels = tmp_path / "in", tmp_path / "labels"
    inp.mkdir()
    labels.mkdir()
    for img in images:
        shutil.copy(img, inp)
        shutil.copy(dataset / "labelsTr" / img.name.replace("_0000", ""), labels)
    code, said = run_s3d(["predict", "-i", str(inp), "-o", str(tmp_path / "pred"), "-m", str(ft), "--device", "cpu",
                       "--no-tta"], capsys)
    assert code == 0, said
    for img in images:
        ref, pred = nib.load(img), nib.load(tmp_path / "pred" / img.name.replace("_0000", ""))
        assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    code, said = run_s3d(["evaluate", str(labels), str(tmp_path / "pred"), "-o",
                       str(tmp_path / "summary.json")], capsys)
    assert code == 0, said
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == N_PREDICT and 0 <= summary["foreground_mean"]["Dice"] <= 1

    # export the full model: it reloads and predicts the same; encoder only: swinViT.* alone
    code, said = run_s3d(["weights", "export", str(ft), str(tmp_path / "export")], capsys)
    assert code == 0, said
    code, said = run_s3d(["predict", "-i", str(inp), "-o", str(tmp_path / "pred2"), "-m", str(tmp_path / "export"),
                       "--device", "cpu", "--no-tta"], capsys)
    assert code == 0, said
    for img in images:
        name = img.name.replace("_0000", "")
        a, b = nib.load(tmp_path / "pred" / name), nib.load(tmp_path / "pred2" / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    code, said = run_s3d(["weights", "export", str(pre), str(tmp_path / "enc"), "--encoder-only"], capsys)
    assert code == 0, said
    enc = load_file(str(tmp_path / "enc" / "model.safetensors"))
    assert enc and all(k.startswith("swinViT.") for k in enc) and enc.keys() == {
        k for k in pre_sd if k.startswith("swinViT.")}


@pytest.mark.parametrize(("change", "says"), [
    ({"feature_size": 24}, "model.safetensors: tensors do not match its config.json"),
    ({"window_size": [7, 7, 7]}, "model.safetensors: tensors do not match its config.json"),
    ({"deep_supervision": False}, "model.safetensors: tensors do not match its config.json"),
    ({"num_heads": [5, 2, 4, 8]}, "config.json: network: network config: stage 0 width 12 is not divisible"),
])
def test_a_swin_model_whose_tensors_do_not_fit_its_config_is_refused_with_one_line(runs, dataset, tmp_path, capsys,
                                                                                    change, says):
    _, ft = runs
    model = tmp_path / "model"
    shutil.copytree(ft, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["network"].update(change)
    (model / "config.json").write_text(json.dumps(cfg))
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(sorted((dataset / "imagesTr").glob("*.nii.gz"))[0], inp)
    line = _one_line_error(*run_s3d(["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(model),
                                  "--device", "cpu"], capsys))
    assert str(model) in line and says in line, line


def test_finetune_from_scratch_takes_the_presets_patch_and_refuses_one_off_the_token_grid(dataset, cache, tmp_path,
                                                                                           capsys):
    common = [str(dataset), "--arch", "swin-unetr-s", "--device", "cpu", "-j", "1", "--workers", "0",
              "--cache-dir", str(cache)]
    line = _one_line_error(*run_s3d(["finetune", *common[:1], str(tmp_path / "bad"), *common[1:], "--patch-size", "64",
                                  "64", "40"], capsys))
    assert "--patch-size 64 64 40: Swin UNETR needs multiples of its token grid stride 32 32 32" in line
    code, said = run_s3d(["finetune", *common[:1], str(tmp_path / "run"), *common[1:], "--steps", "1", "--batch-size",
                       "1", "--val-every", "0"], capsys)
    assert code == 0, said
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["network"]["arch"] == "swin-unetr" and cfg["network"]["feature_size"] == 12
    assert cfg["patch_size"] == [64, 64, 64] and cfg["transfer"] is None


def test_a_bare_swin_safetensors_without_config_resolves_to_its_network(tmp_path):
    """`--weights model.safetensors` with no config.json beside it: the Swin topology is read off the tensors
    (not mistaken for a ResEnc), and every encoder tensor transfers unchanged."""
    from safetensors.torch import save_file

    from s3d.hub import resolve_weights
    from s3d.nn.networks import with_task
    from s3d.train.finetune import transfer_encoder

    torch.manual_seed(0)
    cfg = preset("swin-unetr-s")
    src = build_network(cfg)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if k.startswith("swinViT.")}, str(path))
    resolved = resolve_weights(str(path), cache_dir=tmp_path / "cache")
    got = network_config_from_dict(resolved.config["network"])
    assert isinstance(got, SwinUNETRConfig)
    assert (got.feature_size, got.depths, got.num_heads, got.window_size, got.patch_size) == (
        cfg.feature_size, cfg.depths, cfg.num_heads, cfg.window_size, cfg.patch_size)
    assert resolved.config["source"]["encoder_only"] is True
    net = build_network(with_task(got, 1, 3, False))
    report = transfer_encoder(net, resolved.state_dict, source=str(path))
    encoder_keys = [k for k in net.state_dict() if k.startswith("swinViT.")]
    assert report["encoder_tensors_loaded"] == len(encoder_keys) > 0 and not report["encoder_tensors_missing"]
    assert all(torch.equal(net.state_dict()[k], src.state_dict()[k]) for k in encoder_keys)
