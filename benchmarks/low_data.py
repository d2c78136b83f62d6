"""The papers' low-data study on real scans: does pre-training help when labels are scarce?

On a fixed internal split of Dataset004_Hippocampus (fold 0 of s3d's 5-fold split):
1. pre-train once per method (mae, simtrot) on the TRAINING-split images plus ../shared/data/unlabeled
   (never on the validation cases);
2. fine-tune from scratch (same network and preprocessing, random init) and from each pre-trained
   encoder with N training cases (default 5, 10, 25, all) and several seeds, one step budget per N;
3. predict the validation cases, evaluate Dice and NSD (1 mm) on the original grid, and report
   mean +- std per arm and N as a Markdown table (results.md), JSON (results.json) and a PNG plot;
   each pre-trained arm against scratch as the mean paired per-case difference (averaged over the
   seeds both ran) with a 95% bootstrap interval over the validation cases and the per-case win rate
   (s3d.compare.paired_bootstrap, as `s3d evaluate REF A B` reports it).

`--backbones swin` adds (or, alone, runs only) the SimTROT paper's own setting (issue 15): Swin UNETR
(`--swin-arch`, default swin-unetr-s) from scratch vs SimTROT vs B-TROT pre-trained on the TRAINING-split
images only (no unlabeled volumes), with s3d's Swin pre-training defaults (the paper's SGD, lr 1e-4, Nesterov
0.99; w = 5, tau = 0.5, view-A mask ratio 0.75). Its arms are named swin_scratch, swin_simtrot, swin_btrot
(run folders pretrain_swin_*, ft_swin_*), so both backbones can share one --out and one report, and each
pre-trained arm is paired against the scratch arm of its own backbone.

Everything is resumable: finished runs are skipped, so the study can be stopped and restarted.

    python benchmarks/low_data.py --out runs/low_data            # full study (hours on 2 CPU cores)
    python benchmarks/low_data.py --out runs/ld --ns 5 --seeds 0 --finetune-steps 50 --simtrot-steps 20
    python benchmarks/low_data.py --out runs/ld_swin --backbones swin --ns 5 --seeds 0 --finetune-steps 3 \
        --swin-pretrain-steps 2 --val-cases 4                        # Swin arms only, smoke size
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from s3d.files import write_json

SWIN_PREFIX = "swin_"  # arm-name prefix of the Swin UNETR arms; their reference arm is swin_scratch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))


def _link_images(cases: list[str], src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for c in cases:
        link = dst / f"{c}_0000.nii.gz"
        if not link.exists():
            link.symlink_to((src / f"{c}_0000.nii.gz").resolve())
    return dst


def _draw_plot(results: dict, ns: list, path: Path, n_all: int, title: str) -> None:
    """Dice vs N, one line per arm with the seeds' std as error bars. matplotlib (`pip install matplotlib`,
    a benchmark-only dependency) draws axes, ticks and a legend; without it, bare lines drawn with numpy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _draw_plot_numpy(results, ns, path)
        return
    xs = {n: n_all if n == "all" else int(n) for n in ns}
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for arm, row in results.items():
        pts = [(xs[n], row[str(n)]["dice_mean"], row[str(n)]["dice_std"]) for n in ns if str(n) in row]
        if pts:
            x, y, e = zip(*pts, strict=True)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks([xs[n] for n in ns], [f"{xs[n]}" + (" (all)" if n == "all" else "") for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("labeled training cases N")
    ax.set_ylabel("mean foreground Dice (fold-0 val cases)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _draw_plot_numpy(results: dict, ns: list, path: Path) -> None:
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


def _worker_init() -> None:
    # One thread per worker: two torch processes each using every core slow each other ~8x (OpenMP
    # spinning); one single-threaded run per core is the fastest way through many small runs.
    import torch

    torch.set_num_threads(1)


def _reference_arm(arm: str) -> str:
    """The scratch arm a pre-trained arm is compared with: the same backbone, randomly initialised."""
    return f"{SWIN_PREFIX}scratch" if arm.startswith(SWIN_PREFIX) else "scratch"


def _pretrain_job(method: str, run: Path, data: list[Path], spec: dict) -> dict:
    from s3d.data.curation import CurationConfig
    from s3d.train.pretrain import PretrainConfig, pretrain

    t = time.time()
    if (run / "config.json").exists() and json.loads((run / "config.json").read_text()).get("step", 0) >= spec["steps"]:
        return {"job": run.name, "wall_s": 0.0, "skipped": "finished earlier"}
    # lr stays None (PretrainConfig's per-arch default): for Swin UNETR that is the SimTROT paper's 1e-4
    cfg = PretrainConfig(method=method, arch=spec["arch"], patch_size=tuple(spec["patch"]),
                         batch_size=spec["batch"], steps=spec["steps"], device=spec["device"],
                         checkpoint_every=max(1, spec["steps"] // 10), preview_every=max(1, spec["steps"] // 4))
    # workers=0: the study runs one single-threaded job per core, a loader process would take a core
    # min_fov_fraction=0: the hippocampus crops (35x50x35) are smaller than the 48^3 patch and are the data here
    pretrain(data, run, cfg, resume=(run / "pretrain.json").exists(), workers=0,
             curation=CurationConfig(min_fov_fraction=0))
    return {"job": run.name, "wall_s": time.time() - t}


def _finetune_job(run: Path, prepared: Path, val_imgs: Path, val_refs: Path, labels: dict, spec: dict) -> dict:
    from s3d.evaluate import evaluate_folders
    from s3d.predict import predict_folder
    from s3d.train.finetune import FinetuneConfig, finetune

    summary_path = run / "val_summary.json"
    t = time.time()
    if not summary_path.exists():
        cfg = FinetuneConfig(
            arch=spec["arch"], patch_size=tuple(spec["patch"]), batch_size=spec["batch"], steps=spec["steps"],
            val_every=0, fold=0, train_cases=spec["n"], seed=spec["seed"], device=spec["device"],
            weights=spec["weights"], from_scratch=spec["from_scratch"], checkpoint_every=max(1, spec["steps"] // 4),
            lr=spec["lr"], amp=spec["amp"], warmup_steps=spec.get("warmup"),
        )
        finetune(prepared, run, cfg, resume=(run / "finetune.json").exists(), workers=0)
        preds = run / "val_predictions"
        predict_folder(val_imgs, preds, run, device=spec["device"], tta=spec["tta"], continue_=True,
                       amp=spec["amp"])
        summary = evaluate_folders(val_refs, preds, labels, nsd_tolerance=1.0, progress=False)
        summary["wall_s"] = time.time() - t
        write_json(summary_path, summary)
    return {"job": run.name, "wall_s": time.time() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "Dataset004_Hippocampus")
    ap.add_argument("--unlabeled", type=Path, default=DATA / "unlabeled")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ns", nargs="+", default=["5", "10", "25", "all"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["mae", "simtrot"])
    ap.add_argument("--arch", default="resenc-s")
    ap.add_argument("--patch-size", nargs=3, type=int, default=[40, 56, 40],
                    help="fine-tuning patch (voxels); nnU-Net's plan for this dataset")
    ap.add_argument("--pretrain-patch", nargs=3, type=int, default=[48, 48, 48],
                    help="pre-training patch (voxels); it also fixes the network every arm shares")
    ap.add_argument("--mae-steps", type=int, default=1200)
    ap.add_argument("--simtrot-steps", type=int, default=500)
    ap.add_argument("--simtrot-batch", type=int, default=4, help="SimTROT needs other volumes in the batch")
    ap.add_argument("--finetune-steps", type=int, default=600, help="same budget for every arm and N")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2,
                    help="peak LR of every arm. S3D fine-tunes pre-trained encoders at 1e-3, tuned for 1000 epochs; "
                         "at a CPU budget of hundreds of steps 1e-3 has not left the all-background solution "
                         "(measured: 400 steps, N=5, Dice 0), so every arm gets nnU-Net's 1e-2 here")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"],
                    help="autocast for fine-tuning and prediction (bf16: ~1.5x faster training on AMX CPUs)")
    ap.add_argument("--tta", action="store_true", help="mirroring TTA when predicting the validation cases")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="runs in parallel, one thread each")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbones", nargs="+", default=["resenc"], choices=["resenc", "swin"],
                    help="resenc: the ResEnc arms (scratch, --methods); swin: the Swin UNETR arms (swin_scratch, "
                         "swin_ + --swin-methods), pre-trained on the training-split images only (SimTROT's setting)")
    ap.add_argument("--swin-arch", default="swin-unetr-s", help="Swin UNETR preset of the swin arms")
    ap.add_argument("--swin-methods", nargs="+", default=["simtrot", "btrot"], choices=["simtrot", "btrot"])
    ap.add_argument("--swin-patch", nargs=3, type=int, default=[64, 64, 64],
                    help="pre-training and fine-tuning patch of the swin arms (a multiple of 32: Swin UNETR's "
                         "patch 2 embedding and 4 merges); the 35x50x35 crops are padded to it")
    ap.add_argument("--swin-pretrain-steps", type=int, default=1000,
                    help="per method; ~1 s/step on one core at 64^3, batch 2 (the paper: 1000 epochs, Sec. 4.2)")
    ap.add_argument("--swin-pretrain-batch", type=int, default=2,
                    help="SimTROT's batch (paper Sec. 4.2); 2 still gives each volume another one to contrast with")
    ap.add_argument("--swin-warmup", default="none", choices=["none", "s3d"],
                    help="fine-tuning warm-up of the pre-trained swin arms. none: the whole network at the peak lr "
                         "from step 0 with PolyLR, as the scratch arm and as SimTROT fine-tunes (Sec. 4.2, "
                         "nnFormer's recipe, no warm-up); s3d: s3d's default 5%% decoder-only + 5%% warm-up")
    ap.add_argument("--val-cases", type=int, default=None,
                    help="evaluate only the first K fold-0 validation cases (smoke tests; default all 42)")
    ap.add_argument("--report-only", action="store_true", help="tabulate the finished runs in --out, train nothing")
    args = ap.parse_args()

    from s3d.data.curation import CurationConfig
    from s3d.train.finetune import FinetuneConfig, prepare_data, split_cases
    from s3d.train.pretrain import PretrainConfig, prepare_corpus

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((args.data / "dataset.json").read_text())["labels"]
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (args.data / "imagesTr").glob("*_0000.nii.gz"))
    train_ids, val_ids = split_cases(cases, FinetuneConfig(fold=0))
    val_ids = val_ids[: args.val_cases] if args.val_cases else val_ids
    train_imgs = _link_images(train_ids, args.data / "imagesTr", out / "train_images")
    val_imgs = _link_images(val_ids, args.data / "imagesTr", out / "val_images")
    val_refs = out / "val_labels"
    val_refs.mkdir(exist_ok=True)
    for c in val_ids:
        if not (val_refs / f"{c}.nii.gz").exists():
            (val_refs / f"{c}.nii.gz").symlink_to((args.data / "labelsTr" / f"{c}.nii.gz").resolve())
    # One entry per backbone: its arms (scratch first), the methods behind them, what they pre-train on
    # and the network/patches every arm of that backbone shares.
    swin = "swin" in args.backbones
    backbones: list[dict] = []
    if "resenc" in args.backbones:
        backbones.append({"prefix": "", "arch": args.arch, "methods": args.methods, "patch": args.patch_size,
                          "pretrain_patch": args.pretrain_patch, "data": [args.unlabeled, train_imgs]})
    if swin:
        # The paper's own setting: pre-training sees the task's training images and nothing else.
        backbones.append({"prefix": SWIN_PREFIX, "arch": args.swin_arch, "methods": args.swin_methods,
                          "patch": args.swin_patch, "pretrain_patch": args.swin_patch, "data": [train_imgs]})
    arms = [f"{b['prefix']}{a}" for b in backbones for a in ["scratch", *b["methods"]]]
    if args.report_only:
        report(out, args, arms, len(train_ids), len(val_ids), float("nan"))
        return
    if swin:  # a patch off the token grid fails here, before hours of ResEnc runs
        from s3d.nn.networks import check_patch_size, preset

        check_patch_size(args.swin_patch, preset(args.swin_arch), "--swin-patch")
    # Caches are filled here, once, so parallel runs never race to write them.
    prepared = prepare_data(args.data, (1.0, 1.0, 1.0))
    for b in backbones:
        if b["methods"]:
            prepare_corpus(b["data"], PretrainConfig(patch_size=tuple(b["pretrain_patch"])),
                           curation=CurationConfig(min_fov_fraction=0))
    t0 = time.time()

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx, initializer=_worker_init)
    common = {"device": args.device, "amp": args.amp}
    futures = []
    pretrained = {}
    # arm -> (its backbone, the pre-training run that fixes its network, or None)
    by_arm: dict[str, tuple[dict, Path | None]] = {}
    for b in backbones:
        base = out / f"pretrain_{b['prefix']}{b['methods'][0]}" if b["methods"] else None
        for method in b["methods"]:
            arm = f"{b['prefix']}{method}"
            if b["prefix"] == SWIN_PREFIX:
                steps, batch = args.swin_pretrain_steps, max(2, args.swin_pretrain_batch)
            else:
                steps = args.mae_steps if method == "mae" else args.simtrot_steps
                batch = args.batch_size if method == "mae" else max(2, args.simtrot_batch)
            spec = common | {"arch": b["arch"], "patch": b["pretrain_patch"], "steps": steps, "batch": batch}
            pretrained[arm] = pool.submit(_pretrain_job, method, out / f"pretrain_{arm}", b["data"], spec)
        for a in ["scratch", *b["methods"]]:
            by_arm[f"{b['prefix']}{a}"] = (b, base)

    def finetune_spec(arm: str, n: str, seed: int) -> dict:
        b, base = by_arm[arm]
        scratch = arm == _reference_arm(arm)
        weights = out / f"pretrain_{arm}" if not scratch else base
        return common | {"arch": b["arch"], "patch": b["patch"], "batch": args.batch_size,
                         "steps": args.finetune_steps, "lr": args.lr, "n": None if n == "all" else int(n),
                         "seed": seed, "tta": args.tta, "weights": str(weights) if weights else None,
                         "from_scratch": scratch and base is not None,
                         "warmup": (0, 0) if b["prefix"] == SWIN_PREFIX and args.swin_warmup == "none" else None}

    # Every arm trains the network of the pre-training (scratch: that network, randomly initialised), so
    # fine-tuning starts once pre-training is done. Seed-major order: if the study is cut short, whole
    # seeds are complete for every arm and N.
    for f in pretrained.values():
        print(f.result(), flush=True)
    for seed in args.seeds:
        for n in args.ns:
            for arm in arms:
                run = out / f"ft_{arm}_n{n}_s{seed}"
                futures.append(pool.submit(_finetune_job, run, prepared, val_imgs, val_refs, labels,
                                           finetune_spec(arm, n, seed)))
    for f in futures:
        print(f.result(), flush=True)
    pool.shutdown()
    report(out, args, arms, len(train_ids), len(val_ids), time.time() - t0)


