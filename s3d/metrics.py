"""Segmentation metrics: Dice, normalised surface Dice (NSD) and the 95th-percentile Hausdorff distance.

Surface metrics follow DeepMind's `surface-distance` package (Nikolov et al., "Clinically applicable
segmentation of head and neck anatomy for radiotherapy", arXiv 1809.04430): same surfels, areas,
distances and percentile rule, so numbers are comparable with papers that report it:

* Surface elements ("surfels") live on the corner grid of the voxels. Each corner gets the 8-bit code
  of the 2x2x2 voxel neighbourhood around it; codes other than 0 and 255 are border corners, and the
  code fixes the surfel's area through a marching-cubes triangulation of that neighbourhood, scaled
  by the voxel spacing.
* The distance from a surfel of one mask to the other surface is the exact Euclidean distance (in mm,
  with spacing) from its corner to the nearest border corner of the other mask.
* NSD at tolerance tau = (area of ref surfels within tau of pred + area of pred surfels within tau
  of ref) / (total area of both surfaces). One deliberate difference: a distance equal to tau counts
  as within it even when round-off puts it a hair above (the reference drops surfels exactly 3 voxels
  away at 0.8 mm spacing and tau 2.4 mm, because 3 * 0.8 > 2.4 in float64).
* HD95 = max over both directions of the area-weighted 95th percentile of the surfel distances.

Empty-mask policy (what `evaluate_case` reports, and what ends up in summary.json):

* reference and prediction both empty: Dice, NSD and HD95 are NaN (written as null) and these cases
  are left out of every mean (a label that is absent and correctly not predicted says nothing).
* exactly one empty: Dice 0 and NSD 0 (they enter the means); HD95 is undefined (infinite), so it
  is reported as null with `"hd95_undefined": true` and left out of the HD95 mean; the means count
  such cases in `n_hd95_undefined`.
* JSON never holds NaN or Infinity tokens.

The stand-alone functions `nsd` and `hd95` return NaN when both masks are empty; with exactly one
empty mask `nsd` returns 0.0 and `hd95` returns `inf` (as the reference package does).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Any

import numpy as np
import SimpleITK as sitk

__all__ = [
    "dice",
    "compute_surface_distances",
    "surface_distances",
    "surfel_area_table",
    "neighbour_codes",
    "nsd",
    "hd95",
    "evaluate_case",
]

_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _corner_bit(corner: tuple[int, int, int]) -> int:
    # Bit layout of surface-distance's ENCODE_NEIGHBOURHOOD_3D_KERNEL: the corner at offset (0,0,0) of
    # the 2x2x2 window is the most significant bit (128), the corner at (1,1,1) the least (1).
    a, b, c = corner
    return 1 << (7 - (4 * a + 2 * b + c))


def _as_bool(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask (i, j, k), got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _check_spacing(spacing: Any) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm per axis), got {spacing}")
    return sp  # type: ignore[return-value]


def dice(ref: Any, pred: Any) -> float:
    """Dice coefficient 2|R∩P| / (|R|+|P|) of two boolean masks of equal shape; NaN when both are empty."""
    r = _as_bool(ref, "ref")
    p = _as_bool(pred, "pred")
    if r.shape != p.shape:
        raise ValueError(f"masks differ in shape: {r.shape} vs {p.shape}")
    total = int(r.sum()) + int(p.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(r, p).sum()) / total


# ---------------------------------------------------------------------------------------------------
# Surfel areas per neighbourhood code.
#
# The reference package ships a hand-made table of marching-cubes triangle normals. We derive the same
# numbers: the marching-cubes polygon(s) through the edge midpoints of each 2x2x2 configuration, with
# faces that have two diagonal corners of each kind ("ambiguous" faces) cut so that the corners of the
# minority kind (inside when at most 4 corners are inside) are separated, as the original 15-case table
# of Lorensen & Cline does. The reference triangulates non-planar polygons (3 corners on a face, the
# twisted 4-corner hexagons) in the way that gives the largest area at unit spacing; all such
# triangulations give the same area at every spacing. tests/test_metrics.py checks all 256 codes
# against surface_distance.lookup_tables at several anisotropic spacings.
# ---------------------------------------------------------------------------------------------------


def _polygon_loops(code: int) -> list[list[tuple[float, float, float]]]:
    inside = {c for c in _CORNERS if code & _corner_bit(c)}
    separate_inside = len(inside) <= 4
    neighbours: dict[tuple, list[tuple]] = {}
    for axis in range(3):
        u, v = (a for a in range(3) if a != axis)
        for level in (0, 1):
            ring = []
            for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                p = [0, 0, 0]
                p[axis], p[u], p[v] = level, du, dv
                ring.append(tuple(p))
            ring_edges = [tuple(sorted((ring[i], ring[(i + 1) % 4]))) for i in range(4)]
            crossing = [e for e in ring_edges if (e[0] in inside) != (e[1] in inside)]
            if len(crossing) == 2:
                pairs = [(crossing[0], crossing[1])]
            elif len(crossing) == 4:
                # ring_edges[0] and [1] meet at ring[1]; cutting that pair off separates ring[1] and ring[3]
                if (ring[1] in inside) == separate_inside:
                    pairs = [(ring_edges[0], ring_edges[1]), (ring_edges[2], ring_edges[3])]
                else:
                    pairs = [(ring_edges[1], ring_edges[2]), (ring_edges[3], ring_edges[0])]
            else:
                pairs = []
            for e1, e2 in pairs:
                neighbours.setdefault(e1, []).append(e2)
                neighbours.setdefault(e2, []).append(e1)
    loops = []
    seen: set = set()
    for start in neighbours:
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [n for n in neighbours[cur] if n != prev and n not in seen]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
            loop.append(cur)
            seen.add(cur)
        loops.append([tuple((np.add(e[0], e[1]) / 2.0).tolist()) for e in loop])
    return loops


def _triangulations(idx: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
    """All triangulations of the polygon with vertex indices idx (in order)."""
    if len(idx) < 3:
        return [[]]
    first, last = idx[0], idx[-1]
    out = []
    for k in range(1, len(idx) - 1):
        for left in _triangulations(idx[: k + 1]):
            for right in _triangulations(idx[k:]):
                out.append(left + right + [(first, idx[k], last)])
    return out


@lru_cache(maxsize=1)
def _unit_area_vectors() -> np.ndarray:
    """(256, T, 3) area vectors (half cross products) of the triangles of each code at unit spacing."""
    per_code = []
    for code in range(256):
        vectors = []
        for loop in _polygon_loops(code):
            v = np.asarray(loop, dtype=np.float64)
            best, best_area = None, -1.0
            for tri in _triangulations(tuple(range(len(v)))):
                vecs = [np.cross(v[j] - v[i], v[k] - v[i]) / 2.0 for i, j, k in tri]
                area = float(sum(np.linalg.norm(x) for x in vecs))
                if area > best_area + 1e-12:
                    best, best_area = vecs, area
            vectors.extend(best or [])
        per_code.append(vectors)
    width = max(len(v) for v in per_code)
    table = np.zeros((256, width, 3))
    for code, vecs in enumerate(per_code):
        if vecs:
            table[code, : len(vecs)] = vecs
    return table


def surfel_area_table(spacing: Any) -> np.ndarray:
    """(256,) float64: surfel area in mm^2 of each 2x2x2 neighbourhood code at this spacing (i, j, k)."""
    s0, s1, s2 = _check_spacing(spacing)
    # An area vector (normal * area) scales with the cofactors of diag(spacing): component i by the
    # product of the other two spacings.
    scaled = _unit_area_vectors() * np.array([s1 * s2, s0 * s2, s0 * s1])
    return np.linalg.norm(scaled, axis=-1).sum(axis=-1)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """uint8 codes on the corner grid, shape mask.shape + 1: corner p sees voxels p-1..p per axis."""
    m = np.pad(np.asarray(mask, dtype=bool).astype(np.uint8), 1)
    n0, n1, n2 = (s - 1 for s in m.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for corner in _CORNERS:
        a, b, c = corner
        codes |= m[a : a + n0, b : b + n1, c : c + n2] * np.uint8(_corner_bit(corner))
    return codes


def _distance_to(border: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Exact Euclidean distance in mm from every corner to the nearest True corner of `border`."""
    img = sitk.GetImageFromArray(border.astype(np.uint8))
    img.SetSpacing(spacing[::-1])  # SimpleITK reads the last numpy axis as x
    # Maurer's transform is exact (matches scipy's distance_transform_edt to float32 precision);
    # Danielsson's is off by up to ~0.1 mm on anisotropic grids.
    # The squared map is asked for because it is exact in float32 for integer offsets at 1 mm (the
    # usual case), so distances equal to the NSD tolerance compare as the reference's float64 ones do.
    dist2 = sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=True, useImageSpacing=True, backgroundValue=0
    )
    d2 = sitk.GetArrayViewFromImage(dist2).astype(np.float64)
    return np.where(border, 0.0, np.sqrt(np.abs(d2)))


