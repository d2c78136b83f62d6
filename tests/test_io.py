"""s3d.data.io: reading any supported format into (i, j, k) + RAS affine, and writing on the exact grid."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from s3d.data.io import Geometry, atomic_path, read_channels, read_image, read_label, write_image, write_segmentation
from s3d.errors import S3DError

EDGE_PAIRS = [
    ("bigendian_int16_anatomical.nii", "bigendian_int16_anatomical_label.nii.gz"),
    ("reoriented_anat_moved.nii", "reoriented_anat_moved_label.nii.gz"),
]


def _raw_header(path) -> nib.Nifti1Header:
    """The header bytes as stored (nibabel's loaded image header resets scl_slope/vox_offset)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(f)


def _one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert name in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("image_name,label_name", EDGE_PAIRS)
def test_edge_case_segmentation_lands_on_the_image_grid(edge_cases_dir, tmp_path, image_name, label_name, ext):
    image_path, label_path = edge_cases_dir / image_name, edge_cases_dir / label_name
    ref = nib.load(image_path)
    image, geo = read_image(image_path)
    # nibabel's own scaled float read is the reference for the big-endian / float data
    assert image.dtype == np.float32 and image.flags.c_contiguous
    np.testing.assert_array_equal(image, ref.get_fdata(dtype=np.float32))
    assert geo.shape == ref.shape
    np.testing.assert_allclose(geo.spacing, ref.header.get_zooms()[:3], rtol=1e-6)

    label, _ = read_label(label_path)
    assert np.issubdtype(label.dtype, np.integer)
    # the predict path stores Geometry as JSON between preprocessing and writing
    geo = Geometry.from_dict(json.loads(json.dumps(geo.to_dict())))
    out = tmp_path / f"seg{ext}"
    write_segmentation(label, geo, out)

    back = nib.load(out)
    assert back.shape == ref.shape
    assert np.array_equal(back.affine, ref.affine)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(nib.load(label_path).dataobj))
    assert back.get_data_dtype() == np.uint8
    assert back.header.endianness == "<"
    raw, raw_ref = _raw_header(out), _raw_header(image_path)
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units"):
        assert np.array_equal(raw[key], raw_ref[key]), key
    assert raw["scl_slope"] == 1 and raw["scl_inter"] == 0
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def _itk_volume() -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)  # SimpleITK order (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 1.3, 2.9))
    img.SetOrigin((12.5, -30.0, 41.25))
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    img.SetDirection(rot.ravel().tolist())
    return img


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_itk_formats_map_voxels_to_the_same_physical_points(tmp_path, ext):
    img = _itk_volume()
    src = tmp_path / f"vol{ext}"
    sitk.WriteImage(img, str(src))
    arr, geo = read_image(src)
    assert arr.shape == img.GetSize()  # (i, j, k) = ITK (x, y, z)
    assert geo.header is None
    for idx in [(0, 0, 0), (6, 5, 4), (1, 2, 3), (6, 0, 2)]:
        assert arr[idx] == img.GetPixel(*map(int, idx))
        lps = np.array(img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx)))
        ras = geo.affine @ np.array([*idx, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)

    # writing back (same format, and NIfTI) and reading with SimpleITK gives the original grid
    seg = (arr > 500).astype(np.uint8)
    for out in (tmp_path / f"seg{ext}", tmp_path / "seg.nii.gz"):
        write_segmentation(seg, geo, out)
        back = sitk.ReadImage(str(out))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), seg.transpose(2, 1, 0))
        np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-5)
    leftovers = [p.name for p in tmp_path.iterdir() if "tmp" in p.name]
    assert leftovers == []


def test_truncated_and_corrupt_files_raise_one_line_errors(hippocampus_dir, edge_cases_dir, tmp_path):
    good = hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz"
    data = good.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(S3DError) as err:
        read_image(cut)
    _one_line_naming(err, "cut.nii.gz")

    raw = (edge_cases_dir / "bigendian_int16_anatomical.nii").read_bytes()
    cut_nii = tmp_path / "cut_plain.nii"
    cut_nii.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(S3DError) as err:
        read_image(cut_nii)
    _one_line_naming(err, "cut_plain.nii")

    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(S3DError) as err:
        read_image(junk)
    _one_line_naming(err, "junk.mha")

    with pytest.raises(S3DError) as err:
        read_label(tmp_path / "absent.nii.gz")
    _one_line_naming(err, "absent.nii.gz")


