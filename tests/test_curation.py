"""s3d.data.curation: broken copies of real scans are skipped with their reason, real scans are kept."""

from __future__ import annotations

import itertools
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from s3d.data.curation import CurationConfig, array_reason, check_file, fov_reason, header_reason
from s3d.data.io import read_header
from s3d.errors import S3DError

# a small real MR crop (35 x 51 x 32, int16, 1 mm) that most broken copies are made from
SMALL = "tcia_brain_study1_13-hcropvolume.nii.gz"
# a real anisotropic clinical series (512 x 512 x 22, 0.43 x 0.43 x 6.5 mm)
BRAIN = "tcia_brain_study1_12.nii.gz"


def _real(unlabeled_dir, name: str = SMALL) -> nib.Nifti1Image:
    img = nib.load(unlabeled_dir / name)
    return nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)


def _save(tmp_path, name: str, data: np.ndarray, like: nib.Nifti1Image, zooms=None):
    """`data` saved with the header and orientation of the real image `like` (spacing `zooms` if given)."""
    hdr = like.header.copy()
    hdr.set_data_dtype(data.dtype)
    affine = like.affine.copy()
    if zooms is not None:  # same axis directions, other voxel sizes
        affine[:3, :3] = affine[:3, :3] / np.sqrt((affine[:3, :3] ** 2).sum(0)) * np.asarray(zooms)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine, hdr), path)
    return path


# ------------------------------------------------------------------------------------------ real files
def test_every_real_unlabeled_volume_passes_with_the_defaults(unlabeled_dir):
    files = sorted(unlabeled_dir.glob("*.nii.gz"))
    assert len(files) == 22
    for f in files:
        reason, data, geometry = check_file(f)
        assert reason is None, f"{f.name}: {reason}"
        assert data.dtype == np.float32 and data.shape == tuple(geometry.shape)


def test_real_hippocampus_and_edge_case_images_pass(hippocampus_dir, edge_cases_dir):
    names = ["hippocampus_001_0000.nii.gz",  # one of the uint8 re-saves
             "hippocampus_243_0000.nii.gz",  # the smallest case: 34 x 53 x 24 voxels
             "hippocampus_003_0000.nii.gz"]  # float32 as published
    files = [hippocampus_dir / "imagesTr" / n for n in names]
    files += [edge_cases_dir / "bigendian_int16_anatomical.nii", edge_cases_dir / "reoriented_anat_moved.nii"]
    for f in files:
        reason, data, _ = check_file(f)
        assert reason is None, f"{f.name}: {reason}"
        assert data is not None and np.isfinite(data).all()


def test_real_6p5mm_series_is_kept_although_its_header_says_6p5000033(unlabeled_dir):
    h = read_header(unlabeled_dir / BRAIN)
    assert h.spacing[2] > 6.5  # float32 round-off in the real header
    assert header_reason(unlabeled_dir / BRAIN) is None
    # a stricter user setting still bites
    assert "coarser than max_spacing 6 mm" in header_reason(unlabeled_dir / BRAIN, CurationConfig(max_spacing=6))


# ------------------------------------------------------------------------------------------ broken copies
def test_truncated_uncompressed_nii_is_caught_from_its_header(unlabeled_dir, tmp_path):
    whole = tmp_path / "whole.nii"
    nib.save(_real(unlabeled_dir), whole)
    assert header_reason(whole) is None and not read_header(whole).truncated
    cut = tmp_path / "cut.nii"
    raw = whole.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    h = read_header(cut)
    assert h.truncated and not h.compressed and h.file_bytes == len(raw) // 2
    assert h.data_offset + h.data_bytes == len(raw)
    reason = header_reason(cut)
    assert reason.startswith("truncated:") and str(len(raw)) in reason, reason
    reason, data, geometry = check_file(cut)
    assert reason.startswith("truncated") and data is None and geometry is None


def test_truncated_nii_gz_is_caught_by_the_reader(unlabeled_dir, tmp_path):
    raw = (unlabeled_dir / SMALL).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    assert read_header(cut).compressed
    assert header_reason(cut) is None  # the gzip stream starts fine: only reading the voxels fails
    reason, data, _ = check_file(cut)
    assert "cannot read image" in reason and "cut.nii.gz" in reason and "\n" not in reason
    assert data is None


