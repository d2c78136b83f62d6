"""Preprocessing on real data: hippocampus cases through the Python API and `s3d preprocess`, an
anisotropic unlabeled MRI, a broken dataset, and the array steps against brute-force references."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from s3d.data.preprocess import (
    MASK_FOR_NORM_RELATIVE_SIZE,
    DatasetProblems,
    Plan,
    crop_to_nonzero,
    load_preprocessed,
    normalize,
    plan_dataset,
    preprocess_case,
    preprocess_dataset,
    restore_probabilities,
    restore_segmentation,
    sample_class_locations,
    target_spacing_from,
)
from s3d.errors import S3DError

# 001 and 033 are stored as uint8 with another intensity scale, the others float32 (data README)
CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_033", "hippocampus_006"]


def _subset(src: Path, dst: Path, cases: list[str]) -> Path:
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    for c in cases:
        (dst / "imagesTr" / f"{c}_0000.nii.gz").symlink_to(src / "imagesTr" / f"{c}_0000.nii.gz")
        (dst / "labelsTr" / f"{c}.nii.gz").symlink_to(src / "labelsTr" / f"{c}.nii.gz")
    return dst


@pytest.fixture(scope="module")
def hippo_subset(hippocampus_dir, tmp_path_factory) -> Path:
    return _subset(hippocampus_dir, tmp_path_factory.mktemp("raw") / "Dataset004_Hippocampus", CASES)


@pytest.fixture(scope="module")
def hippo_preprocessed(hippo_subset, tmp_path_factory):
    from s3d.data.dataset import find_dataset

    ds = find_dataset(hippo_subset)
    plan, fp = plan_dataset(ds, "median", jobs=1)
    out = tmp_path_factory.mktemp("pp") / "out"
    assert sorted(preprocess_dataset(ds, out, plan, jobs=2, fingerprint=fp)) == sorted(c.case_id for c in ds.cases)
    return ds, plan, fp, out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def _one_hot(seg: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[seg].transpose(3, 0, 1, 2)


# ------------------------------------------------------------------------------ array steps
def test_plan_round_trips_through_json():
    plan = Plan((0.7, 0.7, 3.0), ["ct", "zscore"], [{"mean": 1.0, "std": 2.0, "p005": -5.0, "p995": 9.0}, None],
                {0: "CT", 1: "T1"}, {"background": 0, "liver": 1}, use_nonzero_mask=[False, True])
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and back.digest() == plan.digest()
    old = plan.to_dict()
    del old["use_nonzero_mask"]  # a plan from before this field existed still loads
    assert Plan.from_dict(old).use_nonzero_mask == [False, False]


def test_crop_to_nonzero_matches_brute_force():
    rng = np.random.default_rng(0)
    data = np.zeros((2, 20, 15, 12), np.float32)
    data[0, 3:9, 4:5, 2:11] = rng.normal(size=(6, 1, 9))
    data[1, 12, 7, 1] = -1.0  # a single voxel of another channel extends the box
    seg = np.arange(data[0].size).reshape(data.shape[1:])
    cropped, seg_c, bbox = crop_to_nonzero(data, seg)
    nz = np.argwhere(np.any(data != 0, axis=0))
    assert bbox == [[int(lo), int(hi) + 1] for lo, hi in zip(nz.min(0), nz.max(0), strict=True)]
    assert cropped.shape == (2, 10, 4, 10) and seg_c.shape == (10, 4, 10)
    assert seg_c[0, 0, 0] == seg[3, 4, 1]
    _, _, empty = crop_to_nonzero(np.zeros((1, 4, 5, 6)))
    assert empty == [[0, 4], [0, 5], [0, 6]]


def test_zscore_copes_with_uint8_and_float32():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (1, 10, 11, 12)).astype(np.uint8)
    f32 = u8.astype(np.float32) * 3.7 + 120.0  # same image, another intensity scale
    plan = Plan((1, 1, 1), ["zscore"], [None], {0: "MRI"}, {})
    a, b = normalize(u8, plan), normalize(f32, plan)
    assert a.dtype == np.float32 and b.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    ref = (u8[0].astype(np.float64) - u8.mean()) / u8.std()
    np.testing.assert_allclose(a[0], ref, atol=1e-5)


def test_zscore_with_nonzero_mask_and_ct():
    rng = np.random.default_rng(2)
    x = np.zeros((1, 8, 8, 8), np.float32)
    x[0, 2:6, 2:6, 2:6] = rng.normal(50, 10, (4, 4, 4))
    plan = Plan((1, 1, 1), ["zscore"], [None], {0: "MRI"}, {}, use_nonzero_mask=[True])
    out = normalize(x, plan)
    inside = x[0] != 0
    assert (out[0][~inside] == 0).all()
    assert abs(out[0][inside].mean()) < 1e-5 and abs(out[0][inside].std() - 1) < 1e-5
    ct = np.array([-1000, -50, 0, 40, 80, 3000], np.float32).reshape(1, 1, 2, 3)
    plan = Plan((1, 1, 1), ["ct"], [{"mean": 40.0, "std": 20.0, "p005": -100.0, "p995": 200.0}], {0: "CT"}, {})
    np.testing.assert_allclose(normalize(ct.astype(np.int16), plan).ravel(),
                               (np.clip(ct.ravel(), -100, 200) - 40) / 20, atol=1e-6)
    with pytest.raises(S3DError, match="channel"):
        normalize(np.zeros((2, 3, 3, 3)), plan)


def test_target_spacing_rule():
    # isotropic: the per-axis median
    sp = np.array([[1, 1, 1], [0.8, 1, 1.2], [1.2, 1, 2]])
    assert target_spacing_from(sp, np.full((3, 3), 100)) == (1.0, 1.0, 1.2)
    # nnU-Net: thick-slice axis with few slices -> 10th percentile of that axis' spacings
    sp = np.array([[0.7, 0.7, 5.0]] * 8 + [[0.7, 0.7, 2.5]] * 2)
    shapes = np.array([[512, 512, 40]] * 10)
    assert target_spacing_from(sp, shapes) == pytest.approx((0.7, 0.7, float(np.percentile(sp[:, 2], 10))))
    assert target_spacing_from(sp, shapes)[2] < 5.0
    # anisotropic spacing but not anisotropic in voxels: plain median
    assert target_spacing_from(sp, np.array([[512, 512, 400]] * 10))[2] == 5.0


def test_class_locations_follow_nnunet_sampling():
    seg = np.zeros((60, 60, 60), np.int16)
    seg[:2, :2, :2] = 1  # 8 voxels: all kept
    seg[10:60, 10:60, 10:60] = 2  # 125000 voxels: 10000 samples
    locs = sample_class_locations(seg, [0, 1, 2, 3])
    assert sorted(locs) == [1, 2, 3] and locs[3].shape == (0, 3)
    np.testing.assert_array_equal(locs[1], np.argwhere(seg == 1))
    two = np.array(locs[2])
    assert two.shape == (10000, 3) and len({tuple(v) for v in two}) == 10000
    assert (seg[tuple(two.T)] == 2).all()
    big = np.ones((120, 100, 100), np.int16)  # 1.2M voxels: 1 % coverage wins over 10000
    assert len(sample_class_locations(big, [1])[1]) == 12000


# ------------------------------------------------------------------------ real hippocampus
def test_preprocess_case_and_restore_on_real_case(hippocampus_dir):
    from s3d.data.io import read_channels, read_label

    images, geo = read_channels([hippocampus_dir / "imagesTr" / "hippocampus_033_0000.nii.gz"])
    seg, _ = read_label(hippocampus_dir / "labelsTr" / "hippocampus_033.nii.gz")
    labels = {"background": 0, "anterior": 1, "posterior": 2}
    plan = Plan((1.0, 1.0, 1.0), ["zscore"], [None], {0: "MRI"}, labels)
    data, seg_pp, props = preprocess_case(images, geo, plan, seg)
    assert data.dtype == np.float32 and seg_pp.dtype == np.int16
    assert abs(data.mean()) < 1e-4 and abs(data.std() - 1) < 1e-4
    np.testing.assert_array_equal(restore_segmentation(_one_hot(seg_pp, 3), props), seg)
    json.dumps({k: v for k, v in props.items() if k != "class_locations"})  # the rest is JSON-safe
    for lab in (1, 2):
        np.testing.assert_array_equal(props["class_locations"][lab], np.argwhere(seg_pp == lab))
    # finer spacing: resampled both ways, the round trip stays within a few voxels of the truth
    plan = Plan((0.7, 0.8, 0.75), ["zscore"], [None], {0: "MRI"}, labels)
    data, seg_pp, props = preprocess_case(images, geo, plan, seg)
    assert data.shape[1:] == tuple(round(s / t) for s, t in zip(seg.shape, (0.7, 0.8, 0.75), strict=True))
    back = restore_segmentation(_one_hot(seg_pp, 3), props)
    assert back.shape == seg.shape
    for c in (1, 2):
        assert _dice(back == c, seg == c) > 0.98
    probs = restore_probabilities(torch.from_numpy(_one_hot(seg_pp, 3)), props)
    assert isinstance(probs, np.ndarray) and probs.shape == (3, *seg.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_restore_pastes_background_outside_bbox():
    images = np.zeros((1, 10, 12, 8), np.float32)
    images[0, 2:7, 3:9, 1:6] = np.random.default_rng(3).normal(5, 1, (5, 6, 5))
    geo = SimpleNamespace(spacing=(1.0, 1.0, 1.0), to_dict=lambda: {"shape": [10, 12, 8]})
    plan = Plan((1.0, 1.0, 1.0), ["zscore"], [None], {0: "MRI"}, {"background": 0, "x": 1})
    data, _, props = preprocess_case(images, geo, plan)
    assert props["bbox"] == [[2, 7], [3, 9], [1, 6]] and data.shape == (1, 5, 6, 5)
    probs = np.zeros((2, 5, 6, 5), np.float32)
    probs[1] = 1.0
    full = restore_probabilities(probs, props)
    inside = np.zeros((10, 12, 8), bool)
    inside[2:7, 3:9, 1:6] = True
    assert (full[1][inside] == 1).all() and (full[0][~inside] == 1).all() and (full[1][~inside] == 0).all()
    np.testing.assert_array_equal(restore_segmentation(probs, props), inside.astype(np.uint8))


def _header_spacings(files: list[Path]) -> np.ndarray:
    return np.array([[float(z) for z in nib.load(str(f)).header.get_zooms()[:3]] for f in files])


def test_preprocess_dataset_api(hippo_preprocessed, hippocampus_dir):
    ds, plan, fp, out = hippo_preprocessed
    for name in ("plan.json", "fingerprint.json", "dataset.json"):
        assert (out / name).is_file()
    assert json.loads((out / "dataset.json").read_text())["labels"] == json.loads(
        (hippocampus_dir / "dataset.json").read_text())["labels"]
    spacings = _header_spacings([hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz" for c in CASES])
    saved = Plan.from_dict(json.loads((out / "plan.json").read_text()))
    np.testing.assert_allclose(saved.target_spacing, np.median(spacings, axis=0), rtol=1e-5)
    assert saved.normalization == ["zscore"] and saved.use_nonzero_mask == [False]
    assert fp["num_cases"] == len(CASES) and set(fp["label_counts"]) == {"0", "1", "2"}
    assert fp["intensity"]["0"]["p005"] < fp["intensity"]["0"]["p995"]

    plan2, cases = load_preprocessed(out)
    assert plan2 == plan and [c.case_id for c in cases] == sorted(CASES)
    from s3d.data.io import read_label

    for case in cases:
        data, seg = case.load()
        assert data.dtype == np.float32 and data.shape == (1, *case.shape) and seg.dtype == np.int16
        resampled = tuple(case.props["shape_after_crop"]) != case.shape
        tol = 0.05 if resampled else 1e-4
        assert abs(float(data.mean())) < tol and abs(float(data.std()) - 1) < tol
        assert set(np.unique(seg).tolist()) <= {0, 1, 2}
        assert sorted(case.class_locations) == [1, 2]
        for lab, locs in case.class_locations.items():
            assert locs.shape == ((seg == lab).sum(), 3) and (seg[tuple(locs.T)] == lab).all()
        ref, _ = read_label(hippocampus_dir / "labelsTr" / f"{case.case_id}.nii.gz")
        back = restore_segmentation(_one_hot(seg, 3), case.props)
        if resampled:
            assert all(_dice(back == c, ref == c) > 0.98 for c in (1, 2))
        else:
            np.testing.assert_array_equal(back, ref)


def test_rerun_skips_and_other_plan_needs_overwrite(hippo_preprocessed):
    ds, plan, fp, out = hippo_preprocessed
    stored = sorted((out / "cases").glob("*.b2nd"))
    stamps = [p.stat().st_mtime_ns for p in stored]
    assert stored and preprocess_dataset(ds, out, plan, jobs=1) == []
    assert [p.stat().st_mtime_ns for p in stored] == stamps
    other = Plan.from_dict({**plan.to_dict(), "target_spacing": [1.5, 1.5, 1.5]})
    with pytest.raises(S3DError, match="different plan"):
        preprocess_dataset(ds, out, other, jobs=1)
    assert load_preprocessed(out)[0] == plan


def test_cli_preprocess_hippocampus(hippo_subset, tmp_path):
    from s3d.cli.preprocess import preprocess

    out = tmp_path / "out"
    res = CliRunner().invoke(preprocess, [str(hippo_subset), str(out), "--spacing", "1", "1", "1", "-j", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "plan.json").is_file() and (out / "fingerprint.json").is_file()
    assert sorted(p.stem for p in (out / "cases").glob("*.b2nd") if not p.stem.endswith("_seg")) == sorted(CASES)
    assert json.loads((out / "plan.json").read_text())["target_spacing"] == [1.0, 1.0, 1.0]
    assert f"{len(CASES)} case(s) preprocessed in" in res.output
    (out / "cases" / f"{CASES[0]}.json").unlink()  # an interrupted case: only it is redone
    res = CliRunner().invoke(preprocess, [str(hippo_subset), str(out), "--spacing", "1", "1", "1", "-j", "1"])
    assert res.exit_code == 0, res.output
    assert f"1 case(s) preprocessed, {len(CASES) - 1} already up to date" in res.output
    res = CliRunner().invoke(preprocess, [str(hippo_subset), str(out), "--spacing", "1", "1", "1", "-j", "1"])
    assert f"nothing to do, {len(CASES)} already up to date" in res.output
    res = CliRunner().invoke(preprocess, [str(hippo_subset), str(tmp_path / "med"), "--spacing", "median"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(preprocess, [str(hippo_subset), str(tmp_path / "bad"), "--spacing", "1", "x", "1"])
    assert res.exit_code == 2 and not (tmp_path / "bad").exists()
    help_text = CliRunner().invoke(preprocess, ["--help"]).output
    assert "mm" in help_text and "--norm" in help_text and "--overwrite" in help_text


def test_cli_unlabeled_anisotropic_volume(unlabeled_dir, tmp_path):
    from s3d.cli.preprocess import preprocess

    src = unlabeled_dir / "tcia_brain_study3_26401.nii.gz"  # 280x320x22 at 0.69 x 0.69 x 6.5 mm, int16
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / src.name).symlink_to(src)
    res = CliRunner().invoke(preprocess, [str(raw), str(tmp_path / "out"), "--spacing", "1", "1", "1", "-j", "1"])
    assert res.exit_code == 0, res.output
    plan, cases = load_preprocessed(tmp_path / "out")
    (case,) = cases
    assert not case.has_seg and case.props["lowres_axis"] == 2
    spacing = np.array(case.props["spacing"])
    expected = tuple(int(round(n * s)) for n, s in zip(case.props["shape_after_crop"], spacing, strict=True))
    assert case.shape == expected
    data, seg = case.load()
    assert seg is None and data.shape == (1, *expected)
    assert abs(float(data.mean())) < 0.05 and abs(float(data.std()) - 1) < 0.05
    # nearest along the 6.5 mm axis: output slices are copies of input slices, about 6.5 in a row
    distinct = 1 + sum(not np.array_equal(data[0, :, :, k], data[0, :, :, k + 1]) for k in range(expected[2] - 1))
    assert distinct == case.props["shape_after_crop"][2]
    probs = np.stack([np.full(case.shape, 0.25, np.float32), np.full(case.shape, 0.75, np.float32)])
    assert restore_segmentation(probs, case.props).shape == tuple(case.props["shape_before_crop"])


def test_cli_broken_dataset_lists_every_problem(hippocampus_dir, tmp_path):
    from s3d.cli.preprocess import preprocess

    raw = _subset(hippocampus_dir, tmp_path / "raw", CASES[:3])
    broken_img = raw / "imagesTr" / f"{CASES[0]}_0000.nii.gz"
    data = (hippocampus_dir / "imagesTr" / broken_img.name).read_bytes()
    broken_img.unlink()
    broken_img.write_bytes(data[: len(data) // 3])  # truncated gzip
    lab_path = raw / "labelsTr" / f"{CASES[1]}.nii.gz"
    lab = nib.load(str(lab_path))
    arr = np.asarray(lab.dataobj).copy()
    arr[0, 0, 0] = 5  # not in dataset.json labels
    lab_path.unlink()
    nib.save(nib.Nifti1Image(arr, lab.affine, lab.header), str(lab_path))
    (raw / "imagesTr" / f"{CASES[2]}_0000.nii.gz").unlink()
    (raw / "labelsTr" / "stray.nii.gz").write_bytes(gzip.compress(b"x"))

    out = tmp_path / "out"
    res = CliRunner().invoke(preprocess, [str(raw), str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith("s3d: error: ") for line in lines)
    text = "\n".join(lines)
    assert broken_img.name in text and lab_path.name in text and "stray.nii.gz" in text
    assert len(lines) >= 4  # one line per problem, plus the summary
    assert not out.exists()
    # the installed `s3d` entry point exits with the same code
    from s3d.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", str(raw), str(out)])
    assert exit_info.value.code == 2 and not out.exists()
    # the Python API raises one exception carrying the same list
    from s3d.data.dataset import find_dataset

    with pytest.raises(DatasetProblems) as e:
        preprocess_dataset(find_dataset(raw), out, Plan((1, 1, 1), ["zscore"], [None], {0: "MRI"}, {}))
    assert len(e.value.problems) == len(lines) - 1 and "\n" not in str(e.value)
    assert not out.exists()


def test_plan_uses_nonzero_mask_when_cropping_shrinks_cases(tmp_path):
    # nnU-Net: z-score inside the nonzero mask when cropping leaves < 3/4 of the median case
    rng = np.random.default_rng(4)
    for i, pad in enumerate((6, 7, 0)):
        img = np.zeros((20, 20, 20), np.int16)
        img[pad:20 - pad, pad:20 - pad, pad:20 - pad] = rng.integers(1, 500, [20 - 2 * pad] * 3)
        nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / f"case{i}.nii.gz"))
    from s3d.data.dataset import find_dataset

    plan, fp = plan_dataset(find_dataset(tmp_path), "median")
    assert fp["median_relative_size_after_cropping"] < MASK_FOR_NORM_RELATIVE_SIZE
    assert plan.use_nonzero_mask == [True] and plan.target_spacing == (1.0, 1.0, 2.0)
    plan, _ = plan_dataset(find_dataset(tmp_path), "median", norm="ct")
    assert plan.use_nonzero_mask == [False] and plan.ct_stats[0]["p005"] >= 1


def test_a_tiny_target_spacing_is_refused_before_resampling(hippocampus_dir, monkeypatch):
    """--spacing 0.001 once ended in a MemoryError traceback (or the OOM killer) halfway through a dataset."""
    from s3d.data.io import read_channels, read_label
    from s3d.data.preprocess import Plan, preprocess_case

    path = hippocampus_dir / "imagesTr" / "hippocampus_033_0000.nii.gz"
    images, geo = read_channels([path])
    seg, _ = read_label(hippocampus_dir / "labelsTr" / "hippocampus_033.nii.gz")
    plan = Plan(target_spacing=(0.01, 0.01, 0.01), normalization=["zscore"], ct_stats=[None],
                channel_names={0: "MRI"}, labels={"background": 0, "a": 1, "b": 2})
    with pytest.raises(S3DError, match=r"hippocampus_033_0000.nii.gz: resampling it to 0.01 x 0.01 x 0.01 mm .*"
                                       r"more than the memory budget"):
        preprocess_case(images, geo, plan, seg)
    # the same case fits once the budget allows it: the check measures, it does not refuse small spacings
    data, _, _ = preprocess_case(images, geo, Plan(**{**plan.__dict__, "target_spacing": (0.5, 0.5, 0.5)}), seg)
    monkeypatch.setenv("S3D_MAX_IMAGE_BYTES", str(data[0].size * 4))  # less than the image and its temporaries
    with pytest.raises(S3DError, match="memory budget"):
        preprocess_case(images, geo, Plan(**{**plan.__dict__, "target_spacing": (0.5, 0.5, 0.5)}), seg)


@pytest.mark.parametrize("spacing", [(0, 1, 1), (float("nan"), 1, 1), (1, 1), (-1, 1, 1)])
def test_a_plan_needs_three_positive_spacings(spacing):
    from s3d.data.preprocess import Plan

    with pytest.raises(S3DError, match="needs three positive, finite numbers of mm"):
        Plan(target_spacing=spacing, normalization=["zscore"], ct_stats=[None], channel_names={0: "MRI"},
             labels={"background": 0})
