"""Corpus preprocessing on real volumes: bad files skipped with their reason, resumable, parts that
cover every file once, loss masks on the preprocessed grid, and `s3d pretrain` on the store with
DataLoader workers."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from s3d.cli import cli
from s3d.data.corpus import CorpusImage, find_corpus
from s3d.data.corpus_preprocess import corpus_plan, preprocess_corpus
from s3d.data.preprocess import load_preprocessed
from s3d.errors import S3DError

GOOD = ["tcia_brain_study1_13-hcropvolume.nii.gz", "tcia_brain_study2_14-hcropvolume.nii.gz",
        "tcia_brain_study3_11-hcropvolume.nii.gz", "totalseg_mr_3mm.nii.gz"]


@pytest.fixture(scope="module")
def corpus(unlabeled_dir, tmp_path_factory):
    """Four good real volumes in nested folders, and broken copies of real files next to them."""
    root = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(GOOD):
        (root / f"site{i % 2}" / f"sub{i}").mkdir(parents=True)
        shutil.copy(unlabeled_dir / name, root / f"site{i % 2}" / f"sub{i}" / name)
    bad = root / "bad"
    bad.mkdir()
    src = nib.load(unlabeled_dir / GOOD[0])
    raw = gzip.decompress((unlabeled_dir / GOOD[0]).read_bytes())
    (bad / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    (bad / "not_an_image.nii.gz").write_bytes(b"this is a text file, not an image")
    nib.save(nib.Nifti1Image(np.full(src.shape, 7, np.int16), src.affine), bad / "constant.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, :3], src.affine), bad / "scout.nii.gz")
    return root


def test_bad_files_are_skipped_with_their_reason_and_reruns_do_nothing(corpus, tmp_path):
    images = find_corpus([corpus])
    assert len(images) == len(GOOD) + 4
    store = tmp_path / "store"
    report = preprocess_corpus(images, store, jobs=2, patch_size=(32, 32, 32))
    assert report.written == len(GOOD) and len(report.skipped) == 4
    reasons = {r["path"].split("/")[-1]: r["reason"] for r in report.skipped}
    assert "truncated" in reasons["truncated.nii"]
    assert "cannot read" in reasons["not_an_image.nii.gz"]
    assert "constant image" in reasons["constant.nii.gz"]
    assert "scout" in reasons["scout.nii.gz"]
    assert all("\n" not in r for r in reasons.values())
    on_disk = json.loads((store / "report.json").read_text())
    assert {r["reason"] for r in on_disk["skipped"]} == set(reasons.values())
    assert "4 skipped" in report.summary() and str(store / "report.json") in report.summary()
    plan, cases = load_preprocessed(store)
    assert plan.target_spacing == (1.0, 1.0, 1.0) and len(cases) == len(GOOD)
    data, _ = cases[0].load()
    assert abs(float(data.mean())) < 0.05 and abs(float(data.std()) - 1) < 0.05
    stamps = sorted(p.stat().st_mtime_ns for p in (store / "cases").iterdir())
    again = preprocess_corpus(images, store, jobs=1, patch_size=(32, 32, 32))
    assert again.written == 0 and again.up_to_date == len(GOOD) and len(again.skipped) == 4
    assert sorted(p.stat().st_mtime_ns for p in (store / "cases").iterdir()) == stamps  # nothing re-read or rewritten


def test_parts_cover_every_file_once_and_share_one_store(corpus, tmp_path):
    images = find_corpus([corpus])
    store = tmp_path / "store"
    seen: list[str] = []
    for k in range(3):
        r = preprocess_corpus(images, store, jobs=1, part=k, parts=3, patch_size=(32, 32, 32))
        seen += [row["case_id"] for row in r.skipped]
        assert (store / f"report-part-{k}-of-3.json").is_file()
    _, cases = load_preprocessed(store)
    seen += [c.case_id for c in cases]
    assert sorted(seen) == sorted(i.case_id for i in images)
    with pytest.raises(S3DError, match="another plan"):
        preprocess_corpus(images, store, corpus_plan((2.0, 2.0, 2.0)), part=0, parts=3)


def test_anatomy_and_anonymisation_masks_become_the_loss_mask(unlabeled_dir, tmp_path):
    src = unlabeled_dir / "totalseg_mr_3mm.nii.gz"  # 117x91x20 at 3 mm: resampled to 1 mm, cropped first
    img = nib.load(src)
    vol = np.asarray(img.dataobj)
    anatomy = (vol > np.percentile(vol, 40)).astype(np.uint8)
    anon = np.zeros_like(anatomy)
    anon[:, :30] = 1  # a "defaced" band
    nib.save(nib.Nifti1Image(anatomy, img.affine), tmp_path / "anat.nii.gz")
    nib.save(nib.Nifti1Image(anon, img.affine), tmp_path / "anon.nii.gz")
    image = CorpusImage("mr", src, anatomy_mask=tmp_path / "anat.nii.gz", anonymization_mask=tmp_path / "anon.nii.gz")
    report = preprocess_corpus([image], tmp_path / "store", patch_size=(32, 32, 32))
    assert report.written == 1
    _, (case,) = load_preprocessed(tmp_path / "store")
    assert case.has_loss_mask
    stored = np.asarray(case.open()["lossmask"][...])
    assert stored.shape == case.shape and set(np.unique(stored)) == {0, 1}
    # the same mask brought to the preprocessed grid by hand: crop to the bbox, nearest along z, linear in plane
    from s3d.data.preprocess import resample_label

    keep = (anatomy > 0) & (anon == 0)
    (x0, x1), (y0, y1), (z0, z1) = case.props["bbox"]
    ref = resample_label(keep[x0:x1, y0:y1, z0:z1].astype(np.int16), case.props["spacing"], (1, 1, 1),
                         new_shape=case.shape)
    assert np.mean(stored == (np.asarray(ref) > 0)) == 1.0
    # the defaced band (first 30 voxels of axis 1 at 3 mm = 90 mm) never counts
    assert stored[:, : 30 * 3 - y0 * 3 - 2].max() == 0


def test_pretrain_cli_on_a_store_with_workers(corpus, tmp_path):
    store = tmp_path / "store"
    res = CliRunner().invoke(cli, ["preprocess", str(corpus), str(store), "--corpus", "-j", "1",
                                   "--patch-size", "32", "32", "32"])
    assert res.exit_code == 0, res.output
    assert "4 preprocessed" in res.output and "4 skipped" in res.output
    common = [str(store), str(tmp_path / "run"), "--method", "mae", "--arch", "resenc-s", "--patch-size", "32", "32",
              "32", "--device", "cpu", "--workers", "2", "--checkpoint-every", "2"]
    res = CliRunner().invoke(cli, ["pretrain", *common, "--steps", "2"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["num_cases"] == len(GOOD) and cfg["step"] == 2
    assert json.loads((tmp_path / "run" / "skipped_for_patch.json").read_text()) == []
    # 64^3 is larger than the hippocampus crops (35x51x32 at 1 mm) in every axis: they are left out and
    # listed; the 3 mm MR (351x273x60 at 1 mm) is smaller along one axis only and stays
    small = ["pretrain", str(store), str(tmp_path / "run64"), "--arch", "resenc-s", "--patch-size", "64", "64", "64",
             "--device", "cpu", "--workers", "0", "--steps", "1"]
    res = CliRunner().invoke(cli, small)
    assert res.exit_code == 0, res.output
    left_out = json.loads((tmp_path / "run64" / "skipped_for_patch.json").read_text())
    assert sorted(r["case_id"] for r in left_out) == sorted(c.case_id for c in load_preprocessed(store)[1]
                                                             if "hcrop" in c.case_id)
    assert json.loads((tmp_path / "run64" / "config.json").read_text())["data"]["num_cases"] == 1
    # 320^3: the MR is smaller along two axes too
    res = CliRunner().invoke(cli, [*small[:2], str(tmp_path / "run320"), *small[3:6], "320", "320", "320", *small[9:]])
    # (the `s3d` entry point prints an S3DError as one line with exit code 2; CliRunner hands it back)
    assert isinstance(res.exception, S3DError) and "no volume left to pre-train on" in str(res.exception)