def compute_surface_distances(ref: Any, pred: Any, spacing: Any) -> dict[str, np.ndarray]:
    """Distances between the surfaces of two 3D boolean masks (i, j, k), as surface-distance defines them.

    Returns a dict of 1-D float64 arrays: "distances_ref_to_pred" (mm, one per ref surfel, sorted
    ascending) with "surfel_areas_ref" (mm^2, same order), and "distances_pred_to_ref" with
    "surfel_areas_pred". With both masks empty all four are empty; with one empty, the other
    mask's distances are all inf.
    """
    sp = _check_spacing(spacing)
    r = _as_bool(ref, "ref")
    p = _as_bool(pred, "pred")
    if r.shape != p.shape:
        raise ValueError(f"masks differ in shape: {r.shape} vs {p.shape}")
    union = r | p
    if not union.any():
        empty = np.zeros(0)
        return {"distances_ref_to_pred": empty, "distances_pred_to_ref": empty.copy(),
                "surfel_areas_ref": empty.copy(), "surfel_areas_pred": empty.copy()}
    # Crop to the union's bounding box: corners outside it have code 0 in both masks.
    box = []
    for axis in range(3):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    box = tuple(box)
    codes_r = neighbour_codes(r[box])
    codes_p = neighbour_codes(p[box])
    border_r = (codes_r != 0) & (codes_r != 255)
    border_p = (codes_p != 0) & (codes_p != 255)
    dist_to_r = _distance_to(border_r, sp) if border_r.any() else np.full(border_r.shape, np.inf)
    dist_to_p = _distance_to(border_p, sp) if border_p.any() else np.full(border_p.shape, np.inf)
    areas = surfel_area_table(sp)
    out = {}
    for name, border, codes, other in (("ref", border_r, codes_r, dist_to_p), ("pred", border_p, codes_p, dist_to_r)):
        d = other[border]
        a = areas[codes[border]]
        order = np.lexsort((a, d))  # by distance, then area: the reference's sort order
        key = "distances_ref_to_pred" if name == "ref" else "distances_pred_to_ref"
        out[key] = d[order]
        out[f"surfel_areas_{name}"] = a[order]
    return out


