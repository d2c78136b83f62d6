"""`s3d pretrain` on real images for each method, and `s3d finetune --weights` on its output."""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from s3d.cli import cli

COMMON = ["--arch", "resenc-s", "--patch-size", "32", "32", "32", "--device", "cpu", "-j", "1"]


@pytest.fixture(scope="module")
def images(hippocampus_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlabeled")
    for p in sorted((hippocampus_dir / "imagesTr").glob("*_0000.nii.gz"))[:4]:
        shutil.copy(p, folder / p.name.replace("_0000", ""))
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def mae_run(images, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mae"
    res = _run(["pretrain", str(images), str(out), "--method", "mae", "--steps", "4", "--checkpoint-every", "2",
                "--mask-ratio", "0.6-0.9", "--cache-dir", str(cache), *COMMON])
    assert res.exit_code == 0, res.output
    return out


def test_mae_run_has_encoder_weights_config_log_and_preview(mae_run):
    cfg = json.loads((mae_run / "config.json").read_text())
    assert cfg["kind"] == "pretrain" and cfg["method"] == "mae" and cfg["step"] == 4
    # default block = patch / bottleneck = the network's total stride (S3D: 32 for 160^3 into 5^3)
    total = [1, 1, 1]
    for stride in cfg["network"]["strides"]:
        total = [t * s for t, s in zip(total, stride, strict=True)]
    assert cfg["mask_ratio"] == "0.6-0.9" and cfg["mask_block"] == total and total[0] > 1
    sd = load_file(str(mae_run / "model.safetensors"))
    assert any(k.startswith("encoder.stem.") for k in sd) and any(k.startswith("mask_tokens.") for k in sd)
    rows = list(csv.DictReader((mae_run / "log.csv").open()))
    assert rows and float(rows[-1]["loss"]) > 0
    pngs = sorted(mae_run.glob("preview_step*.png"))
    assert [p.name for p in pngs] == ["preview_step0000002.png", "preview_step0000004.png"]
    head = pngs[-1].read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    assert w > 4 * 32 and h > 3 * 32  # 4 columns (input, masked, recon, pasted) x 3 slice rows


def test_finetune_loads_every_encoder_tensor_of_a_pretrained_run(mae_run, hippocampus_dir, cache, tmp_path):
    ds = tmp_path / "Dataset004_Small"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (hippocampus_dir / "imagesTr").glob("*_0000.nii.gz"))
    for c in cases[10:16]:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz", ds / "imagesTr")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{c}.nii.gz", ds / "labelsTr")
    shutil.copy(hippocampus_dir / "dataset.json", ds / "dataset.json")
    out = tmp_path / "ft"
    res = _run(["finetune", str(ds), str(out), "--weights", str(mae_run), "--steps", "4", "--warmup-steps", "1", "1",
                "--val-every", "0", "--patch-size", "32", "32", "32", "--device", "cpu", "--cache-dir", str(cache),
                "-j", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["transfer"]
    assert t["encoder_tensors_loaded"] == t["encoder_tensors_in_network"] > 0 and not t["encoder_tensors_missing"]
    assert cfg["train"]["lr"] == pytest.approx(1e-3)  # S3D fine-tuning peak LR
    assert [p["kind"] for p in cfg["train"]["phases"]] == ["warmup", "warmup", "poly"]
    assert cfg["train"]["phases"][0]["frozen"] == ["encoder"]
    pre = load_file(str(mae_run / "model.safetensors"))
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert rows
    # --from-scratch keeps the network but not the values
    out2 = tmp_path / "scratch"
    res = _run(["finetune", str(ds), str(out2), "--weights", str(mae_run), "--from-scratch", "--steps", "2",
                "--val-every", "0", "--patch-size", "32", "32", "32", "--device", "cpu", "--cache-dir", str(cache),
                "-j", "1"])
    assert res.exit_code == 0, res.output
    cfg2 = json.loads((out2 / "config.json").read_text())
    assert cfg2["network"]["features"] == cfg["network"]["features"] and cfg2["transfer"] is None
    assert cfg2["train"]["lr"] == pytest.approx(1e-2)
    sd2 = load_file(str(out2 / "model.safetensors"))
    assert not (sd2["encoder.stem.convs.0.conv.weight"] == pre["encoder.stem.convs.0.conv.weight"]).all()


@pytest.mark.parametrize("method", ["simtrot", "btrot"])
def test_token_methods_run_and_log_the_collapse_monitor(method, images, cache, tmp_path):
    out = tmp_path / method
    res = _run(["pretrain", str(images), str(out), "--method", method, "--steps", "3", "--batch-size", "2",
                "--cache-dir", str(cache), *COMMON])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader((out / "log.csv").open()))
    # the projections' monitor and the encoder tokens' (what fine-tuning inherits)
    assert {"token_std", "same_position_sim", "enc_token_std", "enc_other_position_sim"} <= set(rows[-1])
    saved = json.loads((out / "config.json").read_text())
    # B-TROT's heads are BYOL's (batch norm over the tokens), SimTROT's per-token LayerNorm
    assert saved["pretrain"]["head_norm"] == ("batch" if method == "btrot" else "layer")
    sd = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("encoder.stages.") for k in sd)
    assert not any(k.startswith("target_") for k in sd)  # the EMA target is training state, not weights


