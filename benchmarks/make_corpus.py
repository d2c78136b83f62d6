"""A pre-training I/O benchmark corpus of N volumes made from the real scans in shared/data.

The files are renamed, randomly cropped and randomly flipped copies of a handful of real volumes,
so the corpus has the file count, folder layout, sizes, voxel types and spacings of a clinical
pre-training corpus but none of its diversity: it measures preprocessing, storage and data-loading
cost (benchmarks/pretrain_loader.py), NOT what pre-training learns. Never report a training result
(loss curves, downstream Dice) from it as if it were a corpus of N different scans.

Sources: every volume in DATA/unlabeled/ and the images of DATA/Dataset004_Hippocampus/imagesTr.
Volumes whose largest axis is under SMALL_MM (the 1 mm hippocampus crops, ~35x50x35 voxels, and
the three hippocampus crops in unlabeled/) form the small pool; `--small-fraction` of the files are
drawn from it, the rest from the big volumes (brain MR series, CT, prostate MR, a 1 mm brain),
weighted by SOURCE_WEIGHTS. Each copy keeps >= `--min-keep` (70%) of every axis; on the two axes
with the largest field of view, where the source's nonzero region spans >= 161 mm, the crop keeps
at least 161 mm of it, so the volume still holds a 160^3 patch in-plane after resampling to 1 mm
(S3D pre-trains on 160^3 patches, and s3d's curation skips volumes smaller than the patch along 2
axes). Each axis is then flipped with probability 1/2. The affine is updated for the crop offset
and the flips, so every voxel keeps its world position; voxels keep the source's dtype.

Layout: OUT/site-XX/sub-XXXX/ses-1/sub-XXXX_ses-1_run-K_MODALITY.nii.gz (FILES_PER_SUBJECT files per
subject, subjects spread over SITES sites), plus OUT/paths.txt (relative paths, one a line), an
nnssl-style OUT/pretrain_data.json (collection -> datasets (sites) -> subjects -> sessions ->
images; image paths relative to the json's folder, which `s3d` resolves; nnssl itself wants
`$nnssl_raw/...` prefixes) and OUT/manifest.json (source, crop, flips and 1 mm shape of every file,
with the summary printed at the end). The output is the same for the same --seed and sources.

Budget used to pick the defaults (2 CPU cores, AMD EPYC, measured 2026-12-03 with one thread per
volume: read + z-score + resample to 1 mm + blosc2 LZ4HC write, i.e. what `s3d preprocess --corpus`
does per file): a 512x512x22 0.43x0.43x6.5 mm brain series costs ~1.0 s (220x220x143 at 1 mm, 9 MiB
compressed), a 280x320x22 series ~0.65 s, the 160x192x224 brain ~0.6 s, a hippocampus crop ~0.04 s,
the 3 mm CT abdomen ~7 s (37 M voxels at 1 mm, 100 MiB: hence its weight). About 0.16 s per million
1 mm voxels plus 0.03 s per file; the script prints that estimate for the corpus it wrote. Every big
source can keep >= 160 voxels on 2 axes at 1 mm (the brain series in-plane: 220 mm at 0.43 mm and
193x220 mm at 0.69 mm; the 1 mm brain along its 171 and 191 mm nonzero axes; CT, prostate, 3 mm MR
in-plane); the hippocampus crops cannot.

Result of the first command below (default seed and mix): 2000 files (400 small, 1600 big) in
162 s with -j 2, 5.5 GiB of .nii.gz in 811 folders; at 1 mm all 1600 big files are >= 160 voxels on
>= 2 axes (45 on 3), median sorted axes 117 / 169 / 190 voxels, median 4.2 M voxels per big file,
26 GiB as uncompressed float32. `s3d preprocess --corpus -j 2` of a random 100-file sample (5.1%
of the voxels) took 21.8 s and 0.65 GiB: ~7.5 min and ~13 GiB for the whole corpus.

    python benchmarks/make_corpus.py /work/bench/corpus2000 --n 2000
    python benchmarks/make_corpus.py /tmp/corpus20 --n 20 --seed 1 --small-fraction 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))

# A volume whose every axis spans less than this (mm) is a "small" source (hippocampus crops).
SMALL_MM = 100.0
# The patch S3D pre-trains on, at 1 mm; crops keep this much (+1 mm for rounding when resampling)
# of the source's nonzero region on the two widest axes where the source has it.
PATCH_MM = 160.0
KEEP_MM = PATCH_MM + 1.0
# Relative draw weights of big sources (default 1). The 3 mm CT abdomen becomes 37 M voxels at 1 mm
# (~7 s and 100 MiB per copy, 7x a brain series): at weight 1 it alone would take a quarter of the
# preprocessing budget.
SOURCE_WEIGHTS = {"totalseg_ct_abdomen_3mm": 0.25}
# Modality names for the file names and pretrain_data.json, by a substring of the source name.
MODALITIES = (("hippocampus", "T1w"), ("hcrop", "T1w"), ("voxelmorph", "T1w"), ("prostate_t2", "T2w"),
              ("dwi", "DWI"), ("_ct_", "CT"))
SITES = 10
FILES_PER_SUBJECT = 5
# Cost model from the measurements in the docstring (seconds on one core of this machine).
SEC_PER_MVOXEL = 0.16
SEC_PER_FILE = 0.03


@dataclass(frozen=True)
class Source:
    path: Path
    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    small: bool
    weight: float
    modality: str


def _name(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def _modality(name: str) -> str:
    low = name.lower()
    return next((m for key, m in MODALITIES if key in low), "MR")


def find_sources(data: Path) -> list[Source]:
    """The source volumes (headers only), sorted by path so the draw does not depend on listing order."""
    paths = sorted((data / "unlabeled").glob("*.nii.gz")) + sorted(
        (data / "Dataset004_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    if not paths:
        raise SystemExit(f"no source volumes in {data}/unlabeled or {data}/Dataset004_Hippocampus/imagesTr "
                         "(set --data or S3D_TEST_DATA)")
    out = []
    for p in paths:
        img = nib.load(p)
        shape = tuple(int(s) for s in img.shape)
        if len(shape) != 3:
            print(f"skipping {p.name}: shape {shape} is not 3-D")
            continue
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        name = _name(p)
        small = max(n * s for n, s in zip(shape, spacing, strict=True)) < SMALL_MM
        out.append(Source(p, name, shape, spacing, small, SOURCE_WEIGHTS.get(name, 1.0), _modality(name)))
    return out


@cache  # per process: every source is read and decompressed once
def _load(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header, tuple[tuple[int, int], ...]]:
    """(voxels in the on-disk dtype, affine, header, nonzero bbox per axis) of a source."""
    img = nib.load(path)
    # no scaling: the raw array in its own dtype; scaled files come back as floats and nibabel
    # re-derives a scaling for the original dtype when it writes them
    data = np.asanyarray(img.dataobj)
    bbox = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(data != 0, axis=tuple(a for a in range(3) if a != axis)))
        bbox.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, data.shape[axis]))
    return data, img.affine.copy(), img.header.copy(), tuple(bbox)


def _crop_axis(rng: np.random.Generator, n: int, spacing: float, nz: tuple[int, int], keep_patch: bool,
               min_keep: float) -> tuple[int, int]:
    """(start, length) of the crop along one axis: length >= min_keep * n and, when keep_patch,
    the crop overlaps the nonzero range `nz` by >= KEEP_MM."""
    lo = min(n, math.ceil(min_keep * n))
    need = min(math.ceil(KEEP_MM / spacing), nz[1] - nz[0]) if keep_patch else 0
    length = int(rng.integers(max(lo, need), n + 1))
    while True:
        starts = np.arange(n - length + 1)
        overlap = np.minimum(nz[1], starts + length) - np.maximum(nz[0], starts)
        ok = starts[overlap >= need]
        if ok.size:
            return int(rng.choice(ok)), length
        length += 1  # cannot pass n: at length n the overlap is the whole nonzero range


def _plan_crop(src: Source, bbox: tuple[tuple[int, int], ...], rng: np.random.Generator,
               min_keep: float) -> tuple[list[tuple[int, int]], list[bool]]:
    extent = [(hi - lo) * s for (lo, hi), s in zip(bbox, src.spacing, strict=True)]
    widest = sorted(range(3), key=lambda a: -extent[a])[:2]
    keep = [a in widest and all(extent[b] >= KEEP_MM for b in widest) for a in range(3)]
    crop = [_crop_axis(rng, n, s, nz, k, min_keep)
            for n, s, nz, k in zip(src.shape, src.spacing, bbox, keep, strict=True)]
    flips = [bool(f) for f in rng.integers(0, 2, size=3)]
    return crop, flips


def _shape_1mm(data: np.ndarray, spacing: tuple[float, float, float]) -> list[int]:
    """The shape `s3d preprocess --corpus` will give this volume: cropped to its nonzero box, then
    resampled to 1 mm (rounded)."""
    shape = []
    for axis in range(3):
        hit = np.flatnonzero(np.any(data != 0, axis=tuple(a for a in range(3) if a != axis)))
        n = int(hit[-1] - hit[0] + 1) if hit.size else data.shape[axis]
        shape.append(max(1, round(n * spacing[axis])))
    return shape


def _write_one(job: tuple) -> dict:
    """Crop, flip and write one file (worker); returns its manifest row."""
    index, seed, src, rel, out_dir, min_keep, verify = job
    rng = np.random.default_rng([seed, index])
    data, affine, header, bbox = _load(src.path)
    crop, flips = _plan_crop(src, bbox, rng, min_keep)
    view = data[tuple(slice(s, s + n) for s, n in crop)]
    # new voxel j on axis a is source voxel start + j, or start + length - 1 - j when flipped:
    # affine_new = affine_src @ M keeps every voxel's world position
    m = np.eye(4)
    for a, ((start, length), flip) in enumerate(zip(crop, flips, strict=True)):
        m[a, a] = -1.0 if flip else 1.0
        m[a, 3] = start + (length - 1 if flip else 0)
    axes = tuple(a for a in range(3) if flips[a])
    arr = np.ascontiguousarray(np.flip(view, axis=axes) if axes else view)
    new_affine = affine @ m
    img = nib.Nifti1Image(arr, new_affine, header=header)
    img.set_data_dtype(header.get_data_dtype())
    # keep the source's form codes (nibabel would otherwise upgrade a 0 qform code to 'aligned')
    img.set_qform(new_affine, int(header["qform_code"]))
    img.set_sform(new_affine, int(header["sform_code"]))
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    if verify:
        _verify(path, data, affine, crop, flips)
    return {"path": rel, "source": src.name, "modality": src.modality, "small": src.small,
            "crop_start": [s for s, _ in crop], "shape": [n for _, n in crop], "flips": flips,
            "spacing": [round(s, 6) for s in src.spacing], "dtype": str(header.get_data_dtype()),
            "shape_1mm": _shape_1mm(arr, src.spacing)}


def _verify(path: Path, data: np.ndarray, affine: np.ndarray, crop: list[tuple[int, int]],
            flips: list[bool]) -> None:
    """Read the file back: dtype, and that the voxel at a few positions sits at the same world point
    with the same value as in the source."""
    img = nib.load(path)
    out = np.asanyarray(img.dataobj)
    assert out.dtype == data.dtype, (path, out.dtype, data.dtype)
    rng = np.random.default_rng(0)
    inv = np.linalg.inv(affine)
    for _ in range(8):
        j = [int(rng.integers(0, n)) for _, n in crop]
        world = img.affine @ np.array([*j, 1.0])
        i = np.rint(inv @ world)[:3].astype(int)
        expect = [s + (n - 1 - jj if f else jj) for (s, n), jj, f in zip(crop, j, flips, strict=True)]
        assert list(i) == expect, (path, i, expect)
        assert out[tuple(j)] == data[tuple(i)], (path, j, i)


def _assign(sources: list[Source], n: int, small_fraction: float, seed: int) -> list[Source]:
    """The source of each of the n files: exactly round(n * small_fraction) small ones, at
    seeded random positions; big ones drawn by weight."""
    small = [s for s in sources if s.small]
    big = [s for s in sources if not s.small]
    n_small = round(n * small_fraction) if small else 0
    if not big:
        n_small = n
    rng = np.random.default_rng([seed, 10**9])
    is_small = np.zeros(n, bool)
    is_small[rng.permutation(n)[:n_small]] = True
    weights = np.array([s.weight for s in big], float)
    picks_big = rng.choice(len(big), size=n - n_small, p=weights / weights.sum()) if big else []
    picks_small = rng.integers(0, len(small), size=n_small) if small else []
    it_big, it_small = iter(picks_big), iter(picks_small)
    return [small[next(it_small)] if s else big[next(it_big)] for s in is_small]


def _rel_path(index: int, modality: str) -> tuple[str, str, str, str]:
    """(relative path, site, subject, file name) of file `index`."""
    subject = index // FILES_PER_SUBJECT
    run = index % FILES_PER_SUBJECT + 1
    site = f"site-{subject % SITES:02d}"
    sub = f"sub-{subject:04d}"
    name = f"{sub}_ses-1_run-{run}_{modality}.nii.gz"
    return f"{site}/{sub}/ses-1/{name}", site, sub, name


def _pretrain_json(rows: list[dict], seed: int) -> dict:
    """nnssl's pretrain_data.json layout (its readme, "Examplary Structure")."""
    datasets: dict[str, dict] = {}
    for row in rows:
        site, sub, ses, name = row["path"].split("/")
        ds = datasets.setdefault(site, {"dataset_index": site, "dataset_info": None, "subjects": {}})
        subject = ds["subjects"].setdefault(sub, {"subject_id": sub, "subject_info": None, "sessions": {}})
        session = subject["sessions"].setdefault(ses, {"session_id": ses, "session_info": None, "images": []})
        session["images"].append({"name": name, "modality": row["modality"], "image_info": {},
                                  "image_path": row["path"], "associated_masks": None})
    return {"collection_index": 900, "collection_name": f"Dataset900_S3DLoaderBench_seed{seed}",
            "datasets": dict(sorted(datasets.items()))}


