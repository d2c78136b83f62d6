"""Values a hostile (or hurried) user types: each is one line and exit 2 before any work, never a
traceback, an overwritten input or a silently different command."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import run_s3d

from s3d.errors import S3DError


@pytest.fixture()
def labels(hippocampus_dir, tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for name in ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz"):
        shutil.copy(hippocampus_dir / "labelsTr" / name, ref)
        shutil.copy(hippocampus_dir / "labelsTr" / name, pred)
    shutil.copy(hippocampus_dir / "dataset.json", tmp_path / "dataset.json")
    return ref, pred


@pytest.mark.parametrize("target", ["pred/hippocampus_001.nii.gz", "ref/hippocampus_003.nii.gz", "dataset.json"])
def test_evaluate_never_overwrites_an_input_with_its_summary(labels, capsys, target):
    ref, pred = labels
    victim = ref.parent / target
    before = victim.read_bytes()
    code, said = run_s3d(["evaluate", str(ref), str(pred), "-o", str(victim)], capsys)
    assert code == 2 and said.strip().count("\n") == 0 and str(victim) in said
    assert victim.read_bytes() == before and not victim.with_suffix(".csv").exists()


def test_evaluate_may_replace_its_own_earlier_summary(labels, capsys):
    ref, pred = labels
    out = ref.parent / "summary.json"
    assert run_s3d(["evaluate", str(ref), str(pred), "-o", str(out)], capsys)[0] == 0
    assert run_s3d(["evaluate", str(ref), str(pred), "-o", str(out)], capsys)[0] == 0
    assert json.loads(out.read_text())["metric_per_case"]


@pytest.mark.parametrize("spacing", [["1", "1", "1", "1"], ["1", "1"]])
def test_preprocess_spacing_takes_exactly_three_numbers(hippocampus_dir, tmp_path, capsys, spacing):
    """Four numbers once made the fourth the OUTPUT and preprocessed the dataset as an unlabeled corpus."""
    code, said = run_s3d(["preprocess", str(hippocampus_dir), str(tmp_path / "out"), "--spacing", *spacing], capsys)
    assert code == 2 and said.strip().count("\n") == 0
    assert f"--spacing takes 'median' or three numbers (X Y Z mm), got {len(spacing)}" in said
    assert "s3d preprocess --help" in said
    assert not (tmp_path / "out").exists() and not (tmp_path / "1").exists()


def test_a_click_usage_error_is_one_line(capsys):
    code, said = run_s3d(["evaluate", "/nonexistent/ref", "/nonexistent/pred"], capsys)
    assert code == 2 and said.strip().count("\n") == 0 and said.startswith("s3d: error: ")


@pytest.mark.parametrize(("name", "value"), [("WORLD_SIZE", "abc"), ("RANK", "x"), ("LOCAL_WORLD_SIZE", "0"),
                                             ("S3D_MAX_IMAGE_BYTES", "inf"), ("S3D_MAX_IMAGE_BYTES", "-1")])
def test_malformed_environment_numbers_are_one_line(monkeypatch, name, value):
    from s3d.data.io import memory_budget
    from s3d.data.loader import default_workers
    from s3d.env import rank, world_size

    monkeypatch.setenv(name, value)
    read = {"WORLD_SIZE": world_size, "RANK": rank, "LOCAL_WORLD_SIZE": default_workers,
            "S3D_MAX_IMAGE_BYTES": memory_budget}[name]
    with pytest.raises(S3DError, match=name):
        read()


def test_world_size_without_rank_says_to_use_torchrun(monkeypatch):
    from s3d.env import world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(S3DError, match="start multi-process runs with torchrun"):
        world_size()


@pytest.mark.parametrize(("field", "value", "option"), [
    ("temperature", 0.0, "--temperature"), ("temperature", float("nan"), "--temperature"),
    ("same_position_weight", -5.0, "--same-position-weight"), ("ema_decay", 2.0, "--ema-decay"),
    ("token_stage", 99, "--token-stage"), ("view_mask_ratio", 1.0, "--view-mask-ratio")])
def test_pretrain_settings_that_cannot_train_are_named(field, value, option):
    from s3d.train.pretrain import PretrainConfig

    with pytest.raises(S3DError, match=option):
        PretrainConfig(**{field: value}).check(n_stages=6)
    PretrainConfig().check(n_stages=6)  # the defaults pass


@pytest.mark.parametrize("lr", [-1.0, 0.0, float("nan"), float("inf")])
def test_a_learning_rate_that_cannot_train_is_refused(lr):
    from s3d.train.loop import check_lr

    with pytest.raises(S3DError, match="--lr"):
        check_lr(lr)


def test_zscore_of_large_valid_intensities_does_not_overflow_to_zeros(hippocampus_dir):
    """An int16 image with scl_slope 1e30 (values ~1e32, valid float32) used to become all zeros."""
    from s3d.data.preprocess import _zscore

    vol = np.asarray(nib.load(hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz").dataobj, np.float32)
    with np.errstate(over="raise"):
        big = _zscore(vol * np.float32(1e30), None)
    small = _zscore(vol, None)
    np.testing.assert_allclose(big, small, rtol=1e-4, atol=1e-4)
    assert abs(float(big.std()) - 1.0) < 1e-3


# ---------------------------------------------------------------------------------------------------
# s3d predict: --continue and --save-probabilities on the files a killed run or a odd case name leaves


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random, tiny segmentation model: predictions are arbitrary but real files on the input grid."""
    import torch

    from s3d.checkpoint import save_model
    from s3d.data.preprocess import Plan
    from s3d.nn.resenc import ResEncConfig, ResEncUNet

    cfg = ResEncConfig(in_channels=1, num_classes=3, features=(4, 8), blocks=(1, 1), strides=((1, 1, 1), (2, 2, 2)),
                       kernel_sizes=((3, 3, 3), (3, 3, 3)), decoder_convs=(1,), deep_supervision=False)
    torch.manual_seed(0)
    labels = {"background": 0, "anterior": 1, "posterior": 2}
    plan = Plan(target_spacing=(1.0, 1.0, 1.0), normalization=["zscore"], ct_stats=[None], channel_names={0: "MRI"},
                labels=labels)
    out = tmp_path_factory.mktemp("tiny_model")
    save_model(out, ResEncUNet(cfg).state_dict(), {"kind": "segmentation", "network": cfg.to_dict(),
                                                   "plan": plan.to_dict(), "patch_size": [16, 16, 16],
                                                   "labels": labels})
    return out


