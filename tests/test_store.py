"""The blosc2 store and the loader: patches equal crops of the full array, chunk layout follows the
patch, batch order is a function of (seed, rank, step) whatever the number of workers, resume
continues the same sequence, and a dataset carries no volumes into its workers."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from s3d.data.preprocess import case_from_props, load_preprocessed
from s3d.data.sampling import PatchDataset
from s3d.data.store import (
    CHUNK_TO_PATCH,
    MAX_BLOCK_BYTES,
    MAX_CHUNK_BYTES,
    blosc2_layout,
    open_array,
    read_crop,
    write_array,
    write_case,
)
from s3d.errors import S3DError


@pytest.mark.parametrize("shape,patch", [((1, 300, 280, 200), (160, 160, 160)), ((2, 35, 50, 35), (64, 64, 64)),
                                         ((1, 512, 512, 22), (64, 64, 64)), ((400, 90, 300), (96, 80, 48))])
def test_layout_respects_the_byte_and_patch_bounds(shape, patch):
    chunks, blocks = blosc2_layout(shape, patch, 4)
    lead = len(shape) - 3
    assert chunks[:lead] == blocks[:lead] == (1,) * lead  # one channel readable without the others
    assert np.prod(blocks) * 4 <= MAX_BLOCK_BYTES and np.prod(chunks) * 4 <= MAX_CHUNK_BYTES
    for c, b, n, p in zip(chunks[lead:], blocks[lead:], shape[lead:], patch, strict=True):
        assert 1 <= b <= c <= max(1, min(n, int(CHUNK_TO_PATCH * p)))


@pytest.fixture(scope="module")
def real_volume(unlabeled_dir):
    from s3d.data.io import read_image

    data, _ = read_image(unlabeled_dir / "totalseg_ct_aorta_1p5mm.nii.gz")  # 120x126x164 int16 CT
    return data[None]


def test_crops_of_the_store_equal_crops_of_the_array(real_volume, tmp_path):
    path = tmp_path / "v.b2nd"
    write_array(path, real_volume, (64, 64, 64))
    stored = open_array(path)
    assert stored.shape == real_volume.shape and np.array_equal(stored[...], real_volume)
    rng = np.random.default_rng(0)
    for _ in range(25):
        size = tuple(int(s) for s in rng.integers(8, 90, 3))
        start = tuple(int(s) for s in rng.integers(-40, 170, 3))  # inside, straddling and outside the volume
        expect = np.full((1, *size), -7.0, np.float32)
        for i in range(size[0]):  # brute force, voxel row by voxel row
            x = start[0] + i
            if not 0 <= x < real_volume.shape[1]:
                continue
            for j in range(size[1]):
                y = start[1] + j
                if not 0 <= y < real_volume.shape[2]:
                    continue
                zs = [start[2] + k for k in range(size[2])]
                ok = [k for k, z in enumerate(zs) if 0 <= z < real_volume.shape[3]]
                expect[0, i, j, ok] = real_volume[0, x, y, [zs[k] for k in ok]]
        np.testing.assert_array_equal(read_crop(stored, start, size, fill=-7.0), expect)
        np.testing.assert_array_equal(read_crop(real_volume, start, size, fill=-7.0), expect)


def test_a_damaged_array_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "bad.b2nd"
    bad.write_bytes(b"not a blosc2 file at all")
    with pytest.raises(S3DError, match="bad.b2nd: cannot read preprocessed array") as e:
        open_array(bad)
    assert "\n" not in str(e.value)


def _cases(folder, n: int, shape=(20, 24, 18), lossmask: bool = False):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        data = rng.normal(size=(1, *shape)).astype(np.float32) + i  # each case recognisable by its mean
        mask = (np.indices(shape)[0] < shape[0] // 2).astype(np.uint8) if lossmask else None
        props = {"case_id": f"c{i:03d}", "shape": list(shape), "has_seg": False, "num_channels": 1}
        write_case(folder, f"c{i:03d}", data, props, (16, 16, 16), loss_mask=mask)
        out.append(case_from_props(folder / f"c{i:03d}.json", {**props, "has_loss_mask": lossmask}))
    return out


def _take(iterable, n: int) -> list[dict]:
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_batches_are_a_function_of_seed_rank_and_step_with_any_number_of_workers(tmp_path):
    from s3d.data.loader import make_loader

    cases = _cases(tmp_path, 6)
    cpu = torch.device("cpu")

    def stream(workers: int, start: int = 0, rank: int = 0, seed: int = 3) -> list[dict]:
        ds = PatchDataset(cases, (16, 16, 16), 2, oversample_foreground=0, seed=seed, rank=rank,
                          with_valid_mask=True, start_step=start)
        return _take(make_loader(ds, workers, cpu), 6)

    inline = stream(0)
    two = stream(2)
    for a, b in zip(inline, two, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["valid"], b["valid"])
    # consecutive batches (made by different workers) differ, and so does another rank
    assert not torch.equal(two[0]["image"], two[1]["image"])
    assert not torch.equal(stream(0, rank=1)[0]["image"], inline[0]["image"])
    assert not torch.equal(stream(0, seed=4)[0]["image"], inline[0]["image"])
    # resuming at step 4 continues the very same sequence
    resumed = stream(1, start=4)
    assert torch.equal(resumed[0]["image"], inline[4]["image"]) and torch.equal(resumed[1]["image"], inline[5]["image"])


def test_the_dataset_carries_a_few_bytes_per_case_not_volumes(tmp_path):
    cases = _cases(tmp_path, 40, shape=(40, 40, 40))
    ds = PatchDataset(cases, (16, 16, 16), 2, oversample_foreground=0)
    next(iter(ds))  # opening files must not make the pickled dataset (what a worker receives) grow either
    size = len(pickle.dumps(ds))
    assert size < 60 * len(cases) + 4000, size  # a volume here is 256 kB
    (tmp_path / "more").mkdir()
    more = PatchDataset(_cases(tmp_path / "more", 200, shape=(40, 40, 40)), (16, 16, 16), 2, oversample_foreground=0)
    assert len(pickle.dumps(more)) < 60 * 200 + 4000


def test_loss_mask_zeroes_valid_outside_it(tmp_path):
    cases = _cases(tmp_path, 2, shape=(20, 20, 20), lossmask=True)
    ds = PatchDataset(cases, (20, 20, 20), 4, oversample_foreground=0, with_valid_mask=True)
    valid = next(iter(ds))["valid"].numpy()
    assert valid.shape == (4, 1, 20, 20, 20)
    assert (valid[:, :, 10:] == 0).all() and (valid[:, :, :10] == 1).all()


def test_old_npz_folders_are_refused_or_rebuilt_with_one_line(hippocampus_dir, tmp_path, capsys):
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import plan_dataset, preprocess_dataset

    src = tmp_path / "raw"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    ids = ["hippocampus_001", "hippocampus_003"]
    for c in ids:
        (src / "imagesTr" / f"{c}_0000.nii.gz").symlink_to(hippocampus_dir / "imagesTr" / f"{c}_0000.nii.gz")
        (src / "labelsTr" / f"{c}.nii.gz").symlink_to(hippocampus_dir / "labelsTr" / f"{c}.nii.gz")
    (src / "dataset.json").write_text((hippocampus_dir / "dataset.json").read_text())
    ds = find_dataset(src)
    plan, _ = plan_dataset(ds, spacing=(1, 1, 1))
    old = tmp_path / "old"
    (old / "cases").mkdir(parents=True)
    (old / "plan.json").write_text(json.dumps(plan.to_dict()))
    for c in ids:  # what s3d 0.1 wrote
        np.savez(old / "cases" / f"{c}.npz", data=np.zeros((1, 4, 4, 4), np.float32))
        (old / "cases" / f"{c}.json").write_text(json.dumps({"case_id": c, "shape": [4, 4, 4],
                                                              "plan_digest": plan.digest()}))
    with pytest.raises(S3DError, match=r"older s3d \(\.npz cases\)") as e:
        load_preprocessed(old)
    assert "\n" not in str(e.value)
    written = preprocess_dataset(ds, old, plan)
    assert sorted(written) == ids  # the old cases (same plan digest) were not taken as up to date
    assert "old .npz format" in capsys.readouterr().out
    assert not list((old / "cases").glob("*.npz"))
    _, cases = load_preprocessed(old)
    assert [c.case_id for c in cases] == ids and cases[0].load()[0].shape[1:] == cases[0].shape