def summarize(rows: list[dict]) -> dict:
    """Counts, 1 mm size distribution and the preprocessing estimate of a manifest."""
    shapes = np.array([r["shape_1mm"] for r in rows], dtype=np.int64)
    srt = np.sort(shapes, axis=1)
    mvox = shapes.prod(axis=1) / 1e6
    big = np.array([not r["small"] for r in rows])
    ge160 = (shapes >= PATCH_MM).sum(axis=1)
    q = [0, 10, 50, 90, 100]
    by_source: dict[str, dict] = {}
    for r, g, v in zip(rows, ge160, mvox, strict=True):
        key = "hippocampus (Dataset004 imagesTr)" if r["source"].startswith("hippocampus_") else r["source"]
        d = by_source.setdefault(key, {"files": 0, "ge160_2axes": 0, "mvoxels_1mm": 0.0})
        d["files"] += 1
        d["ge160_2axes"] += int(g >= 2)
        d["mvoxels_1mm"] += float(v)
    return {
        "files": len(rows),
        "small_files": int((~big).sum()),
        "big_files": int(big.sum()),
        "ge160_on_2_axes": int((ge160 >= 2).sum()),
        "ge160_on_2_axes_of_big": int((ge160[big] >= 2).sum()),
        "ge160_on_3_axes": int((ge160 >= 3).sum()),
        "ge64_on_3_axes": int((shapes >= 64).all(axis=1).sum()),
        "axis_1mm_percentiles": {f"p{p}": {"smallest": int(np.percentile(srt[:, 0], p)),
                                           "middle": int(np.percentile(srt[:, 1], p)),
                                           "largest": int(np.percentile(srt[:, 2], p))} for p in q},
        "mvoxels_1mm_per_file_big": {f"p{p}": round(float(np.percentile(mvox[big], p)), 2) for p in q}
        if big.any() else {},
        "float32_gib_1mm": round(float(mvox.sum()) * 4e6 / 2**30, 2),
        "estimated_preprocess_core_s": round(float(mvox.sum()) * SEC_PER_MVOXEL + len(rows) * SEC_PER_FILE),
        "by_source": dict(sorted(by_source.items())),
    }