@pytest.fixture()
def one_thread():
    """Tiny convolutions: one thread is fastest, and two threads on two shared cores wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _predict(inp, out, model, capsys, *extra: str) -> tuple[int, str]:
    return run_s3d(["predict", "-i", str(inp), "-o", str(out), "-m", str(model), "--device", "cpu", "--no-tta",
                 *extra], capsys)


def test_continue_redoes_empty_and_truncated_outputs_and_keeps_finished_ones(hippocampus_dir, tiny_model, tmp_path,
                                                                            capsys, one_thread):
    from s3d.data.io import output_problem

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    for case in ("001", "003", "004"):
        shutil.copy(hippocampus_dir / "imagesTr" / f"hippocampus_{case}_0000.nii.gz", inp / f"c{case}.nii.gz")
    assert _predict(inp, out, tiny_model, capsys)[0] == 0
    good = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert len(good) == 3
    (out / "c001.nii.gz").write_bytes(b"")  # killed before anything was written
    (out / "c003.nii.gz").write_bytes(good["c003.nii.gz"][: len(good["c003.nii.gz"]) // 2])  # cut short
    kept = (out / "c004.nii.gz").stat().st_mtime_ns
    assert output_problem(out / "c003.nii.gz", nib.load(inp / "c003.nii.gz").shape) is not None
    code, said = _predict(inp, out, tiny_model, capsys, "--continue")
    assert code == 0, said
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == good  # redone, bit for bit
    assert (out / "c004.nii.gz").stat().st_mtime_ns == kept  # a finished output is not redone
    notes = [line for line in said.splitlines() if line.startswith("s3d: note:")]
    assert len(notes) == 2 and "c001.nii.gz" in notes[0] and "empty file" in notes[0]
    assert "c003.nii.gz" in notes[1] and "truncated" in notes[1]
    # asking for probabilities now redoes cases whose earlier run wrote none
    code, said = _predict(inp, out, tiny_model, capsys, "--continue", "--save-probabilities")
    assert code == 0 and said.count("s3d: note:") == 3 and "missing" in said
    assert len(list((out / "probabilities").glob("*_prob*.nii.gz"))) == 9


def test_probabilities_never_collide_with_a_case_named_like_them(hippocampus_dir, tiny_model, tmp_path, capsys,
                                                                 one_thread):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz", inp / "X.nii.gz")
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_003_0000.nii.gz", inp / "X_prob01.nii.gz")
    code, said = _predict(inp, out, tiny_model, capsys, "--save-probabilities")
    assert code == 0, said
    seg = nib.load(out / "X_prob01.nii.gz")  # case X_prob01's segmentation, not case X's class-1 map
    assert seg.get_data_dtype() == np.uint8 and seg.shape == nib.load(inp / "X_prob01.nii.gz").shape
    prob = nib.load(out / "probabilities" / "X_prob01.nii.gz")
    assert prob.get_data_dtype() == np.float32 and prob.shape == nib.load(inp / "X.nii.gz").shape
    assert len(list((out / "probabilities").iterdir())) == 6
    # a file where the probabilities go is refused on one line, before any case is predicted
    other = tmp_path / "other"
    other.mkdir()
    (other / "probabilities").write_text("mine")
    code, said = _predict(inp, other, tiny_model, capsys, "--save-probabilities")
    assert code == 2 and said.strip().count("\n") == 0 and "probabilities: exists and is not a folder" in said
    assert sorted(p.name for p in other.iterdir()) == ["probabilities"]


def _raw_nifti(src, path, **fields) -> None:
    """The real image `src` written as a .nii whose header fields are set as given, byte for byte (nibabel's
    own saving would repair them)."""
    img = nib.load(src)
    hdr = img.header.copy()
    for name, value in fields.items():
        hdr[name] = value
    hdr["vox_offset"] = 352
    data = np.asanyarray(img.dataobj).astype(hdr.get_data_dtype())
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + data.tobytes(order="F"))


def test_library_warnings_on_odd_headers_are_one_line_naming_the_file(hippocampus_dir, tiny_model, tmp_path, capsys,
                                                                       one_thread):
    src = hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz"
    pixdim = nib.load(src).header["pixdim"].copy()
    pixdim[1] = 0
    inp = tmp_path / "in"
    inp.mkdir()
    _raw_nifti(src, inp / "zero_pixdim.nii", pixdim=pixdim)
    _raw_nifti(src, inp / "bad_sform_code.nii", sform_code=7)
    code, said = _predict(inp, tmp_path / "out", tiny_model, capsys)
    assert code == 0, said
    lines = [ln for ln in said.splitlines() if "pixdim" in ln or "sform_code" in ln]
    assert lines == [f"s3d: warning: {inp / 'bad_sform_code.nii'}: sform_code 7 not valid; setting to 0 (nibabel)",
                     f"s3d: warning: {inp / 'zero_pixdim.nii'}: pixdim[1,2,3] should be non-zero; setting 0 dims "
                     "to 1 (nibabel)"]


def test_only_library_warnings_are_rerouted_and_only_while_the_cli_runs(capsys, monkeypatch):
    import logging
    import os
    import warnings

    import nibabel.nifti1

    from s3d.messages import library_messages

    with warnings.catch_warnings(record=True) as shown, library_messages():
        warnings.simplefilter("always")
        for _ in range(2):
            warnings.warn_explicit("Extension size is not a multiple of 16 bytes", UserWarning,
                                   nibabel.nifti1.__file__, 1)
        warnings.warn_explicit("a real problem of s3d's own", UserWarning, "/somewhere/s3d/thing.py", 7)
    err = capsys.readouterr().err
    assert err.count("s3d: warning: Extension size is not a multiple of 16 bytes (nibabel)") == 1
    # any other warning goes where it went before (here: the recorder), not ours to reformat
    assert [str(w.message) for w in shown] == ["a real problem of s3d's own"]
    # huggingface_hub's retry chatter is quiet unless the user asks for it with its own variable
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    hf = logging.getLogger("huggingface_hub.utils._http")
    with library_messages():
        assert hf.getEffectiveLevel() == logging.ERROR and os.environ["HF_HUB_VERBOSITY"] == "error"
    assert "HF_HUB_VERBOSITY" not in os.environ
    monkeypatch.setenv("HF_HUB_VERBOSITY", "info")
    before = hf.getEffectiveLevel()
    with library_messages():
        assert hf.getEffectiveLevel() == before
    assert not logging.getLogger("nibabel.global").filters and warnings.showwarning.__module__ != "s3d.cli"


def test_a_library_message_is_one_write_so_parallel_workers_cannot_interleave_it(monkeypatch):
    """Spawned workers' stderr is unbuffered: every write call goes straight to the shared pipe. A line
    written in two parts (text, then newline) can have another worker's line land in between."""
    import sys

    from s3d import messages

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def write(self, s: str) -> int:
            self.calls.append(s)
            return len(s)

        def flush(self) -> None:
            pass

    rec = Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    shown = messages._LibraryMessages()
    shown.show("nibabel", "pixdim[1,2,3] should be non-zero; setting 0 dims to 1")
    shown.show("nibabel", "sform_code 7 not valid; setting to 0")
    written = [c for c in rec.calls if c]
    assert written == ["s3d: warning: pixdim[1,2,3] should be non-zero; setting 0 dims to 1 (nibabel)\n",
                       "s3d: warning: sform_code 7 not valid; setting to 0 (nibabel)\n"]