def _seed_std(values: np.ndarray) -> float:
    """Sample std (ddof=1) over seeds, as papers report it; 0 for a single seed rather than NaN."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def report(out: Path, args: argparse.Namespace, arms: list[str], n_train: int, n_val: int, wall_s: float) -> None:
    results: dict[str, dict] = {}
    for arm in arms:
        results[arm] = {}
        for n in args.ns:
            per_seed, seed_ids = [], []
            for seed in args.seeds:
                path = out / f"ft_{arm}_n{n}_s{seed}" / "val_summary.json"
                if path.exists():
                    s = json.loads(path.read_text())["foreground_mean"]
                    per_seed.append((s["Dice"], s["NSD"]))
                    seed_ids.append(seed)
            if not per_seed:
                continue
            d = np.array(per_seed)
            results[arm][str(n)] = {"dice_mean": float(d[:, 0].mean()), "dice_std": _seed_std(d[:, 0]),
                                    "nsd_mean": float(d[:, 1].mean()), "nsd_std": _seed_std(d[:, 1]),
                                    "dice_per_seed": d[:, 0].tolist(), "nsd_per_seed": d[:, 1].tolist(),
                                    "seed_ids": seed_ids, "seeds": len(per_seed)}
    paired_lines, paired = _paired_table(out, results, args.ns, args.seeds)
    # one self-contained file: what benchmarks/results/ keeps of a study
    write_json(out / "results.json", {"results": results, "paired_vs_scratch": paired,
                                      "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                      "train_cases": n_train, "val_cases": n_val, "wall_s": wall_s,
                                      "runs": _run_details(out), "pretraining": _pretrain_details(out)})
    lines = ["| arm | " + " | ".join(f"N={n}" for n in args.ns) + " |",
             "| --- |" + " --- |" * len(args.ns)]
    for arm, row in results.items():
        cells = [f"{row[str(n)]['dice_mean']:.3f} ± {row[str(n)]['dice_std']:.3f} "
                 f"(NSD {row[str(n)]['nsd_mean']:.3f} ± {row[str(n)]['nsd_std']:.3f}, {row[str(n)]['seeds']} seeds)"
                 if str(n) in row else "-" for n in args.ns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += paired_lines
    (out / "results.md").write_text("\n".join(lines) + "\n")
    write_json(out / "paired_vs_scratch.json", paired)
    print("\n".join(lines))
    seeds = max((row[str(n)]["seeds"] for row in results.values() for n in args.ns if str(n) in row), default=0)
    _draw_plot(results, args.ns, out / "dice_vs_n.png", n_train,
               f"Hippocampus fold 0, {args.finetune_steps} fine-tuning steps, {seeds} seed(s) per point")


def _log_rows(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _run_details(out: Path) -> dict[str, dict]:
    """Per finished fine-tuning: Dice per label, the last logged training loss and the job's wall time
    (``wall_s_last_session``: a resumed run counts from its resume), so a result file explains itself
    without the run folder."""
    details = {}
    for summary_path in sorted(out.glob("ft_*/val_summary.json")):
        s = json.loads(summary_path.read_text())
        rows = _log_rows(summary_path.parent / "log.csv")
        details[summary_path.parent.name] = {
            "dice": {label: round(m["Dice"], 4) for label, m in s["mean"].items()},
            "final_train_loss": rows[-1].get("loss") if rows else None,
            "wall_s_last_session": round(s["wall_s"]) if "wall_s" in s else None,
        }
    return details


def _pretrain_details(out: Path) -> dict[str, list[dict[str, float]]]:
    """The first, middle and last logged rows of each pre-training: loss and the collapse monitor
    (token std and cosines) show whether the encoder learned or collapsed."""
    details = {}
    for log in sorted(out.glob("pretrain_*/log.csv")):
        rows = _log_rows(log)
        if rows:
            picked = {0, len(rows) // 2, len(rows) - 1}
            details[log.parent.name] = [rows[i] for i in sorted(picked)]
    return details


def _case_dice(out: Path, arm: str, n: str, seed: int) -> dict[str, float] | None:
    from s3d.compare import per_case_values

    path = out / f"ft_{arm}_n{n}_s{seed}" / "val_summary.json"
    return per_case_values(json.loads(path.read_text()), "Dice") if path.exists() else None


def _paired_table(out: Path, results: dict, ns: list, seeds: list[int]) -> tuple[list[str], dict]:
    """Dice of each pre-trained arm minus scratch, paired by case: per validation case the difference
    averaged over the seeds both arms ran, then its mean over cases with a 95% bootstrap interval over
    cases (10,000 resamples, seeded) and the share of cases the arm wins. Pairing removes what the arms
    share (which cases are hard), so it shows more than two means with their own stds; the interval
    says whether the difference is larger than the case-to-case noise of this validation set."""
    from s3d.compare import paired_bootstrap

    if not any(results.get(_reference_arm(arm)) for arm in results):
        return [], {}
    lines = ["", "Dice minus scratch of the same backbone (swin_* arms: swin_scratch), paired by case (per case "
             "averaged over the seeds both ran), in points: mean [95% bootstrap CI over cases], cases won:", "",
             "| arm | " + " | ".join(f"N={n}" for n in ns) + " |", "| --- |" + " --- |" * len(ns)]
    stats: dict = {}
    for arm in results:
        ref = _reference_arm(arm)
        if arm == ref:
            continue
        cells = []
        for n in ns:
            pairs = [(_case_dice(out, arm, str(n), s), _case_dice(out, ref, str(n), s)) for s in seeds]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if not pairs:
                cells.append("-")
                continue
            cases = sorted(pairs[0][0])
            a = np.array([[p[0][c] for c in cases] for p in pairs]).mean(axis=0)
            b = np.array([[p[1][c] for c in cases] for p in pairs]).mean(axis=0)
            r = paired_bootstrap(a, b, seed=0)
            stats.setdefault(arm, {})[str(n)] = r | {"seeds": len(pairs)}
            if r["mean_diff"] is None:
                cells.append("-")
                continue
            cells.append(f"{100 * r['mean_diff']:+.1f} [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}], "
                         f"wins {100 * r['win_rate']:.0f}% ({len(pairs)} seeds)")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "An interval that excludes 0 means the arm differs from scratch beyond the case-to-case noise "
              "of these validation cases (the seeds' training noise is averaged, not resampled)."]
    return lines, stats


if __name__ == "__main__":
    main()
