"""s3d.hub and `s3d weights`: registry, offline Hub resolution, nnssl conversion, export round trip.

No network: HF_HUB_OFFLINE is set and every test passes its own cache_dir, laid out the way
huggingface_hub lays out its cache (models--owner--name/{refs/main, blobs/, snapshots/<sha>/}).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from s3d import hub
from s3d.errors import S3DError

dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")

TINY_FEATURES = (4, 8, 8, 8, 8, 8)  # ResEnc-L depth (blocks 1,3,4,6,6,6), reduced width: same key structure
RESENC_L_BLOCKS = (1, 3, 4, 6, 6, 6)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "test-org/ResEncL-Tiny"


def _dna(features=TINY_FEATURES, num_classes: int = 2) -> nn.Module:
    return dna_unet.ResidualEncoderUNet(
        1, 6, features, nn.Conv3d, 3, STRIDES, RESENC_L_BLOCKS, num_classes, (1, 1, 1, 1, 1), conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True})


# adaptation plan as nnssl's AdaptationPlan.serialize() writes it for the OpenMind ResEncL checkpoints
PLAN = {
    "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None, "arch_kwargs_requiring_import": None},
    "pretrain_plan": {
        "dataset_name": "Dataset745_OpenNeuro_v2", "plans_name": "nnsslPlans",
        "original_median_spacing_after_transp": [1, 1, 1], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"onemmiso": {
            "data_identifier": "nnsslPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "spacing": [1, 1, 1], "patch_size": [160, 160, 160]}},
        "experiment_planner_used": "FixedResEncUNetPlanner"},
    "pretrain_num_input_channels": 1,
    "recommended_downstream_patchsize": [160, 128, 96],  # deliberately anisotropic: checks the axis flip
    "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
    "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None,
}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = _dna()
    with torch.no_grad():  # non-default values everywhere (norm affine params start at 1/0)
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _put_in_cache(cache: Path, repo: str, sha: str, files: dict[str, Path], ref: str = "main") -> Path:
    """Lay out files like huggingface_hub's cache: blobs/<hash>, snapshots/<sha>/<path> -> ../../blobs/<hash>
    (a path in the repo may have folders, as in MIC-DKFZ/SSL3D-checkpoints)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    (root / "blobs").mkdir(exist_ok=True)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap


def _nnssl_checkpoint(network_weights: dict, plan: dict | None) -> dict:
    """The dict nnssl's AbstractBaseTrainer.save_checkpoint writes (nnssl commit 70448644), with tiny state: the
    optimiser, scaler and logging entries are what a converter has to skip, `plan=None` leaves the plan out."""
    first = next(iter(network_weights.values()))
    ckpt = {
        "network_weights": network_weights,
        "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros_like(first)}},
                            "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True, "params": [0]}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                              "_growth_tracker": 0},
        "logging": {"train_losses": [1.0, 0.5], "lrs": [0.01, 0.009], "epoch_start_timestamps": [0.0, 1.0]},
        "_best_ema": None,
        "current_epoch": 2,
        "init_args": {"configuration_name": "onemmiso", "fold": "all", "device": "cuda"},
        "trainer_name": "BaseMAETrainer",
    }
    if plan is not None:
        ckpt["nnssl_adaptation_plan"] = plan
    return ckpt


