"""End to end on real scans: finetune -> predict -> evaluate, transfer of pre-trained encoders,
and predictions on the exact input grid of awkward headers."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import hippocampus_subset

from s3d import predict
from s3d.cli import cli
from s3d.train.finetune import FinetuneConfig, split_cases, transfer_encoder

N_CASES = 8


@pytest.fixture(scope="module")
def small_dataset(hippocampus_dir, tmp_path_factory):
    """The first N_CASES real hippocampus cases as an nnU-Net raw dataset."""
    return hippocampus_subset(hippocampus_dir, tmp_path_factory.mktemp("data") / "Dataset004_Small", N_CASES)


@pytest.fixture(scope="module")
def trained_run(small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hippo"
    cache = tmp_path_factory.mktemp("cache")
    res = CliRunner().invoke(cli, ["finetune", str(small_dataset), str(out), "--steps", "6", "--val-every", "0",
                                   "--patch-size", "32", "32", "32", "--device", "cpu", "--cache-dir", str(cache),
                                   "--checkpoint-every", "3", "-j", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def test_split_is_deterministic_disjoint_and_nested():
    ids = [f"c{i:03d}" for i in range(40)]
    tr, va = split_cases(ids, FinetuneConfig(fold=0))
    assert not set(tr) & set(va) and len(va) == 8 and sorted(tr + va) == ids
    folds = [split_cases(ids, FinetuneConfig(fold=k))[1] for k in range(5)]
    assert sorted(sum(folds, [])) == ids
    five = split_cases(ids, FinetuneConfig(train_cases=5))[0]
    ten = split_cases(ids, FinetuneConfig(train_cases=10))[0]
    assert len(five) == 5 and set(five) <= set(ten) and not set(ten) & set(va)


def test_finetune_writes_a_complete_run(trained_run):
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["kind"] == "segmentation" and cfg["step"] == 6
    assert cfg["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    assert set(cfg["data"]["val_cases"]).isdisjoint(cfg["data"]["train_cases"])
    assert (trained_run / "model.safetensors").exists() and (trained_run / "state.safetensors").exists()
    val = [json.loads(line) for line in (trained_run / "validation.jsonl").read_text().splitlines()]
    assert val[-1]["step"] == 6 and "dice_anterior" in val[-1]


def test_predict_writes_on_the_input_grid_and_evaluate_scores_it(trained_run, small_dataset, tmp_path):
    out = tmp_path / "pred"
    res = CliRunner().invoke(cli, ["predict", "-i", str(small_dataset / "imagesTr"), "-o", str(out), "-m",
                                   str(trained_run), "--device", "cpu", "--no-tta"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for img in sorted((small_dataset / "imagesTr").glob("*.nii.gz")):
        case = img.name[: -len("_0000.nii.gz")]
        ref, pred = nib.load(img), nib.load(out / f"{case}.nii.gz")
        assert pred.shape == ref.shape
        assert np.array_equal(pred.affine, ref.affine)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    res = CliRunner().invoke(cli, ["evaluate", str(small_dataset / "labelsTr"), str(out), "-o",
                                   str(tmp_path / "summary.json")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == N_CASES
    assert 0 <= summary["foreground_mean"]["Dice"] <= 1


def test_predict_amp_bf16_changes_precision_not_results(trained_run, small_dataset, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    img = sorted((small_dataset / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(img, inp)
    probs = {}
    for amp in ("off", "bf16"):
        res = CliRunner().invoke(cli, ["predict", "-i", str(inp), "-o", str(tmp_path / amp), "-m", str(trained_run),
                                       "--device", "cpu", "--no-tta", "--save-probabilities", "--amp", amp],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        case = img.name[: -len("_0000.nii.gz")]
        probs[amp] = np.stack([np.asarray(nib.load(predict.probability_path(tmp_path / amp, case, k)).dataobj)
                               for k in range(3)])
    diff = np.abs(probs["bf16"] - probs["off"]).max()
    assert 0 < diff < 0.05  # bf16 really ran (not a silent fp32 run) and stays close to fp32


def test_predict_on_awkward_headers_keeps_shape_affine_and_codes(trained_run, edge_cases_dir, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("bigendian_int16_anatomical.nii", "reoriented_anat_moved.nii"):
        shutil.copy(edge_cases_dir / name, inp / name)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["predict", "-i", str(inp), "-o", str(out), "-m", str(trained_run),
                                   "--device", "cpu", "--no-tta"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for name in ("bigendian_int16_anatomical.nii", "reoriented_anat_moved.nii"):
        ref, pred = nib.load(inp / name), nib.load(out / name)
        assert pred.shape == ref.shape[:3]
        assert np.allclose(pred.affine, ref.affine, atol=1e-6)
        assert int(pred.header["qform_code"]) == int(ref.header["qform_code"])
        assert int(pred.header["sform_code"]) == int(ref.header["sform_code"])
    assert sorted(p.name for p in inp.iterdir()) == ["bigendian_int16_anatomical.nii", "reoriented_anat_moved.nii"]


def test_predict_rejects_a_bad_file_with_one_line(trained_run, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a volume")
    res = CliRunner().invoke(cli, ["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(trained_run),
                                   "--device", "cpu"])
    assert res.exit_code != 0
    assert "broken.nii.gz" in res.output
    assert "Traceback" not in res.output


def test_predict_refuses_nan_and_complex_images_and_goes_on_with_the_good_ones(trained_run, small_dataset, tmp_path):
    """A NaN voxel used to give an all-background mask and exit 0; complex voxels lost their imaginary part."""
    src = sorted((small_dataset / "imagesTr").glob("*.nii.gz"))[0]
    img = nib.load(src)
    vol = np.asarray(img.dataobj).astype(np.float32)
    inp = tmp_path / "in"
    inp.mkdir()
    nan = vol.copy()
    nan[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, img.affine), inp / "a_nan.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.complex64), img.affine), inp / "b_complex.nii.gz")
    shutil.copy(src, inp / "c_good.nii.gz")
    res = CliRunner().invoke(cli, ["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(trained_run),
                                   "--device", "cpu"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "a_nan.nii.gz: 1 NaN/inf voxels" in res.output and "b_complex.nii.gz: complex voxels" in res.output
    assert "2 of 3 cases could not be predicted" in str(res.exception)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["c_good.nii.gz"]  # nothing written for the bad


def test_a_newline_in_a_file_name_stays_one_escaped_line(trained_run, small_dataset, tmp_path):
    import subprocess
    import sys

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "bad\nname.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not a volume")
    shutil.copy(sorted((small_dataset / "imagesTr").glob("*.nii.gz"))[0], inp / "good.nii.gz")
    res = subprocess.run([sys.executable, "-m", "s3d", "predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m",
                          str(trained_run), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout
    errors = [line for line in (res.stdout + res.stderr).replace("\r", "\n").splitlines() if "s3d: error:" in line]
    assert any("bad\\nname.nii.gz" in line for line in errors), errors  # escaped, on the line naming it
    assert not any(line.startswith("name.nii.gz") for line in (res.stdout + res.stderr).splitlines())
    assert (tmp_path / "o" / "good.nii.gz").is_file()


def test_transfer_encoder_replicates_the_stem_over_channels():
    from s3d.nn.resenc import ResEncUNet, plan_network

    cfg1 = plan_network((32, 32, 32), (1.0, 1.0, 1.0), preset="resenc-s", in_channels=1, num_classes=1)
    cfg3 = plan_network((32, 32, 32), (1.0, 1.0, 1.0), preset="resenc-s", in_channels=3, num_classes=4)
    src, dst = ResEncUNet(cfg1), ResEncUNet(cfg3)
    report = transfer_encoder(dst, src.state_dict())
    assert report["encoder_tensors_loaded"] == report["encoder_tensors_in_network"]
    stem_key = report["stem_replicated"][0]
    w_src, w_dst = src.state_dict()[stem_key], dst.state_dict()[stem_key]
    assert w_dst.shape[1] == 3 and torch.allclose(w_dst.sum(1, keepdim=True), w_src, atol=1e-6)
    for k, v in src.state_dict().items():
        if k.startswith("encoder.") and k != stem_key:
            assert torch.equal(dst.state_dict()[k], v)
    assert not torch.equal(dst.state_dict()["decoder.seg_layers.0.weight"][:1],
                           src.state_dict()["decoder.seg_layers.0.weight"])


def test_finetune_killed_mid_save_resumes_with_its_saved_settings(small_dataset, tmp_path):
    """Real scans, a real SIGKILL while a checkpoint is half replaced, then the CLI's --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run, flag = tmp_path / "run", tmp_path / "paused"
    args = [sys.executable, "-m", "s3d", "finetune", str(small_dataset), str(run), "--patch-size", "32", "32", "32",
            "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "-j", "1", "--workers", "0",
            "--val-every", "0", "--checkpoint-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "S3D_PAUSE_AT": f"state-moved-aside:1:{flag}"}
    proc = subprocess.Popen(args + ["--steps", "6"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    settings = (run / "finetune.json").read_bytes()
    env.pop("S3D_PAUSE_AT")

    refused = subprocess.run(args + ["--steps", "9"], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "holds a run already" in refused.stderr
    assert (run / "finetune.json").read_bytes() == settings  # a refused start leaves the settings alone

    resumed = subprocess.run(args + ["--steps", "9", "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = resumed.stdout + resumed.stderr
    assert "continuing with the settings in" in said
    assert f"resuming {run} at step 2/6 from previous state state.prev.safetensors" in said
    assert json.loads((run / "config.json").read_text())["step"] == 6  # the saved --steps 6, not the new 9
    assert (run / "finetune.json").read_bytes() == settings


def _s3d(args: list[str], capsys) -> tuple[int, str]:
    """`s3d ARGS` in this process, as the console script runs it: (exit code, everything printed)."""
    from s3d.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(args)
    out = capsys.readouterr()
    return exited.value.code, out.out + out.err


def _broken_config(cfg: dict, how: str):
    if how == "a list":
        return [cfg]
    cfg = json.loads(json.dumps(cfg))
    if how == "no network":
        del cfg["network"]
    elif how == "no plan":
        del cfg["plan"]
    elif how == "plan without labels":
        del cfg["plan"]["labels"]
    elif how == "pretrain kind":
        cfg["kind"] = "pretrain"
    elif how == "two channels":
        cfg["network"]["in_channels"] = 2
    elif how == "wider network":
        cfg["network"]["features"] = [f * 2 for f in cfg["network"]["features"]]
    elif how == "more classes":
        cfg["network"]["num_classes"] = 5
    elif how == "bad stride":
        cfg["network"]["strides"][1] = "two"
    elif how == "zero spacing":
        cfg["plan"]["target_spacing"] = [1.0, 0.0, 1.0]
    return cfg


# (how the config is broken, the file the message must name, what it must say)
BROKEN = [
    ("a list", "config.json", "not a model config"),
    ("no network", "config.json", "no 'network' object"),
    ("no plan", "config.json", "no 'plan' object"),
    ("plan without labels", "config.json", "plan: missing 'labels'"),
    ("pretrain kind", "config.json", "holds pretrain weights, not a segmentation model"),
    ("two channels", "config.json", "plan normalises 1 channel(s) but the network takes in_channels 2"),
    ("wider network", "model.safetensors", "tensors do not match its config.json"),
    ("more classes", "config.json", "labels go up to 2 but the network has num_classes 5"),
    ("bad stride", "config.json", "network: network config: stride 'two'"),
    ("zero spacing", "config.json", "target_spacing [1.0, 0.0, 1.0] needs three positive numbers"),
]


@pytest.mark.parametrize(("how", "names", "says"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_model_folder_is_one_line_naming_the_file(trained_run, small_dataset, tmp_path, capsys, how, names,
                                                           says):
    model = tmp_path / "model"
    shutil.copytree(trained_run, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(_broken_config(cfg, how)))
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(sorted((small_dataset / "imagesTr").glob("*.nii.gz"))[0], inp)
    code, said = _s3d(["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(model), "--device", "cpu"],
                      capsys)
    assert code == 2, said
    line = said.strip()
    assert "\n" not in line and "Traceback" not in line and line.startswith("s3d: error: ")
    assert f"{model / names}: " in line and says in line, line
    assert not any((tmp_path / "o").iterdir())


def test_a_truncated_model_file_is_one_line(trained_run, small_dataset, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained_run, model)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, said = _s3d(["predict", "-i", str(small_dataset / "imagesTr"), "-o", str(tmp_path / "o"), "-m", str(model),
                       "--device", "cpu"], capsys)
    assert code == 2 and "\n" not in said.strip()
    assert f"{model / 'model.safetensors'}: not a readable safetensors file" in said


def test_a_tiny_model_spacing_fails_each_case_before_allocating(trained_run, small_dataset, tmp_path, capsys):
    """A config spacing of 0.001 mm once made predict try to allocate ~250 GB."""
    model = tmp_path / "model"
    shutil.copytree(trained_run, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["plan"]["target_spacing"] = [0.001] * 3
    (model / "config.json").write_text(json.dumps(cfg))
    inp = tmp_path / "in"
    inp.mkdir()
    for src in sorted((small_dataset / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(src, inp)
    code, said = _s3d(["predict", "-i", str(inp), "-o", str(tmp_path / "o"), "-m", str(model), "--device", "cpu"],
                      capsys)
    assert code == 2 and "Traceback" not in said
    errors = [ln for ln in said.splitlines() if "s3d: error:" in ln and "memory budget" in ln]
    assert len(errors) == 2 and "at the model's spacing 0.001 x 0.001 x 0.001 mm" in errors[0]
    assert "2 of 2 cases could not be predicted" in said
    assert not any((tmp_path / "o").iterdir())


def test_a_model_with_nan_weights_is_refused_not_predicted_as_background(trained_run, small_dataset, tmp_path,
                                                                          capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(trained_run, model)
    sd = load_file(str(model / "model.safetensors"))
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] * float("nan")
    save_file(sd, str(model / "model.safetensors"))
    code, said = _s3d(["predict", "-i", str(small_dataset / "imagesTr"), "-o", str(tmp_path / "o"), "-m", str(model),
                       "--device", "cpu"], capsys)
    assert code == 2 and "\n" not in said.strip()
    assert f"{model / 'model.safetensors'}: 1 tensor(s) hold NaN or inf, e.g. {key}" in said