@pytest.mark.parametrize("name", ["notes.nii.gz", "notes.nii", "notes.mha", "notes.nrrd"])
def test_a_text_file_with_an_image_suffix_is_unreadable(tmp_path, name):
    path = tmp_path / name
    path.write_text("patient list\nnot an image\n" * 20)
    reason = header_reason(path)
    assert "cannot read image header" in reason and name in reason and "\n" not in reason
    assert check_file(path)[0] == reason
    with pytest.raises(S3DError, match="cannot read image header"):
        read_header(path)


def test_2d_slice_is_skipped(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir)
    path = _save(tmp_path, "slice.nii.gz", np.asarray(img.dataobj)[:, :, 10], img)
    assert read_header(path).spatial_shape is None
    assert header_reason(path).startswith("2-D image (shape (35, 51))")


def test_4d_with_two_frames_is_skipped_but_one_frame_is_a_volume(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir)
    vol = np.asarray(img.dataobj)
    two = _save(tmp_path, "two.nii.gz", np.stack([vol, vol], axis=-1), img)
    assert "4-D image with 2 volumes" in header_reason(two)
    one = _save(tmp_path, "one.nii.gz", vol[..., None], img)
    assert read_header(one).spatial_shape == vol.shape
    assert check_file(one)[0] is None


def test_rgb_and_complex_images_are_skipped(unlabeled_dir, tmp_path):
    vol = np.asarray(_real(unlabeled_dir).dataobj).astype(np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([vol.T] * 3, axis=-1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    assert read_header(tmp_path / "rgb.mha").components == 3
    assert header_reason(tmp_path / "rgb.mha").startswith("3 components per voxel")
    img = _real(unlabeled_dir)
    cplx = _save(tmp_path, "complex.nii.gz", np.asarray(img.dataobj).astype(np.complex64) * (1 + 1j), img)
    assert "complex voxels" in header_reason(cplx)
    assert "complex voxels" in array_reason(np.ones((4, 4, 4), np.complex64))


def test_constant_and_nan_images_are_skipped(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir)
    vol = np.asarray(img.dataobj)
    const = _save(tmp_path, "empty.nii.gz", np.full_like(vol, 7), img)
    assert header_reason(const) is None
    reason, data, _ = check_file(const)
    assert reason == "constant image (all voxels = 7)" and data is None
    bad = vol.astype(np.float32)
    bad[3, 4, 5] = bad[0, 0, 0] = np.nan
    bad[10, 10, 10] = np.inf
    nan = _save(tmp_path, "nan.nii.gz", bad, img)
    reason, data, _ = check_file(nan)
    # read_image itself refuses NaN/inf (every command does); the reason is its one line
    assert f"3 NaN/inf voxels (of {vol.size})" in reason and "\n" not in reason and data is None


def test_localizer_like_volume_is_skipped(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir, BRAIN)
    loc = _save(tmp_path, "scout.nii.gz", np.asarray(img.dataobj)[:, :, 9:12], img)
    assert header_reason(loc) == "localizer/scout-like: only 3 slices along axis 2 (shape (512, 512, 3))"
    assert header_reason(loc, CurationConfig(min_slices=3)) is None


def test_spacing_coarser_than_the_threshold_is_skipped(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir, "totalseg_mr_3mm.nii.gz")
    coarse = _save(tmp_path, "coarse.nii.gz", np.asarray(img.dataobj), img, zooms=(3.0, 3.0, 8.0))
    assert read_header(coarse).spacing == pytest.approx((3.0, 3.0, 8.0))
    reason = header_reason(coarse)
    assert reason.startswith("spacing 8 mm along axis 2 is coarser than max_spacing 6.5 mm"), reason
    assert header_reason(coarse, CurationConfig(max_spacing=8.0)) is None


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_zero_or_nan_spacing_is_skipped(unlabeled_dir, tmp_path, bad):
    img = _real(unlabeled_dir)
    hdr = img.header
    hdr.set_sform(img.affine, code=1)  # nibabel takes the geometry from srow_* when sform_code > 0
    hdr["srow_y"][:3] = [bad, bad, bad]  # broken export: no extent (or NaN) along world y
    hdr.set_data_offset(352)
    path = tmp_path / "flat.nii"
    with open(path, "wb") as f:  # the header bytes as they are: nib.save would refit them
        hdr.write_to(f)
        f.write(b"\0" * 4)  # empty extension block
        f.write(np.asarray(img.dataobj).astype(hdr.get_data_dtype()).tobytes(order="F"))
    assert header_reason(path).startswith("voxel spacing (")
    assert "is not positive and finite" in header_reason(path)


def test_too_few_voxels_is_skipped(unlabeled_dir, tmp_path):
    img = _real(unlabeled_dir)
    tiny = _save(tmp_path, "tiny.nii.gz", np.asarray(img.dataobj)[:20, :20, :10], img)
    assert header_reason(tiny) == "only 4000 voxels (shape (20, 20, 10)), fewer than min_voxels 4096"
    assert header_reason(tiny, CurationConfig(min_voxels=4000)) is None


def test_itk_formats_truncated_and_compressed(unlabeled_dir, tmp_path):
    vol = np.asarray(_real(unlabeled_dir).dataobj)
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.T))
    for name, compress in [("raw.mha", False), ("zip.mha", True), ("raw.nrrd", False), ("zip.nrrd", True),
                           ("meta.mhd", False), ("zmeta.mhd", True), ("detached.nhdr", False)]:
        path = tmp_path / name
        sitk.WriteImage(img, str(path), compress)
        h = read_header(path)
        assert h.shape == vol.shape and h.compressed == compress and not h.truncated, name
        assert check_file(path)[0] is None, name
    # the voxels of an uncompressed MetaImage / detached NRRD cut short: the header says more
    for header_file, data_file in [("raw.mha", "raw.mha"), ("meta.mhd", "meta.raw"), ("raw.nrrd", "raw.nrrd"),
                                   ("detached.nhdr", "detached.raw")]:
        blob = (tmp_path / data_file).read_bytes()
        (tmp_path / data_file).write_bytes(blob[:-1000])
        assert header_reason(tmp_path / header_file).startswith("truncated"), header_file
    # a header whose voxel file is gone: our check or ITK's own, one line naming the header file
    for header_file, data_file in [("meta.mhd", "meta.raw"), ("detached.nhdr", "detached.raw")]:
        (tmp_path / data_file).unlink()
        reason = header_reason(tmp_path / header_file)
        assert header_file in reason and "\n" not in reason, reason