@pytest.fixture()
def nnssl_cache(tmp_path, tiny, monkeypatch):
    """Offline HF cache holding an OpenMind-layout repo, plus a registry entry pointing at it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"network_weights": tiny.state_dict(), "nnssl_adaptation_plan": PLAN,
                "citations": ["@article{openmind}"]}, src / "checkpoint_final.pth")
    (src / "adaptation_plan.json").write_text(json.dumps(PLAN))
    (src / "config.json").write_text(json.dumps({"description": "Dummy config to allow tracking HF downloads."}))
    cache = tmp_path / "hub"
    _put_in_cache(cache, REPO, SHA, {n: src / n for n in ("checkpoint_final.pth", "adaptation_plan.json",
                                                          "config.json")})
    entry = hub.WeightsEntry(name="test-tiny", repo_id=REPO, revision="main",
                             files=("checkpoint_final.pth", "adaptation_plan.json"), format="nnssl-pth",
                             method="MAE", arch=None, description="tiny test weights")
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    return cache


def _count_torch_load(monkeypatch) -> list:
    calls = []
    real = torch.load

    def checked(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "pickles must be read with weights_only=True"
        assert str(kwargs.get("map_location")) == "cpu"
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked)
    return calls


def _expected_keys(sd) -> set[str]:
    return {k for k in sd if ".all_modules." not in k and not k.startswith("decoder.encoder.")}


def test_registry_lists_the_openmind_resencl_checkpoints():
    for method in ("MAE", "S3D", "VoCo", "SimCLR", "VF", "SwinUNETR"):
        e = hub.REGISTRY[f"openmind-resencl-{method.lower()}"]
        assert e.repo_id == f"MIC-DKFZ/ResEncL-OpenMind-{method}"
        assert e.aliases == (f"AnonRes/ResEncL-OpenMind-{method}",)
        assert e.format == "nnssl-pth" and e.files == ("checkpoint_final.pth", "adaptation_plan.json")
        # the patch is each plan's recommended_downstream_patchsize (SimCLR was pre-trained on 192 x 192 x 64)
        assert (e.arch, e.in_channels, e.spacing, e.normalization, e.patch_size) == \
            ("resenc-l", 1, (1.0, 1.0, 1.0), "zscore", None)
        assert e.license == "cc-by-4.0" and "2412.17041" in e.citation
    assert "2410.23132" in hub.REGISTRY["openmind-resencl-s3d"].citation
    with pytest.raises(S3DError, match="unknown format"):
        hub.register(hub.WeightsEntry("x", "a/b", "main", ("f",), "pickle", "m"))


def test_network_inferred_from_real_resencl_shapes_is_the_preset():
    with torch.device("meta"):  # 102M parameters: shapes only, no memory
        net = _dna(features=(32, 64, 128, 256, 320, 320), num_classes=3)
    inferred = hub.infer_network_config(net.state_dict())
    preset = hub.preset_network("resenc-l")
    for key in ("features", "blocks", "strides", "kernel_sizes", "decoder_convs"):
        assert hub._arch_of(inferred)[key] == hub._arch_of(preset)[key], key
    assert inferred["in_channels"] == 1 and inferred["num_classes"] == 3


def test_real_resencl_checkpoint_keys_fit_s3d_resencl():
    """The OpenMind layout (DNA ResEnc-L state dict) minus duplicates == s3d's resenc-l, key for key."""
    resenc = importlib.import_module("s3d.nn.resenc")
    with torch.device("meta"):
        dna = hub.drop_dna_duplicates(_dna(features=(32, 64, 128, 256, 320, 320), num_classes=2).state_dict())
        ours = resenc.ResEncUNet(resenc.ResEncConfig.from_dict({**hub.preset_network("resenc-l"),
                                                                "num_classes": 2})).state_dict()
    assert {k: tuple(v.shape) for k, v in dna.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_offline_nnssl_resolution_converts_once(nnssl_cache, tiny, monkeypatch):
    calls = _count_torch_load(monkeypatch)
    r = hub.resolve_weights("test-tiny", cache_dir=nnssl_cache)
    sd = r.state_dict
    original = tiny.state_dict()
    assert set(sd) == _expected_keys(original)
    assert not any(".all_modules." in k or k.startswith("decoder.encoder.") for k in sd)
    for k, v in sd.items():
        assert torch.equal(v, original[k]) and v.dtype == original[k].dtype, k
    assert len(calls) == 1 and Path(calls[0]).name == "checkpoint_final.pth"
    assert r.path == nnssl_cache / "s3d-converted" / f"test-org--ResEncL-Tiny--{SHA}" / "model.safetensors"
    cfg = r.config
    assert cfg["network"]["features"] == list(TINY_FEATURES) and cfg["network"]["blocks"] == list(RESENC_L_BLOCKS)
    assert cfg["plan"] == {"target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"]}
    assert cfg["patch_size"] == [96, 128, 160]  # nnssl (z, y, x) -> s3d (i, j, k)
    assert cfg["source"]["revision"] == SHA and cfg["nnssl_adaptation_plan"]["key_to_stem"] == "encoder.stem"
    # the converted safetensors holds each tensor once
    from safetensors import safe_open

    with safe_open(str(r.path), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == len(set(keys)) == len(_expected_keys(original))

    def boom(*a, **k):
        raise AssertionError("torch.load called again: the conversion cache was not used")

    monkeypatch.setattr(torch, "load", boom)
    for spec in ("test-tiny", REPO, f"{REPO}@{SHA}", f"https://huggingface.co/{REPO}"):
        again = hub.resolve_weights(spec, cache_dir=nnssl_cache)
        assert again.path == r.path, spec
        assert torch.equal(again.state_dict["encoder.stem.convs.0.conv.weight"],
                           original["encoder.stem.convs.0.conv.weight"])


def test_converted_weights_reproduce_the_dna_network(nnssl_cache, tiny):
    sd = hub.resolve_weights("test-tiny", cache_dir=nnssl_cache).state_dict
    fresh = _dna()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected
    # every key it lacks is one of DNA's aliases, and those alias the very tensors just loaded
    assert missing and all(".all_modules." in k or k.startswith("decoder.encoder.") for k in missing)
    x = torch.randn(1, 1, 64, 64, 64)
    tiny.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), tiny(x))
    enc = hub.encoder_state_dict(sd)
    assert enc and all(k.startswith(("encoder.stem.", "encoder.stages.")) for k in enc)
    assert set(enc) == {k for k in sd if k.startswith("encoder.")}


def test_encoder_loads_strictly_into_s3d_resenc(nnssl_cache):
    resenc = importlib.import_module("s3d.nn.resenc")
    r = hub.resolve_weights("test-tiny", cache_dir=nnssl_cache)
    net = resenc.ResEncUNet(resenc.ResEncConfig.from_dict({**r.config["network"], "num_classes": 2}))
    enc = {k[len("encoder."):]: v for k, v in hub.encoder_state_dict(r.state_dict).items()}
    net.encoder.load_state_dict(enc, strict=True)
    net.load_state_dict(r.state_dict, strict=True)