def test_dimensionality(tmp_path):
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), aff), tmp_path / "four.nii.gz")
    with pytest.raises(S3DError) as err:
        read_image(tmp_path / "four.nii.gz")
    _one_line_naming(err, "four.nii.gz")
    assert "4-D" in str(err.value) and "(4, 5, 6, 2)" in str(err.value)

    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.int16), aff), tmp_path / "single.nii.gz")
    arr, geo = read_image(tmp_path / "single.nii.gz")
    assert arr.shape == geo.shape == (4, 5, 6)
    np.testing.assert_allclose(geo.spacing, (1.5, 1.5, 3.0))
    # a segmentation for it is a plain 3-D file on the same grid
    write_segmentation(np.ones((4, 5, 6), np.uint8), geo, tmp_path / "single_seg.nii.gz")
    back = nib.load(tmp_path / "single_seg.nii.gz")
    assert back.shape == (4, 5, 6) and np.array_equal(back.affine, aff)

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.float32)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(S3DError) as err:
        read_image(tmp_path / "flat.nrrd")
    _one_line_naming(err, "flat.nrrd")
    assert "2-D" in str(err.value)


def test_scaling_and_label_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(-300, 300, size=(6, 7, 8)).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    # nibabel would rescale on save; write the unscaled integers with the slope in the header
    img.header.set_data_dtype(np.int16)
    nib.save(img, tmp_path / "scaled.nii")
    ref = nib.load(tmp_path / "scaled.nii")
    arr, _ = read_image(tmp_path / "scaled.nii")
    np.testing.assert_allclose(arr, ref.get_fdata(), rtol=1e-6, atol=1e-4)
    assert arr.dtype == np.float32

    nib.save(nib.Nifti1Image(np.array([[[0.0, 1.0], [2.0, 300.0]]], np.float32), np.eye(4)),
             tmp_path / "float_label.nii.gz")
    lab, _ = read_label(tmp_path / "float_label.nii.gz")
    assert lab.dtype == np.int16 and lab.tolist() == [[[0, 1], [2, 300]]]

    nib.save(nib.Nifti1Image(np.array([[[0.0, 0.5]]], np.float32), np.eye(4)), tmp_path / "half.nii.gz")
    with pytest.raises(S3DError, match="non-integer"):
        read_label(tmp_path / "half.nii.gz")


def test_uint16_when_labels_exceed_255(tmp_path):
    geo = Geometry(shape=(3, 4, 5), spacing=(1.0, 2.0, 3.0), affine=np.diag([-1.0, 2.0, 3.0, 1.0]), header=None)
    seg = np.zeros((3, 4, 5), np.int64)
    seg[1, 2, 3] = 300
    seg[0, 0, 0] = 7
    write_segmentation(seg, geo, tmp_path / "big.nii.gz")
    back = nib.load(tmp_path / "big.nii.gz")
    assert back.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), seg)
    assert np.array_equal(back.affine, geo.affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 1

    write_segmentation(np.minimum(seg, 255), geo, tmp_path / "small.nii.gz")
    assert nib.load(tmp_path / "small.nii.gz").get_data_dtype() == np.uint8

    write_segmentation(seg, geo, tmp_path / "big.nrrd")
    back = sitk.ReadImage(str(tmp_path / "big.nrrd"))
    assert back.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), seg)

    with pytest.raises(S3DError, match="shape"):
        write_segmentation(np.zeros((3, 4, 6), np.uint8), geo, tmp_path / "wrong.nii.gz")
    with pytest.raises(S3DError, match="negative"):
        write_segmentation(-seg, geo, tmp_path / "neg.nii.gz")
    assert not (tmp_path / "wrong.nii.gz").exists()


def test_write_image_float32_round_trip(edge_cases_dir, tmp_path):
    arr, geo = read_image(edge_cases_dir / "reoriented_anat_moved.nii")
    probs = (arr / max(float(arr.max()), 1.0)).astype(np.float32)
    write_image(probs, geo, tmp_path / "p.nii.gz")
    back = nib.load(tmp_path / "p.nii.gz")
    assert back.get_data_dtype() == np.dtype("<f4")  # big-endian reference, little-endian output
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), probs)
    assert np.array_equal(back.affine, nib.load(edge_cases_dir / "reoriented_anat_moved.nii").affine)


@pytest.mark.parametrize("field,value", [("srow_x", [np.nan, 0, 0, 0]), ("pixdim", [1, np.inf, 1, 1, 1, 1, 1, 1])])
def test_non_finite_affine_is_an_error(tmp_path, field, value):
    # written byte by byte: nibabel's save would re-derive the geometry fields from a finite affine
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3, 3, 3))
    hdr.set_data_dtype(np.float32)
    hdr["sform_code"] = 1 if field == "srow_x" else 0
    hdr["qform_code"] = 0 if field == "srow_x" else 1
    hdr["srow_y"], hdr["srow_z"] = [0, 1, 0, 0], [0, 0, 1, 0]
    hdr[field] = value
    path = tmp_path / "nan_affine.nii"
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(np.zeros(27, np.float32).tobytes())
    with pytest.raises(S3DError) as err:
        read_image(path)
    _one_line_naming(err, "nan_affine.nii")
    assert "not finite" in str(err.value)