surface_distances = compute_surface_distances


def _surface_dice(sd: dict[str, np.ndarray], tau: float) -> float:
    a_r, a_p = sd["surfel_areas_ref"], sd["surfel_areas_pred"]
    total = a_r.sum() + a_p.sum()
    if total == 0:
        return math.nan
    # SimpleITK's distance maps are float32: a distance that equals tau (a whole number of voxels at
    # 0.8 mm, say) can come back a few ulp above it, so allow float32 round-off before comparing.
    tau = tau * (1.0 + 4e-7) + 1e-6
    within = a_r[sd["distances_ref_to_pred"] <= tau].sum() + a_p[sd["distances_pred_to_ref"] <= tau].sum()
    return float(within / total)


def _percentile_distance(dist: np.ndarray, area: np.ndarray, percent: float) -> float:
    if len(dist) == 0:
        return math.inf
    cum = np.cumsum(area) / np.sum(area)
    idx = int(np.searchsorted(cum, percent / 100.0))  # first surfel whose cumulative area share >= percent
    return float(dist[min(idx, len(dist) - 1)])


def _robust_hausdorff(sd: dict[str, np.ndarray], percent: float) -> float:
    if len(sd["distances_ref_to_pred"]) == 0 and len(sd["distances_pred_to_ref"]) == 0:
        return math.nan
    return max(_percentile_distance(sd["distances_ref_to_pred"], sd["surfel_areas_ref"], percent),
               _percentile_distance(sd["distances_pred_to_ref"], sd["surfel_areas_pred"], percent))


