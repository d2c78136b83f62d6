"""B-TROT collapse probe: a short B-TROT pre-training with a chosen head norm, and the collapse monitor of its
projections and of its encoder tokens at the first and last logged step (benchmarks/README.md, "B-TROT's
collapse and its fix").

    python benchmarks/btrot_collapse.py --arch swin-unetr-s --head-norm layer --steps 200 --out /tmp/pb_swin_layer

Pre-trains on the hippocampus training-split images (fold 0 of s3d's split, as benchmarks/low_data.py) with
s3d's defaults for the arch (Swin UNETR: 64^3, batch 2, lr 1e-4; ResEnc: 48^3, batch 4, lr 1e-2), bf16.
Run alone, or two probes with OMP_NUM_THREADS=1 each on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the study's data path, image links and log reader (this folder is on sys.path when the script runs)
from low_data import DATA, _link_images, _log_rows

KEYS = ("loss", "other_position_sim", "token_std", "enc_other_position_sim", "enc_same_position_sim",
        "enc_token_std")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="swin-unetr-s")
    ap.add_argument("--head-norm", default="batch", choices=["layer", "batch"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--method", default="btrot", choices=["btrot", "simtrot"])
    ap.add_argument("--data", type=Path, default=DATA / "Dataset004_Hippocampus")
    ap.add_argument("--out", type=Path, required=True, help="run folder (must not exist)")
    args = ap.parse_args()

    from s3d.data.curation import CurationConfig
    from s3d.train.finetune import FinetuneConfig, split_cases
    from s3d.train.pretrain import PretrainConfig, pretrain

    if not (args.data / "imagesTr").is_dir():
        raise SystemExit(f"{args.data}: no imagesTr (set --data or S3D_TEST_DATA)")
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (args.data / "imagesTr").glob("*_0000.nii.gz"))
    train_ids, _ = split_cases(cases, FinetuneConfig(fold=0))
    images = _link_images(train_ids, args.data / "imagesTr", args.out.with_name(args.out.name + "_images"))
    swin = args.arch.startswith("swin")
    cfg = PretrainConfig(method=args.method, arch=args.arch, patch_size=(64,) * 3 if swin else (48,) * 3,
                         batch_size=2 if swin else 4, steps=args.steps, amp="bf16", head_norm=args.head_norm,
                         checkpoint_every=args.steps, preview_every=10**6)
    # min_fov_fraction=0: the hippocampus crops (35x50x35) are smaller than the patch and are the data here
    pretrain([images], args.out, cfg, workers=0, curation=CurationConfig(min_fov_fraction=0))
    rows = _log_rows(args.out / "log.csv")
    first, last = rows[0], rows[-1]
    summary = {"arch": args.arch, "head_norm": args.head_norm, "method": args.method, "steps": args.steps,
               **{k: [first[k], last[k]] for k in KEYS}}
    (args.out / "collapse_probe.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