def test_check_file_never_raises_for_bad_paths(tmp_path):
    assert check_file(tmp_path / "missing.nii.gz") == (f"{tmp_path / 'missing.nii.gz'}: file not found", None, None)
    assert "is a folder" in check_file(tmp_path)[0]


def test_uncompressed_copy_of_a_real_file_keeps_its_voxels(unlabeled_dir, tmp_path):
    shutil.copy(unlabeled_dir / SMALL, tmp_path / SMALL)
    a = check_file(tmp_path / SMALL)[1]
    b = np.asarray(nib.load(unlabeled_dir / SMALL).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ config
def test_config_round_trips_and_rejects_typos_and_bad_values():
    cfg = CurationConfig(min_slices=5, min_voxels=100, max_spacing=8.0, min_fov_fraction=0.5)
    assert CurationConfig.from_dict(cfg.to_dict()) == cfg
    assert CurationConfig.from_dict({}) == CurationConfig()
    assert CurationConfig().to_dict() == {"min_slices": 8, "min_voxels": 4096, "max_spacing": 6.5,
                                          "min_fov_fraction": 1.0}
    with pytest.raises(S3DError, match="unknown setting.*max_spacng"):
        CurationConfig.from_dict({"max_spacng": 3})
    for bad in [{"min_slices": 0}, {"max_spacing": -1.0}, {"min_voxels": -5}, {"min_fov_fraction": float("nan")}]:
        with pytest.raises(S3DError, match="curation"):
            CurationConfig(**bad)


def test_array_reason_on_plain_arrays():
    assert array_reason(np.zeros((0, 3, 3))) == "no voxels"
    assert array_reason(np.full((4, 4, 4), -3, np.int16)) == "constant image (all voxels = -3)"
    assert array_reason(np.arange(64, dtype=np.int16).reshape(4, 4, 4)) is None
    x = np.zeros((5, 5, 5), np.float64)
    x[0, 0, 0] = 1.0
    assert array_reason(x) is None
    x[1, 1, 1] = -np.inf
    assert array_reason(x) == "1 NaN/inf voxels (of 125)"


# ------------------------------------------------------------------------------------------ fov
def test_fov_reason_brute_force():
    patch = (4, 6, 8)
    for shape in itertools.product(range(0, 10, 1), range(0, 13, 2), range(0, 17, 3)):
        for frac, min_axes in itertools.product([0.0, 0.5, 1.0, 1.25], [1, 2, 3]):
            small = [a for a in range(3) if shape[a] * 1.0 < frac * patch[a]]
            reason = fov_reason(shape, patch, frac, min_axes)
            if len(small) >= min_axes:
                assert reason is not None and f"along axes {tuple(small)}" in reason, (shape, frac, min_axes)
            else:
                assert reason is None, (shape, frac, min_axes, reason)


def test_fov_reason_defaults_and_errors():
    assert fov_reason((35, 51, 32), (160, 160, 160)) is not None  # a hippocampus crop is mostly padding
    assert fov_reason((220, 220, 143), (160, 160, 160)) is None  # a 6.5 mm brain series at 1 mm: one thin axis
    assert fov_reason((160, 159, 159), (160, 160, 160)) is not None
    assert fov_reason((35, 51, 32), (160, 160, 160), 0.0) is None  # 0 disables
    with pytest.raises(ValueError):
        fov_reason((1, 2), (1, 2, 3))
    with pytest.raises(ValueError):
        fov_reason((1, 2, 3), (1, 2, 3), min_axes=0)


# ------------------------------------------------------------------ sizes on the grid after resampling


def test_every_real_volume_keeps_enough_voxels_after_resampling_to_1mm(unlabeled_dir, hippocampus_dir, edge_cases_dir):
    from s3d.data.corpus_preprocess import CORPUS_SPACING

    files = sorted(unlabeled_dir.glob("*.nii.gz")) + sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:20]
    files += [edge_cases_dir / "bigendian_int16_anatomical.nii", edge_cases_dir / "reoriented_anat_moved.nii"]
    for f in files:
        assert header_reason(f, target_spacing=CORPUS_SPACING) is None, f.name