def test_registry_preset_mismatch_is_reported(nnssl_cache, monkeypatch):
    e = hub.REGISTRY["test-tiny"]
    monkeypatch.setitem(hub.REGISTRY, "test-tiny", hub.WeightsEntry(**{**e.__dict__, "arch": "resenc-l"}))
    with pytest.raises(S3DError, match="do not match preset resenc-l"):
        hub.resolve_weights("test-tiny", cache_dir=nnssl_cache)


def test_sha256_mismatch_is_reported(nnssl_cache, monkeypatch):
    e = hub.REGISTRY["test-tiny"]
    monkeypatch.setitem(hub.REGISTRY, "test-tiny", hub.WeightsEntry(**{**e.__dict__, "sha256": "0" * 64}))
    with pytest.raises(S3DError, match="sha256"):
        hub.resolve_weights("test-tiny", cache_dir=nnssl_cache)


class _Opaque:  # any class: weights_only unpickling must refuse it
    def __init__(self) -> None:
        self.x = 1


def test_pickles_with_objects_are_refused_not_unpickled(tmp_path, tiny, monkeypatch):
    calls = _count_torch_load(monkeypatch)
    good = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": tiny.state_dict(), "nnssl_adaptation_plan": PLAN}, good)
    r = hub.resolve_weights(str(good))
    assert set(r.state_dict) == _expected_keys(tiny.state_dict()) and r.path is None
    assert r.config["network"]["features"] == list(TINY_FEATURES)
    bad = tmp_path / "evil.pth"
    torch.save({"network_weights": tiny.state_dict(), "trainer": _Opaque()}, bad)
    with pytest.raises(S3DError, match="weights_only=True") as err:
        hub.resolve_weights(str(bad))
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert len(calls) == 2


def test_offline_and_not_cached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty-cache"
    with pytest.raises(S3DError) as err:
        hub.resolve_weights("openmind-resencl-mae", cache_dir=empty)
    msg = str(err.value)
    assert "'openmind-resencl-mae'" in msg and "not in the cache" in msg and str(empty) in msg
    assert "HF_HUB_OFFLINE" in msg and "s3d weights download openmind-resencl-mae" in msg and "\n" not in msg
    with pytest.raises(S3DError, match="not in the cache"):
        hub.resolve_weights("nobody/nothing@v1", cache_dir=empty)
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import, maybe under a test's env
    with pytest.raises(S3DError, match="only local files"):
        hub.resolve_weights("openmind-resencl-s3d", cache_dir=empty, local_files_only=True)


def test_unrecognised_spec(tmp_path):
    with pytest.raises(S3DError, match="not an existing file or folder, a registry name"):
        hub.resolve_weights("no such weights", cache_dir=tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(S3DError, match="not a weights folder"):
        hub.resolve_weights(str(tmp_path / "folder"))


_NOT_RESENC = {"head.weight": torch.zeros(2, 3)}
_ODD_RESENC = {"encoder.stem.convs.0.conv.weight": torch.zeros(4, 1, 3, 3, 3),
               "encoder.stages.0.blocks.0.conv2.conv.weight": torch.zeros(4, 4, 3)}  # a 1-D kernel


@pytest.mark.parametrize("name,content", [
    ("plain.pth", _NOT_RESENC),
    ("plain.safetensors", _NOT_RESENC),
    ("odd.pth", _ODD_RESENC),
    ("nnssl.pth", {"network_weights": {"encoder.x": 1}}),
    ("list.pth", [1, 2]),
    ("garbage.safetensors", b"not safetensors at all"),
])
def test_every_weights_error_names_the_file(tmp_path, name, content):
    from safetensors.torch import save_file

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".safetensors"):
        save_file(content, str(path))
    else:
        torch.save(content, path)
    with pytest.raises(S3DError) as e:
        _ = hub.resolve_weights(str(path)).state_dict  # the tensors too: a lazily read file can fail then
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_transfer_and_metadata_errors_name_the_weights(tmp_path):
    from s3d.checkpoint import tensors_metadata
    from s3d.nn.resenc import PRESETS, ResEncUNet
    from s3d.train.finetune import transfer_encoder

    with pytest.raises(S3DError, match=r"^plain\.pth: holds no encoder"):
        transfer_encoder(ResEncUNet(PRESETS["resenc-s"]), dict(_NOT_RESENC), source="plain.pth")
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(S3DError, match=r"x\.safetensors: not a readable safetensors file"):
        tensors_metadata(tmp_path / "x.safetensors")


def _run_cli(args: list[str], capsys) -> str:
    from s3d.cli import main

    main(args)
    return capsys.readouterr().out


