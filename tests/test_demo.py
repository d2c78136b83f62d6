"""`s3d demo` runs the whole pipeline on its synthetic phantom and prints a Dice table."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from s3d.cli import cli
from s3d.demo import make_phantom_dataset


def test_phantom_labels_sit_on_brighter_voxels(tmp_path):
    ds = make_phantom_dataset(tmp_path, num_cases=2)
    img = nib.load(ds / "imagesTr" / "phantom_000_0000.nii.gz").get_fdata()
    seg = np.asarray(nib.load(ds / "labelsTr" / "phantom_000.nii.gz").dataobj)
    assert set(np.unique(seg)) == {0, 1, 2}
    assert img[seg == 1].mean() > img[seg == 2].mean() > img[seg == 0].mean()


def test_demo_prints_a_dice_table(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--steps", "3", "--device", "cpu", "--keep", str(tmp_path / "d")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "[4/4] evaluating" in res.output
    rows = re.findall(r"^(core|rim)\s+([0-9.]+)\s+([0-9.]+)$", res.output, flags=re.M)
    assert [r[0] for r in rows] == ["core", "rim"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])
    preds = sorted((tmp_path / "d" / "predictions").glob("*.nii.gz"))
    assert len(preds) == 4