@pytest.mark.parametrize("zoom,reason", [
    (1e-6, "only 1 slices along axis 0 after resampling to (1, 1, 1) mm (shape (35, 51, 32) at spacing "
           "(1e-06, 1e-06, 1e-06) mm -> (1, 1, 1)), fewer than min_slices 8"),
    (0.3, "only 1650 voxels after resampling to (1, 1, 1) mm (shape (35, 51, 32) at spacing (0.3, 0.3, 0.3) mm "
          "-> (11, 15, 10)), fewer than min_voxels 4096"),
])
def test_a_volume_that_resampling_shrinks_below_the_limits_is_skipped(unlabeled_dir, tmp_path, zoom, reason):
    img = _real(unlabeled_dir)
    tiny = _save(tmp_path, "tiny.nii.gz", np.asarray(img.dataobj), img, zooms=(zoom,) * 3)
    assert header_reason(tiny) is None  # its own grid is a normal 35 x 51 x 32 volume
    assert header_reason(tiny, target_spacing=(1.0, 1.0, 1.0)) == reason
    assert header_reason(tiny, target_spacing=(zoom,) * 3) is None


def test_the_corpus_judges_the_resampled_grid_before_reading_voxels(unlabeled_dir, tmp_path, monkeypatch):
    import s3d.data.curation as curation
    from s3d.data.corpus import CorpusImage
    from s3d.data.corpus_preprocess import preprocess_corpus

    img = _real(unlabeled_dir)
    tiny = _save(tmp_path, "tiny.nii.gz", np.asarray(img.dataobj), img, zooms=(1e-6,) * 3)

    def no_voxels(path):
        raise AssertionError(f"{path}: voxels read although the header decides")

    monkeypatch.setattr(curation, "read_image", no_voxels)
    report = preprocess_corpus([CorpusImage("tiny", tiny)], tmp_path / "store", patch_size=(32, 32, 32))
    assert report.written == 0 and len(report.skipped) == 1
    assert report.skipped[0]["reason"].startswith("only 1 slices along axis 0 after resampling to (1, 1, 1) mm")
    assert not list((tmp_path / "store" / "cases").glob("tiny.b2nd"))
