"""s3d.data.dataset: discovering nnU-Net raw datasets / image folders and reporting every problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from s3d.data.dataset import find_dataset, find_images, validate
from s3d.errors import S3DError

HIPPO_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
              "numTraining": 9, "file_ending": ".nii.gz"}


def test_real_hippocampus_is_valid(hippocampus_dir):
    ds = find_dataset(hippocampus_dir)
    assert ds.kind == "nnunet" and len(ds.cases) == 208
    assert ds.labels == {"background": 0, "anterior": 1, "posterior": 2}
    assert ds.channel_names == {0: "MRI"} and ds.file_ending == ".nii.gz"
    assert all(len(c.images) == 1 and c.images[0].is_file() and c.label is not None for c in ds.cases)
    assert ds.cases[0].images[0].name == f"{ds.cases[0].case_id}_0000.nii.gz"
    assert validate(ds) == []


def _save_like(arr: np.ndarray, ref: nib.Nifti1Image, path: Path, affine: np.ndarray | None = None) -> None:
    hdr = ref.header.copy()
    hdr.set_data_dtype(arr.dtype)
    nib.save(nib.Nifti1Image(arr, ref.affine if affine is None else affine, hdr), path)


def _expect_exactly(problems: list[str], expected: list[tuple[Path, str]]) -> None:
    """Every expected (file, keyword) reported on exactly one line that starts with the file; nothing else."""
    for path, word in expected:
        hits = [p for p in problems if p.startswith(f"{path}:") and word in p]
        assert len(hits) == 1, (path.name, word, problems)
    assert len(problems) == len(expected), "\n".join(problems)


def test_broken_copy_reports_every_problem_once(hippocampus_dir, tmp_path):
    src_images = sorted((hippocampus_dir / "imagesTr").glob("*_0000.nii.gz"))[:9]
    root = tmp_path / "Dataset999_Broken"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(HIPPO_JSON))
    ids = []
    for img in src_images:
        cid = img.name[: -len("_0000.nii.gz")]
        ids.append(cid)
        shutil.copy(img, root / "imagesTr" / img.name)
        shutil.copy(hippocampus_dir / "labelsTr" / f"{cid}.nii.gz", root / "labelsTr" / f"{cid}.nii.gz")
    image = [root / "imagesTr" / f"{c}_0000.nii.gz" for c in ids]
    label = [root / "labelsTr" / f"{c}.nii.gz" for c in ids]

    lab0 = nib.load(label[0])
    arr = np.asanyarray(lab0.dataobj).copy()
    arr[0, 0, 0] = 7
    _save_like(arr, lab0, label[0])

    img1 = nib.load(image[1])
    arr = img1.get_fdata(dtype=np.float32)
    arr[3, 4, 5] = np.nan
    _save_like(arr, img1, image[1])

    label[2].unlink()

    data = image[3].read_bytes()
    image[3].write_bytes(data[: len(data) // 2])

    lab4 = nib.load(label[4])
    _save_like(np.asanyarray(lab4.dataobj)[:, :, :-1].copy(), lab4, label[4])

    img5 = nib.load(image[5])
    arr = img5.get_fdata(dtype=np.float32)
    _save_like(np.stack([arr, arr], axis=-1), img5, image[5])

    lab6 = nib.load(label[6])
    arr = np.asanyarray(lab6.dataobj).astype(np.float32)
    arr[1, 1, 1] = 0.5
    _save_like(arr, lab6, label[6])

    lab7 = nib.load(label[7])
    moved = lab7.affine.copy()
    moved[:3, 3] += 10.0
    _save_like(np.asanyarray(lab7.dataobj).copy(), lab7, label[7], affine=moved)

    ghost = root / "labelsTr" / "ghost_999.nii.gz"
    shutil.copy(hippocampus_dir / "labelsTr" / f"{ids[8]}.nii.gz", ghost)
    stray = root / "imagesTr" / "notes.nii.gz"
    shutil.copy(image[8], stray)
    extra_channel = root / "imagesTr" / f"{ids[8]}_0001.nii.gz"
    shutil.copy(image[8], extra_channel)

    ds = find_dataset(root)
    assert [c.case_id for c in ds.cases] == ids
    assert ds.cases[2].label is None
    expected = [
        (label[0], "7"),
        (image[1], "NaN"),
        (image[2], "without label"),
        (image[3], "truncated"),
        (label[4], "shape"),
        (image[5], "4-D"),
        (label[6], "non-integer"),
        (label[7], "origin"),
        (ghost, "without image"),
        (stray, "channel number"),
        (extra_channel, "channel 1"),
    ]
    problems = validate(ds)
    _expect_exactly(problems, expected)
    # the process pool finds the same, in the same order
    assert validate(ds, jobs=2) == problems


def test_missing_channel_and_spacing_mismatch(hippocampus_dir, tmp_path):
    root = tmp_path / "Dataset998_TwoChannels"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = dict(HIPPO_JSON, channel_names={"0": "T1", "1": "T2"})
    (root / "dataset.json").write_text(json.dumps(meta))
    ids = ["hippocampus_001", "hippocampus_003"]
    for cid in ids:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{cid}_0000.nii.gz", root / "imagesTr" / f"{cid}_0000.nii.gz")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{cid}.nii.gz", root / "labelsTr" / f"{cid}.nii.gz")
    # case 1: second channel on a 1.2 mm grid; case 2: no second channel, label on a 1.5 mm grid
    c0 = nib.load(root / "imagesTr" / f"{ids[0]}_0000.nii.gz")
    _save_like(c0.get_fdata(dtype=np.float32), c0, root / "imagesTr" / f"{ids[0]}_0001.nii.gz",
               affine=c0.affine @ np.diag([1.2, 1.2, 1.2, 1.0]))
    lab = nib.load(root / "labelsTr" / f"{ids[1]}.nii.gz")
    _save_like(np.asanyarray(lab.dataobj).copy(), lab, root / "labelsTr" / f"{ids[1]}.nii.gz",
               affine=lab.affine @ np.diag([1.5, 1.5, 1.5, 1.0]))

    ds = find_dataset(root)
    assert [len(c.images) for c in ds.cases] == [2, 2]
    _expect_exactly(validate(ds), [
        (root / "imagesTr" / f"{ids[0]}_0001.nii.gz", "spacing"),
        (root / "imagesTr" / f"{ids[1]}_0001.nii.gz", "missing channel"),
        (root / "labelsTr" / f"{ids[1]}.nii.gz", "spacing"),
    ])


def test_unlabeled_folder(unlabeled_dir):
    ds = find_dataset(unlabeled_dir)
    assert ds.kind == "folder" and len(ds.cases) == 22
    assert ds.channel_names == {0: "image"} and ds.labels == {}
    assert all(len(c.images) == 1 and c.label is None for c in ds.cases)
    assert len({c.case_id for c in ds.cases}) == 22
    assert "voxelmorph_brain_t1" in {c.case_id for c in ds.cases}


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_find_images_grouping(tmp_path):
    grouped = tmp_path / "grouped"
    _touch(grouped, "b_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "a_0001.nii.gz", ".hidden_0000.nii.gz",
           "notes.txt")
    cases = find_images(grouped, num_channels=2)
    assert [c.case_id for c in cases] == ["a", "b"]
    assert [[p.name for p in c.images] for c in cases] == [["a_0000.nii.gz", "a_0001.nii.gz"],
                                                           ["b_0000.nii.gz", "b_0001.nii.gz"]]
    with pytest.raises(S3DError, match="case a has 2 channel file"):
        find_images(grouped, num_channels=1)

    gap = tmp_path / "gap"
    _touch(gap, "a_0000.nii.gz", "a_0002.nii.gz", "b_0000.nii.gz")
    with pytest.raises(S3DError, match="case a lacks channel file.*_0001"):
        find_images(gap)

    plain = tmp_path / "plain"
    _touch(plain, "scan.nii.gz", "other.nrrd", "third.mha")
    assert [(c.case_id, len(c.images)) for c in find_images(plain)] == [("other", 1), ("scan", 1), ("third", 1)]
    with pytest.raises(S3DError, match="needs 2 channels"):
        find_images(plain, num_channels=2)

    # _XXXX numbers without a _0000 are part of the name, not channels
    numbered = tmp_path / "numbered"
    _touch(numbered, "patient_0001.nii.gz", "patient_0002.nii.gz")
    assert [c.case_id for c in find_images(numbered, num_channels=1)] == ["patient_0001", "patient_0002"]

    single = tmp_path / "single"
    _touch(single, "x_0000.nii.gz", "y_0000.nii")
    assert [(c.case_id, c.images[0].name) for c in find_images(single, 1)] == [("x", "x_0000.nii.gz"),
                                                                              ("y", "y_0000.nii")]


def test_find_dataset_errors(tmp_path):
    with pytest.raises(S3DError, match="not found"):
        find_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S3DError, match="no images"):
        find_dataset(tmp_path / "empty")

    root = tmp_path / "regions"
    _touch(root / "imagesTr", "c_0000.nii.gz")
    with pytest.raises(S3DError, match="dataset.json"):
        find_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "whole": [1, 2], "core": 2}}))
    with pytest.raises(S3DError, match="region") as err:
        find_dataset(root)
    assert "dataset.json" in str(err.value) and "whole" in str(err.value)

    # nnU-Net v1 / Decathlon layout of the same information is understood
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background",
                                                                                        "1": "liver"}}))
    ds = find_dataset(root)
    assert ds.labels == {"background": 0, "liver": 1} and ds.channel_names == {0: "CT"}
    assert [c.case_id for c in ds.cases] == ["c"] and ds.cases[0].label is None

    (root / "dataset.json").write_text("{not json")
    with pytest.raises(S3DError, match="dataset.json"):
        find_dataset(root)


def test_test_split(tmp_path):
    root = tmp_path / "ds"
    _touch(root / "imagesTr", "a_0000.nii.gz")
    _touch(root / "imagesTs", "t1_0000.nii.gz", "t2_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps(HIPPO_JSON))
    ds = find_dataset(root, split="Ts")
    assert [c.case_id for c in ds.cases] == ["t1", "t2"]
    assert all(c.label is None for c in ds.cases) and ds.split == "Ts"


def test_label_values_with_a_gap_are_one_line_before_anything_is_allocated(hippocampus_dir, tmp_path):
    root = tmp_path / "Dataset_Gap"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz", root / "imagesTr")
    shutil.copy(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz", root / "labelsTr")
    (root / "dataset.json").write_text(json.dumps({**HIPPO_JSON, "labels": {"background": 0, "anterior": 1,
                                                                          "posterior": 60000}}))
    with pytest.raises(S3DError, match=r"label values must be consecutive 0, 1, 2, \.\.\. .*got 0, 1, 60000") as e:
        find_dataset(root)
    assert "\n" not in str(e.value) and "dataset.json" in str(e.value)
