"""Hippocampus 5-fold cross-validation, and the 5-fold ensemble against fold 0 on cases none trained on.

1. A test subset (--test-fraction of the labeled cases, a fixed permutation) is set aside; the other
   cases form the pool that `s3d finetune --folds` splits into 5 folds. Nothing of the test subset is
   trained on, validated on or used to decide the postprocessing.
2. Every fold is trained with `s3d finetune POOL RUN --folds K --resume` (one command per fold, so its
   wall time is measured on its own; the run is resumable at any point: rerun the same command).
3. The cross-validation Dice per fold and overall and the postprocessing decision are read from what
   the command wrote (fold_K/validation/summary.json, crossval/summary.json, postprocessing.json).
4. The test subset is predicted with `s3d predict -m RUN` (the ensemble of the 5 folds) and with
   `-m RUN/fold_0` (one network), both with the run's postprocessing, and compared case by case with
   `s3d evaluate TEST_LABELS ENSEMBLE FOLD0` (paired bootstrap interval).

Results: OUT/results.md and OUT/results.json.

    python benchmarks/crossval.py --out runs/cv_hippo --steps 1000                 # the measurement
    python benchmarks/crossval.py --out /tmp/cv_smoke --steps 5 --max-cases 20     # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))
TEST_SEED = 4242  # not the split's seed (12345): the test subset is drawn independently of the folds


def _link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.symlink_to(src.resolve())


def make_subsets(data: Path, out: Path, test_fraction: float, max_cases: int | None) -> tuple[Path, Path, Path, list]:
    """OUT/pool (an nnU-Net dataset of the cross-validation cases), OUT/test_images, OUT/test_labels."""
    ds_json = json.loads((data / "dataset.json").read_text())
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (data / "imagesTr").glob("*_0000.nii.gz"))
    if max_cases:
        ids = ids[:max_cases]
    perm = [ids[i] for i in np.random.RandomState(TEST_SEED).permutation(len(ids))]
    n_test = max(1, round(len(ids) * test_fraction))
    test, pool = sorted(perm[:n_test]), sorted(perm[n_test:])
    pool_dir, test_images, test_labels = out / "pool", out / "test_images", out / "test_labels"
    for d in (pool_dir / "imagesTr", pool_dir / "labelsTr", test_images, test_labels):
        d.mkdir(parents=True, exist_ok=True)
    (pool_dir / "dataset.json").write_text(json.dumps({**ds_json, "numTraining": len(pool)}, indent=1))
    for c in pool:
        _link(data / "imagesTr" / f"{c}_0000.nii.gz", pool_dir / "imagesTr" / f"{c}_0000.nii.gz")
        _link(data / "labelsTr" / f"{c}.nii.gz", pool_dir / "labelsTr" / f"{c}.nii.gz")
    for c in test:
        _link(data / "imagesTr" / f"{c}_0000.nii.gz", test_images / f"{c}_0000.nii.gz")
        _link(data / "labelsTr" / f"{c}.nii.gz", test_labels / f"{c}.nii.gz")
    return pool_dir, test_images, test_labels, test


def _s3d(*args: str) -> float:
    """Run one s3d command (the CLI, as a user would), echo it, and return its wall time in seconds."""
    cmd = [sys.executable, "-m", "s3d", *args]
    print("+ s3d " + " ".join(args), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "Dataset004_Hippocampus")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=1000, help="training steps per fold")
    ap.add_argument("--arch", default="resenc-s")
    ap.add_argument("--patch-size", nargs=3, type=int, default=[40, 56, 40],
                    help="voxels; nnU-Net's plan for this dataset")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="auto", help="autocast for training and prediction (auto: fp32 on CPU; bf16 pays "
                    "off only on CPUs with native bf16)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="labeled cases kept out of the 5-fold split")
    ap.add_argument("--max-cases", type=int, default=None, help="use only the first N cases (smoke tests)")
    ap.add_argument("--no-tta", action="store_true", help="no mirroring when predicting (8x faster)")
    ap.add_argument("--resamples", type=int, default=10_000)
    args = ap.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool, test_images, test_labels, test_ids = make_subsets(args.data, out, args.test_fraction, args.max_cases)
    run = out / "run"
    tta = ["--no-tta"] if args.no_tta else []
    train_opts = ["--steps", str(args.steps), "--arch", args.arch, "--patch-size", *map(str, args.patch_size),
                  "--batch-size", str(args.batch_size), "--device", args.device, "--amp", args.amp, "--val-every", "0",
                  "--checkpoint-every", str(max(1, args.steps // 4)), *tta]
    timing_file = out / "fold_times.json"
    times = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    for k in args.folds:
        done = (run / f"fold_{k}" / "validation" / "summary.json").exists()
        wall = _s3d("finetune", str(pool), str(run), "--folds", str(k), "--resume", *train_opts)
        if not done:  # a fold finished by an earlier invocation keeps its time
            times[str(k)] = wall
            timing_file.write_text(json.dumps(times, indent=1))

    predict_opts = ["--device", args.device, "--amp", args.amp, *tta]
    pred_ens, pred_f0 = out / "test_pred_ensemble", out / "test_pred_fold0"
    t_ens = _s3d("predict", "-i", str(test_images), "-o", str(pred_ens), "-m", str(run), *predict_opts)
    t_f0 = _s3d("predict", "-i", str(test_images), "-o", str(pred_f0), "-m", str(run / f"fold_{args.folds[0]}"),
                *predict_opts)
    comparison = out / "ensemble_vs_fold0.json"
    _s3d("evaluate", str(test_labels), str(pred_ens), str(pred_f0), "-o", str(comparison),
         "--resamples", str(args.resamples))
    report(out, run, args, times, t_ens, t_f0, comparison, len(test_ids))


def report(out: Path, run: Path, args: argparse.Namespace, times: dict, t_ens: float, t_f0: float,
           comparison: Path, n_test: int) -> None:
    cv = json.loads((run / "crossval" / "summary.json").read_text())
    pp = json.loads((run / "postprocessing.json").read_text())
    comp = json.loads(comparison.read_text())
    names = cv["labels"]
    lines = [f"Hippocampus, {len(args.folds)} folds x {args.steps} steps ({args.arch}, patch "
             f"{'x'.join(map(str, args.patch_size))}, batch {args.batch_size}, {args.device}, amp {args.amp}), "
             "validation "
             f"{'without' if args.no_tta else 'with'} TTA", "",
             "| fold | val cases | " + " | ".join(f"Dice {n}" for n in names.values()) + " | mean Dice | NSD | "
             "train+validate wall s |", "| --- |" + " ---: |" * (len(names) + 4)]
    per_fold = {}
    for k in args.folds:
        s = json.loads((run / f"fold_{k}" / "validation" / "summary.json").read_text())
        per_fold[k] = s
        cells = [f"{s['mean'][v]['Dice']:.4f}" for v in names]
        lines.append(f"| {k} | {len(s['metric_per_case'])} | " + " | ".join(cells) +
                     f" | {s['foreground_mean']['Dice']:.4f} | {s['foreground_mean']['NSD']:.4f} | "
                     f"{times.get(str(k), float('nan')):.0f} |")
    lines.append(f"| all (out-of-fold) | {len(cv['metric_per_case'])} | " +
                 " | ".join(f"{cv['mean'][v]['Dice']:.4f}" for v in names) +
                 f" | {cv['foreground_mean']['Dice']:.4f} | {cv['foreground_mean']['NSD']:.4f} | "
                 f"{sum(times.values()):.0f} |")
    from s3d.postprocess import PostprocessingDecision

    described = PostprocessingDecision.from_dict(pp).describe()
    lines += ["", f"Postprocessing decided on the out-of-fold predictions: {described} (mean Dice "
              f"{pp['dice_before']['foreground_mean']:.4f} -> {pp['dice_after']['foreground_mean']:.4f})", "",
              f"Test subset ({n_test} cases outside the 5-fold split), with the run's postprocessing: "
              f"ensemble predicted in {t_ens:.0f} s, fold 0 alone in {t_f0:.0f} s.", ""]
    from s3d.compare import format_comparison

    lines.append(format_comparison(comp))
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "folds": {k: s["foreground_mean"] for k, s in per_fold.items()}, "fold_wall_s": times,
        "crossval": cv["foreground_mean"], "postprocessing": pp, "ensemble_vs_fold0": comp["pairs"],
        "methods": comp["methods"], "predict_wall_s": {"ensemble": t_ens, "fold0": t_f0},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
