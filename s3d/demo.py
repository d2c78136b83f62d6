"""`s3d demo`: fine-tune, predict and score on the real hippocampus MRIs that ship with s3d.

The 24 bundled cases (MSD Task04, CC BY-SA 4.0, `s3d/assets/`) are split by the same fixed rule as
every s3d fine-tuning run: 18 train a small Residual Encoder U-Net from scratch, the other 6 are never
seen in training and are predicted on their original voxel grid, then scored with Dice and NSD.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3d.errors import S3DError

DEFAULT_OUTPUT = Path("s3d-demo")
# Measured on 2 CPU cores (benchmarks/README.md, "s3d demo"): at 600 steps both labels are found on the
# held-out cases; fewer steps leave the network on the all-background solution this early in training.
DEFAULT_STEPS = 600
VAL_FRACTION = 0.25


@dataclass
class DemoResult:
    output: Path
    run: Path
    predictions: Path
    summary: Path
    metrics: dict[str, Any]
    train_cases: list[str]
    heldout_cases: list[str]


def _prepare(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise S3DError(f"{output}: exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise S3DError(f"{output}: folder is not empty; choose another with -o or pass --overwrite")
        if not (output / "demo.json").is_file():
            # --overwrite deletes, so only ever a folder an earlier demo wrote
            raise S3DError(f"{output}: not a folder `s3d demo` wrote (no demo.json); not deleting it")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def run_demo(output: str | Path = DEFAULT_OUTPUT, *, steps: int = DEFAULT_STEPS, device: str = "auto",
             amp: str | None = None, overwrite: bool = False, echo=print) -> DemoResult:  # noqa: ANN001
    """Fine-tune on the bundled scans, predict the held-out ones, score them; everything under `output`.

    Layout: `run/` (model + config, usable with `s3d predict -m`), `heldout/images`, `heldout/labels`,
    `predictions/` (one segmentation per held-out case, on its input grid) and
    `predictions/summary.{json,csv}`. `amp=None` picks bf16 on CPUs with native bf16, else the
    fine-tuning default.
    """
    from s3d.assets import demo_dataset
    from s3d.device import cpu_has_native_bf16, resolve_device
    from s3d.evaluate import evaluate_folders
    from s3d.files import read_json, write_json
    from s3d.predict import predict_folder
    from s3d.train.finetune import FinetuneConfig, finetune

    output = Path(output)
    _prepare(output, overwrite)
    write_json(output / "demo.json", {"steps": steps, "device": device, "status": "started"})
    dataset = demo_dataset()
    dev = resolve_device(device)
    if amp is None:
        # bf16 only where the CPU does it natively: emulated bf16 is slower than fp32
        amp = ("bf16" if cpu_has_native_bf16() else "off") if dev.type == "cpu" else "auto"

    echo(f"[1/3] fine-tuning resenc-s from scratch on the bundled hippocampus MRIs ({dataset.name}, "
         f"{steps} steps, {dev.type}{', bf16' if amp == 'bf16' else ''})")
    cfg = FinetuneConfig(arch="resenc-s", batch_size=2, steps=steps, val_every=0, val_fraction=VAL_FRACTION,
                         checkpoint_every=max(steps // 4, 1), device=device, amp=amp)
    run = finetune(dataset, output / "run", cfg, cache_dir=output / "cache")
    data = read_json(run / "config.json")["data"]
    train_cases, heldout = list(data["train_cases"]), list(data["val_cases"])
    if set(train_cases) & set(heldout):  # the split function guarantees it; the demo's claim depends on it
        raise S3DError("demo: training and held-out cases overlap")

    images, refs = output / "heldout" / "images", output / "heldout" / "labels"
    images.mkdir(parents=True)
    refs.mkdir(parents=True)
    for case in heldout:
        shutil.copy(dataset / "imagesTr" / f"{case}_0000.nii.gz", images)
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", refs)
    echo(f"[2/3] predicting the {len(heldout)} held-out cases on their original voxel grid (mirroring TTA)")
    predictions = output / "predictions"
    predict_folder(images, predictions, run, device=device)
    echo("[3/3] scoring against the reference labels")
    summary_path = predictions / "summary.json"
    summary = evaluate_folders(refs, predictions, read_json(run / "config.json").get("labels"),
                               output=summary_path)
    write_json(output / "demo.json", {"steps": steps, "device": device, "amp": amp, "status": "done",
                                      "train_cases": train_cases, "heldout_cases": heldout,
                                      "foreground_mean": summary["foreground_mean"]})
    shutil.rmtree(output / "cache", ignore_errors=True)  # preprocessed copies: 10 MB nobody needs afterwards
    return DemoResult(output=output, run=run, predictions=predictions, summary=summary_path, metrics=summary,
                      train_cases=train_cases, heldout_cases=heldout)
