"""The papers' low-data study on real scans: does pre-training help when labels are scarce?

On a fixed internal split of Dataset004_Hippocampus (fold 0 of s3d's 5-fold split):
1. pre-train once per method (mae, simtrot) on the TRAINING-split images plus ../shared/data/unlabeled
   (never on the validation cases);
2. fine-tune from scratch (same network and preprocessing, random init) and from each pre-trained
   encoder with N training cases (default 5, 10, 25, all) and several seeds, one step budget per N;
3. predict the validation cases, evaluate Dice and NSD (1 mm) on the original grid, and report
   mean +- std per arm and N as a Markdown table (results.md), JSON (results.json) and a PNG plot.

Everything is resumable: finished runs are skipped, so the study can be stopped and restarted.

    python benchmarks/low_data.py --out runs/low_data            # full study (hours on 2 CPU cores)
    python benchmarks/low_data.py --out runs/ld --ns 5 --seeds 0 --finetune-steps 50 --pretrain-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))


def _link_images(cases: list[str], src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for c in cases:
        link = dst / f"{c}_0000.nii.gz"
        if not link.exists():
            link.symlink_to((src / f"{c}_0000.nii.gz").resolve())
    return dst


def _draw_plot(results: dict, ns: list, path: Path) -> None:
    """Dice vs N, one line per arm, as a PNG drawn with numpy (no plotting library needed)."""
    from s3d.viz import write_png

    h, w, m = 300, 420, 30
    img = np.full((h, w), 255, np.uint8)
    img[h - m, m : w - m] = 0
    img[m : h - m, m] = 0
    xs = {n: m + 10 + i * (w - 2 * m - 20) / max(1, len(ns) - 1) for i, n in enumerate(ns)}
    vals = [v["dice_mean"] for arm in results.values() for v in arm.values() if v.get("dice_mean") is not None]
    if not vals:
        return
    lo, hi = min(vals) - 0.02, max(vals) + 0.02

    def y(v: float) -> float:
        return h - m - (v - lo) / max(hi - lo, 1e-6) * (h - 2 * m)

    for shade, (_, arm) in zip((0, 90, 160, 200), results.items(), strict=False):
        pts = [(xs[n], y(arm[str(n)]["dice_mean"])) for n in ns if str(n) in arm and arm[str(n)].get("dice_mean")]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            for t in np.linspace(0, 1, 200):
                xi, yi = int(x0 + t * (x1 - x0)), int(y0 + t * (y1 - y0))
                img[max(0, yi - 1) : yi + 2, max(0, xi - 1) : xi + 2] = shade
        for x0, y0 in pts:
            img[int(y0) - 3 : int(y0) + 4, int(x0) - 3 : int(x0) + 4] = shade
    write_png(path, img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "Dataset004_Hippocampus")
    ap.add_argument("--unlabeled", type=Path, default=DATA / "unlabeled")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ns", nargs="+", default=["5", "10", "25", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["mae", "simtrot"])
    ap.add_argument("--arch", default="resenc-s")
    ap.add_argument("--patch-size", nargs=3, type=int, default=[48, 64, 48], help="fine-tuning patch (voxels)")
    ap.add_argument("--pretrain-patch", type=int, default=64, help="cubic pre-training patch edge (voxels)")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--finetune-steps", type=int, default=1000, help="same budget for every arm and N")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from s3d.evaluate import evaluate_folders
    from s3d.predict import predict_folder
    from s3d.train.finetune import FinetuneConfig, finetune, prepare_data, split_cases
    from s3d.train.pretrain import PretrainConfig, pretrain

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((args.data / "dataset.json").read_text())["labels"]
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (args.data / "imagesTr").glob("*_0000.nii.gz"))
    train_ids, val_ids = split_cases(cases, FinetuneConfig(fold=0))
    train_imgs = _link_images(train_ids, args.data / "imagesTr", out / "train_images")
    val_imgs = _link_images(val_ids, args.data / "imagesTr", out / "val_images")
    val_refs = out / "val_labels"
    val_refs.mkdir(exist_ok=True)
    for c in val_ids:
        if not (val_refs / f"{c}.nii.gz").exists():
            (val_refs / f"{c}.nii.gz").symlink_to((args.data / "labelsTr" / f"{c}.nii.gz").resolve())
    prepared = prepare_data(args.data, (1.0, 1.0, 1.0))
    t0 = time.time()

    weights = {}
    for method in args.methods:
        run = out / f"pretrain_{method}"
        cfg_file = run / "config.json"
        done = cfg_file.exists() and json.loads(cfg_file.read_text())["step"] >= args.pretrain_steps
        if not done:
            cfg = PretrainConfig(method=method, arch=args.arch, patch_size=(args.pretrain_patch,) * 3,
                                 batch_size=max(2, args.batch_size), steps=args.pretrain_steps, device=args.device,
                                 checkpoint_every=max(1, args.pretrain_steps // 4))
            pretrain([args.unlabeled, train_imgs], run, cfg, resume=(run / "state.json").exists())
        weights[method] = run

    arms = {"scratch": None, **weights}
    base = next(iter(weights.values()), None)
    results: dict[str, dict] = {}
    for arm, w in arms.items():
        results[arm] = {}
        for n in args.ns:
            per_seed = []
            for seed in args.seeds:
                run = out / f"ft_{arm}_n{n}_s{seed}"
                summary_path = run / "val_summary.json"
                if not summary_path.exists():
                    cfg = FinetuneConfig(
                        arch=args.arch, patch_size=tuple(args.patch_size), batch_size=args.batch_size,
                        steps=args.finetune_steps, val_every=0, fold=0,
                        train_cases=None if n == "all" else int(n), seed=seed, device=args.device,
                        weights=str(w or base) if (w or base) else None, from_scratch=w is None and base is not None,
                        checkpoint_every=args.finetune_steps,
                    )
                    finetune(prepared, run, cfg, resume=(run / "state.json").exists())
                    preds = run / "val_predictions"
                    predict_folder(val_imgs, preds, run, device=args.device)
                    summary = evaluate_folders(val_refs, preds, labels, nsd_tolerance=1.0)
                    summary_path.write_text(json.dumps(summary, indent=1))
                s = json.loads(summary_path.read_text())["foreground_mean"]
                per_seed.append((s["Dice"], s["NSD"]))
            d = np.array(per_seed)
            results[arm][str(n)] = {"dice_mean": float(d[:, 0].mean()), "dice_std": float(d[:, 0].std()),
                                    "nsd_mean": float(d[:, 1].mean()), "nsd_std": float(d[:, 1].std()),
                                    "seeds": len(per_seed)}
            print(arm, n, results[arm][str(n)], flush=True)

    (out / "results.json").write_text(json.dumps({"results": results, "args": vars(args) | {
        "data": str(args.data), "unlabeled": str(args.unlabeled), "out": str(out)},
        "train_cases": len(train_ids), "val_cases": len(val_ids), "wall_s": time.time() - t0}, indent=1, default=str))
    lines = ["| arm | " + " | ".join(f"N={n}" for n in args.ns) + " |",
             "| --- |" + " --- |" * len(args.ns)]
    for arm, row in results.items():
        cells = [f"{row[str(n)]['dice_mean']:.3f} ± {row[str(n)]['dice_std']:.3f} "
                 f"(NSD {row[str(n)]['nsd_mean']:.3f} ± {row[str(n)]['nsd_std']:.3f})" for n in args.ns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _draw_plot(results, args.ns, out / "dice_vs_n.png")


if __name__ == "__main__":
    main()