def nsd(ref: Any, pred: Any, spacing: Any, tau: float = 1.0) -> float:
    """Normalised surface Dice at tolerance `tau` mm (area-weighted), in [0, 1]; NaN when both are empty."""
    return _surface_dice(compute_surface_distances(ref, pred, spacing), float(tau))


def hd95(ref: Any, pred: Any, spacing: Any, percent: float = 95.0) -> float:
    """Robust Hausdorff distance in mm: max of both directed area-weighted `percent`-th percentiles.

    NaN when both masks are empty, inf when exactly one is.
    """
    return _robust_hausdorff(compute_surface_distances(ref, pred, spacing), float(percent))


def evaluate_case(ref_seg: np.ndarray, pred_seg: np.ndarray, labels: list[int], spacing: Any,
                  nsd_tolerance: float = 1.0) -> dict[str, dict[str, Any]]:
    """Metrics of each label of two integer label maps (i, j, k) on the same grid.

    Returns {str(label): {"Dice", "IoU", "NSD", "HD95", "hd95_undefined", "TP", "FP", "FN", "n_ref",
    "n_pred", "volume_ref_mm3", "volume_pred_mm3"}} with NaN for undefined values (see the module
    docstring for the empty-mask policy; HD95 is NaN, never inf).
    """
    sp = _check_spacing(spacing)
    if ref_seg.shape != pred_seg.shape:
        raise ValueError(f"label maps differ in shape: {ref_seg.shape} vs {pred_seg.shape}")
    voxel_mm3 = sp[0] * sp[1] * sp[2]
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        r = ref_seg == label
        p = pred_seg == label
        n_ref, n_pred = int(r.sum()), int(p.sum())
        tp = int(np.logical_and(r, p).sum())
        fp, fn = n_pred - tp, n_ref - tp
        m: dict[str, Any] = {"TP": tp, "FP": fp, "FN": fn, "n_ref": n_ref, "n_pred": n_pred,
                             "volume_ref_mm3": n_ref * voxel_mm3, "volume_pred_mm3": n_pred * voxel_mm3}
        if n_ref == 0 and n_pred == 0:
            m.update(Dice=math.nan, IoU=math.nan, NSD=math.nan, HD95=math.nan, hd95_undefined=False)
        elif n_ref == 0 or n_pred == 0:
            m.update(Dice=0.0, IoU=0.0, NSD=0.0, HD95=math.nan, hd95_undefined=True)
        else:
            sd = compute_surface_distances(r, p, sp)
            m.update(Dice=2.0 * tp / (n_ref + n_pred), IoU=tp / (tp + fp + fn), NSD=_surface_dice(sd, nsd_tolerance),
                     HD95=_robust_hausdorff(sd, 95.0), hd95_undefined=False)
        out[str(int(label))] = m
    return out