def test_read_channels_requires_one_grid(edge_cases_dir, tmp_path):
    src = edge_cases_dir / "reoriented_anat_moved.nii"
    shutil.copy(src, tmp_path / "c_0000.nii")
    img = nib.load(src)
    nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32) * 2, img.affine, img.header), tmp_path / "c_0001.nii")
    stacked, geo = read_channels([tmp_path / "c_0000.nii", tmp_path / "c_0001.nii"])
    assert stacked.shape == (2, *img.shape)
    np.testing.assert_allclose(stacked[1], 2 * stacked[0], rtol=1e-6)

    moved = img.affine.copy()
    moved[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(img.get_fdata(dtype=np.float32), moved), tmp_path / "c_0002.nii")
    with pytest.raises(S3DError) as err:
        read_channels([tmp_path / "c_0000.nii", tmp_path / "c_0002.nii"])
    _one_line_naming(err, "c_0002.nii")
    assert "origin" in str(err.value)


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith("out.json.tmp-")
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_affine_of_geometry_wins_over_its_header(edge_cases_dir, tmp_path):
    _, geo = read_image(edge_cases_dir / "reoriented_anat_moved.nii")
    moved = geo.affine.copy()
    moved[:3, 3] += [3.0, -2.0, 7.5]
    geo = Geometry(shape=geo.shape, spacing=geo.spacing, affine=moved, header=geo.header, source=geo.source)
    write_segmentation(np.zeros(geo.shape, np.uint8), geo, tmp_path / "moved.nii.gz")
    back = nib.load(tmp_path / "moved.nii.gz")
    np.testing.assert_allclose(back.affine, moved, atol=1e-5)
    np.testing.assert_allclose(back.header.get_qform(), moved, atol=1e-5)
    assert int(back.header["qform_code"]) == 2 and int(back.header["sform_code"]) == 2


def test_geometry_dict_is_json_and_restores_the_header(edge_cases_dir):
    _, geo = read_image(edge_cases_dir / "bigendian_int16_anatomical.nii")
    d = json.loads(json.dumps(geo.to_dict()))
    back = Geometry.from_dict(d)
    assert back.shape == geo.shape and back.spacing == geo.spacing and back.source == geo.source
    assert np.array_equal(back.affine, geo.affine)
    assert back.header.binaryblock == geo.header.binaryblock
    assert back.header.endianness == ">"


def _hostile_header(src, dst, dims, gz: bool):
    """A real file's header declaring `dims`, followed by a few real voxel bytes only."""
    hdr = nib.load(src).header.copy()
    hdr.set_data_shape(dims)
    blob = hdr.binaryblock + b"\x00" * 4 + np.asarray(nib.load(src).dataobj).tobytes()[:64]
    if gz:
        blob = gzip.compress(blob)
    dst.write_bytes(blob)
    return dst


@pytest.mark.parametrize("dims,gz", [((32767, 32767, 32767), True), ((800, 800, 800), True),
                                     ((32767, 32767, 32767), False), ((800, 800, 800), False)])
def test_hostile_headers_fail_in_one_line_before_any_allocation(hippocampus_dir, tmp_path, dims, gz):
    import tracemalloc

    from s3d.data.io import read_image, read_label

    src = hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz"
    bad = _hostile_header(src, tmp_path / ("big.nii.gz" if gz else "big.nii"), dims, gz)
    assert bad.stat().st_size < 1000
    for reader in (read_image, read_label):
        tracemalloc.start()
        with pytest.raises(S3DError) as e:
            reader(bad)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(bad))
        assert ("corrupt header" in msg) if gz else ("truncated" in msg)
        assert peak < 20 << 20, peak  # no volume-sized buffer was ever allocated


def test_images_beyond_the_memory_budget_are_refused(hippocampus_dir, monkeypatch):
    from s3d.data.io import memory_budget, read_image

    src = hippocampus_dir / "imagesTr" / "hippocampus_001_0000.nii.gz"
    assert memory_budget() > 1 << 30
    read_image(src)
    monkeypatch.setenv("S3D_MAX_IMAGE_BYTES", "100000")
    with pytest.raises(S3DError, match="more than the memory budget of .* S3D_MAX_IMAGE_BYTES"):
        read_image(src)
