"""Prediction speed: seconds per case and peak memory, with and without mirroring TTA.

Cases: hippocampus images, the 512x512 anisotropic MR series and the 3 mm abdomen CT from
../shared/data/unlabeled. Also prints the FLOP floor: network FLOPs per window x windows /
measured conv throughput of this machine.

    python benchmarks/predict_speed.py --model runs/hippo --device cpu
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("S3D_TEST_DATA", REPO.parent / "shared" / "data"))


def conv_flops(network: torch.nn.Module, patch) -> float:  # noqa: ANN001
    """Multiply-adds x2 of every conv / transposed conv for one window (forward only)."""
    total = 0.0

    def hook(m, inp, out):  # noqa: ANN001
        nonlocal total
        k = m.weight.numel() // (m.out_channels if isinstance(m, torch.nn.Conv3d) else m.in_channels)
        total += 2.0 * k * out.numel() / out.shape[0] * (1 if isinstance(m, torch.nn.Conv3d) else 1)

    hs = [m.register_forward_hook(hook) for m in network.modules()
          if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    with torch.inference_mode():
        network(torch.zeros(1, network.encoder.stem_in_channels if hasattr(network.encoder, "stem_in_channels")
                            else 1, *patch, device=next(network.parameters()).device))
    for h in hs:
        h.remove()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hippocampus-cases", type=int, default=10)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"], help="autocast dtype of the network")
    ap.add_argument("--only", nargs="+", choices=["hippocampus", "mr", "ct"], default=["hippocampus", "mr", "ct"])
    ap.add_argument("--tta-max-windows", type=int, default=1000,
                    help="skip the TTA run of a volume with more windows than this (8x the no-TTA time)")
    args = ap.parse_args()

    import numpy as np

    from s3d.data.io import read_channels
    from s3d.infer import sliding_window_positions
    from s3d.predict import load_predictor, predict_case

    pred = load_predictor(args.model, args.device, args.amp)
    hippo = sorted((DATA / "Dataset004_Hippocampus" / "imagesTr").glob("*_0000.nii.gz"))[: args.hippocampus_cases]
    groups = {
        f"hippocampus ({len(hippo)} cases)": ("hippocampus", hippo),
        "MR 512x512x22 (tcia_brain_study1_12)": ("mr", [DATA / "unlabeled" / "tcia_brain_study1_12.nii.gz"]),
        "CT 3 mm abdomen": ("ct", [DATA / "unlabeled" / "totalseg_ct_abdomen_3mm.nii.gz"]),
    }
    groups = {name: files for name, (key, files) in groups.items() if key in args.only}
    flops = conv_flops(pred.network, pred.patch_size)
    x = torch.randn(2, pred.num_channels, *pred.patch_size, device=pred.device)
    amp = torch.autocast(pred.device.type, dtype=pred.amp, enabled=pred.amp is not None)
    with torch.inference_mode(), amp:
        pred.network(x)
        t = time.perf_counter()
        for _ in range(3):
            pred.network(x)
        per_window = (time.perf_counter() - t) / 6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, amp {args.amp}")
    print(f"network: {flops / 1e9:.2f} GFLOP per {pred.patch_size} window, {per_window * 1000:.0f} ms per window "
          f"({flops / per_window / 1e9:.1f} GFLOP/s achieved)")
    from s3d.data.preprocess import Plan, preprocess_case

    plan = Plan.from_dict(pred.config["plan"])
    for name, files in groups.items():
        loaded = []
        windows = 0
        for f in files:
            images, geom = read_channels([f])
            data, _, _ = preprocess_case(images, geom, plan)
            shape = [max(s, p) for s, p in zip(data.shape[1:], pred.patch_size, strict=True)]
            windows += int(np.prod([len(p) for p in sliding_window_positions(shape, pred.patch_size, 0.5)]))
            loaded.append((images, geom))
        per_case = windows / len(files)
        for tta in (False, True):
            floor = per_case * per_window * (8 if tta else 1)
            if tta and per_case > args.tta_max_windows:
                print(f"{name:<40} tta=on  skipped ({per_case:.0f} windows > --tta-max-windows; "
                      f"network floor {floor:.0f} s)")
                continue
            # timed from the image in memory (reading the file is the same for both tools and TTA settings)
            t = time.perf_counter()
            for images, geom in loaded:
                predict_case(pred, images, geom, tta=tta)
            dt = (time.perf_counter() - t) / len(files)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"{name:<40} tta={'on ' if tta else 'off'} {dt:7.2f} s/case  (network floor {floor:6.2f} s, "
                  f"{per_case:.0f} windows)  peak RSS so far {rss:.1f} GiB")

if __name__ == "__main__":
    main()