def test_cli_list_and_info(capsys):
    out = _run_cli(["weights", "list"], capsys)
    for e in hub.REGISTRY.values():
        assert e.name in out and e.repo_id in out
    assert "cc-by-4.0" in out and "MIC-DKFZ/ResEncL-OpenMind-S3D" in out
    out = _run_cli(["weights", "info", "openmind-resencl-s3d"], capsys)
    assert "https://huggingface.co/MIC-DKFZ/ResEncL-OpenMind-S3D" in out and "2410.23132" in out
    assert "zscore" in out and "patch:         from the plan (recommended_downstream_patchsize" in out
    assert "also as:       AnonRes/ResEncL-OpenMind-S3D" in out and "NOT confirmed" in out
    with pytest.raises(SystemExit) as ex:
        _run_cli(["weights", "info", "nope"], capsys)
    assert ex.value.code == 2 and "not in the registry" in capsys.readouterr().err


def test_cli_download_converts_into_the_cache(nnssl_cache, capsys):
    out = _run_cli(["weights", "download", "test-tiny", "--cache-dir", str(nnssl_cache)], capsys)
    assert "s3d-converted" in out and (nnssl_cache / "s3d-converted" / f"test-org--ResEncL-Tiny--{SHA}"
                                       / "config.json").exists()


def _pretrain_run(run: Path, sd) -> None:
    from s3d.checkpoint import save_model

    save_model(run, sd, {"kind": "pretrain", "method": "mae", "network": hub.infer_network_config(sd),
                         "plan": {"target_spacing": [1.0, 1.0, 1.0], "normalization": ["zscore"]},
                         "patch_size": [64, 64, 64], "data": {"folders": ["/secret/place/unlabeled"]}, "step": 7})
    (run / "validation.jsonl").write_text('{"step": 7, "dice_mean": 0.5}\n')


