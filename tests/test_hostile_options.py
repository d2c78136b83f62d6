"""Values a hostile (or hurried) user types: each is one line and exit 2 before any work, never a
traceback, an overwritten input or a silently different command."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from s3d.errors import S3DError


def _s3d(args: list[str], capsys) -> tuple[int, str]:
    """`s3d ARGS` in this process as the console script runs it: (exit code, everything printed)."""
    from s3d.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


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
    code, said = _s3d(["evaluate", str(ref), str(pred), "-o", str(victim)], capsys)
    assert code == 2 and said.strip().count("\n") == 0 and str(victim) in said
    assert victim.read_bytes() == before and not victim.with_suffix(".csv").exists()


def test_evaluate_may_replace_its_own_earlier_summary(labels, capsys):
    ref, pred = labels
    out = ref.parent / "summary.json"
    assert _s3d(["evaluate", str(ref), str(pred), "-o", str(out)], capsys)[0] == 0
    assert _s3d(["evaluate", str(ref), str(pred), "-o", str(out)], capsys)[0] == 0
    assert json.loads(out.read_text())["metric_per_case"]


@pytest.mark.parametrize("spacing", [["1", "1", "1", "1"], ["1", "1"]])
def test_preprocess_spacing_takes_exactly_three_numbers(hippocampus_dir, tmp_path, capsys, spacing):
    """Four numbers once made the fourth the OUTPUT and preprocessed the dataset as an unlabeled corpus."""
    code, said = _s3d(["preprocess", str(hippocampus_dir), str(tmp_path / "out"), "--spacing", *spacing], capsys)
    assert code == 2 and said.strip().count("\n") == 0
    assert f"--spacing takes 'median' or three numbers (X Y Z mm), got {len(spacing)}" in said
    assert "s3d preprocess --help" in said
    assert not (tmp_path / "out").exists() and not (tmp_path / "1").exists()


def test_a_click_usage_error_is_one_line(capsys):
    code, said = _s3d(["evaluate", "/nonexistent/ref", "/nonexistent/pred"], capsys)
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
