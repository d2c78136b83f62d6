"""s3d.data.corpus: listing a pre-training corpus from folders, text files and nnssl pretrain_data.json."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest

from s3d.data.corpus import CorpusImage, find_corpus, split_part
from s3d.errors import S3DError

SAFE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)
    return dst


def _ids(images: list[CorpusImage]) -> list[str]:
    return [im.case_id for im in images]


def _check_ids(images: list[CorpusImage]) -> None:
    ids = _ids(images)
    assert ids == sorted(ids)
    assert len({i.lower() for i in ids}) == len(ids), "ids must be unique also on case-insensitive disks"
    assert all(SAFE_ID.match(i) for i in ids), ids


@pytest.fixture
def bids_tree(unlabeled_dir, tmp_path) -> Path:
    """A BIDS-like folder of real scans: nested sessions, links, and things that must be ignored."""
    root = tmp_path / "bids"
    real = sorted(unlabeled_dir.glob("tcia_brain_study1_*.nii.gz"))
    _link(real[0], root / "sub-01" / "ses-1" / "T1w.nii.gz")
    _link(real[1], root / "sub-01" / "ses-2" / "T1w.nii.gz")
    (root / "sub-02" / "ses-1").mkdir(parents=True)
    shutil.copy(real[2], root / "sub-02" / "ses-1" / "T1w.nii.gz")  # a copy among links
    _link(real[3], root / "sub-02" / "ses 1 (repeat)" / "FLAIR.NII.GZ")
    _link(real[4], root / "top.nii.gz")
    # must all be skipped: hidden file and folder, label folders, non-image files
    _link(real[0], root / ".hidden.nii.gz")
    _link(real[0], root / ".git" / "annex" / "x.nii.gz")
    _link(real[0], root / "sub-01" / "labelsTr" / "seg.nii.gz")
    _link(real[0], root / "labelsTs" / "seg.nii.gz")
    (root / "sub-01" / "ses-1" / "T1w.json").write_text("{}")
    (root / "README").write_text("not an image")
    # a linked folder is searched, a link back up (a cycle) is not followed forever
    extra = tmp_path / "elsewhere"
    _link(unlabeled_dir / "totalseg_mr_3mm.nii.gz", extra / "mr.nii.gz")
    _link(extra, root / "linked")
    _link(root, root / "sub-02" / "loop")
    return root


def test_folder_is_searched_recursively_with_ids_from_relative_paths(bids_tree, monkeypatch):
    images = find_corpus([bids_tree])
    _check_ids(images)
    assert _ids(images) == [
        "linked__mr",
        "sub-01__ses-1__T1w",
        "sub-01__ses-2__T1w",
        "sub-02__ses-1__T1w",
        "sub-02__ses_1_repeat___FLAIR",
        "top",
    ]
    by_id = {im.case_id: im for im in images}
    assert by_id["sub-01__ses-1__T1w"].path == bids_tree / "sub-01" / "ses-1" / "T1w.nii.gz"
    assert all(im.path.is_absolute() and im.path.is_file() for im in images)
    assert all(im.anatomy_mask is None and im.anonymization_mask is None for im in images)
    # the same answer from a relative source path and from another working directory
    monkeypatch.chdir(bids_tree.parent)
    assert find_corpus(["bids"]) == images


def test_nnunet_dataset_gives_only_its_images(hippocampus_dir):
    images = find_corpus([hippocampus_dir])
    _check_ids(images)
    assert len(images) == len(list((hippocampus_dir / "imagesTr").glob("*.nii.gz"))) == 208
    assert all(im.path.parent.name == "imagesTr" for im in images)
    assert images[0].case_id == "imagesTr__hippocampus_001_0000"


def test_nnunet_dataset_inside_a_plain_folder_skips_labels_and_other_folders(hippocampus_dir, tmp_path):
    ds = tmp_path / "corpus" / "Dataset004_Small"
    (ds / "dataset.json").parent.mkdir(parents=True)
    shutil.copy(hippocampus_dir / "dataset.json", ds / "dataset.json")
    img = hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz"
    lab = hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz"
    _link(img, ds / "imagesTr" / "case_001_0000.nii.gz")
    _link(img, ds / "imagesTs" / "case_002_0000.nii.gz")
    _link(lab, ds / "labelsTr" / "case_001.nii.gz")
    _link(lab, ds / "labelsTs" / "case_002.nii.gz")
    _link(lab, ds / "predictions" / "case_002.nii.gz")  # not an nnU-Net image folder
    _link(img, tmp_path / "corpus" / "other" / "scan.nii.gz")
    assert _ids(find_corpus([tmp_path / "corpus"])) == [
        "Dataset004_Small__imagesTr__case_001_0000",
        "Dataset004_Small__imagesTs__case_002_0000",
        "other__scan",
    ]


def test_text_file_of_paths(unlabeled_dir, tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    _link(unlabeled_dir / "monai_prostate_t2.nii.gz", tmp_path / "data" / "prostate" / "t2.nii.gz")
    _link(unlabeled_dir / "monai_prostate_dwi.nii.gz", lists / "dwi.nii.gz")
    lists.mkdir(exist_ok=True)
    (lists / "train.txt").write_text(
        "# pre-training images, one a line\n"
        "\n"
        "../data/prostate/t2.nii.gz\n"
        "   dwi.nii.gz   \r\n"
        f"{unlabeled_dir / 'voxelmorph_brain_t1.nii.gz'}\n"
        "  # an indented comment\n"
        "not/there/yet.nii.gz\n"  # missing files are the preprocessing step's business
    )
    monkeypatch.chdir(tmp_path / "data")  # relative to the text file, not to the working directory
    images = find_corpus([lists / "train.txt"])
    _check_ids(images)
    by_id = {im.case_id: im.path for im in images}
    unl = "__".join(p for p in unlabeled_dir.parts if p != "/")
    assert by_id == {
        "data__prostate__t2": tmp_path / "data" / "prostate" / "t2.nii.gz",
        "dwi": lists / "dwi.nii.gz",
        f"{unl}__voxelmorph_brain_t1": unlabeled_dir / "voxelmorph_brain_t1.nii.gz",
        "not__there__yet": lists / "not" / "there" / "yet.nii.gz",
    }


def _nnssl_json(path: Path, datasets: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"collection_index": 745, "collection_name": "Dataset745_Test",
                                "datasets": datasets}))
    return path


def _image(name: str, path: str, anat=None, anon=None, masks: bool = True) -> dict:
    img = {"name": name, "modality": "T1w", "image_info": {}, "image_path": path}
    img["associated_masks"] = {"anatomy_mask": anat, "anonymization_mask": anon} if masks else None
    return img


def test_nnssl_pretrain_data_json_with_env_paths_and_masks(unlabeled_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("nnssl_raw", str(unlabeled_dir) + "/")  # nnssl strips a trailing slash
    data = {"ds001": {"dataset_index": "ds001", "dataset_info": None, "subjects": {
        "sub-01": {"subject_id": "sub-01", "subject_info": {"age": 26}, "sessions": {
            "ses-1": {"session_id": "ses-1", "session_info": None, "images": [
                _image("sub-01_T1w.nii.gz", "$nnssl_raw/tcia_brain_study1_12.nii.gz",
                       anat="$nnssl_raw/masks/anat_01.nii.gz", anon="masks/anon_01.nii.gz"),
                _image("sub-01_FLAIR.nii.gz", "$nnssl_raw/tcia_brain_study1_34909.nii.gz",
                       anat=None, anon=None),
                _image("sub-01_T2w.nii.gz", "rel/t2.nii.gz", masks=False),
            ]}}}}}}
    images = find_corpus([_nnssl_json(tmp_path / "pp" / "pretrain_data.json", data)])
    _check_ids(images)
    by_id = {im.case_id: im for im in images}
    assert sorted(by_id) == ["ds001__sub-01__ses-1__sub-01_FLAIR", "ds001__sub-01__ses-1__sub-01_T1w",
                             "ds001__sub-01__ses-1__sub-01_T2w"]
    t1 = by_id["ds001__sub-01__ses-1__sub-01_T1w"]
    assert t1.path == unlabeled_dir / "tcia_brain_study1_12.nii.gz"
    assert t1.anatomy_mask == unlabeled_dir / "masks" / "anat_01.nii.gz"
    assert t1.anonymization_mask == tmp_path / "pp" / "masks" / "anon_01.nii.gz"  # relative to the json
    flair = by_id["ds001__sub-01__ses-1__sub-01_FLAIR"]
    assert flair.anatomy_mask is None and flair.anonymization_mask is None
    t2 = by_id["ds001__sub-01__ses-1__sub-01_T2w"]
    assert t2.path == tmp_path / "pp" / "rel" / "t2.nii.gz" and t2.anatomy_mask is None


def test_nnssl_json_errors_name_the_file(tmp_path, monkeypatch, hippocampus_dir):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    unset = _nnssl_json(tmp_path / "a.json", {"d": {"subjects": {"s": {"sessions": {"x": {"images": [
        _image("i.nii.gz", "$NOT_SET_ANYWHERE/i.nii.gz")]}}}}}})
    with pytest.raises(S3DError, match=r"a\.json: environment variable NOT_SET_ANYWHERE .* is not set"):
        find_corpus([unset])
    broken = tmp_path / "broken.json"
    broken.write_text('{"datasets": {')
    with pytest.raises(S3DError, match=r"broken\.json: not valid JSON"):
        find_corpus([broken])
    for i, bad in enumerate([[1, 2], {"datasets": []}, {"datasets": {"d": {"subjects": {"s": {}}}}},
                             {"datasets": {"d": {"subjects": {"s": {"sessions": {"x": {"images": [{}]}}}}}}}]):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(S3DError, match=rf"bad{i}\.json: not an nnssl pretrain_data\.json") as err:
            find_corpus([path])
        assert "\n" not in str(err.value)
    with pytest.raises(S3DError, match="nnU-Net dataset.json"):
        find_corpus([hippocampus_dir / "dataset.json"])


def test_missing_sources_are_errors(tmp_path):
    with pytest.raises(S3DError, match=r"nowhere: not found"):
        find_corpus([tmp_path / "nowhere"])
    with pytest.raises(S3DError, match="no sources"):
        find_corpus([])


def test_same_names_in_different_folders_and_sources_get_unique_stable_ids(unlabeled_dir, tmp_path):
    real = sorted(unlabeled_dir.glob("*.nii.gz"))
    a, b = tmp_path / "site_a", tmp_path / "site_b"
    _link(real[0], a / "sub-01" / "T1w.nii.gz")
    _link(real[1], b / "sub-01" / "T1w.nii.gz")
    _link(real[2], a / "Scan.nii.gz")
    _link(real[3], a / "scan.nii")  # same id as "Scan" on a case-insensitive disk
    (tmp_path / "list.txt").write_text("site_a/sub-01/T1w.nii.gz\nsite_b/sub-01/T1w.nii.gz\n")
    first = find_corpus([a, b])
    _check_ids(first)
    assert len(first) == 4
    ids = _ids(first)
    assert sum(i.startswith("sub-01__T1w-") for i in ids) == 2
    assert sum(i.lower().startswith("scan-") for i in ids) == 2
    # the same ids whatever the order of the sources
    assert find_corpus([b, a]) == first
    # a file listed twice (folder and text file) is one image
    both = find_corpus([tmp_path / "list.txt", a, b])
    assert sorted(im.path for im in both) == sorted(im.path for im in first)
    _check_ids(both)


def test_unsafe_names_become_safe_ids(unlabeled_dir, tmp_path):
    src = unlabeled_dir / "totalseg_mr_3mm.nii.gz"
    (tmp_path / "list.txt").write_text("..hidden-ish.nii.gz\nsüb 01/ß#1 (a).nii.gz\n")
    _link(src, tmp_path / "süb 01" / "ß#1 (a).nii.gz")
    images = find_corpus([tmp_path / "list.txt"])
    _check_ids(images)
    assert _ids(images) == ["hidden-ish", "s_b_01___1_a_"]


def test_single_image_file_source(unlabeled_dir):
    images = find_corpus([unlabeled_dir / "totalseg_mr_3mm.nii.gz"])
    assert images == [CorpusImage("totalseg_mr_3mm", unlabeled_dir / "totalseg_mr_3mm.nii.gz")]


def test_split_part_covers_every_image_once_whatever_the_order(unlabeled_dir, hippocampus_dir):
    images = find_corpus([unlabeled_dir, hippocampus_dir])
    assert len(images) == 230
    shuffled = list(images)
    random.Random(0).shuffle(shuffled)
    for parts in range(1, 6):
        chunks = [split_part(images, k, parts) for k in range(parts)]
        ids = [i for c in chunks for i in _ids(c)]
        assert sorted(ids) == _ids(images), parts  # every image exactly once
        for k in range(parts):
            # another machine that listed the files in another order gets the same part
            assert sorted(_ids(split_part(shuffled, k, parts))) == _ids(chunks[k])
        if parts > 1:
            assert all(len(c) > 0 for c in chunks)  # a hash split, not everything in one part
    for part, parts in [(-1, 3), (3, 3), (0, 0)]:
        with pytest.raises(S3DError, match="--part"):
            split_part(images, part, parts)
