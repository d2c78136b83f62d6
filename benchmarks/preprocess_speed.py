"""Wall time of `s3d preprocess` on all of Dataset004_Hippocampus (208 cases), split into its stages.

Reference point: nnU-Net's `nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 2` (fingerprint,
plan and preprocess) takes about 34 s wall on the project's 2-core machine; the goal is well under
half of that for the same three stages. Also compares the per-case cost of np.savez against
np.savez_compressed on the preprocessed hippocampus arrays (why cases are stored uncompressed).

    python benchmarks/preprocess_speed.py              # -j 2, into a temporary folder
    python benchmarks/preprocess_speed.py -j 1 --keep runs/pp_hippo
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))


def _npz_costs(cases: list, n: int = 20) -> dict[str, float]:
    """Mean ms per case to write and read back, and bytes, for both npz flavours."""
    out = {}
    arrays = [dict(zip(("data", "seg"), c.load(), strict=True)) for c in cases[:n]]
    for name, fn in (("savez", np.savez), ("savez_compressed", np.savez_compressed)):
        t_w = t_r = size = 0.0
        for a in arrays:
            buf = io.BytesIO()
            t = time.perf_counter()
            fn(buf, **a)
            t_w += time.perf_counter() - t
            size += buf.tell()
            buf.seek(0)
            t = time.perf_counter()
            with np.load(buf) as z:
                _ = z["data"], z["seg"]
            t_r += time.perf_counter() - t
        k = len(arrays)
        out[name] = {"write_ms": 1e3 * t_w / k, "read_ms": 1e3 * t_r / k, "kib": size / k / 1024}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "Dataset004_Hippocampus")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="write here and keep it (default: a temp folder)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    from s3d.data.dataset import find_dataset
    from s3d.data.preprocess import check_dataset, load_preprocessed, plan_dataset, preprocess_dataset

    t_import = time.perf_counter() - t0
    out = args.keep or Path(tempfile.mkdtemp(prefix="s3d_pp_bench_")) / "out"
    if out.exists():
        shutil.rmtree(out)
    try:
        t = time.perf_counter()
        ds = find_dataset(args.data)
        check_dataset(ds, args.jobs)
        t_validate = time.perf_counter() - t
        t = time.perf_counter()
        plan, fp = plan_dataset(ds, "median", jobs=args.jobs, validate=False)
        t_plan = time.perf_counter() - t
        t = time.perf_counter()
        preprocess_dataset(ds, out, plan, jobs=args.jobs, fingerprint=fp, validate=False)
        t_pp = time.perf_counter() - t
        total = time.perf_counter() - t0
        _, cases = load_preprocessed(out)
        costs = _npz_costs(cases)
    finally:
        if args.keep is None:
            shutil.rmtree(out.parent, ignore_errors=True)

    print(f"{len(ds.cases)} cases, -j {args.jobs}, target spacing {plan.target_spacing}")
    print(f"  import       {t_import:6.2f} s")
    print(f"  validate     {t_validate:6.2f} s")
    print(f"  fingerprint  {t_plan:6.2f} s")
    print(f"  preprocess   {t_pp:6.2f} s")
    print(f"  total wall   {total:6.2f} s   (nnUNetv2_plan_and_preprocess on this machine: ~34 s)")
    for name, c in costs.items():
        print(f"  {name:17s} write {c['write_ms']:5.2f} ms  read {c['read_ms']:5.2f} ms  {c['kib']:7.1f} KiB per case")


if __name__ == "__main__":
    main()