def _print_summary(s: dict, seconds: float, disk: int) -> None:
    print(f"{s['files']} files ({s['small_files']} small, {s['big_files']} big) in {seconds:.1f} s, "
          f"{disk / 2**30:.2f} GiB of .nii.gz")
    print(f"at 1 mm: {s['ge160_on_2_axes']} files >= 160 voxels on >= 2 axes ({s['ge160_on_2_axes_of_big']} of "
          f"{s['big_files']} big), {s['ge160_on_3_axes']} on 3 axes, {s['ge64_on_3_axes']} hold a 64^3 patch")
    print("axis lengths at 1 mm (sorted per file) p0/p10/p50/p90/p100:")
    for k in ("smallest", "middle", "largest"):
        print(f"  {k:8s} " + " / ".join(str(v[k]) for v in s["axis_1mm_percentiles"].values()))
    if s["mvoxels_1mm_per_file_big"]:
        print("M voxels per big file at 1 mm p0/p10/p50/p90/p100: "
              + " / ".join(str(v) for v in s["mvoxels_1mm_per_file_big"].values()))
    est = s["estimated_preprocess_core_s"]
    print(f"float32 at 1 mm: {s['float32_gib_1mm']} GiB uncompressed; estimated `s3d preprocess --corpus` cost "
          f"{est} core-s (~{est / 2 / 60:.1f} min with -j 2)")
    print(f"{'source':42s} files  >=160 on 2 axes  M voxels at 1 mm")
    for name, d in s["by_source"].items():
        print(f"  {name:40s} {d['files']:5d}  {d['ge160_2axes']:15d}  {d['mvoxels_1mm']:10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=2000, help="number of files")
    ap.add_argument("--data", type=Path, default=DATA, help="shared/data (default: $S3D_TEST_DATA or ../shared/data)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-fraction", type=float, default=0.2,
                    help="fraction of files copied from the ~35x50x35 hippocampus crops (default 0.2: keeps "
                         "the -j 2 preprocessing near 10 min for 2000 files)")
    ap.add_argument("--min-keep", type=float, default=0.7, help="each crop keeps at least this fraction of every axis")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="writer processes (gzip is the cost)")
    ap.add_argument("--overwrite", action="store_true", help="delete OUT first if it exists")
    args = ap.parse_args()
    if not 0 <= args.small_fraction <= 1 or not 0 < args.min_keep <= 1 or args.n < 1:
        ap.error("need 0 <= --small-fraction <= 1, 0 < --min-keep <= 1 and --n >= 1")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            ap.error(f"{args.out} is not empty (--overwrite deletes it first)")
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    sources = find_sources(args.data)
    picks = _assign(sources, args.n, args.small_fraction, args.seed)
    seen: set[str] = set()
    jobs = []
    for i, src in enumerate(picks):
        rel = _rel_path(i, src.modality)[0]
        jobs.append((i, args.seed, src, rel, args.out, args.min_keep, src.name not in seen))
        seen.add(src.name)
    # sorted by source so that each worker reads a source once and mostly reuses it from its cache
    order = sorted(range(len(jobs)), key=lambda k: (jobs[k][2].name, k))
    chunk = max(1, len(jobs) // (8 * max(1, args.jobs)))
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            done = list(pool.map(_write_one, [jobs[k] for k in order], chunksize=chunk))
    else:
        done = [_write_one(jobs[k]) for k in order]
    rows = [row for _, row in sorted(zip(order, done, strict=True))]
    seconds = time.perf_counter() - t0

    (args.out / "paths.txt").write_text("".join(r["path"] + "\n" for r in rows))
    with open(args.out / "pretrain_data.json", "w") as f:
        json.dump(_pretrain_json(rows, args.seed), f, indent=1)
    disk = sum(p.stat().st_size for p in args.out.rglob("*.nii.gz"))
    summary = summarize(rows)
    meta = {
        "what": "renamed, randomly cropped and randomly flipped copies of the real volumes in shared/data "
                "(an I/O benchmark corpus, not a training corpus)",
        "command": f"python benchmarks/make_corpus.py {args.out} --n {args.n} --seed {args.seed} "
                   f"--small-fraction {args.small_fraction} --min-keep {args.min_keep}",
        "data": str(args.data), "seed": args.seed, "small_fraction": args.small_fraction, "min_keep": args.min_keep,
        "sources": [{"name": s.name, "shape": s.shape, "spacing": s.spacing, "small": s.small, "weight": s.weight}
                    for s in sources],
        "seconds": round(seconds, 1), "nii_gz_bytes": disk, "summary": summary, "files": rows,
    }
    with open(args.out / "manifest.json", "w") as f:
        json.dump(meta, f, indent=None)
    _print_summary(summary, seconds, disk)
    print(f"wrote {args.out}/paths.txt, pretrain_data.json, manifest.json")


if __name__ == "__main__":
    main()
