"""s3d.metrics against DeepMind's surface-distance package (the reference) on real hippocampus labels."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from s3d import metrics as M

sd = pytest.importorskip("surface_distance", reason="surface-distance (dev extra) is the reference")
from surface_distance import lookup_tables  # noqa: E402

CASES = ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz")
# the reference package calls scipy.ndimage.filters/morphology, deprecated namespaces
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SPACINGS = [(1.0, 1.0, 1.0), (1.0, 1.0, 2.5)]


def _erode(mask: np.ndarray) -> np.ndarray:
    """6-connected binary erosion by one voxel (outside the array counts as background)."""
    p = np.pad(mask, 1)
    out = p[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for step in (-1, 1):
            out &= np.roll(p, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def _shift(mask: np.ndarray, offsets: tuple[int, int, int]) -> np.ndarray:
    """Translate by whole voxels, filling with background (no wrap-around)."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for o, n in zip(offsets, mask.shape, strict=True):
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _fit(seg: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop / zero-pad another case's label map to `shape` (corner-aligned)."""
    out = np.zeros(shape, seg.dtype)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, seg.shape, strict=True))
    out[sl] = seg[sl]
    return out


@pytest.fixture(scope="module")
def labels(hippocampus_dir):
    return [np.asarray(nib.load(hippocampus_dir / "labelsTr" / c).dataobj).astype(np.int16) for c in CASES]


def _pairs(labels):
    """(name, ref, pred) label-map pairs: eroded, shifted by 1 and 2 voxels, another case's label."""
    out = []
    for i, ref in enumerate(labels):
        eroded = np.where(_erode(ref > 0), ref, 0)
        out.append((f"case{i}-eroded", ref, eroded))
        out.append((f"case{i}-shift1", ref, _shift(ref, (1, 0, -1))))
        out.append((f"case{i}-shift2", ref, _shift(ref, (0, 2, 0))))
        out.append((f"case{i}-other", ref, _fit(labels[(i + 1) % len(labels)], ref.shape)))
    return out


def test_surfel_area_table_matches_reference_for_all_codes():
    for spacing in [(1, 1, 1), (1, 1, 2.5), (0.7, 1.3, 2.1), (3.0, 0.5, 0.5)]:
        ours = M.surfel_area_table(spacing)
        ref = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12, err_msg=str(spacing))


