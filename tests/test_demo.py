"""`s3d demo`: the bundled real scans, the held-out split, predictions on the input grid, the summary."""

from __future__ import annotations

import hashlib
import json
import re

import nibabel as nib
import numpy as np
from click.testing import CliRunner

from s3d.assets import demo_dataset
from s3d.cli import cli
from s3d.errors import S3DError


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundled_dataset_is_24_real_labelled_cases():
    ds = demo_dataset()
    meta = json.loads((ds / "dataset.json").read_text())
    images = sorted((ds / "imagesTr").glob("*_0000.nii.gz"))
    labels = sorted((ds / "labelsTr").glob("*.nii.gz"))
    assert len(images) == len(labels) == meta["numTraining"] == 24
    assert [p.name.replace("_0000", "") for p in images] == [p.name for p in labels]
    assert meta["labels"] == {"background": 0, "anterior": 1, "posterior": 2}
    licence = (ds / "LICENSE").read_text()
    assert "CC BY-SA 4.0" in licence and "Vanderbilt" in licence
    for lab in labels[:4]:
        seg = np.asarray(nib.load(lab).dataobj)
        assert set(np.unique(seg)) == {0, 1, 2}


def test_bundled_cases_are_byte_copies_of_the_shared_scans(hippocampus_dir):
    src = hippocampus_dir
    ds = demo_dataset()
    for sub in ("imagesTr", "labelsTr"):
        for f in sorted((ds / sub).glob("*.nii.gz")):
            assert _sha(f) == _sha(src / sub / f.name), f


def test_demo_end_to_end_on_the_bundled_scans(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli, ["demo", "--steps", "2", "--device", "cpu", "-o", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    record = json.loads((out / "demo.json").read_text())
    assert record["status"] == "done"
    train, held = set(record["train_cases"]), set(record["heldout_cases"])
    assert len(train) == 18 and len(held) == 6 and not train & held
    rows = re.findall(r"^(anterior|posterior|mean)\s+([0-9.]+)\s+([0-9.]+)$", res.output, flags=re.M)
    assert [r[0] for r in rows] == ["anterior", "posterior", "mean"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows for v in r[1:])
    summary = json.loads((out / "predictions" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 6
    assert str(out / "predictions") in res.output and str(out / "run") in res.output
    # every prediction is on exactly its input's voxel grid
    for case in held:
        img = nib.load(out / "heldout" / "images" / f"{case}_0000.nii.gz")
        pred = nib.load(out / "predictions" / f"{case}.nii.gz")
        assert pred.shape == img.shape
        np.testing.assert_allclose(pred.affine, img.affine, atol=1e-5)
    assert not (out / "cache").exists()


def test_demo_refuses_a_non_empty_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        res = CliRunner().invoke(cli, ["demo", "--steps", "1", "-o", str(out), *extra])
        # `s3d` (s3d.cli.main) prints an S3DError as one line, exit code 2; CliRunner hands it back
        assert isinstance(res.exception, S3DError), (res.exception, res.output)
        msg = str(res.exception)
        assert str(out) in msg and "\n" not in msg
    assert (out / "precious.txt").read_text() == "x"
