"""The on-the-fly preprocessing cache follows its dataset: an edited, added, broken or removed case is
noticed (by file size and modification time), validated again, and only what changed is redone."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from s3d.data.preprocess import DatasetProblems, load_preprocessed
from s3d.train.cache import preprocessed_folder

IDS = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]


def _dataset(hippocampus_dir, root, ids):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    for c in ids:
        shutil.copy(hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz", root / "imagesTr" / f"{c}_0000.nii.gz")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{c}.nii.gz", root / "labelsTr" / f"{c}.nii.gz")
    ds_json = json.loads((hippocampus_dir / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**ds_json, "numTraining": len(ids)}))
    return root


def _stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "cases").glob("*.b2nd")}


def test_cache_notices_edits_additions_removals_and_broken_files(hippocampus_dir, tmp_path):
    raw = _dataset(hippocampus_dir, tmp_path / "Dataset004", IDS)
    cache = tmp_path / "cache"
    out = preprocessed_folder(raw, (1.0, 1.0, 1.0), require_labels=True, cache_dir=cache)
    assert [c.case_id for c in load_preprocessed(out)[1]] == IDS
    before = _stamps(out)
    assert preprocessed_folder(raw, (1.0, 1.0, 1.0), require_labels=True, cache_dir=cache) == out
    assert _stamps(out) == before  # unchanged dataset: reused as it is

    # edit one case: its image becomes another real image (same grid is not needed: its label follows)
    for src, dst in (("imagesTr/hippocampus_007_0000.nii.gz", "imagesTr/hippocampus_003_0000.nii.gz"),
                     ("labelsTr/hippocampus_007.nii.gz", "labelsTr/hippocampus_003.nii.gz")):
        shutil.copy(hippocampus_dir / src, raw / dst)
        os.utime(raw / dst, ns=(1, 1))  # a modification time the copy cannot have had before
    assert preprocessed_folder(raw, (1.0, 1.0, 1.0), require_labels=True, cache_dir=cache) == out
    after = _stamps(out)
    assert after["hippocampus_003.b2nd"] != before["hippocampus_003.b2nd"]
    assert after["hippocampus_001.b2nd"] == before["hippocampus_001.b2nd"]
    case = {c.case_id: c for c in load_preprocessed(out)[1]}["hippocampus_003"]
    from s3d.data.io import read_label

    ref, _ = read_label(hippocampus_dir / "labelsTr" / "hippocampus_007.nii.gz")
    present = np.bincount(case.load()[1].ravel(), minlength=3) > 0
    assert np.array_equal(present, np.bincount(ref.ravel(), minlength=3) > 0)
    assert case.props["shape_before_crop"] == list(ref.shape)

    # a broken new case is found by the validation that runs again
    (raw / "imagesTr" / "hippocampus_006_0000.nii.gz").write_bytes(b"broken")
    shutil.copy(hippocampus_dir / "labelsTr" / "hippocampus_006.nii.gz", raw / "labelsTr")
    with pytest.raises(DatasetProblems, match="hippocampus_006_0000.nii.gz"):
        preprocessed_folder(raw, (1.0, 1.0, 1.0), require_labels=True, cache_dir=cache)

    # fixed, and one case removed: the cache holds exactly the dataset's cases again
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_006_0000.nii.gz", raw / "imagesTr")
    for p in (raw / "imagesTr" / "hippocampus_001_0000.nii.gz", raw / "labelsTr" / "hippocampus_001.nii.gz"):
        p.unlink()
    assert preprocessed_folder(raw, (1.0, 1.0, 1.0), require_labels=True, cache_dir=cache) == out
    assert [c.case_id for c in load_preprocessed(out)[1]] == ["hippocampus_003", "hippocampus_004", "hippocampus_006"]
    assert not list((out / "cases").glob("hippocampus_001*"))