def test_neighbour_codes_match_correlation_with_reference_kernel():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    mask = rng.random((7, 6, 5)) < 0.5
    # the reference pads one zero plane at the far end and correlates with its 2x2x2 kernel
    padded = np.zeros(np.array(mask.shape) + 1, np.uint8)
    padded[:-1, :-1, :-1] = mask
    expected = ndimage.correlate(padded, lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
    np.testing.assert_array_equal(M.neighbour_codes(mask), expected)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_surface_metrics_match_surface_distance_on_real_labels(labels, spacing):
    checked = 0
    for name, ref_seg, pred_seg in _pairs(labels):
        for label in (1, 2):
            r, p = ref_seg == label, pred_seg == label
            if not r.any() or not p.any():
                continue
            theirs = sd.compute_surface_distances(r, p, spacing)
            ours = M.compute_surface_distances(r, p, spacing)
            for a, b in [("distances_ref_to_pred", "distances_gt_to_pred"), ("surfel_areas_ref", "surfel_areas_gt"),
                         ("distances_pred_to_ref", "distances_pred_to_gt"), ("surfel_areas_pred", "surfel_areas_pred")]:
                np.testing.assert_allclose(ours[a], theirs[b], atol=1e-5, err_msg=f"{name} label {label} {a}")
            for tau in (1.0, 2.0):
                expected = sd.compute_surface_dice_at_tolerance(theirs, tau)
                assert M.nsd(r, p, spacing, tau) == pytest.approx(expected, abs=1e-3), (name, label, tau)
            expected_hd = sd.compute_robust_hausdorff(theirs, 95)
            assert M.hd95(r, p, spacing) == pytest.approx(expected_hd, abs=1e-3), (name, label)
            checked += 1
    assert checked >= 20
    # the perturbations must be real ones, or agreement would prove little
    r, p = labels[0] == 1, _shift(labels[0], (0, 2, 0)) == 1
    assert M.nsd(r, p, spacing, 1.0) < 0.95 and M.hd95(r, p, spacing) >= 2.0


def test_dice_equals_brute_force_count(labels):
    ref = labels[0]
    pred = _shift(ref, (1, 0, -1))
    for label in (1, 2):
        inter = n_r = n_p = 0
        for a, b in zip(ref.ravel().tolist(), pred.ravel().tolist(), strict=True):
            n_r += a == label
            n_p += b == label
            inter += a == label and b == label
        assert M.dice(ref == label, pred == label) == pytest.approx(2 * inter / (n_r + n_p), abs=1e-12)
        assert M.dice(ref == label, pred == label) == pytest.approx(
            sd.compute_dice_coefficient(ref == label, pred == label), abs=1e-12)


def test_identical_masks_and_torch_input(labels):
    ref = torch.from_numpy(labels[1] == 2)
    assert M.dice(ref, ref) == 1.0
    assert M.nsd(ref, ref, (1, 1, 2.5), 0.0) == 1.0
    assert M.hd95(ref, ref, (1, 1, 2.5)) == 0.0


def test_slab_shift_gives_spacing_times_offset():
    # two 1-voxel-thick-in-k slabs filling i and j, k apart: every surfel is k * spacing away
    # except the rim, so HD95 is exactly 3 voxels * 2.5 mm when the shift is 3 voxels along axis 2
    a = np.zeros((20, 20, 12), bool)
    a[:, :, 2:5] = True
    b = _shift(a, (0, 0, 3))
    assert M.hd95(a, b, (1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert M.nsd(a, b, (1.0, 1.0, 2.5), 7.4) < M.nsd(a, b, (1.0, 1.0, 2.5), 7.5) == pytest.approx(1.0)


def test_empty_mask_policy():
    empty = np.zeros((8, 8, 8), bool)
    blob = empty.copy()
    blob[2:5, 3:6, 1:4] = True
    assert math.isnan(M.dice(empty, empty))
    assert math.isnan(M.nsd(empty, empty, (1, 1, 1)))
    assert math.isnan(M.hd95(empty, empty, (1, 1, 1)))
    for r, p in ((blob, empty), (empty, blob)):
        assert M.dice(r, p) == 0.0
        assert M.nsd(r, p, (1, 1, 1)) == 0.0
        assert M.hd95(r, p, (1, 1, 1)) == math.inf
    seg_r = blob.astype(np.int16)  # label 1 only
    seg_p = np.where(blob, 2, 0).astype(np.int16)  # label 2 only
    out = M.evaluate_case(seg_r, seg_p, [1, 2, 3], (1.0, 1.0, 2.0))
    for label in ("1", "2"):
        m = out[label]
        assert m["Dice"] == 0.0 and m["NSD"] == 0.0 and math.isnan(m["HD95"]) and m["hd95_undefined"] is True
    assert out["1"]["volume_ref_mm3"] == pytest.approx(27 * 2.0) and out["1"]["n_pred"] == 0
    both = out["3"]
    assert math.isnan(both["Dice"]) and math.isnan(both["NSD"]) and math.isnan(both["HD95"])
    assert both["hd95_undefined"] is False


def test_distance_equal_to_tolerance_counts_as_within():
    # A 3-voxel shift at 0.8 mm is 2.4 mm; the reference's float64 sum gives 2.4000000000000004 and
    # drops those surfels at tau = 2.4 (NSD 0.70). s3d counts them (NSD 1), and agrees just below tau.
    a = np.zeros((40, 40, 30), bool)
    a[8:30, 10:33, 6:24] = True
    b = _shift(a, (3, 0, 0))
    spacing = (0.8, 0.8, 2.0)
    theirs = sd.compute_surface_distances(a, b, spacing)
    assert M.nsd(a, b, spacing, 2.4) == pytest.approx(1.0)
    assert M.nsd(a, b, spacing, 2.39) == pytest.approx(sd.compute_surface_dice_at_tolerance(theirs, 2.39), abs=1e-9)
    assert M.nsd(a, b, spacing, 2.39) < 0.9
    assert M.hd95(a, b, spacing) == pytest.approx(2.4, abs=1e-5)