def test_btrot_run_from_before_head_norm_resumes_with_its_layer_norm_heads(images, cache, tmp_path):
    """A B-TROT run saved before `head_norm` existed holds LayerNorm heads in its state; resuming must
    rebuild those, not the batch-norm heads that are the default now."""
    from s3d.train.pretrain import PretrainConfig, pretrain

    out = tmp_path / "old_btrot"
    cfg = PretrainConfig(method="btrot", arch="resenc-s", patch_size=(32, 32, 32), batch_size=2, steps=2,
                         device="cpu", head_norm="layer")
    pretrain([images], out, cfg, cache_dir=cache, workers=0)
    # as the old version left it: no head_norm in the saved settings, and one step still to go
    saved = json.loads((out / "pretrain.json").read_text())
    del saved["head_norm"]
    saved["steps"] = 3
    (out / "pretrain.json").write_text(json.dumps(saved))
    res = _run(["pretrain", str(images), str(out), "--resume", "--cache-dir", str(cache), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["step"] == 3
    assert json.loads((out / "config.json").read_text())["pretrain"]["head_norm"] == "layer"


def test_simtrot_refuses_a_single_volume_batch(images, cache, tmp_path):
    res = CliRunner().invoke(cli, ["pretrain", str(images), str(tmp_path / "x"), "--method", "simtrot",
                                   "--batch-size", "1", "--steps", "1", "--cache-dir", str(cache), *COMMON])
    assert res.exit_code != 0
    assert "--batch-size must be >= 2" in str(res.exception) + res.output


def _captured_config(monkeypatch, tmp_path, *args):
    """The PretrainConfig the CLI builds (training itself is replaced by a stub)."""
    import s3d.train.pretrain as pt

    seen = {}

    def fake(data, output, cfg, **kw):
        seen["cfg"] = cfg
        return output

    monkeypatch.setattr(pt, "pretrain", fake)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    res = _run(["pretrain", str(data), str(tmp_path / "out"), *args])
    assert res.exit_code == 0, res.output
    return seen["cfg"]


def test_mae_default_mask_ratio_is_s3d_dynamic_range(monkeypatch, tmp_path):
    from s3d.nn.masking import parse_mask_ratio, random_block_mask
    from s3d.train.pretrain import PretrainConfig

    cfg = _captured_config(monkeypatch, tmp_path)
    assert cfg.method == "mae" and cfg.mask_ratio == PretrainConfig().mask_ratio
    ratio = parse_mask_ratio(cfg.mask_ratio)
    assert ratio == (0.6, 0.9)
    # the default draws per sample, within [0.6, 0.9] of the 5^3 = 125 cells, and not one fixed ratio
    m = random_block_mask(300, (40, 40, 40), (8, 8, 8), ratio, generator=torch.Generator().manual_seed(0))
    frac = 1.0 - m[:, 0, ::8, ::8, ::8].flatten(1).mean(1)
    assert float(frac.min()) >= 0.6 - 0.5 / 125 and float(frac.max()) <= 0.9 + 0.5 / 125
    assert len(frac.unique()) > 20 and float(frac.min()) < 0.65 and float(frac.max()) > 0.85
    # a fixed 0.75 stays available; token methods keep their fixed 75% view mask
    assert _captured_config(monkeypatch, tmp_path, "--mask-ratio", "0.75").mask_ratio == "0.75"
    tok = _captured_config(monkeypatch, tmp_path, "--method", "simtrot")
    assert tok.view_mask_ratio == 0.75
    # block-sparse by default (the emulation's results, computed on visible cells); the emulation on request
    assert cfg.block_sparse and not _captured_config(monkeypatch, tmp_path, "--no-block-sparse").block_sparse


def test_mae_emulated_run_trains(images, cache, tmp_path):
    out = tmp_path / "bs"
    res = _run(["pretrain", str(images), str(out), "--steps", "2", "--checkpoint-every", "2", "--no-block-sparse",
                "--cache-dir", str(cache), *COMMON])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "pretrain.json").read_text())["block_sparse"] is False
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert rows and math.isfinite(float(rows[-1]["loss"])) and float(rows[-1]["loss"]) > 0
