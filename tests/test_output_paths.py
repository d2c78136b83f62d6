"""One shared check of every output path, before any work starts: a parent that is a file, an output
that is (or is inside) the input, all refused in one line with nothing written."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from s3d.cli import cli
from s3d.errors import S3DError
from s3d.files import prepare_output_dir


def _run(args):
    res = CliRunner().invoke(cli, args)
    # `s3d` (s3d.cli.main) prints an S3DError as one line with exit code 2; CliRunner hands it back
    assert isinstance(res.exception, S3DError), (res.exception, res.output)
    msg = str(res.exception)
    assert "\n" not in msg
    return msg


@pytest.fixture()
def dataset(hippocampus_dir, tmp_path):
    root = tmp_path / "Dataset004_Two"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in ("hippocampus_001", "hippocampus_003"):
        shutil.copy(hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz", root / "imagesTr")
        shutil.copy(hippocampus_dir / "labelsTr" / f"{c}.nii.gz", root / "labelsTr")
    shutil.copy(hippocampus_dir / "dataset.json", root / "dataset.json")
    return root


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_outputs_under_a_file_are_refused_before_any_work(dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = blocker / "sub" / "out"
    (tmp_path / "run").mkdir()  # an (empty) run folder: the output is checked before the run is read
    before = _tree(tmp_path)
    msgs = [
        _run(["predict", "-i", str(dataset / "imagesTr"), "-o", str(out), "-m", str(tmp_path / "no_model")]),
        _run(["evaluate", str(dataset / "labelsTr"), str(dataset / "labelsTr"), "-o", str(out / "s.json")]),
        _run(["finetune", str(dataset), str(out), "--steps", "1", "--device", "cpu"]),
        _run(["weights", "export", str(tmp_path / "run"), str(out)]),
        _run(["pretrain", str(dataset / "imagesTr"), str(out), "--steps", "1", "--device", "cpu"]),
    ]
    for msg in msgs:
        assert f"{blocker} is a file" in msg, msg
    assert _tree(tmp_path) == before and blocker.read_text() == "keep me"


def test_finetune_refuses_to_write_into_its_dataset(dataset):
    before = _tree(dataset)
    assert "must not be the input" in _run(["finetune", str(dataset), str(dataset), "--steps", "1"])
    assert "or inside it" in _run(["finetune", str(dataset), str(dataset / "runs" / "x"), "--steps", "1"])
    assert _tree(dataset) == before


def test_a_writable_new_folder_is_created(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b", inputs=(tmp_path / "in",))
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe leaves nothing behind
