"""Patch sampling: shapes, padding, foreground oversampling on a real label, determinism, DDP ranks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from s3d.data.preprocess import case_from_props
from s3d.data.sampling import PatchDataset, crop_patch, sample_patch
from s3d.data.store import write_case


def _store_case(folder, data, seg=None, case_id="case"):
    """A case written through the real store (what PatchDataset reads in training)."""
    locations = None
    if seg is not None:
        locations = {int(v): np.argwhere(seg == v) for v in np.unique(seg) if v != 0}
    props = {"case_id": case_id, "shape": list(data.shape[1:]), "has_seg": seg is not None,
             "num_channels": int(data.shape[0]), "class_location_labels": sorted(locations or {})}
    write_case(folder, case_id, data, props, (16, 16, 16), seg=seg, locations=locations)
    return case_from_props(folder / f"{case_id}.json", props)


def test_crop_patch_pads_outside_the_volume():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    p = crop_patch(a, (-2, 1, 3), (6, 3, 5), fill=-1)
    assert p.shape == (1, 6, 3, 5)
    assert (p[:, :2] == -1).all() and (p[:, :, :, 3:] == -1).all()
    assert np.array_equal(p[0, 2:6, :, :3], a[0, 0:4, 1:4, 3:6])


@pytest.fixture(scope="module")
def real_case(hippocampus_dir, tmp_path_factory):
    img = nib.load(hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz").get_fdata(dtype=np.float32)
    seg = np.asarray(nib.load(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz").dataobj).astype(np.int16)
    case = _store_case(tmp_path_factory.mktemp("store"), ((img - img.mean()) / img.std())[None], seg)
    case.data, case.seg = case.load()
    return case


def test_forced_foreground_patches_contain_foreground(real_case):
    rng = np.random.default_rng(0)
    patch = (16, 16, 16)  # small relative to the volume, so random patches often miss the hippocampus
    for _ in range(50):
        _, lab = sample_patch(real_case.data, real_case.seg, patch, rng, force_fg=True)
        assert (lab > 0).any()
    random_hits = np.mean([(sample_patch(real_case.data, real_case.seg, patch, rng)[1] > 0).any()
                           for _ in range(200)])
    assert random_hits < 1.0


def test_batches_have_exact_shapes_oversampling_and_are_deterministic(real_case):
    ds = PatchDataset([real_case], (48, 64, 48), batch_size=3, seed=5)  # larger than the volume: padded
    b1 = next(iter(ds))
    b2 = next(iter(PatchDataset([real_case], (48, 64, 48), batch_size=3, seed=5)))
    assert b1["image"].shape == (3, 1, 48, 64, 48) and b1["seg"].shape == (3, 1, 48, 64, 48)
    assert str(b1["seg"].dtype) == "torch.int64"
    assert (b1["image"] == b2["image"]).all()
    assert (b1["seg"][-1] > 0).any()  # the last third of the batch is forced to foreground
    other_rank = next(iter(PatchDataset([real_case], (16, 16, 16), batch_size=3, seed=5, rank=1)))
    same_rank = next(iter(PatchDataset([real_case], (16, 16, 16), batch_size=3, seed=5, rank=0)))
    assert not (other_rank["image"] == same_rank["image"]).all()


def test_channels_as_samples_gives_single_channel_unlabeled_batches(tmp_path):
    data = np.stack([np.full((10, 10, 10), c, np.float32) for c in range(3)])
    ds = PatchDataset([_store_case(tmp_path, data)], (8, 8, 8), batch_size=12, channels_as_samples=True,
                      oversample_foreground=0)
    b = next(iter(ds))
    assert b["image"].shape == (12, 1, 8, 8, 8) and "seg" not in b
    assert set(np.unique(b["image"].numpy())) == {0.0, 1.0, 2.0}


def test_valid_mask_marks_the_padding(tmp_path):
    data = np.random.default_rng(0).normal(size=(1, 10, 12, 6)).astype(np.float32)
    ds = PatchDataset([_store_case(tmp_path, data)], (16, 16, 16), batch_size=2, oversample_foreground=0,
                      with_valid_mask=True)
    b = next(iter(ds))
    valid = b["valid"].numpy()
    assert valid.shape == (2, 1, 16, 16, 16) and valid.sum(axis=(1, 2, 3, 4)).tolist() == [10 * 12 * 6] * 2
    assert (b["image"].numpy()[valid == 0] == 0).all()
    assert (b["image"].numpy()[valid == 1] != 0).all()


def test_a_batch_larger_than_the_memory_budget_is_refused_up_front(real_case, monkeypatch):
    from s3d.errors import S3DError

    with pytest.raises(S3DError, match=r"--patch-size 4000 x 4000 x 4000 with --batch-size 2: one batch is about"):
        PatchDataset([real_case], (4000, 4000, 4000), 2)
    monkeypatch.setenv("S3D_MAX_IMAGE_BYTES", str(2 * 32**3 * 8))  # exactly one batch of 32^3, image + label
    PatchDataset([real_case], (32, 32, 32), 2)
    with pytest.raises(S3DError, match="memory budget"):
        PatchDataset([real_case], (32, 32, 32), 3)