def test_export_round_trips_and_resolves_from_a_hub_cache(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = hub.drop_dna_duplicates(tiny.state_dict())
    run, out = tmp_path / "run", tmp_path / "export"
    _pretrain_run(run, sd)
    _run_cli(["weights", "export", str(run), str(out), "--license", "cc-by-4.0"], capsys)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    card = (out / "README.md").read_text()
    for needle in ("license: cc-by-4.0", "2410.23132", "2408.05889", "Hu, Xinrong", "Wald, Tassilo",
                   "features per stage: 4 x 8 x 8 x 8 x 8 x 8", "zscore", "dice_mean: 0.5", "mae"):
        assert needle in card, needle
    cfg = json.loads((out / "config.json").read_text())
    assert "/secret/place" not in json.dumps(cfg) and cfg["export"]["tensors"] == "full"

    back = hub.resolve_weights(str(out))
    assert set(back.state_dict) == set(sd)
    for k in sd:
        assert torch.equal(back.state_dict[k], sd[k]) and back.state_dict[k].dtype == sd[k].dtype
    assert back.config["network"]["features"] == list(TINY_FEATURES)

    cache = tmp_path / "hub"
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    _put_in_cache(cache, "me/my-weights", sha, {n: out / n for n in ("model.safetensors", "config.json",
                                                                      "README.md")})
    for spec in ("me/my-weights", f"me/my-weights@{sha}"):
        hubbed = hub.resolve_weights(spec, cache_dir=cache)
        assert "me/my-weights" in hubbed.source and hubbed.path.parent.name == sha
        assert all(torch.equal(hubbed.state_dict[k], sd[k]) for k in sd)

    enc_out = tmp_path / "export-enc"
    hub.export_run(run, enc_out, encoder_only=True)
    enc = hub.resolve_weights(str(enc_out)).state_dict
    assert set(enc) == set(hub.encoder_state_dict(sd)) and "decoder.seg_layers.0.weight" not in enc


def _small_dataset(root: Path, hippocampus_dir: Path, n: int = 4) -> Path:
    ds = root / "Dataset004_Small"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for img in sorted((hippocampus_dir / "imagesTr").glob("*_0000.nii.gz"))[:n]:
        case = img.name[: -len("_0000.nii.gz")]
        shutil.copy(img, ds / "imagesTr")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{case}.nii.gz", ds / "labelsTr")
    shutil.copy(hippocampus_dir / "dataset.json", ds)
    return ds


def test_finetune_by_registry_name_works_offline_and_fails_clearly_without_cache(
        nnssl_cache, tiny, hippocampus_dir, tmp_path, monkeypatch, capsys):
    from s3d.cli import main

    ds = _small_dataset(tmp_path, hippocampus_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(nnssl_cache))
    args = ["finetune", str(ds), str(tmp_path / "ft"), "--weights", "test-tiny", "--steps", "3", "--warmup-steps",
            "1", "1", "--patch-size", "64", "64", "64", "--val-every", "0", "--device", "cpu", "-j", "1",
            "--cache-dir", str(tmp_path / "prep")]
    main(args)  # returns normally on success
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    t = cfg["transfer"]
    assert t["encoder_tensors_loaded"] == t["encoder_tensors_in_network"] > 0
    assert cfg["plan"]["target_spacing"] == [1.0, 1.0, 1.0]  # the weights' preprocessing, not the dataset median

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*args[:2], str(tmp_path / "ft2"), *args[3:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and "test-tiny" in err[0] and "s3d weights download" in err[0]
    assert not (tmp_path / "ft2" / "model.safetensors").exists()


def test_revisions_and_repo_ids_that_would_leave_the_cache_are_refused(tmp_path, monkeypatch):
    """A revision is a path inside the Hub cache (refs/REVISION): `../` used to reach files outside it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    outside = tmp_path / "secret"
    outside.write_text("0123456789abcdef0123456789abcdef01234567")  # what a ref file would hold
    for spec in ("openmind-resencl-mae@../../../secret", "owner/name@../../secret"):
        with pytest.raises(S3DError, match="is not a valid git revision"):
            hub.resolve_weights(spec, cache_dir=cache)
    with pytest.raises(S3DError, match="not an existing file or folder, a registry name"):
        hub.resolve_weights("owner/name@main\nx", cache_dir=cache)
    with pytest.raises(S3DError, match="not a valid Hub repo id"):
        hub.check_hub_names("own--er/name", None, "x")
    for repo, rev in (("MIC-DKFZ/ResEncL-OpenMind-MAE", "main"), ("a/b.c", "v1.0"), ("a/b", "refs/pr/1"),
                      ("a/b", "0123456789abcdef0123456789abcdef01234567")):
        hub.check_hub_names(repo, rev, "x")  # the Hub's real names pass


# ----------------------------------------------------------------------------------------------------------
# Every registry entry, resolved offline from a cache laid out like the real Hub repos (issue 14)


def _sha_of(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()  # any 40-hex commit id; one per repo


def _plan(recommended: tuple | None, *, conf_patch=(160, 160, 160), spacing=(1, 1, 1), config: str = "onemmiso",
          arch: str = "ResEncL", dataset: str = "Dataset745_OpenNeuro_v2") -> dict:
    plan = json.loads(json.dumps(PLAN))
    plan["architecture_plans"]["arch_class_name"] = arch
    pp = plan["pretrain_plan"]
    pp["dataset_name"] = dataset
    conf = pp["configurations"].pop("onemmiso")
    conf.update(spacing_style=config, spacing=list(spacing) if spacing else None, patch_size=list(conf_patch))
    pp["configurations"][config] = conf
    plan["recommended_downstream_patchsize"] = list(recommended) if recommended else None
    return plan


# What each entry's repo holds here. `cached` is the one Hub id the cache has: the OpenMind repos seen only as
# AnonRes/... are cached only under that alias, so the alias fallback is what makes them resolve.
LAYOUT = {
    "openmind-resencl-mae": {"cached": "MIC-DKFZ/ResEncL-OpenMind-MAE", "patch": (160, 160, 160)},
    "openmind-resencl-s3d": {"cached": "AnonRes/ResEncL-OpenMind-S3D", "patch": (160, 160, 160)},
    "openmind-resencl-voco": {"cached": "MIC-DKFZ/ResEncL-OpenMind-VoCo", "patch": (160, 160, 160),
                              "encoder_only": True},
    "openmind-resencl-simclr": {"cached": "AnonRes/ResEncL-OpenMind-SimCLR", "patch": (192, 192, 64),
                                "conf_patch": (192, 192, 64), "head": True},
    "openmind-resencl-vf": {"cached": "AnonRes/ResEncL-OpenMind-VF", "patch": (128, 128, 128)},
    "openmind-resencl-swinunetr": {"cached": "AnonRes/ResEncL-OpenMind-SwinUNETR", "patch": (160, 160, 160)},
    "nnfoundation-cnn": {"cached": "MIC-DKFZ/nnFoundationCNN", "patch": (192, 192, 192), "config": "noresample",
                         "spacing": None, "arch": "ResidualEncoderUNet", "extra": ("nnFoundation_banner.webp",)},
    **{f"missingpiece-resencl-{m.lower()}": {"cached": f"MIC-DKFZ/ResEncL-MissingPiece-{m}", "patch": (112, 160, 128),
                                             "spacing": (1.5, 0.75, 0.75), "dataset": "Dataset_CT-RATE_ABCD"}
       for m in ("MAE", "MG", "S3D", "VoCo", "MultiTalent")},
    "ssl3d-resencl-datamen": {"cached": "MIC-DKFZ/SSL3D-checkpoints", "patch": (160, 160, 160)},
    "ssl3d-resencl-dkfz-mae": {"cached": "MIC-DKFZ/SSL3D-checkpoints", "patch": (160, 160, 160)},
    # a submission without a plan and without decoder: the entry's fixed challenge patch applies
    "ssl3d-resencl-hilab": {"cached": "MIC-DKFZ/SSL3D-checkpoints", "patch": None, "encoder_only": True},
}


def _weights_for(layout: dict, full: dict) -> dict:
    sd = {k: v for k, v in full.items() if k.startswith("encoder.")} if layout.get("encoder_only") else dict(full)
    if layout.get("head"):  # a contrastive projection head: not part of the U-Net, dropped by the converter
        sd["projection_head.0.weight"] = torch.ones(8, 8)
    return sd


@pytest.fixture()
def registry_cache(tmp_path, tiny, monkeypatch):
    """An offline HF cache with every registry entry's repo in its real file layout; the tiny network's topology
    stands in for the ResEnc-L preset so the registry's own entries (arch "resenc-l") are used unchanged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    full = tiny.state_dict()
    tiny_preset = {**hub.infer_network_config(hub.drop_dna_duplicates(full)), "num_classes": 1}
    real_preset = hub.preset_network
    monkeypatch.setattr(hub, "preset_network", lambda name: dict(tiny_preset) if name == "resenc-l"
                        else real_preset(name))
    cache, src = tmp_path / "hub", tmp_path / "src"
    repos: dict[str, dict[str, Path]] = {}
    for name, lay in LAYOUT.items():
        entry = hub.REGISTRY[name]
        folder = src / name
        folder.mkdir(parents=True)
        plan = None if lay["patch"] is None else _plan(
            lay["patch"], conf_patch=lay.get("conf_patch", (160, 160, 160)), spacing=lay.get("spacing", (1, 1, 1)),
            config=lay.get("config", "onemmiso"), arch=lay.get("arch", "ResEncL"),
            dataset=lay.get("dataset", "Dataset745_OpenNeuro_v2"))
        torch.save(_nnssl_checkpoint(_weights_for(lay, full), plan), folder / "weights.pth")
        files = repos.setdefault(lay["cached"], {})
        files[entry.files[0]] = folder / "weights.pth"
        if entry.files[0] == "checkpoint_final.pth":  # the nnssl layout: plan, dummy config, card beside it
            (folder / "adaptation_plan.json").write_text(json.dumps(plan))
            (folder / "config.json").write_text('{"description": "Dummy config to allow tracking HF downloads."}')
            (folder / "README.md").write_text(f"---\nlicense: {entry.license}\n---\n# {lay['cached']}\n")
            files.update({n: folder / n for n in ("adaptation_plan.json", "config.json", "README.md")})
            for extra in lay.get("extra", ()):
                (folder / extra).write_bytes(b"RIFF\0\0\0\0WEBP")
                files[extra] = folder / extra
    ssl3d = repos["MIC-DKFZ/SSL3D-checkpoints"]
    (src / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# SSL3D Challenge\n")
    ssl3d["README.md"] = src / "README.md"
    ssl3d["Primus-M/Datamen/Datamen_PrimusM.pth"] = src / "README.md"  # the other track: never read
    for repo, files in repos.items():
        _put_in_cache(cache, repo, _sha_of(repo), files)
    return cache


def test_every_registry_entry_resolves_offline_from_a_hub_cache(registry_cache, tiny, monkeypatch):
    assert set(LAYOUT) == set(hub.REGISTRY), "a registry entry without a cached repo in this test"
    calls = _count_torch_load(monkeypatch)
    full = tiny.state_dict()
    for name, lay in LAYOUT.items():
        entry = hub.REGISTRY[name]
        r = hub.resolve_weights(name, cache_dir=registry_cache)
        cfg, src = r.config, r.config["source"]
        repo = lay["cached"]
        assert (src["repo_id"], src["registry_repo_id"], src["alias"]) == (repo, entry.repo_id,
                                                                           repo != entry.repo_id), name
        assert src["revision"] == _sha_of(repo) and src["filename"] == entry.files[0], name
        assert r.path.parent.name.startswith(f"{repo.replace('/', '--')}--{_sha_of(repo)}"), name
        assert repo in r.source, name
        # patch: the plan's recommended_downstream_patchsize in s3d axis order, else the entry's fallback
        want_patch = list(lay["patch"][::-1]) if lay["patch"] else list(entry.patch_size)
        assert cfg["patch_size"] == want_patch, name
        assert src["plan_from"] == ("checkpoint" if lay["patch"] else None), name
        want_spacing = [float(x) for x in (lay.get("spacing") or (1, 1, 1))[::-1]]
        assert cfg["plan"]["target_spacing"] == want_spacing, name
        assert cfg["license"] == entry.license, name
        expected = _expected_keys(_weights_for(lay, full))
        expected = {k for k in expected if k.startswith(("encoder.", "decoder."))}
        assert set(r.state_dict) == expected and src["dropped_keys"] == (1 if lay.get("head") else 0), name
        assert all(torch.equal(r.state_dict[k], full[k]) for k in expected), name
        assert cfg["network"]["features"] == list(TINY_FEATURES), name
    assert len(calls) == len(LAYOUT)  # each checkpoint unpickled once, with weights_only=True
    # the three SSL3D teams share one snapshot but not one conversion folder
    team_dirs = {hub.resolve_weights(n, cache_dir=registry_cache).path.parent.name
                 for n in LAYOUT if n.startswith("ssl3d-")}
    prefix = f"MIC-DKFZ--SSL3D-checkpoints--{_sha_of('MIC-DKFZ/SSL3D-checkpoints')}"
    assert team_dirs == {f"{prefix}--ResEnc-L-{t}-{t}_ResEncL" for t in ("Datamen", "DKFZ_MAE", "HiLab")}
    assert len(calls) == len(LAYOUT)  # and the second resolution reads the converted safetensors


def test_registry_id_wins_over_its_alias_and_a_missing_repo_names_both(registry_cache, tiny, monkeypatch):
    src = registry_cache.parent / "src" / "openmind-resencl-s3d"
    files = {n: src / n for n in ("adaptation_plan.json", "config.json", "README.md")}
    _put_in_cache(registry_cache, "MIC-DKFZ/ResEncL-OpenMind-S3D", SHA, {**files, "checkpoint_final.pth":
                                                                        src / "weights.pth"})
    r = hub.resolve_weights("openmind-resencl-s3d", cache_dir=registry_cache)
    assert r.config["source"]["repo_id"] == "MIC-DKFZ/ResEncL-OpenMind-S3D" and r.config["source"]["alias"] is False
    # an explicit Hub id is taken as given: no alias is tried for it
    with pytest.raises(S3DError, match="not in the cache") as err:
        hub.resolve_weights("AnonRes/ResEncL-OpenMind-MAE", cache_dir=registry_cache)
    assert "tried" not in str(err.value)
    empty = registry_cache.parent / "empty"
    with pytest.raises(S3DError) as err:
        hub.resolve_weights("openmind-resencl-vf", cache_dir=empty)
    msg = str(err.value)
    assert "\n" not in msg and "not in the cache" in msg and "s3d weights download openmind-resencl-vf" in msg
    assert "tried MIC-DKFZ/ResEncL-OpenMind-VF, AnonRes/ResEncL-OpenMind-VF" in msg
    # a repo that exists but lacks the file is reported, not papered over with the alias
    hub_repo = registry_cache / "models--MIC-DKFZ--ResEncL-OpenMind-VF" / "snapshots" / SHA
    _put_in_cache(registry_cache, "MIC-DKFZ/ResEncL-OpenMind-VF", SHA, files)
    assert hub_repo.is_dir()
    with pytest.raises(S3DError, match="not in the cache"):
        hub.resolve_weights("openmind-resencl-vf", cache_dir=registry_cache, local_files_only=True)


def test_plan_comes_from_adaptation_plan_json_when_the_checkpoint_has_none(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    torch.save(_nnssl_checkpoint(tiny.state_dict(), None), src / "checkpoint_final.pth")
    (src / "adaptation_plan.json").write_text(json.dumps(_plan((192, 192, 64), conf_patch=(192, 192, 64))))
    cache = tmp_path / "hub"
    _put_in_cache(cache, REPO, SHA, {n: src / n for n in ("checkpoint_final.pth", "adaptation_plan.json")})
    entry = hub.WeightsEntry(name="test-noplan", repo_id=REPO, revision="main",
                             files=("checkpoint_final.pth", "adaptation_plan.json"), format="nnssl-pth", method="m",
                             arch=None, spacing=None)
    monkeypatch.setitem(hub.REGISTRY, entry.name, entry)
    cfg = hub.resolve_weights("test-noplan", cache_dir=cache).config
    assert cfg["patch_size"] == [64, 192, 192] and cfg["source"]["plan_from"] == "adaptation_plan.json"
    assert cfg["nnssl_adaptation_plan"]["recommended_downstream_patchsize"] == [192, 192, 64]


def test_ssl3d_team_entries_and_their_names():
    e = hub.REGISTRY["ssl3d-resencl-dkfz-mae"]
    assert e.repo_id == "MIC-DKFZ/SSL3D-checkpoints" and e.files == ("ResEnc-L/DKFZ_MAE/DKFZ_MAE_ResEncL.pth",)
    assert e.files[0] != "checkpoint_final.pth" and e.patch_size == (160, 160, 160) and e.license == "cc-by-4.0"
    other = hub.ssl3d_team_entry("Some-Team_2", "method X")
    assert other.name == "ssl3d-resencl-some-team-2"
    assert other.files == ("ResEnc-L/Some-Team_2/Some-Team_2_ResEncL.pth",)
    for bad in ("../x", "a/b", "", "x..y"):
        with pytest.raises(S3DError, match="SSL3D team") as err:
            hub.ssl3d_team_entry(bad, "m")
        assert "\n" not in str(err.value)


def test_registry_entries_say_where_their_facts_come_from():
    for e in hub.REGISTRY.values():
        assert e.sources and e.data_summary and e.pretraining_data and e.license, e.name
        assert e.files[0].endswith(".pth") and e.format == "nnssl-pth", e.name
    nnf = hub.REGISTRY["nnfoundation-cnn"]
    assert nnf.license == "cc-by-sa-4.0" and nnf.license_label() == "cc-by-sa-4.0 (!)"
    assert "ShareAlike" in nnf.license_note() and nnf.arch is None and nnf.patch_size is None
    assert hub.REGISTRY["openmind-resencl-mae"].license_note() is None
    for m in ("MAE", "MG", "S3D", "VoCo", "MultiTalent"):
        e = hub.REGISTRY[f"missingpiece-resencl-{m.lower()}"]
        assert e.repo_id == f"MIC-DKFZ/ResEncL-MissingPiece-{m}" and "2509.15947" in e.citation
        assert e.spacing is None and e.patch_size is None
    assert "CT-RATE" in hub.REGISTRY["missingpiece-resencl-s3d"].pretraining_data
    assert "not confirmed" in hub.REGISTRY["missingpiece-resencl-multitalent"].pretraining_data
    text = Path(hub.__file__).read_text()
    assert "documentation/openmind.md" not in text and "documentation/Getting_started_OpenMind.md" in text


def test_cli_list_is_a_table_with_licence_and_data_and_flags_share_alike(capsys):
    out = _run_cli(["weights", "list"], capsys)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert lines[0].split() == ["name", "licence", "pre-training", "data", "hub", "id"]
    for e in hub.REGISTRY.values():
        row = next(line for line in lines if line.split() and line.split()[0] == e.name)
        assert e.license_label() in row and e.data_summary in row and e.repo_id in row, e.name
    nnf_row = next(line for line in lines if line.startswith("nnfoundation-cnn "))
    assert "cc-by-sa-4.0 (!)" in nnf_row
    assert sum("(!)" in line for line in lines) == 2  # the one flagged row and its explanation
    assert any(line.startswith("(!) cc-by-sa-4.0: ShareAlike") for line in lines)
    out = _run_cli(["weights", "info", "nnfoundation-cnn"], capsys)
    assert "licence:       cc-by-sa-4.0 (!)" in out and "(!) cc-by-sa-4.0: ShareAlike" in out
    assert "as stored" in out and "NOT resolved, so the network is read off the tensors" in " ".join(out.split())


def test_cli_info_shows_the_hub_card_cached_under_an_alias(registry_cache, capsys):
    out = _run_cli(["weights", "info", "openmind-resencl-vf", "--cache-dir", str(registry_cache)], capsys)
    assert "model card from the Hub" in out and "# AnonRes/ResEncL-OpenMind-VF" in out


def _front_matter(card: str) -> dict:
    """The YAML front matter of a model card, read by the rules model_card writes: `key: value` with a bare
    word or a JSON string, `key:` followed by `- item` lines; anything else fails the test."""
    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    out, key = {}, None
    for line in lines[1:end]:
        if line.startswith("- ") and key is not None:
            out[key].append(line[2:])
            continue
        key, sep, value = line.partition(": ") if ": " in line else line.partition(":")
        assert sep and key.isidentifier(), line
        value = value.strip()
        out[key] = json.loads(value) if value.startswith('"') else value if value else []
    return out


@pytest.mark.parametrize("license_", ["cc-by-4.0", 'my: "licence"\n---\nlicense: mit', "yes", "it's 'mine' \u2028"])
def test_model_card_front_matter_survives_any_licence_and_title(tmp_path, tiny, license_):
    sd = hub.drop_dna_duplicates(tiny.state_dict())
    run, out = tmp_path / "run", tmp_path / "export"
    _pretrain_run(run, sd)
    title = "Brain MAE\n---\nlicense: evil"
    hub.export_run(run, out, license=license_, title=title)
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front == {"license": license_, "library_name": "s3d",
                     "tags": ["medical", "3d", "s3d", "residual-encoder-unet", "self-supervised-learning"]}
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(card.split("---\n")[1]) == front
    body = card.split("\n")[card.split("\n").index("---", 1) + 1:]
    assert "# Brain MAE --- license: evil" in body and "---" not in body[:4]
    assert json.loads((out / "config.json").read_text())["export"]["license"] == license_


@pytest.mark.parametrize("arch", ["resenc", "swin-unetr"])
def test_model_card_architecture_section_describes_its_network(arch):
    if arch == "swin-unetr":
        net = {"arch": "swin-unetr", "in_channels": 1, "feature_size": 12, "depths": [2, 2, 2, 2],
               "num_heads": [3, 6, 12, 24], "window_size": [4, 4, 4], "patch_size": [2, 2, 2]}
        expected = ["- feature size: 12", "- depths / heads per stage: 2 x 2 x 2 x 2 / 3 x 6 x 12 x 24",
                    "- window / patch size: 4 x 4 x 4 / 2 x 2 x 2"]
        other = "features per stage"
    else:
        net = {"in_channels": 1, "features": [32, 64], "blocks": [1, 3], "strides": [[1, 1, 1], [2, 2, 2]],
               "kernel_sizes": [[3, 3, 3], [3, 3, 3]]}
        expected = ["- features per stage: 32 x 64", "- residual blocks per stage: 1 x 3"]
        other = "window / patch size"
    card = hub.model_card({"kind": "pretrain", "method": "simtrot", "network": net}, tensors="encoder",
                          num_params=1234, metrics=None, license="mit", title="t").split("\n")
    section = card[card.index("## Architecture"):card.index("## Pre-training")]
    for line in [*expected, "- input channels: 1", "- tensors in this upload: encoder (1,234 values)"]:
        assert line in section, (line, section)
    assert not any(other in line for line in section)
    assert sum(line.startswith("- input channels") for line in card) == 1
